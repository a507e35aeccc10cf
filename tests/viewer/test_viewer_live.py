"""Live scoring in headless Chromium: the page's score button -> the viewer (gRPC client) ->
a real `milroi-serve serve` -> server-sent events -> tiles painted as they arrive."""
from __future__ import annotations

import contextlib
import signal
import time

import pytest
from viewer_testing import metric, open_slide_page, read_csv_rows

LIVE_LOG = "window.milroi.liveLog"
pytestmark = pytest.mark.slow   # a gRPC server of its own


def test_live_score_paints_tiles_before_the_summary(page, live_viewer, scored, tmp_path):
    open_slide_page(page, live_viewer)
    assert page.locator("#live").is_visible()
    page.click("#score")
    page.wait_for_function(f"() => {LIVE_LOG}.some(e => e.kind === 'tiles' && e.nonblank)",
                           timeout=60_000)
    page.screenshot(path=str(tmp_path / "live_first_tiles.png"))
    page.wait_for_function(f"() => {LIVE_LOG}.some(e => !['header', 'tiles'].includes(e.kind))",
                           timeout=120_000)
    page.screenshot(path=str(tmp_path / "live_done.png"))
    log = page.evaluate(LIVE_LOG)
    kinds = [e["kind"] for e in log]
    assert kinds[0] == "header" and kinds[-1] == "summary", kinds
    tiles = [e for e in log if e["kind"] == "tiles"]
    # Several chunks (--chunk-size 2), each painted before the summary arrived.
    assert len(tiles) >= 3 and tiles[0]["nonblank"] > 0
    assert tiles[0]["t"] < log[-1]["t"]
    assert [e["painted"] for e in tiles] == sorted(e["painted"] for e in tiles)
    # The same tiles and ROIs as the batch job scored (same bundle, same slide).
    csv_rows = read_csv_rows(scored)
    assert tiles[-1]["painted"] == len(csv_rows)
    expected_rois = len(page.evaluate("window.milroi.state.info.rois"))
    assert page.locator("#rois li").count() == expected_rois
    assert "done" in page.locator("#live-status").inner_text()
    print(f"live: first painted tile {tiles[0]['t']:.0f} ms after the click, "
          f"summary at {log[-1]['t']:.0f} ms")


@contextlib.contextmanager
def server_paused(server):
    """The gRPC server process stopped (SIGSTOP) until the block ends: a stream that has sent its
    header cannot finish while the page cancels it, however fast this machine scores."""
    server.process.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.process.proc.send_signal(signal.SIGCONT)


def wait_for_count(read, before: float, what: str) -> None:
    """Until the server has counted the ending (its handler's `finally`); the deadline only bounds
    a broken run."""
    deadline = time.monotonic() + 120
    while read() <= before:
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_cancel_stops_the_stream_on_the_server(page, live_viewer, grpc_server, tmp_path):
    def cancelled():
        return metric(grpc_server.metrics_url, "milroi_requests_total", method="ScoreSlide",
                      code="CANCELLED")

    before = cancelled()
    open_slide_page(page, live_viewer)
    page.click("#score")
    page.wait_for_function(f"() => {LIVE_LOG}.some(e => e.kind === 'header')", timeout=60_000)
    with server_paused(grpc_server):
        page.click("#cancel")
        page.wait_for_function(f"() => {LIVE_LOG}.some(e => e.kind === 'cancelled')")
    page.screenshot(path=str(tmp_path / "live_cancelled.png"))
    assert "cancelled" in page.locator("#live-status").inner_text()
    # The server counts the call as CANCELLED (its work on the slide stopped), not OK.
    wait_for_count(cancelled, before, "the server never saw the cancel")
    log = page.evaluate(LIVE_LOG)
    assert not any(e["kind"] == "summary" for e in log)


def test_closing_the_page_cancels_the_stream_on_the_server(browser, live_viewer, grpc_server):
    """No cancel button: the tab is closed mid-stream, the viewer sees the connection close
    and cancels the gRPC call."""
    def cancelled():
        return metric(grpc_server.metrics_url, "milroi_requests_total", method="ScoreSlide",
                      code="CANCELLED")

    before = cancelled()
    page = browser.new_page()
    open_slide_page(page, live_viewer)
    page.click("#score")
    page.wait_for_function(f"() => {LIVE_LOG}.some(e => e.kind === 'header')", timeout=60_000)
    with server_paused(grpc_server):
        page.close()
        # The viewer notices the closed connection and cancels its call (this server is
        # stopped: the cancel waits in its socket until it runs again).
        live = live_viewer.process
        deadline = time.monotonic() + 120
        while "the page went away, cancelling" not in live.log():
            assert time.monotonic() < deadline, "the viewer never noticed the page leave"
            time.sleep(0.1)
    wait_for_count(cancelled, before, "the server kept scoring for a page that left")
