"""The error types of milroi, one per domain, all under `MilroiError`.

Every error milroi raises on purpose is one of these. The command line prints it as one line
(`core.cli.dispatch`), the batch job writes it into a `failed` row, and the gRPC server maps its
*type* to a status code (`serving.server.status_of`, docs/errors.md). So a message is for people
and the type is for programs: no caller ever matches message text.

Every class pickles (its constructor arguments are its `args`), so an error raised in a Ray
actor or a worker process arrives on the driver as the same type with the same message.
"""
from __future__ import annotations

import os


class MilroiError(Exception):
    """Base class of every error milroi raises on purpose."""


class ConfigError(MilroiError):
    """A bad command-line option, parameter or set-up: a flag out of range, a missing file of
    the user's, an unreachable cluster address."""


class _FileError(MilroiError):
    """An error about one file or folder: its `path` and the `cause`, kept as the exception's
    arguments (so it pickles); `_message` says how they read."""

    _message = "{path}: {cause}"

    def __init__(self, path: str | os.PathLike, cause: str):
        super().__init__(os.fspath(path), cause)
        self.path, self.cause = os.fspath(path), cause

    def __str__(self) -> str:
        return self._message.format(path=self.path, cause=self.cause)


class SlideError(_FileError):
    """A slide file that cannot be opened or read: missing, empty, corrupt, not a slide."""

    _message = "cannot read slide {path}: {cause}"


class SlideMissing(SlideError):
    """The slide file does not exist (NOT_FOUND on the wire)."""

    def __init__(self, path: str | os.PathLike, cause: str = "no such file"):
        super().__init__(path, cause)


class BundleError(_FileError):
    """A model bundle that cannot be used: missing files, a bad manifest, a graph that will not
    load on the asked provider."""

    _message = "cannot load model bundle {path}: {cause}"


class ExportError(MilroiError):
    """A model bundle that cannot be made: the exported graphs do not reproduce the torch model,
    the int8 backbone disagrees with the fp32 one, the output folder is taken."""


class RegistryError(MilroiError):
    """The MLflow tracking server or model registry: an unknown run, model, version or alias,
    a malformed `models:/` URI, a promotion that is refused."""


class RequestError(MilroiError):
    """A request the server or a library call cannot serve as asked: a bad parameter value, a
    malformed tile batch (INVALID_ARGUMENT unless a subclass says otherwise)."""


class PathDenied(RequestError):
    """A slide path that would leave the slide roots (PERMISSION_DENIED)."""


class SlideNotFound(RequestError):
    """A well-formed slide path that exists under none of the slide roots (NOT_FOUND)."""


class Busy(RequestError):
    """More concurrent streams than the server takes (RESOURCE_EXHAUSTED)."""


class ModelNotReady(RequestError):
    """No model is loaded yet (UNAVAILABLE)."""


class Cancelled(RequestError):
    """Scoring was cancelled before it finished."""


class ClusterError(MilroiError):
    """Ray: a cluster that cannot be reached or holds no room for the actors, an actor that
    died past its restarts, actors that loaded different model versions."""


class AuthError(MilroiError):
    """Authentication: a missing or wrong bearer token, an unreadable token file or TLS key."""
