"""The results folder of `milroi-serve score --out OUT` (and of `milroi-serve spatiopath`):

    OUT/summary.csv                  one row per slide (SUMMARY_COLUMNS), rewritten atomically
    OUT/<key>/<name>_patches.csv     per-tile scores          \
    OUT/<key>/<name>.geojson         QuPath detections + ROIs  | results.outputs, OUTPUT_SUFFIXES
    OUT/<key>/<name>_heatmap.png     heatmap over a thumbnail  |
    OUT/<key>/<name>_spatiopath.json ROI polygons, pixel size /
    OUT/<key>/<name>_scores.npz      the patch CSV's columns in binary (what the viewer reads)
    OUT/<key>/done.json              written last: the slide is finished (its summary row)

`<key>` is the slide's path under the slide folder without its extension (a/b/tumor_001), and
`<name>` the slide's name (tumor_001). Every file goes through `core.files.atomic_write`, so a
killed job never leaves a half-written file; `clear_unfinished` and
`remove_stale_summary_temps` tidy what a killed job left, so that a rerun starts clean.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.files import atomic_write

SUMMARY_NAME = "summary.csv"
DONE_MARKER = "done.json"
# The files of one scored slide, by kind, as the suffix after the slide's name.
OUTPUT_SUFFIXES = {"csv": "_patches.csv", "geojson": ".geojson", "heatmap": "_heatmap.png",
                   "spatiopath": "_spatiopath.json", "scores": "_scores.npz"}
# The columns of the scoring job's summary.csv.
# "slide_mpp" to "upsampled" say how the slide was read (results.scored.SlideHeader.scale_record);
# "decision" and "decision_reason" reconcile label and ROIs (results.decision); "in_domain"
# (1, 0, empty: not known), "domain_score" and "domain_reasons" ("; "-joined) are the slide
# against the model's training data (core.domain).
SUMMARY_COLUMNS = ("slide", "status", "label", "score", "threshold", "tiles", "rois", "seconds",
                   "model", "model_version", "error", "path", "artefact_tiles", "slide_mpp",
                   "mpp_source", "model_mpp", "scale_factor", "read_level", "upsampled",
                   "decision", "decision_reason", "in_domain", "domain_score", "domain_reasons")
REASON_SEPARATOR = "; "   # between the domain reasons of one summary cell


def domain_columns(check) -> dict:
    """The summary.csv cells of a core.domain.DomainCheck."""
    return {"in_domain": "" if check.in_domain is None else int(check.in_domain),
            "domain_score": check.score, "domain_reasons": REASON_SEPARATOR.join(check.reasons)}


HEATMAP_CMAP = "jet"   # the heatmap PNGs' colour map, and the viewer's


def output_path(folder: Path, name: str, kind: str) -> Path:
    """The `kind` file (a key of OUTPUT_SUFFIXES) of slide `name` in `folder`."""
    return Path(folder) / f"{name}{OUTPUT_SUFFIXES[kind]}"


def output_name(path: Path, kind: str) -> str | None:
    """The slide name of a `kind` output file, or None when `path` is not one."""
    suffix = OUTPUT_SUFFIXES[kind]
    return path.name[:-len(suffix)] if path.name.endswith(suffix) else None


def _fmt(value) -> str:
    """A summary cell: numbers to 6 significant digits, nothing for None or NaN."""
    if value is None:
        return ""
    if isinstance(value, float | np.floating):
        return "" if math.isnan(value) else f"{float(value):.6g}"
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def write_summary(out_dir: Path, rows: list[dict], columns: Sequence[str] = SUMMARY_COLUMNS) -> Path:
    """OUT/summary.csv: one row per slide, sorted by slide, the given `columns`, replaced
    atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["slide"]):
        writer.writerow({k: _fmt(row.get(k)) for k in columns})
    path = Path(out_dir) / SUMMARY_NAME
    with atomic_write(path, "w") as f:
        f.write(buffer.getvalue())
    return path


def read_summary(out_dir: Path) -> list[dict]:
    """summary.csv's rows as written (strings)."""
    with open(Path(out_dir) / SUMMARY_NAME, newline="") as f:
        return list(csv.DictReader(f))


def write_done_marker(slide_out: Path, row: dict) -> Path:
    """Mark a slide finished: its summary row, written after all its outputs."""
    path = Path(slide_out) / DONE_MARKER
    with atomic_write(path, "w") as f:
        json.dump(row, f, indent=2)
    return path


def read_done_marker(slide_out: Path) -> dict | None:
    """The summary row of a finished slide, or None when it is not finished."""
    try:
        row = json.loads((Path(slide_out) / DONE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) and row.get("status") == "ok" else None


def recorded_slide_path(slide_out: Path) -> Path | None:
    """The slide file a finished slide's done marker names, when it still exists."""
    try:
        recorded = json.loads((Path(slide_out) / DONE_MARKER).read_text()).get("path")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(recorded) if recorded and Path(recorded).exists() else None


def clear_unfinished(slide_out: Path) -> None:
    """Delete the files of a slide that is not finished (outputs of an interrupted run, temp
    files a killed write left behind), done marker first. Subfolders are other slides' (a/ and
    a/b/), so they stay."""
    slide_out = Path(slide_out)
    if slide_out.is_dir():
        (slide_out / DONE_MARKER).unlink(missing_ok=True)
        for path in slide_out.iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)


def remove_stale_summary_temps(out_dir: Path) -> None:
    """Temp files of summary.csv left by a job killed while it replaced the file (atomic_write
    names its temp files after the target)."""
    for path in Path(out_dir).iterdir():
        if path.is_file() and SUMMARY_NAME in path.name and path.name != SUMMARY_NAME:
            path.unlink(missing_ok=True)
