"""`milroi-serve view` in headless Chromium: the slide list, the slide page (OpenSeadragon tiles,
heatmap, ROIs, hover, downloads) of a scored synthetic slide, and the confinement of paths."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from viewer_testing import SLIDE, http_get, open_slide_page, read_csv_rows, screen_point

from viewer.app import DEFAULT_HOST, configure_parser


def shot(page, path, clip=None) -> np.ndarray:
    page.screenshot(path=str(path), clip=clip)
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_slide_list_sorts_filters_and_shows_errors(page, viewer, scored, tmp_path):
    page.goto(viewer.url)
    page.wait_for_selector("body[data-ready='1']")
    page.screenshot(path=str(tmp_path / "list.png"))
    slides = page.eval_on_selector_all("#slides tbody tr", "rows => rows.map(r => r.dataset.slide)")
    assert slides == ["blank", "broken", "escape", SLIDE]
    failed = page.locator("tr.failed")
    assert failed.count() == 1 and "broken.svs" in failed.locator("td.error").inner_text()
    # Sorted by score, highest first (a second click), and filtered by status and label.
    page.click("th[data-col=score]")
    page.click("th[data-col=score]")
    scores = page.eval_on_selector_all("#slides tbody tr td:nth-child(4)", "c => c.map(e => e.textContent)")
    numbers = [float(s) for s in scores if s]
    assert numbers == sorted(numbers, reverse=True) and scores[-1] == ""
    page.select_option("#filter-status", "failed")
    assert page.eval_on_selector_all("#slides tbody tr", "r => r.map(e => e.dataset.slide)") == ["broken"]
    page.select_option("#filter-status", "")
    page.select_option("#filter-label", "normal")
    shown = page.eval_on_selector_all("#slides tbody tr td:nth-child(3)", "c => c.map(e => e.textContent)")
    assert shown and set(shown) == {"normal"}
    page.click(f"#slides a:text-is('{SLIDE}')")
    page.wait_for_url(f"**/slide/{SLIDE}")


def test_openseadragon_draws_slide_pixels_from_local_assets(page, viewer, tmp_path):
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    open_slide_page(page, viewer)
    page.screenshot(path=str(tmp_path / "slide.png"))
    # OpenSeadragon's own canvas (no overlay on it): the slide's pixels, not a blank view.
    data_url = page.evaluate("window.milroi.state.viewer.drawer.canvas.toDataURL('image/png')")
    canvas = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")
    canvas.save(tmp_path / "osd_canvas.png")
    pixels = np.asarray(canvas, np.int16).reshape(-1, 3)
    assert pixels.std(0).max() > 20, "a uniform canvas: no slide drawn"
    red, green, blue = pixels.T
    stained = (red - green > 30) & (blue - green > 20)   # H&E: pink and purple
    assert stained.mean() > 0.05, f"only {stained.mean():.3f} of the view is stained tissue"
    assert all(u.startswith(viewer.url) or u.startswith("data:") for u in requests), \
        [u for u in requests if not u.startswith(viewer.url)]
    assert any("/static/openseadragon/openseadragon.min.js" in u for u in requests)
    assert any("/api/tile/" in u for u in requests)


def test_heatmap_opacity_changes_pixels_under_an_roi(page, viewer, scored, tmp_path):
    from matplotlib import colormaps

    open_slide_page(page, viewer)
    rois = json.loads((scored.out / SLIDE / f"{SLIDE}_spatiopath.json").read_text())["polygons"]
    assert rois, "the test slide must have an ROI"
    # A tile of the first ROI: the highest-scored clean tile whose centre lies inside it.
    from shapely.geometry import Point, Polygon

    roi = Polygon(list(zip(rois[0]["x"], rois[0]["y"])))
    rows = [r for r in read_csv_rows(scored) if not r["artefact"]]
    size = int(rows[0]["size"])
    inside = [r for r in rows if roi.contains(Point(int(r["x"]) + size / 2, int(r["y"]) + size / 2))]
    tile = max(inside, key=lambda r: float(r["score"]))
    cx, cy = screen_point(page, int(tile["x"]) + size / 2, int(tile["y"]) + size / 2)
    clip = {"x": cx - 3, "y": cy - 3, "width": 6, "height": 6}

    def at_opacity(value):
        page.eval_on_selector("#opacity", "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }",
                              str(value))
        page.wait_for_timeout(100)
        return shot(page, tmp_path / f"opacity_{value}.png", clip).reshape(-1, 3).mean(0)

    bare, full, half = at_opacity(0), at_opacity(1), at_opacity(0.5)
    page.screenshot(path=str(tmp_path / "slide_opacity_half.png"))
    assert np.abs(full - bare).max() > 40, (bare, full)
    # Fully opaque, the pixel is the colour map's colour of the tile's CSV score.
    expected = np.array(colormaps["jet"](float(tile["score"]), bytes=True)[:3], np.int16)
    assert np.abs(full - expected).max() <= 12, (full, expected)
    assert np.abs(half - (bare + expected) / 2).max() <= 20, (half, bare, expected)


def test_hover_shows_the_csv_score_of_the_tile(page, viewer, scored):
    open_slide_page(page, viewer)
    rows = read_csv_rows(scored)
    size = int(rows[0]["size"])
    for row in [rows[0], rows[len(rows) // 2], rows[-1]]:
        x, y = screen_point(page, int(row["x"]) + size / 2, int(row["y"]) + size / 2)
        page.mouse.move(x, y)
        page.wait_for_function(f"() => document.getElementById('hover').dataset.x === '{row['x']}'"
                               f" && document.getElementById('hover').dataset.y === '{row['y']}'")
        hover = page.locator("#hover")
        assert hover.get_attribute("data-score") == row["score"]
        assert f"score {row['score']}" in hover.inner_text()


def test_threshold_hides_tiles_and_roi_list_zooms(page, viewer, scored):
    open_slide_page(page, viewer)
    scores = np.array([float(r["score"]) for r in read_csv_rows(scored) if not r["artefact"]])
    threshold = float(np.median(scores))
    status, body, _ = http_get(f"{viewer.url}/api/heatmap/{SLIDE}?threshold={threshold}")
    alpha = np.asarray(Image.open(io.BytesIO(body)))[..., 3]
    assert status == 200 and (alpha > 0).sum() == (scores >= threshold).sum() < len(scores)
    # The slider reloads the page's heatmap at its value.
    page.eval_on_selector("#threshold", "e => { e.value = 0.9; e.dispatchEvent(new Event('change')); }")
    page.wait_for_function("() => document.getElementById('heatmap').dataset.loaded === '0.9'")
    # Clicking an ROI in the side list fits the view to it.
    before = page.evaluate("window.milroi.state.viewer.viewport.getZoom(true)")
    page.click("#rois li[data-roi='1'] a")
    page.wait_for_timeout(1500)   # the zoom animation
    bounds = page.evaluate("""() => { const v = window.milroi.state.viewer;
        const r = v.viewport.viewportToImageRectangle(v.viewport.getBounds(true));
        return [r.x, r.y, r.x + r.width, r.y + r.height]; }""")
    polygon = json.loads((scored.out / SLIDE / f"{SLIDE}_spatiopath.json").read_text())["polygons"][0]
    assert bounds[0] <= min(polygon["x"]) and bounds[2] >= max(polygon["x"])
    assert bounds[1] <= min(polygon["y"]) and bounds[3] >= max(polygon["y"])
    assert page.evaluate("window.milroi.state.viewer.viewport.getZoom(true)") != before


def test_downloads_are_the_slide_outputs(page, viewer, scored):
    open_slide_page(page, viewer)
    assert not page.locator("#live").is_visible()   # no --server: no live scoring
    assert http_get(f"{viewer.url}/api/live/{SLIDE}")[0] == 409
    links = page.eval_on_selector_all("#downloads a", "a => a.map(e => e.getAttribute('href'))")
    assert sorted(links) == sorted(f"/download/{k}/{SLIDE}" for k in ("csv", "geojson", "spatiopath"))
    for link, name in zip(sorted(links), [f"{SLIDE}_patches.csv", f"{SLIDE}.geojson",
                                          f"{SLIDE}_spatiopath.json"]):
        status, body, headers = http_get(viewer.url + link)
        assert status == 200 and body == (scored.out / SLIDE / name).read_bytes()
        assert name in headers["content-disposition"]


def test_corrupt_slide_gives_an_error_tile_and_a_message(page, viewer, tmp_path):
    page.goto(f"{viewer.url}/slide/broken")
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_function("() => window.milroi.state.viewer.world.getItemAt(0).getFullyLoaded()")
    page.screenshot(path=str(tmp_path / "broken.png"))
    message = page.locator("#message")
    assert message.is_visible() and "broken.svs" in message.inner_text()
    # The view shows the error tile (grey with a red cross), not an empty frame.
    data_url = page.evaluate("window.milroi.state.viewer.drawer.canvas.toDataURL('image/png')")
    canvas = np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))
    red = (canvas[..., 0] > 150) & (canvas[..., 1] < 90) & (canvas[..., 2] < 90)
    assert red.sum() > 100, "no error tile drawn"
    status, body, headers = http_get(f"{viewer.url}/api/tile/0/0/0/broken")
    assert status == 200 and headers["content-type"] == "image/png"
    assert "broken.svs" in headers["x-milroi-error"]
    tile = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    assert tile.shape == (256, 256, 3) and tile.std() > 10   # the drawn cross and text
    # The viewer is still serving.
    assert http_get(f"{viewer.url}/api/summary")[0] == 200


@pytest.mark.parametrize("path", [
    "/slide/..%2F..%2Fetc%2Fpasswd",                    # ..
    "/slide/%2Fetc%2Fpasswd",                            # absolute
    "/api/tile/0/0/0/..%2Fscores",
    "/api/scores/%2e%2e/x",
    "/download/csv/%2Ftmp%2Fx",
    "/api/tile/0/0/0/escape",                            # a symlink out of --slides
    "/api/slide/escape",
    "/api/scores/leak",                                  # a symlink out of SCORES_DIR
    "/slide/leak",
])
def test_path_escapes_are_403(viewer, path):
    status, body, _ = http_get(viewer.url + path)
    assert status == 403, (path, status, body[:300])


def test_slide_without_tissue_opens(page, viewer, tmp_path):
    page.goto(f"{viewer.url}/slide/blank")
    page.wait_for_selector("body[data-ready='1']")
    page.screenshot(path=str(tmp_path / "blank.png"))
    assert "no_tissue" in page.locator("#verdict").inner_text()
    assert page.locator("#rois li").count() == 0 and not page.locator("#message").is_visible()


def test_unknown_slide_is_a_404_page(page, viewer):
    response = page.goto(f"{viewer.url}/slide/no_such_slide")
    assert response.status == 404
    assert "no_such_slide" in page.locator(".error").inner_text()
    assert http_get(f"{viewer.url}/api/tile/0/0/0/no_such_slide")[0] == 404


def test_binds_loopback_by_default():
    import argparse

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["scores", "--slides", "a", "--slides", "b"])
    assert DEFAULT_HOST == "127.0.0.1" and args.host == DEFAULT_HOST and args.port == 8080
    assert [str(p) for p in args.slides] == ["a", "b"]
