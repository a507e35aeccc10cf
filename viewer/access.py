"""Who may reach the viewer, and what a page it serves may do.

The viewer binds 127.0.0.1 and, by default, asks for no credentials. Loopback alone does not keep
other web pages out: a page from anywhere can point its own host name at 127.0.0.1 (DNS
rebinding) and read the viewer as same-origin. Three layers close that, as Jupyter closed it:

- a `Host` allowlist (Starlette's TrustedHostMiddleware): loopback names by default, more with
  `--allowed-host`; a rebound name is not on it, so its requests get 400;
- an optional token (`--token-file`): the URL the viewer prints carries `?token=...`; the first
  visit exchanges it for an HttpOnly, SameSite=Strict cookie (a digest of the token, not the token)
  and is redirected to the same URL without it; scripts may send `Authorization: Bearer <token>`;
- response headers: `X-Content-Type-Options: nosniff`, a Content-Security-Policy that allows
  only the viewer's own origin, and `frame-ancestors 'none'` (no framing, no clickjacking).

Route parameters are bounded here too (`register_convertors`): a tile index has at most 9 digits
(Python refuses to parse integers of more than 4,300), and a slide key may hold any character,
a newline included, up to MAX_KEY_CHARS.
"""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode

from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Host header names that reach this machine only (Starlette keeps IPv6 literals bracketed).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
COOKIE = "milroi_viewer"
MAX_KEY_CHARS = 4096    # PATH_MAX: a longer key names no file
# OpenSeadragon 6 inserts one fixed <style> element (its touch-screen focus rule): allowed by
# its hash, nothing else inline (tests/viewer checks the hash against the vendored file).
OPENSEADRAGON_STYLE_HASH = "sha256-9xTiqzfwFaL2SGb1rmr8gysEwVVjIvqWAgmZgqFqpEE="
CSP = (f"default-src 'self'; style-src 'self' '{OPENSEADRAGON_STYLE_HASH}'; "
       "img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",           # frame-ancestors for browsers that predate it
    "Referrer-Policy": "no-referrer",    # a ?token= URL never leaks through a link
}


class TileIndexConvertor(Convertor[int]):
    """A deep-zoom level, column or row: at most 9 digits (a longer one matches no route: 404)."""
    regex = "[0-9]{1,9}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(value)


class SlideKeyConvertor(Convertor[str]):
    """A slide key: any characters (newlines included, which Starlette's `path` does not match),
    at most MAX_KEY_CHARS."""
    regex = f"[\\s\\S]{{1,{MAX_KEY_CHARS}}}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


def register_convertors() -> None:
    """`{name:tile_index}` and `{name:slide_key}` in the viewer's routes."""
    register_url_convertor("tile_index", TileIndexConvertor())
    register_url_convertor("slide_key", SlideKeyConvertor())


def allowed_hosts(bind_host: str, extra: Iterable[str] = ()) -> list[str]:
    """The Host names the viewer answers: loopback, the address it is bound to (unless a
    wildcard), and `extra` (--allowed-host)."""
    hosts = list(LOOPBACK_HOSTS)
    if bind_host not in WILDCARD_BINDS:
        hosts.append(f"[{bind_host}]" if ":" in bind_host else bind_host)
    for host in extra:
        host = host.strip().lower()
        if host and host not in hosts:
            hosts.append(host)
    return hosts


def cookie_value(token: str) -> str:
    """What the cookie holds: a digest of the token (the token itself stays out of the cookie
    jar)."""
    return hmac.new(token.encode(), b"milroi viewer cookie v1", hashlib.sha256).hexdigest()


class TokenGate:
    """ASGI middleware: every request needs the token (query `token`, the cookie it was
    exchanged for, or `Authorization: Bearer`), compared in constant time."""

    def __init__(self, app: ASGIApp, token: str):
        self.app, self.token, self.cookie = app, token, cookie_value(token)

    def _has_cookie(self, headers: Headers) -> bool:
        jar = SimpleCookie()
        try:
            jar.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed Cookie header is no credential
            return False
        morsel = jar.get(COOKIE)
        return morsel is not None and hmac.compare_digest(morsel.value.encode(), self.cookie.encode())

    def _has_bearer(self, headers: Headers) -> bool:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                                  self.token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        given = [value for name, value in query if name == "token"]
        if given:
            if not hmac.compare_digest(given[-1].encode(), self.token.encode()):
                await _refuse(scope, "wrong token")(scope, receive, send)
                return
            # The token is exchanged for the cookie, and the URL is shown without it.
            rest = urlencode([(name, value) for name, value in query if name != "token"])
            location = scope["path"] + (f"?{rest}" if rest else "")
            response = RedirectResponse(location, status_code=303)
            response.set_cookie(COOKIE, self.cookie, httponly=True, samesite="strict", path="/")
            await response(scope, receive, send)
            return
        if self._has_cookie(headers) or self._has_bearer(headers):
            await self.app(scope, receive, send)
            return
        await _refuse(scope, "this viewer needs its token")(scope, receive, send)


def _refuse(scope: Scope, why: str) -> Response:
    message = (f"{why}: open the URL that `milroi-serve view` printed (it ends in ?token=...), "
               "or send 'Authorization: Bearer <token>'")
    if scope["path"].startswith("/api/"):
        return JSONResponse({"error": message, "type": "AuthError"}, 401)
    return PlainTextResponse(message, 401)


class SecurityHeaders:
    """ASGI middleware: SECURITY_HEADERS on every response, errors and static files included."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.headers = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *(h for h in self.headers if h[0] not in names)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def middleware(hosts: list[str], token: str | None) -> list[Middleware]:
    """The viewer's middleware, outermost first: headers on every answer (refusals included),
    then the Host check, then the token."""
    stack = [Middleware(SecurityHeaders), Middleware(TrustedHostMiddleware, allowed_hosts=hosts)]
    if token is not None:
        stack.append(Middleware(TokenGate, token=token))
    return stack
