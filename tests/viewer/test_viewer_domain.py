"""The domain check in the viewer (core.domain): the list's domain column, the slide page's
banner over a slide unlike the training slides (from summary.csv and from live scoring), the
tiles' domain distances in the hover. On `domain_scored`: the tumour slide out of domain, the
blank slide in, the failed one unknown."""
from __future__ import annotations

import json
import math

import numpy as np
from viewer_testing import DOMAIN_REASONS, SLIDE, http_get, open_slide_page, screen_point

from results.outputs import TileScores
from viewer.results import scores_json


def test_scores_json_has_the_known_domain_distances():
    def encoded(distance):
        table = TileScores(np.zeros((3, 2), np.int64), np.zeros(3, np.float32),
                           np.zeros(3, np.uint8), 224, distance)
        return json.loads(scores_json(table))

    assert encoded(np.array([math.nan, 1.23456, 0.5], np.float32))["domain_distance"] == \
        [None, 1.235, 0.5]
    # A folder from before the check, or a model without a description: no array of nulls.
    assert "domain_distance" not in encoded(None)
    assert "domain_distance" not in encoded(np.full(3, math.nan, np.float32))


def test_summary_rows_carry_the_domain_check(domain_viewer):
    status, body, _ = http_get(f"{domain_viewer.url}/api/summary")
    rows = {r["slide"]: r for r in json.loads(body)["rows"]}
    assert status == 200
    assert (rows[SLIDE]["in_domain"], rows[SLIDE]["domain_reasons"]) == ("0", "; ".join(DOMAIN_REASONS))
    assert (rows["blank"]["in_domain"], rows["blank"]["domain_score"]) == ("1", "0.42")
    assert rows["broken"]["in_domain"] == ""
    row = json.loads(http_get(f"{domain_viewer.url}/api/slide/{SLIDE}")[1])["row"]
    assert row["in_domain"] == "0" and row["domain_reasons"] == rows[SLIDE]["domain_reasons"]


def test_list_shows_the_domain_column(page, domain_viewer, tmp_path):
    page.goto(domain_viewer.url)
    page.wait_for_selector("body[data-ready='1']")
    page.screenshot(path=str(tmp_path / "list.png"))
    headers = page.eval_on_selector_all("#slides th", "h => h.map(e => e.dataset.col)")
    column = headers.index("in_domain") + 1   # nth-child counts from 1
    assert headers[column - 2] == "decision"
    cells = page.eval_on_selector_all(f"#slides tbody tr td:nth-child({column})", """cells =>
        cells.map(c => [c.parentElement.dataset.slide, c.textContent, c.title, c.className,
                        getComputedStyle(c).backgroundColor])""")
    by_slide = {slide: (text, title, cls, colour) for slide, text, title, cls, colour in cells}
    out, inside = by_slide[SLIDE], by_slide["blank"]
    assert out[:3] == ("out", "; ".join(DOMAIN_REASONS), "out-of-domain")
    assert inside[:3] == ("in", "domain score 0.420", "")
    assert by_slide["broken"][0] == ""
    assert out[3] != inside[3], "an out-of-domain cell must stand out"
    # The columns after it keep their places: the model version is still under its header.
    version = page.eval_on_selector(f"tr[data-slide='{SLIDE}'] td.version", "c => c.cellIndex")
    assert headers[version] == "model_version"
    # Sortable as the others: ascending puts "0" (out) before "1" (in).
    page.click("th[data-col=in_domain]")
    order = page.eval_on_selector_all("#slides tbody tr", "r => r.map(e => e.dataset.slide)")
    assert order.index(SLIDE) < order.index("blank")


def banner(page) -> tuple[bool, list[str]]:
    return (page.locator("#domain-banner").is_visible(),
            page.eval_on_selector_all("#domain-reasons li", "li => li.map(e => e.textContent)"))


def test_out_of_domain_slide_has_a_banner_and_hover_distances(page, domain_viewer, domain_scored,
                                                               tmp_path):
    from results.layout import OUTPUT_SUFFIXES
    from results.outputs import read_tile_scores

    open_slide_page(page, domain_viewer)
    page.screenshot(path=str(tmp_path / "out_of_domain.png"))
    assert banner(page) == (True, list(DOMAIN_REASONS))   # the markup as text, never run
    assert "Out of domain" in page.locator("#domain-banner").inner_text()
    assert page.evaluate("window.pwned") is None
    table = read_tile_scores(domain_scored.out / SLIDE / f"{SLIDE}{OUTPUT_SUFFIXES['scores']}")
    size = table.tile_size
    # viewer_testing.TILE_DISTANCES: unknown (no domain text), out, in
    for (x, y), expected in zip(table.coords[:3].tolist(), ["", ", domain 1.50 (out)",
                                                            ", domain 0.25 (in)"]):
        page.mouse.move(*screen_point(page, x + size / 2, y + size / 2))
        page.wait_for_function(f"() => document.getElementById('hover').dataset.x === '{x}'"
                               f" && document.getElementById('hover').dataset.y === '{y}'")
        text = page.locator("#hover").inner_text()
        assert text.endswith(expected) and (expected or "domain" not in text), text


def test_in_domain_and_unknown_slides_have_no_banner(page, domain_viewer):
    for key in ("blank", "broken"):   # in domain; failed, the model could not tell
        page.goto(f"{domain_viewer.url}/slide/{key}")
        page.wait_for_selector("body[data-ready='1']")
        assert banner(page) == (False, []), key


def test_live_summary_sets_the_banner(page, domain_viewer):
    """The page's live-scoring path, fed summaries (SlideSummary.to_dict()) by a stand-in for
    /api/live: the live verdict replaces the stored one, either way."""
    summary = {"label": "tumor", "slide_score": 0.9, "tile_count": 3, "rois": [],
               "timings": {"total_s": 1.0}, "decision": None}
    domain = {}
    page.route(f"**/api/live/{SLIDE}", lambda route: route.fulfill(
        status=200, content_type="text/event-stream",
        body=f"event: summary\ndata: {json.dumps({**summary, 'domain': domain})}\n\n"))
    open_slide_page(page, domain_viewer)
    for in_domain, reasons, shown in [(True, [], False), (False, ["features: 40% <b>x</b>"], True),
                                      (None, ["no description"], False)]:
        domain.update(in_domain=in_domain, domain_score=None, reasons=reasons, criteria={})
        page.evaluate("window.milroi.liveLog = []; document.getElementById('score').click()")
        page.wait_for_function("() => window.milroi.liveLog.some(e => e.kind === 'summary')")
        assert banner(page) == (shown, reasons if shown else []), in_domain
