"""`milroi-serve view --token-file --allowed-host` as a user runs it, over the hostile folder:
raw HTTP for the Host check and the token exchange, headless Chromium for the cookie flow, the
pages under their Content-Security-Policy, and slide names that look like markup."""
from __future__ import annotations

import http.client
import re
import time
from urllib.parse import quote, urlsplit

import pytest
import viewer_testing as vt
from conftest import Running
from server_testing import free_port
from viewer_testing import SCRIPTED

TOKEN = "tok-3f9a1c0e-viewer"
pytestmark = pytest.mark.slow   # a viewer process of its own


@pytest.fixture(scope="module")
def token_viewer(hostile, tmp_path_factory):
    slides, out = hostile
    folder = tmp_path_factory.mktemp("token_viewer")
    (folder / "token").write_text(f"  {TOKEN}\n")
    port = free_port()
    process = vt.Process(["view", str(out), "--slides", str(slides), "--port", str(port),
                          "--token-file", str(folder / "token"), "--allowed-host", "viewer.lab"],
                         folder / "viewer.log")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while request(url, "/api/summary")[0] != 401:   # up, and refusing without the token
            assert process.proc.poll() is None and time.monotonic() < deadline, process.log()
            time.sleep(0.1)
        yield Running(url, process)
    finally:
        process.stop()


def request(url: str, target: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers with lower-case names, body); no redirect followed; (0, {}, b"") when
    nothing listens yet."""
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        connection.request("GET", target, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    except ConnectionRefusedError:
        return 0, {}, b""
    finally:
        connection.close()


def test_the_printed_url_carries_the_token(token_viewer):
    assert f"?token={TOKEN}" in token_viewer.process.log()


def test_requests_without_the_token_are_refused(token_viewer):
    for target in ("/", "/slide/ok", "/api/summary", "/api/slide/ok", "/api/tile/0/0/0/ok",
                   "/download/csv/ok", "/static/slide.js"):
        status, headers, body = request(token_viewer.url, target)
        assert status == 401, target
        assert b"ok.tif" not in body and headers["x-content-type-options"] == "nosniff"
    for wrong in ("x", TOKEN[:-1], TOKEN + "x", TOKEN.upper(), ""):
        assert request(token_viewer.url, f"/?token={quote(wrong)}")[0] == 401, wrong
    for header in (f"Basic {TOKEN}", TOKEN, "Bearer wrong", f"Bearer {TOKEN}x"):
        assert request(token_viewer.url, "/api/summary", {"Authorization": header})[0] == 401
    assert request(token_viewer.url, "/api/summary", {"Cookie": "milroi_viewer=forged"})[0] == 401


def test_the_token_is_exchanged_for_a_cookie(token_viewer):
    status, headers, _ = request(token_viewer.url, f"/slide/ok?token={TOKEN}&x=1")
    assert status == 303 and headers["location"] == "/slide/ok?x=1"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert TOKEN not in cookie
    value = re.match(r"milroi_viewer=([^;]+)", cookie).group(1)
    status, _, body = request(token_viewer.url, "/api/summary", {"Cookie": f"milroi_viewer={value}"})
    assert status == 200 and b'"ok"' in body
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert request(token_viewer.url, "/api/summary", bearer)[0] == 200


def test_only_allowed_host_names_are_answered(token_viewer):
    port = urlsplit(token_viewer.url).port
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for host in ("attacker.example", f"attacker.example:{port}", "viewer.lab.attacker.example"):
        status, _, body = request(token_viewer.url, "/api/summary", {**bearer, "Host": host})
        assert status == 400 and b"ok" not in body, host
    for host in (f"viewer.lab:{port}", f"localhost:{port}", f"127.0.0.1:{port}"):
        assert request(token_viewer.url, "/api/summary", {**bearer, "Host": host})[0] == 200


def test_browser_signs_in_with_the_printed_url_and_no_markup_runs(page, token_viewer, tmp_path):
    """The printed URL, once: the cookie carries every later page, API call and tile. A slide
    named like markup shows as text, and nothing in it runs (the page fixture fails the test on
    any CSP violation, such as a blocked inline handler)."""
    page.goto(f"{token_viewer.url}/?token={TOKEN}")
    assert "token" not in page.url
    page.wait_for_selector("body[data-ready='1']")
    page.screenshot(path=str(tmp_path / "token_list.png"))
    names = page.eval_on_selector_all("#slides tbody tr", "rows => rows.map(r => r.dataset.slide)")
    assert SCRIPTED in names and "ok" in names
    assert page.evaluate("() => window.pwned") is None
    assert page.locator("#slides img").count() == 0
    vt.open_slide_page(page, token_viewer, key="ok")
    page.screenshot(path=str(tmp_path / "token_slide.png"))
    page.goto(f"{token_viewer.url}/slide/{quote(SCRIPTED, safe='')}")
    page.wait_for_selector("body[data-ready='1']")
    assert SCRIPTED in page.locator("#title").inner_text()
    assert "svs" in page.locator("#message").inner_text()
    assert page.evaluate("() => window.pwned") is None
    assert page.locator("header img, #message img").count() == 0
