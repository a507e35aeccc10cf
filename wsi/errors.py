"""The error types of the slide core.

Callers (CLI, gRPC server, batch scorer) catch `WsiError` to turn any problem with a slide or a
parameter into one clear message; `SlideError` always names the file and the cause.
"""
from __future__ import annotations

import os


class WsiError(Exception):
    """Base class for every error the slide core raises on purpose."""


class SlideError(WsiError):
    """A slide file that cannot be opened or read: missing, empty, corrupt, not a slide."""

    def __init__(self, path: str | os.PathLike, cause: str):
        self.path = os.fspath(path)
        self.cause = cause
        super().__init__(f"cannot read slide {self.path}: {cause}")
