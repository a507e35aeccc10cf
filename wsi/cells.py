"""Cell centroids of a slide, in level-0 px, for the Spatiopath analysis (`spatiopath_analysis.command`).

Two formats, chosen by the file's extension:

- `.csv`: a header with `x` and `y` (level-0 px, origin top-left, any case) and optionally
  `class` (the cell type); other columns are ignored;
- `.geojson` / `.json`: a QuPath detections export (File > Export objects as GeoJSON): a
  FeatureCollection (or a list) of features whose centroid is the cell's, and whose
  `properties.classification.name` (or a plain string) is its class.

A QuPath export is in the frame QuPath shows the slide in, which on slides with OpenSlide
bounds (MIRAX, Leica SCN, sparse TIFF) is level 0 minus the bounds offset: `offset` is added to
every point read (the scores' `bounds_offset`; (0, 0) elsewhere).

`cell_class` keeps only the cells of one class (`Immune cells`). Every point must lie on the
slide (`dimensions`): a point outside it means the file is in another frame (micrometres, a
lower level, another slide) and is refused with a message naming the line or feature. `boxes`
keeps only the cells in those level-0 boxes, read in chunks, so a whole slide's cells never
need to be held at once. Errors are `ConfigError`s naming the file.
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import ConfigError
from core.files import atomic_write

CSV_SUFFIXES = (".csv",)
GEOJSON_SUFFIXES = (".geojson", ".json")
CELL_SUFFIXES = CSV_SUFFIXES + GEOJSON_SUFFIXES
CHUNK_ROWS = 200_000


@dataclass
class Cells:
    """Centroids (float64 [n, 2], level-0 x, y) of the cells kept, and what was read."""

    xy: np.ndarray
    path: Path
    read: int                       # cells in the file (all classes, all places)
    classes: Counter = field(default_factory=Counter)   # class -> count, over the whole file

    def __len__(self) -> int:
        return len(self.xy)


def _inside(xy: np.ndarray, boxes) -> np.ndarray:
    if boxes is None:
        return np.ones(len(xy), bool)
    keep = np.zeros(len(xy), bool)
    for x0, y0, x1, y1 in boxes:
        keep |= (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)
    return keep


class _Checker:
    """Counts classes, checks the frame, filters; accumulates the kept points."""

    def __init__(self, path: Path, cell_class, dimensions, boxes, offset=(0, 0)):
        self.path, self.cell_class, self.dimensions, self.boxes = path, cell_class, dimensions, boxes
        self.offset = np.asarray(offset, np.float64).reshape(2)
        self.kept: list[np.ndarray] = []
        self.classes: Counter = Counter()
        self.read = 0

    def add(self, xy: np.ndarray, classes, where) -> None:
        """`where(i)` names the i-th point of this chunk in a message (a line, a feature)."""
        self.read += len(xy)
        xy = xy + self.offset
        if self.dimensions is not None and len(xy):
            width, height = self.dimensions
            out = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= width) | (xy[:, 1] >= height)
            bad = ~np.isfinite(xy).all(axis=1) | out
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ConfigError(
                    f"cells file {self.path}: {int(bad.sum())} cell(s) outside the slide "
                    f"({width} x {height} px at level 0), the first at x={xy[i, 0]:g}, y={xy[i, 1]:g} "
                    f"({where(i)}): cell coordinates must be level-0 pixels of this slide")
        if classes is not None:
            self.classes.update(classes)
        if self.cell_class is not None:
            xy = xy[np.asarray(classes, dtype=object) == self.cell_class]
        self.kept.append(xy[_inside(xy, self.boxes)])

    def result(self) -> Cells:
        if self.cell_class is not None and self.read and not self.classes.get(self.cell_class):
            found = ", ".join(f"{k!r} {v}" for k, v in self.classes.most_common()) or "none"
            raise ConfigError(f"cells file {self.path}: no cell of class {self.cell_class!r} "
                              f"(classes found: {found})")
        xy = np.concatenate(self.kept) if self.kept else np.zeros((0, 2))
        return Cells(xy.reshape(-1, 2).astype(np.float64), self.path, self.read, self.classes)


def _read_csv(path: Path, check: _Checker) -> None:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ConfigError(f"cells file {path}: empty file (a header with x,y is expected)")
        names = [h.strip().lower() for h in header]
        if "x" not in names or "y" not in names:
            raise ConfigError(f"cells file {path}: no x and y columns in the header {header!r} "
                              "(a cells CSV needs x,y in level-0 px and optionally class)")
        ix, iy = names.index("x"), names.index("y")
        ic = names.index("class") if "class" in names else None
        if check.cell_class is not None and ic is None:
            raise ConfigError(f"cells file {path}: --cell-class {check.cell_class!r} given but the "
                              f"file has no class column (header {header!r})")
        first_line = 2
        while True:
            rows = [row for _, row in zip(range(CHUNK_ROWS), reader)]
            if not rows:
                break
            try:
                xy = np.array([(row[ix], row[iy]) for row in rows], dtype=np.float64)
            except (ValueError, IndexError):
                for k, row in enumerate(rows):   # find the offending line for the message
                    try:
                        float(row[ix]), float(row[iy])
                    except (ValueError, IndexError):
                        raise ConfigError(f"cells file {path}, line {first_line + k}: x, y not "
                                          f"numbers: {','.join(row)!r}") from None
                raise
            classes = [row[ic] if ic < len(row) else "" for row in rows] if ic is not None else None
            start = first_line
            check.add(xy, classes, lambda i, start=start: f"line {start + i}")
            first_line += len(rows)


def _class_name(properties: dict) -> str:
    value = (properties or {}).get("classification")
    if isinstance(value, dict):
        return str(value.get("name", ""))
    return "" if value is None else str(value)


def _read_geojson(path: Path, check: _Checker) -> None:
    import shapely.geometry

    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cells file {path}: not JSON ({exc})") from None
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features", [])
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    elif isinstance(doc, list):
        features = doc
    else:
        raise ConfigError(f"cells file {path}: not GeoJSON features (a FeatureCollection or a list "
                          "of features, as QuPath exports detections)")
    xy, classes = np.zeros((len(features), 2)), []
    for i, feature in enumerate(features):
        try:
            geometry = shapely.geometry.shape(feature["geometry"])
            centroid = geometry.centroid
            xy[i] = (centroid.x, centroid.y)
        except (KeyError, TypeError, ValueError, AttributeError, shapely.errors.ShapelyError) as exc:
            raise ConfigError(f"cells file {path}: feature {i} has no usable geometry ({exc})") from None
        classes.append(_class_name(feature.get("properties")))
    check.add(xy, classes, lambda i: f"feature {i}")


def read_cells(path, cell_class: str | None = None, dimensions=None, boxes=None,
               offset=(0, 0)) -> Cells:
    """Cell centroids of one file (module docstring); `dimensions` (w, h) checks the frame,
    `boxes` [(x0, y0, x1, y1), ...] keeps only the cells inside them, `offset` (x, y) is added
    to every point (QuPath's frame -> level 0)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cells file {path}: no such file")
    check = _Checker(path, cell_class, dimensions, boxes, offset)
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        _read_csv(path, check)
    elif suffix in GEOJSON_SUFFIXES:
        _read_geojson(path, check)
    else:
        raise ConfigError(f"cells file {path}: unknown format {suffix!r} (one of {', '.join(CELL_SUFFIXES)})")
    return check.result()


def write_cells_csv(path, xy, classes=None) -> Path:
    """`x,y[,class]` per cell (level-0 px), the format `read_cells` reads."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["x", "y"] + (["class"] if classes is not None else []))
        if classes is None:
            writer.writerows((f"{x:.1f}", f"{y:.1f}") for x, y in xy.tolist())
        else:
            writer.writerows((f"{x:.1f}", f"{y:.1f}", c) for (x, y), c in zip(xy.tolist(), classes))
    return Path(path)
