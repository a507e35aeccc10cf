"""Reading what `milroi-serve score` writes, for the test folders that run it (batch, hardening,
containers)."""
from __future__ import annotations

import csv
from pathlib import Path

from results.layout import DONE_MARKER, SUMMARY_COLUMNS, SUMMARY_NAME


def read_summary(out: Path) -> dict[str, dict]:
    """summary.csv by slide key; its header must be exactly SUMMARY_COLUMNS."""
    with open(out / SUMMARY_NAME, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == SUMMARY_COLUMNS
        return {row["slide"]: row for row in reader}


def slide_files(out: Path) -> dict[str, bytes]:
    """Every file under OUT except the run-dependent ones (timings), by relative path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in (SUMMARY_NAME, DONE_MARKER)}


def stable_summary(out: Path) -> dict[str, dict]:
    """summary.csv without the columns that differ between runs of the same job."""
    return {k: {c: v for c, v in row.items() if c not in ("seconds", "path")}
            for k, row in read_summary(out).items()}
