"""What a scored slide leaves on disk: patch CSV, QuPath GeoJSON, heatmap PNG, Spatiopath JSON,
and the tile scores in binary (`<name>_scores.npz`, read back by `read_tile_scores`).

`write_scored_slide(out_dir, slide, scored)` writes them from a `results.scored.ScoredSlide`,
with the ROIs its scorer computed (results.rois); `write_slide_outputs` from bare arrays.

Coordinates are level-0 pixels of the slide (x to the right, y down, origin top-left), the frame
the tile grid uses, in every file but the GeoJSON: that one is in the frame QuPath shows the slide
in. QuPath crops a slide to OpenSlide's bounds (`openslide.bounds-x/-y`: MRXS, Leica SCN, sparse
TIFF...), so its origin is the bounds' top-left and the GeoJSON's coordinates are level-0 minus
that offset (`Slide.bounds_offset`, (0, 0) for a slide without bounds). The offset is recorded in
the GeoJSON's and the Spatiopath JSON's `bounds_offset`.

Every file is written through `atomic_write`, so a job killed mid-write never leaves a
half-written output behind.
"""
from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import Polygon

from core.bundle import DEFAULT_ROI_THRESHOLD
from core.errors import ConfigError, RequestError
from core.files import atomic_write
from core.tiling import TissueParams
from results.layout import HEATMAP_CMAP, OUTPUT_SUFFIXES, output_path
from results.rois import check_scores, roi_polygons, roi_tile_stats, with_tile_stats
from results.scored import Roi, ScoredSlide
from wsi.tile_quality import flag_names, flags_from_names

TUMOR_CLASS = {"name": "Tumor", "color": [200, 0, 0]}  # QuPath's own colour for "Tumor"
IGNORE_CLASS = {"name": "Ignore*", "color": [180, 180, 180]}  # QuPath's built-in "leave out" class
SPATIOPATH_FORMAT = "milroi-spatiopath/1"   # the `format` of <slide>_spatiopath.json
HEATMAP_MAX_SIZE = 2048
HEATMAP_ALPHA = 0.5


def _flags(flags, n: int) -> np.ndarray:
    if flags is None:
        return np.zeros(n, np.uint8)
    flags = np.asarray(flags, dtype=np.uint8).reshape(-1)
    if len(flags) != n:
        raise RequestError(f"{n} tiles but {len(flags)} artefact flags")
    return flags


def _distance(domain_distance, n: int) -> np.ndarray:
    if domain_distance is None:
        return np.full(n, np.nan, np.float32)
    distance = np.asarray(domain_distance, dtype=np.float32).reshape(-1)
    if len(distance) != n:
        raise RequestError(f"{n} tiles but {len(distance)} domain distances")
    return distance


def write_patch_csv(path, coords, scores, tile_size: int, flags=None,
                    domain_distance=None) -> Path:
    """`x,y,size,score,artefact,domain_distance,in_domain` per tile: x, y the level-0 top-left
    corner, size the level-0 tile side, artefact what wsi.tile_quality flagged ("ink",
    "background", "blur", joined by "+"; empty for a clean tile). A flagged tile's score is
    reported but is in no ROI and not in the slide score. `domain_distance`: the tile's
    features against the training tiles (core.domain: 1 at the edge of 99 % of them), and
    `in_domain` 1 within it, 0 beyond; both empty where the model has no description."""
    coords, scores = check_scores(coords, scores)
    flags = _flags(flags, len(coords))
    distance = _distance(domain_distance, len(coords))
    table = np.column_stack([coords.astype(np.float64), np.full(len(coords), tile_size), scores])
    buffer = io.StringIO()
    buffer.write("x,y,size,score,artefact,domain_distance,in_domain\n")
    names = {int(v): flag_names(int(v)) for v in np.unique(flags)}
    for row, flag, d in zip(table, flags.tolist(), distance.tolist()):
        domain = "," if math.isnan(d) else f"{d:.4f},{int(d <= 1.0)}"
        buffer.write(f"{int(row[0])},{int(row[1])},{int(row[2])},{row[3]:.6f},{names[flag]},"
                     f"{domain}\n")
    with atomic_write(path, "w") as f:
        f.write(buffer.getvalue())
    return Path(path)


@dataclass(frozen=True)
class TileScores:
    """Every scored tile of a slide, as its results folder holds them."""

    coords: np.ndarray   # int64 [N, 2] level-0 (x, y) top-left
    scores: np.ndarray   # float32 [N] (from a folder without the binary file: the CSV's 6 decimals)
    flags: np.ndarray    # uint8 [N] artefact bits (wsi.tile_quality), 0 = clean
    tile_size: int       # level-0 px
    # float32 [N] distance to the training tiles (core.domain), NaN where not known
    domain_distance: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)


def write_tile_scores(path, coords, scores, tile_size: int, flags=None,
                      domain_distance=None) -> Path:
    """The patch CSV's columns as numpy arrays (`coords`, `scores`, `flags`, `tile_size`,
    `domain_distance`): the scores as computed, read back without a text round trip."""
    coords, _ = check_scores(coords, scores)
    flags = _flags(flags, len(coords))
    with atomic_write(path, "wb") as f:
        np.savez(f, coords=coords, scores=np.asarray(scores, np.float32), flags=flags,
                 tile_size=np.int64(tile_size),
                 domain_distance=_distance(domain_distance, len(coords)))
    return Path(path)


def read_patch_csv(path) -> TileScores:
    """A patch CSV (`x,y,size,score[,artefact]`), with numpy's C reader (10^5 rows in ~0.2 s)."""
    with open(path) as f:
        header = f.readline().strip().split(",")
    if header[:4] != ["x", "y", "size", "score"]:
        raise ConfigError(f"{Path(path).name}: not a milroi patch CSV (header {header})")
    with warnings.catch_warnings():   # a slide without a tissue tile has an empty table
        warnings.simplefilter("ignore", UserWarning)
        numbers = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(0, 1, 2, 3), ndmin=2)
    if numbers.size == 0:
        numbers = np.zeros((0, 4))
    flags = np.zeros(len(numbers), np.uint8)
    if len(header) > 4 and len(numbers):
        names = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(4,), dtype=str, ndmin=1)
        flags = np.array([flags_from_names(n) for n in names], np.uint8)
    size = int(numbers[0, 2]) if len(numbers) else 0
    return TileScores(numbers[:, :2].astype(np.int64), numbers[:, 3].astype(np.float32), flags,
                      size)


def read_tile_scores(path) -> TileScores:
    """A slide's tile scores from its binary scores file, or from its patch CSV (folders scored
    before the binary file existed have only that)."""
    path = Path(path)
    if path.name.endswith(OUTPUT_SUFFIXES["csv"]):
        return read_patch_csv(path)
    with np.load(path, allow_pickle=False) as data:
        return TileScores(data["coords"].astype(np.int64, copy=False).reshape(-1, 2),
                          data["scores"].astype(np.float32, copy=False),
                          data["flags"].astype(np.uint8, copy=False), int(data["tile_size"]),
                          data["domain_distance"].astype(np.float32, copy=False)
                          if "domain_distance" in data else None)


def score_map(coords, scores, tile_size: int, dimensions) -> tuple[np.ndarray, float]:
    """Scores on a 2D grid with one cell per tile: float32 (rows, cols), NaN where no tile was
    scored; the second value is the downsample (level-0 px per cell) = tile_size."""
    coords, scores = check_scores(coords, scores)
    width, height = (int(v) for v in dimensions)
    grid = np.full((-(-height // tile_size), -(-width // tile_size)), np.nan, np.float32)
    if len(coords):
        rows, cols = coords[:, 1] // tile_size, coords[:, 0] // tile_size
        inside = (rows >= 0) & (rows < grid.shape[0]) & (cols >= 0) & (cols < grid.shape[1])
        grid[rows[inside], cols[inside]] = scores[inside]
    return grid, float(tile_size)


def _ring(coords) -> list[list[float]]:
    return [[float(x), float(y)] for x, y in np.asarray(coords)]


def _polygon_geometry(polygon) -> dict:
    polygon = shapely.geometry.polygon.orient(polygon, 1.0)  # GeoJSON: exterior counter-clockwise
    return {"type": "Polygon",
            "coordinates": [_ring(polygon.exterior.coords)] + [_ring(r.coords) for r in polygon.interiors]}


def _offset(bounds_offset) -> tuple[int, int]:
    bx, by = (int(v) for v in bounds_offset)
    return bx, by


def write_geojson(path, coords, scores, tile_size: int, rois: Sequence = (),
                  roi_stats: Sequence[dict] | None = None, mpp: float | None = None,
                  flags=None, bounds_offset=(0, 0), scale: dict | None = None,
                  decision: dict | None = None, domain: dict | None = None,
                  domain_distance=None) -> Path:
    """A FeatureCollection QuPath imports (File > Import objects): one "detection" per tile with
    its `tumor_score` measurement, one "annotation" classified "Tumor" per ROI. A tile flagged
    as an artefact is classified QuPath's "Ignore*" and says which artefact (`artefact`).

    `coords` and `rois` are level-0 px; the file is in QuPath's frame, level-0 minus
    `bounds_offset` (the slide's OpenSlide bounds, which QuPath crops to), recorded in the
    collection's `properties` with `scale` (how the slide was read: SlideHeader.scale_record),
    `decision` (label and ROIs reconciled: results.decision) and `domain` (the slide against
    the training data: core.domain.DomainCheck); each tile's `domain_distance` is a
    measurement beside its score."""
    coords, scores = check_scores(coords, scores)
    flags = _flags(flags, len(coords))
    distance = _distance(domain_distance, len(coords))
    if roi_stats is None:
        keep = flags == 0
        roi_stats = roi_tile_stats(rois, coords[keep], scores[keep], tile_size)
    roi_stats = list(roi_stats)
    bx, by = _offset(bounds_offset)
    if bx or by:   # areas and tile statistics above are unchanged by a translation
        coords = coords - np.array([bx, by], np.int64)
        rois = [shapely.transform(roi, lambda xy: xy - (bx, by)) for roi in rois]
    x0, y0 = coords[:, 0].tolist(), coords[:, 1].tolist()
    features = []
    for x, y, s, flag, d in zip(x0, y0, scores.tolist(), flags.tolist(), distance.tolist()):
        x1, y1 = x + tile_size, y + tile_size
        properties = {"objectType": "detection", "measurements": {"tumor_score": s}}
        if not math.isnan(d):
            properties["measurements"]["domain_distance"] = round(d, 4)
        if flag:
            properties.update(classification=dict(IGNORE_CLASS), artefact=flag_names(flag))
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon",
                         "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]},
            "properties": properties,
        })
    for i, (roi, st) in enumerate(zip(rois, roi_stats)):
        measurements = {"area_px2": st["area_px"], "tiles": st["tiles"]}
        if mpp:
            measurements["area_um2"] = st["area_px"] * mpp * mpp
        if st["max_score"] is not None:
            measurements.update(max_tumor_score=st["max_score"], mean_tumor_score=st["mean_score"])
        features.append({
            "type": "Feature",
            "geometry": _polygon_geometry(roi),
            "properties": {"objectType": "annotation", "name": f"Tumor ROI {i + 1}",
                           "classification": dict(TUMOR_CLASS), "measurements": measurements},
        })
    frame = {"coordinate_frame": "QuPath's: level-0 px minus bounds_offset (OpenSlide's bounds, "
                                 "which QuPath crops to)", "bounds_offset": {"x": bx, "y": by}}
    if scale is not None:
        frame["scale"] = scale
    if decision is not None:
        frame["decision"] = decision
    if domain is not None:
        frame["domain"] = domain
    with atomic_write(path, "w") as f:
        json.dump({"type": "FeatureCollection", "properties": frame, "features": features}, f,
                  separators=(",", ":"))
    return Path(path)


def heatmap_rgb(thumbnail: np.ndarray, dimensions, coords, scores, tile_size: int,
                alpha: float = HEATMAP_ALPHA, cmap: str = HEATMAP_CMAP) -> np.ndarray:
    """The thumbnail with every scored tile blended with its colormap colour; unscored pixels
    (background, tiles left out) keep the thumbnail's own colour."""
    from matplotlib import colormaps

    grid, _ = score_map(coords, scores, tile_size, dimensions)
    th, tw = thumbnail.shape[:2]
    width, height = (int(v) for v in dimensions)
    # Nearest score cell for the centre of every thumbnail pixel (separable: one row and one
    # column index vector, no per-pixel loop).
    rows = np.minimum(((np.arange(th) + 0.5) * height / th // tile_size).astype(np.int64), grid.shape[0] - 1)
    cols = np.minimum(((np.arange(tw) + 0.5) * width / tw // tile_size).astype(np.int64), grid.shape[1] - 1)
    values = grid[rows[:, None], cols[None, :]]
    scored = ~np.isnan(values)
    colours = colormaps[cmap](np.clip(np.nan_to_num(values), 0, 1), bytes=True)[..., :3]
    out = thumbnail[..., :3].astype(np.float32)
    out[scored] = (1 - alpha) * out[scored] + alpha * colours[scored]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def write_heatmap_png(path, slide, coords, scores, tile_size: int, max_size: int = HEATMAP_MAX_SIZE,
                      alpha: float = HEATMAP_ALPHA, cmap: str = HEATMAP_CMAP) -> Path:
    """Heatmap PNG over the slide thumbnail (longest side `max_size` px)."""
    from PIL import Image

    coords, scores = check_scores(coords, scores)
    rgb = heatmap_rgb(slide.thumbnail(max_size), slide.dimensions, coords, scores, tile_size,
                      alpha, cmap)
    with atomic_write(path, "wb") as f:
        Image.fromarray(rgb).save(f, format="PNG")
    return Path(path)


def _xy(ring) -> dict:
    xy = np.asarray(ring.coords)
    return {"x": xy[:, 0].tolist(), "y": xy[:, 1].tolist()}


def write_spatiopath_json(path, slide_name: str, rois: Sequence, mpp: float,
                          scores=None, roi_stats: Sequence[dict] | None = None,
                          roi_threshold: float | None = None, tile_size: int | None = None,
                          dimensions=None, bounds_offset=(0, 0),
                          tissue: TissueParams | None = None, scale: dict | None = None,
                          decision: dict | None = None, domain: dict | None = None) -> Path:
    """Tumour ROIs for Spatiopath: polygons as {"x": [...], "y": [...]} arrays in level-0 px
    (exterior closed, first point repeated) plus holes, the pixel size, score statistics, and
    the slide's `bounds_offset` (what to subtract to get QuPath's frame, as in the GeoJSON).
    `tissue`: the tissue-mask settings the slide was scored with (the model's), so that the
    Spatiopath analysis cuts its windows from the same mask. `scale`: how the slide was read
    (the model's pixel size, the scale factor, the level; SlideHeader.scale_record).
    `decision`: label and ROIs reconciled (results.decision), null when not known. `domain`:
    the slide against the model's training data (core.domain.DomainCheck), null when not known:
    ROIs of a slide out of domain rest on a model outside what it knows."""
    bx, by = _offset(bounds_offset)
    roi_stats = list(roi_stats) if roi_stats is not None else [{} for _ in rois]
    s = np.asarray(scores, np.float64) if scores is not None else np.zeros(0)
    document = {
        "format": SPATIOPATH_FORMAT,
        "slide": slide_name,
        "pixel_size_um": {"mpp": float(mpp)},
        "units": {"coordinates": "level-0 pixels, origin top-left, x right, y down",
                  "area_um2": "square micrometres (area_px2 * mpp^2)",
                  "scores": "tumour probability per tile in [0, 1]",
                  "bounds_offset": "level-0 px; QuPath (and the GeoJSON) show a point at "
                                   "(x - bounds_offset.x, y - bounds_offset.y)"},
        "bounds_offset": {"x": bx, "y": by},
        "dimensions": None if dimensions is None else [int(v) for v in dimensions],
        "tile_size": tile_size,
        "threshold": roi_threshold,   # the ROI threshold (the key of milroi-spatiopath/1)
        "tissue_params": None if tissue is None else tissue.to_dict(),
        "scale": scale,
        "decision": decision,
        "domain": domain,
        "score_stats": {"tiles": int(len(s)),
                        "min": float(s.min()) if len(s) else None,
                        "max": float(s.max()) if len(s) else None,
                        "mean": float(s.mean()) if len(s) else None,
                        "median": float(np.median(s)) if len(s) else None,
                        "above_threshold": (int((s >= roi_threshold).sum()) if roi_threshold is not None
                                            else None)},
        "polygons": [
            {"id": i + 1, **_xy(roi.exterior), "holes": [_xy(r) for r in roi.interiors],
             "area_px2": float(roi.area), "area_um2": float(roi.area) * mpp * mpp,
             **{k: v for k, v in st.items() if k != "area_px"}}
            for i, (roi, st) in enumerate(zip(rois, roi_stats))
        ],
    }
    with atomic_write(path, "w") as f:
        json.dump(document, f, indent=1)
    return Path(path)


def _stats(rois: Sequence[Roi]) -> list[dict]:
    """The per-ROI statistics as the GeoJSON and Spatiopath writers take them."""
    return [{"area_px": roi.area_px, "tiles": roi.tiles,
             "max_score": None if np.isnan(roi.max_score) else roi.max_score,
             "mean_score": None if np.isnan(roi.mean_score) else roi.mean_score} for roi in rois]


@dataclass(frozen=True)
class ScoredRois:
    """What `<slide>_spatiopath.json` says: the ROIs (shapely Polygons, level-0 px), their ids,
    the level-0 pixel size and dimensions, and `bounds_offset`: level-0 px of the origin of
    QuPath's frame (OpenSlide's bounds, which QuPath crops to; (0, 0) without bounds or in
    files that do not record it)."""

    slide: str
    mpp: float
    dimensions: tuple[int, int]
    polygons: list
    ids: list[int]
    path: Path | None = None
    bounds_offset: tuple[int, int] = (0, 0)
    tissue: TissueParams | None = None   # the mask settings it was scored with (None: unrecorded)


def _xy_ring(part: dict, path) -> np.ndarray:
    try:
        xy = np.column_stack([np.asarray(part["x"], float), np.asarray(part["y"], float)])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: a polygon without numeric x and y arrays ({exc})") from None
    return xy


def read_scored_rois(path) -> ScoredRois:
    """Read a `milroi-spatiopath/1` file (`write_spatiopath_json`)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read ROI file {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != SPATIOPATH_FORMAT:
        raise ConfigError(f"{path} is not a milroi Spatiopath file (format {SPATIOPATH_FORMAT!r} "
                          "expected)")
    if not doc.get("dimensions"):
        raise ConfigError(f"{path}: no slide dimensions (written by an older milroi: score again)")
    polygons, ids = [], []
    for i, item in enumerate(doc.get("polygons", [])):
        shell = _xy_ring(item, path)
        holes = [_xy_ring(h, path) for h in item.get("holes", [])]
        polygon = Polygon(shell, holes)
        if not polygon.is_valid:
            polygon = shapely.make_valid(polygon)
        polygons.append(polygon)
        ids.append(int(item.get("id", i + 1)))
    width, height = (int(v) for v in doc["dimensions"])
    offset = doc.get("bounds_offset") or {}
    tissue = doc.get("tissue_params")
    return ScoredRois(slide=str(doc.get("slide", path.stem)), mpp=float(doc["pixel_size_um"]["mpp"]),
                      dimensions=(width, height), polygons=polygons, ids=ids, path=path,
                      bounds_offset=(int(offset.get("x", 0)), int(offset.get("y", 0))),
                      tissue=TissueParams.from_dict(tissue) if isinstance(tissue, dict) else None)


def write_scored_slide(out_dir, slide, scored: ScoredSlide,
                       tissue: TissueParams | None = None) -> dict[str, Path]:
    """The outputs of a scored slide in `out_dir`, named after the slide; returns
    {kind: path} for every kind of `results.layout.OUTPUT_SUFFIXES`. The ROIs are the scorer's
    (`scored.rois`), not computed again. `slide` (open) gives the thumbnail, the pixel size and
    the bounds. `tissue`: the tissue-mask settings the slide was scored with."""
    return _write_files(out_dir, slide, scored.coords, scored.scores, scored.flags,
                        scored.tile_size, scored.summary.roi_threshold, scored.rois, tissue,
                        scored.header.scale_record(), mpp=scored.mpp,
                        decision=scored.summary.decision.to_dict(),
                        domain=scored.summary.domain.to_dict(),
                        domain_distance=scored.domain_distance)


def write_slide_outputs(out_dir, slide, coords, scores, tile_size: int,
                        roi_threshold: float = DEFAULT_ROI_THRESHOLD, min_area_px: float = 0.0,
                        flags=None, tissue: TissueParams | None = None) -> dict[str, Path]:
    """The outputs of bare arrays (tests, tools): as `write_scored_slide`, with the ROIs computed
    here from the clean tiles at `roi_threshold` (components under `min_area_px` dropped)."""
    coords, scores = check_scores(coords, scores)
    flags = _flags(flags, len(coords))
    keep = flags == 0
    polygons = roi_polygons(coords[keep], scores[keep], tile_size, roi_threshold, min_area_px)
    rois = with_tile_stats(polygons, coords[keep], scores[keep], tile_size, slide.mpp)
    return _write_files(out_dir, slide, coords, scores, flags, tile_size, roi_threshold, rois,
                        tissue)


def _write_files(out_dir, slide, coords, scores, flags, tile_size: int, roi_threshold: float,
                 rois: Sequence[Roi], tissue: TissueParams | None,
                 scale: dict | None = None, mpp: float | None = None,
                 decision: dict | None = None, domain: dict | None = None,
                 domain_distance=None) -> dict[str, Path]:
    """Tiles with artefact `flags` are listed (CSV, GeoJSON) but make no ROI and no heatmap
    colour. The GeoJSON is in QuPath's frame for the slide (level-0 minus `slide.bounds_offset`),
    the other files in level-0 px. `mpp`: the pixel size the slide was scored at (default the
    open slide's)."""
    mpp = slide.mpp if mpp is None else mpp
    coords, scores = check_scores(coords, scores)
    flags = _flags(flags, len(coords))
    keep = flags == 0
    clean_coords, clean_scores = coords[keep], scores[keep]
    polygons, stats = [roi.polygon for roi in rois], _stats(rois)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = slide.name
    offset = getattr(slide, "bounds_offset", (0, 0))
    return {
        "csv": write_patch_csv(output_path(out, name, "csv"), coords, scores, tile_size, flags,
                               domain_distance),
        "scores": write_tile_scores(output_path(out, name, "scores"), coords, scores, tile_size,
                                    flags, domain_distance),
        "geojson": write_geojson(output_path(out, name, "geojson"), coords, scores, tile_size,
                                 polygons, stats, mpp=mpp, flags=flags, bounds_offset=offset,
                                 scale=scale, decision=decision, domain=domain,
                                 domain_distance=domain_distance),
        "heatmap": write_heatmap_png(output_path(out, name, "heatmap"), slide, clean_coords,
                                     clean_scores, tile_size),
        "spatiopath": write_spatiopath_json(output_path(out, name, "spatiopath"), name, polygons,
                                            mpp, clean_scores, stats, roi_threshold,
                                            tile_size, slide.dimensions, bounds_offset=offset,
                                            tissue=tissue, scale=scale, decision=decision,
                                            domain=domain),
    }
