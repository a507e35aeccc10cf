"""Spatiopath analysis windows: milroi's whole-slide tumour ROIs cut into windows the engine takes.

Spatiopath (`spatiopath.engine.SpatioPath`) rasterises its tumour regions (`setA`) and its
analysed area (`roi`) onto a `height x width` pixel grid and computes distance maps there, so
it analyses windows of a few thousand pixels, never a whole slide. This module turns a slide's
`<slide>_spatiopath.json` (whole-slide ROI polygons in level-0 px, `results.outputs`) and its
tissue mask into such windows:

- every ROI gets the box of its bounds plus a margin of `analysis_zone_um` (clipped to the
  slide); boxes that overlap are merged while the merged box still fits the window;
- one downsample per slide, a power of two, the smallest at which the largest ROI with its
  margin fits in `window_px` x `window_px`; the pixel size is the slide's mpp times it;
- `set_a` holds the ROI polygons clipped to the window, `roi` the tissue polygons (holes kept)
  clipped to the window, both in window pixel coordinates:
  `window px = (level-0 px - offset) / downsample`;
- windows that still overlap (two ROIs whose merged box would not fit) share nothing: a
  level-0 point belongs to the first window (in `windows` order) whose box holds it, and the
  `roi` of a later window leaves out the boxes of the earlier ones, so pooled counts never hold
  a cell or an area twice (`SlideWindows.split_cells` follows the same rule).

Memory and time depend on the windows, never on the slide's size: the tissue mask (computed
at ~1/32, as scoring does) is cropped per window before it becomes polygons. No spatiopath
import here: the engine side is `spatiopath_analysis.command`.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import Polygon

from core.errors import ConfigError
from core.files import atomic_write
from core.tiling import TissueParams
from results.outputs import ScoredRois, read_scored_rois
from wsi.tissue import TissueMask

WINDOWS_FORMAT = "milroi-spatiopath-windows/1"
DEFAULT_ANALYSIS_ZONE_UM = 400.0   # Spatiopath's own default analysis zone
DEFAULT_WINDOW_PX = 4096           # Spatiopath's own default height and width


# ---------------------------------------------------------------------------------------------
# Windows


@dataclass
class AnalysisWindow:
    """One window: `offset` (x0, y0) and `box` (x0, y0, x1, y1) in level-0 px, `size` (w, h) in
    window px, the ids of the ROIs it holds, `set_a` and `roi` (shapely Polygons, window px)."""

    id: str
    offset: tuple[int, int]
    box: tuple[int, int, int, int]
    size: tuple[int, int]
    downsample: float
    rois: list[int] = field(default_factory=list)
    set_a: list = field(default_factory=list)
    roi: list = field(default_factory=list)

    def to_window(self, xy) -> np.ndarray:
        """Level-0 (x, y) -> window pixel coordinates (float; pixel = floor)."""
        return (np.asarray(xy, np.float64).reshape(-1, 2) - self.offset) / self.downsample

    def to_level0(self, uv) -> np.ndarray:
        """Window pixel coordinates -> level-0 (x, y)."""
        return np.asarray(uv, np.float64).reshape(-1, 2) * self.downsample + self.offset

    def contains(self, xy) -> np.ndarray:
        """Which level-0 points lie in this window's box (not counting ownership)."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        x0, y0, x1, y1 = self.box
        return (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)


@dataclass
class SlideWindows:
    """All windows of one slide; every window shares the downsample and the pixel size."""

    slide: str
    mpp: float
    dimensions: tuple[int, int]
    analysis_zone_um: float
    window_px: int
    downsample: float
    level: int | None
    windows: list[AnalysisWindow]

    @property
    def pixel_size_um(self) -> float:
        return self.mpp * self.downsample

    @property
    def canvas(self) -> tuple[int, int]:
        """(width, height) that holds every window: the engine's `width` and `height`."""
        if not self.windows:
            return 0, 0
        return max(w.size[0] for w in self.windows), max(w.size[1] for w in self.windows)

    def boxes(self) -> list[tuple[int, int, int, int]]:
        return [w.box for w in self.windows]

    def split_cells(self, xy) -> list[np.ndarray]:
        """Level-0 cell centroids -> one (n_i, 2) float array of window px per window: a cell
        goes to the first window whose box holds it, cells in no window are left out."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        taken = np.zeros(len(xy), bool)
        out = []
        for window in self.windows:
            mine = window.contains(xy) & ~taken
            taken |= mine
            out.append(window.to_window(xy[mine]))
        return out

    def to_dict(self) -> dict:
        width, height = self.canvas
        return {
            "format": WINDOWS_FORMAT,
            "slide": self.slide,
            "units": {"offset": "level-0 px", "box": "level-0 px (x0, y0, x1, y1)",
                      "size": "window px (width, height)",
                      "setA, roi": "window px: (level-0 px - offset) / downsample",
                      "pixel_size_um": "um per window px = mpp * downsample"},
            "mpp": self.mpp,
            "dimensions": list(self.dimensions),
            "analysis_zone_um": self.analysis_zone_um,
            "window_px": self.window_px,
            "downsample": self.downsample,
            "level": self.level,
            "pixel_size_um": self.pixel_size_um,
            "canvas": {"width": width, "height": height},
            "windows": [{"id": w.id, "offset": list(w.offset), "box": list(w.box),
                         "size": list(w.size), "downsample": w.downsample, "rois": w.rois,
                         "setA": [_polygon_dict(p) for p in w.set_a],
                         "roi": [_polygon_dict(p) for p in w.roi]} for w in self.windows],
        }

    @classmethod
    def from_dict(cls, doc: dict) -> SlideWindows:
        if doc.get("format") != WINDOWS_FORMAT:
            raise ConfigError(f"not a windows file (format {WINDOWS_FORMAT!r} expected)")
        windows = [AnalysisWindow(id=w["id"], offset=tuple(w["offset"]), box=tuple(w["box"]),
                                  size=tuple(w["size"]), downsample=float(w["downsample"]),
                                  rois=list(w["rois"]),
                                  set_a=[_polygon_from_dict(p) for p in w["setA"]],
                                  roi=[_polygon_from_dict(p) for p in w["roi"]])
                   for w in doc["windows"]]
        return cls(slide=doc["slide"], mpp=float(doc["mpp"]), dimensions=tuple(doc["dimensions"]),
                   analysis_zone_um=float(doc["analysis_zone_um"]), window_px=int(doc["window_px"]),
                   downsample=float(doc["downsample"]), level=doc["level"], windows=windows)


def _xy(ring) -> dict:
    xy = np.asarray(ring.coords)
    return {"x": [round(v, 3) for v in xy[:, 0].tolist()], "y": [round(v, 3) for v in xy[:, 1].tolist()]}


def _polygon_dict(polygon) -> dict:
    return {**_xy(polygon.exterior), "holes": [_xy(r) for r in polygon.interiors]}


def _polygon_from_dict(item: dict) -> Polygon:
    return Polygon(np.column_stack([item["x"], item["y"]]),
                   [np.column_stack([h["x"], h["y"]]) for h in item.get("holes", [])])


def write_windows_json(path, windows: SlideWindows) -> Path:
    with atomic_write(path, "w") as f:
        json.dump(windows.to_dict(), f, separators=(",", ":"))
    return Path(path)


def read_windows_json(path) -> SlideWindows:
    try:
        return SlideWindows.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot read windows file {path}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Planning


def _polygons(geometry) -> list:
    """The polygons of a (multi)polygon or collection, empty and zero-area parts dropped."""
    if geometry is None or geometry.is_empty:
        return []
    if geometry.geom_type == "Polygon":
        return [geometry] if geometry.area > 0 else []
    if hasattr(geometry, "geoms"):
        return [g for part in geometry.geoms for g in _polygons(part)]
    return []  # lines and points left by a clip have no area


def choose_downsample(largest_side_px: float, window_px: int) -> float:
    """The smallest power of two at which `largest_side_px` level-0 px fit in `window_px`."""
    if largest_side_px <= window_px:
        return 1.0
    return float(2 ** math.ceil(math.log2(largest_side_px / window_px)))


def _roi_boxes(rois: ScoredRois, margin: float) -> np.ndarray:
    width, height = rois.dimensions
    bounds = np.array([p.bounds for p in rois.polygons], np.float64).reshape(-1, 4)
    boxes = np.column_stack([np.floor(bounds[:, 0] - margin), np.floor(bounds[:, 1] - margin),
                             np.ceil(bounds[:, 2] + margin), np.ceil(bounds[:, 3] + margin)])
    return np.clip(boxes, 0, [width, height, width, height]).astype(np.int64)


def merge_boxes(boxes: np.ndarray, max_side: float) -> list[tuple[np.ndarray, list[int]]]:
    """Merge boxes (x0, y0, x1, y1) that overlap while the merged box's sides stay within
    `max_side`; returns (box, indices of the input boxes it holds) in (y0, x0) order."""
    groups = [(b.copy(), [i]) for i, b in enumerate(np.asarray(boxes).reshape(-1, 4))]
    merged = True
    while merged:
        merged = False
        for i in range(len(groups)):
            box = groups[i][0]
            others = np.array([g[0] for g in groups[i + 1:]]).reshape(-1, 4)
            if not len(others):
                continue
            overlap = ((others[:, 0] < box[2]) & (box[0] < others[:, 2])
                       & (others[:, 1] < box[3]) & (box[1] < others[:, 3]))
            union = np.column_stack([np.minimum(others[:, :2], box[:2]), np.maximum(others[:, 2:], box[2:])])
            fits = ((union[:, 2] - union[:, 0]) <= max_side) & ((union[:, 3] - union[:, 1]) <= max_side)
            hits = np.flatnonzero(overlap & fits)
            if len(hits):
                j = i + 1 + int(hits[0])
                groups[i] = (union[hits[0]], groups[i][1] + groups[j][1])
                del groups[j]
                merged = True
                break
    return sorted(groups, key=lambda g: (int(g[0][1]), int(g[0][0])))


def tissue_polygons(tissue: TissueMask, box) -> list:
    """The tissue in a level-0 box as polygons (level-0 px, holes kept, clipped to the box): the
    union of the mask pixels' squares in the crop, exact at the mask's resolution."""
    x0, y0, x1, y1 = box
    ds = float(tissue.downsample)
    rows, cols = tissue.mask.shape
    r0, r1 = max(int(y0 // ds), 0), min(int(math.ceil(y1 / ds)), rows)
    c0, c1 = max(int(x0 // ds), 0), min(int(math.ceil(x1 / ds)), cols)
    crop = np.asarray(tissue.mask[r0:r1, c0:c1], bool)
    if not crop.any():
        return []
    # Runs of tissue along each row: one rectangle per run, then one union.
    padded = np.zeros((crop.shape[0], crop.shape[1] + 2), np.int8)
    padded[:, 1:-1] = crop
    edges = np.diff(padded, axis=1)
    start_r, start_c = np.nonzero(edges == 1)
    end_r, end_c = np.nonzero(edges == -1)   # same row order, one end per start
    boxes = shapely.box((start_c + c0) * ds, (start_r + r0) * ds, (end_c + c0) * ds, (end_r + r0 + 1) * ds)
    union = shapely.simplify(shapely.union_all(boxes), 0.0)
    return _polygons(union.intersection(shapely.box(x0, y0, x1, y1)))


def _level_of(downsample: float, level_downsamples: Sequence[float]) -> int | None:
    for level, value in enumerate(level_downsamples):
        if abs(value - downsample) <= 0.02 * downsample:
            return level
    return None


def plan_windows(rois: ScoredRois, tissue: TissueMask, *,
                 analysis_zone_um: float = DEFAULT_ANALYSIS_ZONE_UM,
                 window_px: int = DEFAULT_WINDOW_PX,
                 level_downsamples: Sequence[float] = ()) -> SlideWindows:
    """The analysis windows of one slide from its ROIs and tissue mask (module docstring)."""
    if analysis_zone_um <= 0:
        raise ConfigError(f"the analysis zone must be > 0 um, got {analysis_zone_um:g}")
    if window_px < 64:
        raise ConfigError(f"--window must be at least 64 px, got {window_px}")
    common = dict(slide=rois.slide, mpp=rois.mpp, dimensions=rois.dimensions,
                  analysis_zone_um=float(analysis_zone_um), window_px=int(window_px))
    if not rois.polygons:
        return SlideWindows(**common, downsample=1.0, level=None, windows=[])
    margin = analysis_zone_um / rois.mpp
    boxes = _roi_boxes(rois, margin)
    largest = float(np.max(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])))
    downsample = choose_downsample(largest, window_px)
    windows, earlier = [], []
    for k, (box, members) in enumerate(merge_boxes(boxes, window_px * downsample)):
        x0, y0, x1, y1 = (int(v) for v in box)
        area = shapely.box(x0, y0, x1, y1)
        set_a = [g for p in rois.polygons if p.intersects(area) for g in _polygons(p.intersection(area))]
        roi = tissue_polygons(tissue, (x0, y0, x1, y1))
        if earlier:   # a point belongs to the first window that holds it
            taken = shapely.union_all(earlier)
            roi = [g for p in roi for g in _polygons(p.difference(taken))]
        earlier.append(area)

        def to_window(geom, x0=x0, y0=y0):
            return shapely.transform(geom, lambda c: (c - [x0, y0]) / downsample)

        windows.append(AnalysisWindow(
            id=f"w{k + 1:02d}", offset=(x0, y0), box=(x0, y0, x1, y1),
            size=(int(math.ceil((x1 - x0) / downsample)), int(math.ceil((y1 - y0) / downsample))),
            downsample=downsample, rois=sorted(rois.ids[i] for i in members),
            set_a=[to_window(p) for p in set_a], roi=[to_window(p) for p in roi]))
    return SlideWindows(**common, downsample=downsample,
                        level=_level_of(downsample, level_downsamples), windows=windows)


def windows_for_slide(scores_json, slide, *, analysis_zone_um: float = DEFAULT_ANALYSIS_ZONE_UM,
                      window_px: int = DEFAULT_WINDOW_PX,
                      tissue_params: TissueParams | None = None) -> SlideWindows:
    """Spatiopath-ready windows of a scored slide, for a Spatiopath user's own code.

    `scores_json`: the slide's `<slide>_spatiopath.json` (from `milroi-serve score` or
    `client score --out`); `slide`: the slide file (path) or an open `wsi.slide.Slide`, read
    for its tissue mask. For each window `w` of the result::

        engine = SpatioPath(zone_width, result.analysis_zone_um, result.pixel_size_um,
                            height=result.canvas[1], width=result.canvas[0])
        engine.add_patch(w.id, w.set_a, cells_in_window_px, w.roi)

    with the cells of `result.split_cells(level0_xy)`. The tissue mask uses `tissue_params`,
    else the settings the slide was scored with (recorded in `scores_json` from the model's
    manifest), else the defaults (files from before the record).
    """
    from wsi.slide import Slide, open_slide
    from wsi.tissue import compute_tissue_mask

    rois = read_scored_rois(scores_json)
    if tissue_params is None:
        tissue_params = rois.tissue or TissueParams()

    def mask_of(opened: Slide):
        if tuple(opened.dimensions) != rois.dimensions:
            raise ConfigError(f"{opened.path} is {opened.dimensions[0]} x {opened.dimensions[1]} px "
                              f"but {rois.path} was scored on {rois.dimensions[0]} x "
                              f"{rois.dimensions[1]} px: not the same slide")
        return (compute_tissue_mask(opened, tissue_params) if rois.polygons else None,
                opened.level_downsamples)

    if isinstance(slide, Slide):
        tissue, levels = mask_of(slide)
    else:
        with open_slide(slide) as opened:
            tissue, levels = mask_of(opened)
    return plan_windows(rois, tissue, analysis_zone_um=analysis_zone_um, window_px=window_px,
                        level_downsamples=levels)
