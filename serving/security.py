"""What a client may ask for and see: slide paths confined to the slide roots, the bearer token.

Slide paths come from the network, so they are resolved defensively: relative only, no `..`
component, and the fully resolved path (symlinks followed) must still lie inside the root it was
looked up in; a link inside a root that points outside is refused like a `..`. What goes back
names the slide by the path the client sent, never by its place on the server
(`SlideRoots.wire_message`).

The token is checked by one server interceptor (`BearerTokenInterceptor`) for every method but
grpc.health.v1 (load balancers probe it without credentials); server reflection needs the token
like the scoring service. It is compared in constant time (hmac.compare_digest) so its bytes
cannot be found by timing. A client sends it as gRPC call credentials, which gRPC only attaches
to channels it deems secure: TLS, or a loopback connection (`is_loopback_target`).
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import grpc

from core.errors import AuthError, ConfigError, PathDenied, SlideNotFound


class SlideRoots:
    """The folders a server reads slides from; `resolve()` turns a client path into a file."""

    def __init__(self, roots):
        self.roots = [Path(r).resolve(strict=True) for r in roots]
        # Each root as configured and as resolved, longest first: a nested root is matched
        # before the root that holds it.
        forms = {str(Path(r).absolute()) for r in roots} | {str(r) for r in self.roots}
        self._root_patterns = [
            re.compile(r"(?<![\w.-])" + re.escape(form.rstrip("/") + "/"))
            for form in sorted(forms, key=len, reverse=True)]
        for root in self.roots:
            if not root.is_dir():
                raise ConfigError(f"slide root {root} is not a folder")
        if not self.roots:
            raise ConfigError("at least one slide root is needed")

    def resolve(self, requested: str) -> Path:
        """The file under a root that `requested` names; PathDenied or SlideNotFound otherwise."""
        if not requested or "\x00" in requested:
            raise PathDenied(f"invalid slide path {requested!r}")
        relative = PurePosixPath(requested.replace(os.sep, "/"))
        if relative.is_absolute() or Path(requested).is_absolute():
            raise PathDenied(f"slide path {requested!r} must be relative to a slide root")
        if ".." in relative.parts:
            raise PathDenied(f"slide path {requested!r} may not contain '..'")
        for root in self.roots:
            candidate = root.joinpath(*relative.parts)
            if not os.path.lexists(candidate):
                continue
            resolved = candidate.resolve()
            if not resolved.is_relative_to(root):
                raise PathDenied(f"slide path {requested!r} leads outside the slide roots")
            return resolved
        raise SlideNotFound(f"no slide {requested!r} under the slide roots")

    def wire_message(self, message: str, requested: str | None = None,
                     resolved: Path | None = None) -> str:
        """`message` as a client may read it: the slide's server path (`resolved`, or where
        `requested` lies under each root) replaced by `requested`, the path the client sent, and
        any other path under a slide root made relative to it. The server logs the original."""
        if requested:
            parts = PurePosixPath(requested.replace(os.sep, "/")).parts
            server_paths = {str(root.joinpath(*parts)) for root in self.roots}
            if resolved is not None:
                server_paths.add(str(resolved))
            for server_path in sorted(server_paths, key=len, reverse=True):
                message = message.replace(server_path, requested)
        for pattern in self._root_patterns:
            message = pattern.sub("", message)
        return message


def read_token(path: str | os.PathLike) -> str:
    """The bearer token in a file (surrounding whitespace ignored); it must not be empty."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise AuthError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    if not token:
        raise AuthError(f"token file {path} is empty")
    return token


def bearer_ok(metadata, token: str | None) -> bool:
    """Whether invocation metadata carries `authorization: Bearer <token>` (always True without a token)."""
    if token is None:
        return True
    for key, value in metadata or ():
        if key.lower() == "authorization":
            value = value.decode() if isinstance(value, bytes) else value
            scheme, _, given = value.partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
                return True
    return False


# Methods callable without the token: health (load balancers, orchestrators probe it).
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)
UNAUTHENTICATED_MESSAGE = "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call without `authorization: Bearer <token>` except
    the methods under UNAUTHENTICATED_PREFIXES; `on_denied(method)` is told of each refusal."""

    def __init__(self, token: str, on_denied: Callable[[str], None] | None = None):
        self.token, self.on_denied = token, on_denied

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(UNAUTHENTICATED_PREFIXES) or \
                bearer_ok(handler_call_details.invocation_metadata, self.token):
            return handler
        if self.on_denied is not None:
            self.on_denied(method)
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED at once."""
    async def refuse(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[
        (handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def is_loopback_target(target: str) -> bool:
    """Whether a gRPC target ("host:port", "[::1]:port", "dns:///host:port", "unix:path") names
    this machine: a Unix socket, `localhost` or a loopback IP. Other host names are not looked
    up (the answer could change before the connection is made): they count as remote."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme):]
            break
    if target.startswith("["):                       # [v6]:port
        host = target[1:target.find("]")] if "]" in target else target[1:]
    elif target.count(":") == 1:                     # host:port
        host = target.partition(":")[0]
    else:                                            # host, or a bare IPv6 address
        host = target
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_credentials(cert_file: str | os.PathLike, key_file: str | os.PathLike):
    """grpc TLS server credentials from PEM certificate chain and private key files."""
    try:
        cert, key = Path(cert_file).read_bytes(), Path(key_file).read_bytes()
    except OSError as exc:
        raise AuthError(f"cannot read TLS certificate or key: {exc}") from None
    return grpc.ssl_server_credentials([(key, cert)])
