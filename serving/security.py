"""What a client may ask for: slide paths confined to the slide roots, and the bearer token.

Slide paths come from the network, so they are resolved defensively: relative only, no `..`
component, and the fully resolved path (symlinks followed) must still lie inside the root it was
looked up in; a link inside a root that points outside is refused like a `..`. The token is
compared in constant time (hmac.compare_digest) so its bytes cannot be found by timing.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path, PurePosixPath

from core.errors import AuthError, ConfigError, PathDenied, SlideNotFound


class SlideRoots:
    """The folders a server reads slides from; `resolve()` turns a client path into a file."""

    def __init__(self, roots):
        self.roots = [Path(r).resolve(strict=True) for r in roots]
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


def server_credentials(cert_file: str | os.PathLike, key_file: str | os.PathLike):
    """grpc TLS server credentials from PEM certificate chain and private key files."""
    import grpc

    try:
        cert, key = Path(cert_file).read_bytes(), Path(key_file).read_bytes()
    except OSError as exc:
        raise AuthError(f"cannot read TLS certificate or key: {exc}") from None
    return grpc.ssl_server_credentials([(key, cert)])
