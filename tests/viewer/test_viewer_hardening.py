"""The viewer under faults and hostile input, in process (Starlette's TestClient over the real app
and real slide files): a corrupt tile, names outside Latin-1 and with a newline, moved scores,
oversized route parameters, bad thresholds, foreign Host headers, paths on the wire, and the
security headers. The same checks through `milroi-serve view` and a browser:
test_viewer_access.py."""
from __future__ import annotations

import io
import shutil
from urllib.parse import quote, unquote

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient
from viewer_testing import CORRUPT, JAPANESE, NEWLINE, SCRIPTED

from viewer.app import create_app, header_safe
from viewer.tiles import TileSource


@pytest.fixture
def client(hostile):
    slides, out = hostile
    # base_url: the Host the app allows by default (loopback)
    with TestClient(create_app(out, [slides]), base_url="http://127.0.0.1") as client:
        yield client


def key_url(key: str) -> str:
    return quote(key, safe="")


# -- 1. a corrupt tile does not blind the viewer to the slide ---------------------------------


def test_a_corrupt_tile_leaves_the_rest_of_the_slide_readable(client):
    info = client.get(f"/api/slide/{CORRUPT}").json()
    assert info["slide_error"] == ""
    top = info["deepzoom"]["levels"] - 1
    damaged = client.get(f"/api/tile/{top}/0/0/{CORRUPT}")
    assert damaged.status_code == 200 and damaged.headers["content-type"] == "image/png"
    assert "corrupt.tif" in unquote(damaged.headers["x-milroi-error"])
    # Intact tiles, at full resolution and at every lower level, still decode (OpenSlide's
    # error state stuck to the handle: it is dropped and the slide reopened).
    for level, col, row in [(top, 4, 3), (top - 1, 1, 1), (top - 3, 0, 0), (1, 0, 0), (0, 0, 0)]:
        tile = client.get(f"/api/tile/{level}/{col}/{row}/{CORRUPT}")
        assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg", \
            (level, col, row, tile.headers.get("x-milroi-error"))
    assert client.get(f"/api/slide/{CORRUPT}").json()["slide_error"] == ""
    # The damaged tile stays an error tile (it is not cached as one, nor as a picture).
    again = client.get(f"/api/tile/{top}/0/0/{CORRUPT}")
    assert again.headers["content-type"] == "image/png" and again.headers["cache-control"] == "no-store"


def test_tile_source_reopens_a_handle_after_a_failed_read(hostile):
    slides, _ = hostile
    source = TileSource()
    path = slides / f"{CORRUPT}.tif"
    top = source.info(path).levels - 1
    assert source.tile(path, top, 0, 0).error
    assert source.reopened == 1
    assert not source.tile(path, top - 2, 0, 0).error
    assert source.probe(path) == ""


# -- 2. errors in headers and bodies: ASCII-safe, the browser's paths only ----------------------


def test_non_latin1_slide_name_gets_an_error_tile_not_a_500(client, hostile):
    slides, out = hostile
    response = client.get(f"/api/tile/0/0/0/{key_url(JAPANESE)}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    header = response.headers["x-milroi-error"]
    assert header.isascii() and "\n" not in header
    message = unquote(header)
    assert f"{JAPANESE}.svs" in message
    assert str(slides) not in message and str(slides.resolve()) not in message
    tile = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    assert tile.shape == (256, 256, 3)


def test_errors_name_files_as_the_browser_does(client, hostile):
    slides, out = hostile
    server_paths = {str(slides), str(slides.resolve()), str(out), str(out.resolve())}
    info = client.get(f"/api/slide/{key_url(SCRIPTED)}").json()
    assert f"{SCRIPTED}.svs" in info["slide_error"]
    pages = [client.get(f"/api/tile/0/0/0/{key_url(SCRIPTED)}").headers["x-milroi-error"],
             info["slide_error"], client.get("/api/slide/nope").text,
             client.get("/slide/nope").text, client.get("/api/scores/nope").text]
    for text in pages:
        assert not any(p in unquote(text) for p in server_paths), text
    # The slide list and the slide's row carry the failed slides' errors and the slide paths
    listing = client.get("/api/summary").text
    assert client.get("/api/summary").json()["scores_dir"] == out.name and ".svs" in listing
    assert not any(p in listing for p in server_paths), listing
    row = client.get(f"/api/slide/{key_url(SCRIPTED)}").json()["row"]
    assert row["path"] == f"{SCRIPTED}.svs" and f"{SCRIPTED}.svs" in row["error"]


def test_header_safe_is_ascii_and_round_trips():
    message = "cannot read スライド.svs:\nline two; 100% \"quoted\""
    header = header_safe(message)
    assert header.isascii() and "\n" not in header and "\r" not in header
    assert unquote(header) == message


# -- 3. slides found once per summary version -------------------------------------------------


def test_moved_scores_resolve_slides_once_per_summary_version(hostile, tmp_path, monkeypatch):
    """summary.csv's paths lie under no --slides folder (the scores and slides were copied):
    the slide folder, with many other files, is searched once, not on every request."""
    import wsi.discovery

    slides, out = hostile
    moved_slides, moved_out = tmp_path / "slides", tmp_path / "scores"
    shutil.copytree(slides, moved_slides)
    shutil.copytree(out, moved_out, symlinks=True)
    for i in range(300):
        (moved_slides / f"notes_{i}.txt").write_text("not a slide")
    probes = []
    detect = wsi.discovery._detected_format
    monkeypatch.setattr(wsi.discovery, "_detected_format",
                        lambda path: probes.append(path) or detect(path))
    app = create_app(moved_out, [moved_slides])
    with TestClient(app, base_url="http://127.0.0.1") as client:
        info = client.get("/api/slide/ok").json()
        assert info["slide_error"] == ""
        top = info["deepzoom"]["levels"] - 1
        for col in range(4):
            for row in range(3):
                assert client.get(f"/api/tile/{top}/{col}/{row}/ok").status_code == 200
        assert client.get(f"/api/tile/{top}/0/0/{key_url(NEWLINE)}").status_code == 200
        assert 300 <= len(probes) <= 310, len(probes)   # one search of the folder
        assert app.state.scores.summary_reads == 1
        # A new summary.csv (a job rewrote it) is read anew, and its slides found anew.
        summary = moved_out / "summary.csv"
        lines = summary.read_text().splitlines(keepends=True)
        summary.write_text("".join(line for line in lines if not line.startswith("ok,")))
        assert client.get(f"/api/tile/{top}/0/0/ok").status_code == 404
        assert app.state.scores.summary_reads == 2


# -- 5. route parameters are bounded; the threshold is a number in [0, 1] -----------------------


@pytest.mark.parametrize("route", [
    "/api/tile/{n}/0/0/ok", "/api/tile/0/{n}/0/ok", "/api/tile/0/0/{n}/ok"])
def test_huge_tile_indices_are_4xx(client, route):
    for digits in (10, 4301, 10_000):
        response = client.get(route.format(n="9" * digits))
        assert 400 <= response.status_code < 500, (digits, response.status_code)
    assert client.get("/api/summary").status_code == 200


def test_huge_slide_keys_are_4xx(client):
    for length in (300, 4000, 5000, 20_000):
        for route in ("/slide/", "/api/slide/", "/api/tile/0/0/0/", "/download/csv/"):
            response = client.get(route + "k" * length)
            assert 400 <= response.status_code < 500, (route, length, response.status_code)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "-1", "2", "1.0000001", "x", ""])
def test_heatmap_threshold_outside_0_1_is_400(client, value):
    response = client.get(f"/api/heatmap/ok?threshold={quote(value)}")
    assert response.status_code == 400 and "[0, 1]" in response.json()["error"]


def test_heatmap_threshold_bounds_are_accepted(client):
    for value in ("0", "1", "0.5"):
        response = client.get(f"/api/heatmap/ok?threshold={value}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"


# -- a slide name with a newline ------------------------------------------------------------------


def test_slide_with_a_newline_in_its_name_opens(client):
    rows = {row["slide"]: row for row in client.get("/api/summary").json()["rows"]}
    assert rows[NEWLINE]["status"] == "ok"
    assert client.get(f"/slide/{key_url(NEWLINE)}").status_code == 200
    info = client.get(f"/api/slide/{key_url(NEWLINE)}").json()
    assert info["slide_error"] == "" and info["deepzoom"]["width"] == 1536
    assert client.get(f"/api/scores/{key_url(NEWLINE)}").json()["score"]
    top = info["deepzoom"]["levels"] - 1
    assert client.get(f"/api/tile/{top}/0/0/{key_url(NEWLINE)}").headers["content-type"] == \
        "image/jpeg"
    assert client.get(f"/download/csv/{key_url(NEWLINE)}").status_code == 200


# -- 6. Host allowlist and response headers ---------------------------------------------------------


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8080", "127.0.0.1.nip.io",
                                  "localhost.attacker.example", "", "[::2]", "10.0.0.1"])
def test_foreign_host_headers_are_refused(client, host):
    for path in ("/", "/api/summary", "/api/slide/ok", "/static/slide.js"):
        response = client.get(path, headers={"host": host})
        assert response.status_code == 400, (host, path)
        assert "ok" not in response.text


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8080", "localhost:1", "LOCALHOST",
                                  "[::1]:8080"])
def test_loopback_host_headers_are_served(client, host):
    assert client.get("/api/summary", headers={"host": host}).status_code == 200


def test_allowed_hosts_are_configurable(hostile):
    slides, out = hostile
    app = create_app(out, [slides], allowed_hosts=["127.0.0.1", "viewer.lab"])
    with TestClient(app, base_url="http://viewer.lab") as client:
        assert client.get("/api/summary").status_code == 200
        assert client.get("/api/summary", headers={"host": "localhost"}).status_code == 400


def test_every_answer_carries_the_security_headers(client):
    for path in ("/", "/slide/ok", "/api/summary", "/api/slide/ok", "/api/scores/ok",
                 "/static/slide.js", "/static/openseadragon/openseadragon.min.js",
                 "/api/tile/0/0/0/ok", "/slide/nope", "/api/slide/..%2Fx", "/nowhere"):
        headers = client.get(path).headers
        assert headers["x-content-type-options"] == "nosniff", path
        csp = headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    refused = client.get("/", headers={"host": "attacker.example"}).headers
    assert refused["x-content-type-options"] == "nosniff"


def test_csp_allows_exactly_the_style_openseadragon_inserts():
    """The one inline style of the vendored OpenSeadragon, hashed as the CSP names it."""
    import base64
    import hashlib
    import re

    from viewer.access import CSP
    from viewer.app import STATIC

    script = (STATIC / "openseadragon" / "openseadragon.min.js").read_text()
    styles = re.findall(r'createElement\("style"\)[^;]*;[^;]*;\w+\.textContent="([^"]*)"', script)
    assert len(styles) == 1
    digest = base64.b64encode(hashlib.sha256(styles[0].encode()).digest()).decode()
    assert f"'sha256-{digest}'" in CSP


# -- path escapes on every route (the probe's forms), sent raw to `milroi-serve view` ----------

# Each as the request line carries it (no client-side normalisation of dot segments).
ESCAPES = ["..", "../x", "../../etc/passwd", "a/../../x", "./../x", "synth_tumor/../../x",
           "%2e%2e", "%2e%2e%2fx", "%2E%2E/x", "..%2f..%2fetc%2fpasswd", ".%2e/x", "%2e./x",
           "/etc/passwd", "%2fetc%2fpasswd", "//etc/passwd", "%2f%2fetc%2fpasswd", "%00",
           "synth_tumor%00", "..%00/x", "x/%2e%2e/%2e%2e/y", "%5c..%5cx", "..%5cx", "....//x",
           "%252e%252e/x", "..;/x", "~root", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "leak",
           "leak/x_patches"]
ESCAPE_ROUTES = ["/slide/", "/api/slide/", "/api/scores/", "/api/heatmap/", "/api/tile/0/0/0/",
                 "/api/live/", "/download/csv/", "/download/geojson/"]


def raw_get(url: str, target: str) -> tuple[int, bytes]:
    import http.client
    from urllib.parse import urlsplit

    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        connection.putrequest("GET", target, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_path_escapes_on_every_route_are_refused(viewer, scored):
    outside = str(scored.slides.parent / "outside")
    assert len(ESCAPES) == 29
    for route in ESCAPE_ROUTES:
        for form in ESCAPES:
            status, body = raw_get(viewer.url, route + form)
            assert status in (400, 403, 404), (route + form, status, body[:200])
            assert outside.encode() not in body and b"secret" not in body, route + form
            decoded = unquote(form)
            if ".." in decoded.split("/") or decoded.startswith("/") or "\x00" in decoded:
                assert status == 403, (route + form, status, body[:200])
    # A slide file linked from outside --slides (its scores lie in SCORES_DIR and may be read).
    for route in ("/api/slide/", "/api/tile/0/0/0/", "/api/live/", "/api/heatmap/"):
        assert raw_get(viewer.url, route + "escape")[0] == 403, route
    assert raw_get(viewer.url, "/api/summary")[0] == 200
