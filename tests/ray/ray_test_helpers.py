"""Helpers of the Ray tests: output comparison and actors that kill their own worker process.

(A module of its own name: test modules cannot import `conftest` reliably when several test
folders have one.)
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from results.layout import DONE_MARKER, SUMMARY_NAME

RUN_DEPENDENT = ("seconds",)  # the only summary/done-marker field that differs between runs


def output_files(out: Path) -> dict[str, bytes]:
    """Every output file under OUT but the done markers and summary.csv, by relative path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in (SUMMARY_NAME, DONE_MARKER)}


def summary_rows(out: Path) -> dict[str, dict]:
    with open(out / SUMMARY_NAME, newline="") as f:
        return {row["slide"]: {k: v for k, v in row.items() if k not in RUN_DEPENDENT}
                for row in csv.DictReader(f)}


def done_markers(out: Path) -> dict[str, dict]:
    return {p.parent.relative_to(out).as_posix():
            {k: v for k, v in json.loads(p.read_text()).items() if k not in RUN_DEPENDENT}
            for p in out.rglob(DONE_MARKER)}


def crashing(actor_class: type, method: str, slide_name: str, marker: Path | None):
    """A subclass of `actor_class` whose worker process dies (os._exit, as a segfault or an
    OOM kill would end it) in `method` on the slide named `slide_name`: once, leaving `marker`,
    or every time when `marker` is None. Defined in a function so that Ray pickles it by value
    (the workers cannot import the test modules)."""
    parent = getattr(actor_class, method)

    class Crashing(actor_class):
        pass

    def crash_then_run(self, path, *args):
        if Path(path).stem == slide_name:
            if marker is None:
                os._exit(1)
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)
        return parent(self, path, *args)

    setattr(Crashing, method, crash_then_run)
    return Crashing
