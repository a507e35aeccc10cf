"""Fixtures of the viewer tests, shared by the whole folder (built once per session):

- `slides`: a slide folder (wsi.synth tumour slide, the corrupt tests/data/broken.svs, a symlink
  leading out of the folder);
- `scored`: the folder scored by `milroi-serve score` with the seeded test bundle;
- `grpc_server`: `milroi-serve serve` on that folder with the same bundle (and its Prometheus
  port), for live scoring;
- `hostile`: a folder of hostile names and damage (a non-Latin-1 name, a newline, markup, a
  zeroed level-0 tile), scored;
- `viewer`: `milroi-serve view` on the scores; `live_viewer`: the same with `--server`;
- `domain_scored`: a copy of the scores with a domain check written in (the test bundle has no
  description of its training data): the tumour slide out of domain, the blank one in, and
  per-tile domain distances; `domain_viewer`: `milroi-serve view` on it;
- `browser`: Debian's chromium (installed by scripts/install_chromium.sh when absent), headless,
  driven by Playwright's Python package with executable_path (no `playwright install`), in a
  fresh user-data-dir; `page` is a new tab per test.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import viewer_testing as vt
from server_testing import free_port, wait_serving
from viewer_testing import CORRUPT, JAPANESE, NEWLINE, SCRIPTED

ROI_THRESHOLD = 0.5


@dataclass(frozen=True)
class Scored:
    slides: Path
    out: Path


@dataclass(frozen=True)
class Running:
    url: str
    process: vt.Process
    metrics_url: str = ""


@pytest.fixture(scope="session")
def slides(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("viewer")
    return vt.make_slides(base / "slides", base / "outside")


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    from bundle_testing import export_test_bundle

    return export_test_bundle(tmp_path_factory.mktemp("bundle") / "chowder", "viewer-test")


@pytest.fixture(scope="session")
def scored(slides, bundle, tmp_path_factory) -> Scored:
    """SCORES_DIR of `milroi-serve score` over the slide folder (broken.svs fails), plus a
    symlink in it that leads out of it."""
    out = tmp_path_factory.mktemp("scores")
    assert vt.score_folder(slides, bundle, out, ROI_THRESHOLD) == 1
    outside = tmp_path_factory.mktemp("outside_scores")
    (outside / "x_patches.csv").write_text("x,y,size,score,artefact\n")
    (out / "leak").symlink_to(outside, target_is_directory=True)
    return Scored(slides, out)


def zero_level0_tile(path: Path, index: int = 0) -> None:
    """Zero the compressed bytes of level-0 tile `index` of a pyramidal TIFF, in place."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[index]
        count = tif.pages[0].databytecounts[index]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(count))


@pytest.fixture(scope="session")
def hostile(bundle, tmp_path_factory) -> tuple[Path, Path]:
    """A slide folder of hostile names, scored by `milroi-serve score`."""
    from wsi.synth import write_synthetic_slide

    base = tmp_path_factory.mktemp("hostile")
    slides = base / "slides"
    slides.mkdir()
    write_synthetic_slide(slides / "ok.tif", 1536, 1024, seed=11, tumor=True)
    shutil.copy(slides / "ok.tif", slides / f"{NEWLINE}.tif")
    shutil.copy(slides / "ok.tif", slides / f"{CORRUPT}.tif")
    zero_level0_tile(slides / f"{CORRUPT}.tif")
    shutil.copy(vt.DATA / "broken.svs", slides / f"{JAPANESE}.svs")
    shutil.copy(vt.DATA / "broken.svs", slides / f"{SCRIPTED}.svs")
    out = base / "scores"
    failed = vt.score_folder(slides, bundle, out, 0.5)
    assert failed == 1   # exit status: some slides failed (the two copies of broken.svs)
    return slides, out


@pytest.fixture(scope="session")
def grpc_server(slides, bundle, tmp_path_factory) -> Running:
    """The server of live scoring; --batch-size 4 so that a small slide streams in several model
    runs, as a big one does."""
    port, metrics_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("grpc") / "server.log"
    process = vt.Process(["serve", "--model", str(bundle), "--slide-root", str(slides),
                          "--port", str(port), "--metrics-port", str(metrics_port),
                          "--provider", "cpu", "--batch-size", "4", "--grace", "1"], log)
    try:
        wait_serving(f"127.0.0.1:{port}", process.proc, log)
        yield Running(f"127.0.0.1:{port}", process, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        process.stop()


def _start_viewer(scored: Scored, tmp_path_factory, *extra: str):
    port = free_port()
    log = tmp_path_factory.mktemp("view") / "viewer.log"
    process = vt.Process(["view", str(scored.out), "--slides", str(scored.slides),
                          "--port", str(port), *extra], log)
    url = f"http://127.0.0.1:{port}"
    try:
        vt.wait_http(f"{url}/api/summary", process)
        yield Running(url, process)
    finally:
        process.stop()


@pytest.fixture(scope="session")
def domain_scored(scored, tmp_path_factory) -> Scored:
    """`scored` copied, its summary rows and the tumour slide's tile table given a domain check
    (editing the copy, not scoring again: scoring is slow)."""
    import numpy as np

    from results.layout import OUTPUT_SUFFIXES, read_summary, write_summary
    from results.outputs import read_tile_scores, write_tile_scores

    out = tmp_path_factory.mktemp("domain") / "scores"
    shutil.copytree(scored.out, out, symlinks=True)
    checks = {vt.SLIDE: {"in_domain": "0", "domain_score": "3.2",
                         "domain_reasons": "; ".join(vt.DOMAIN_REASONS)},
              "blank": {"in_domain": "1", "domain_score": "0.42", "domain_reasons": ""}}
    write_summary(out, [{**row, **checks.get(row["slide"], {})} for row in read_summary(out)])
    path = out / vt.SLIDE / f"{vt.SLIDE}{OUTPUT_SUFFIXES['scores']}"
    table = read_tile_scores(path)
    write_tile_scores(path, table.coords, table.scores, table.tile_size, table.flags,
                      np.resize(vt.TILE_DISTANCES, len(table)))
    return Scored(scored.slides, out)


@pytest.fixture(scope="session")
def domain_viewer(domain_scored, tmp_path_factory) -> Running:
    yield from _start_viewer(domain_scored, tmp_path_factory)


@pytest.fixture(scope="session")
def viewer(scored, tmp_path_factory) -> Running:
    """`milroi-serve view` without a server (no live scoring)."""
    yield from _start_viewer(scored, tmp_path_factory)


@pytest.fixture(scope="session")
def live_viewer(scored, grpc_server, tmp_path_factory) -> Running:
    """`milroi-serve view --server`: live scoring in chunks of 2 patches."""
    yield from _start_viewer(scored, tmp_path_factory, "--server", grpc_server.url,
                             "--chunk-size", "2")


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    executable = vt.ensure_chromium()
    profile = tmp_path_factory.mktemp("chromium-profile")   # a fresh --user-data-dir
    with sync_playwright() as playwright:
        # launch_persistent_context is Playwright's way of passing --user-data-dir.
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(executable), headless=True,
            args=vt.CHROMIUM_FLAGS, viewport={"width": 1280, "height": 800})
        yield context
        context.close()


# Every page records what its Content-Security-Policy blocked: the viewer's pages must work under
# their own policy (OpenSeadragon included), so a blocked script, style or image fails the test.
CSP_LOG = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation",
    e => window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`));
"""


@pytest.fixture
def page(browser):
    page = browser.new_page()
    page.add_init_script(CSP_LOG)
    errors, blocked = [], []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: blocked.append(msg.text)
            if "Content Security Policy" in msg.text else None)
    yield page
    if not page.is_closed() and page.url.startswith("http"):
        blocked.extend(page.evaluate("() => window.__cspViolations || []"))
    page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not blocked, f"the page's Content-Security-Policy blocked: {blocked}"
