"""Tumour ROIs of a scored slide: computed once, where the scores are (the pipeline), and carried
to every reader in `results.scored.Roi` (a client takes the server's polygons).

An ROI is the union of the squares of the tiles scored at or above the ROI threshold: exact for
several components and for holes (a hole is a run of low-scored or missing tiles enclosed by
high-scored ones), with no rasterisation error. Artefact tiles are left out by the caller.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely

from core.bundle import DEFAULT_ROI_THRESHOLD
from core.errors import RequestError
from results.scored import Roi


def check_scores(coords, scores) -> tuple[np.ndarray, np.ndarray]:
    """coords as int64 [N, 2] and scores as float64 [N], or RequestError if they disagree."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(coords) != len(scores):
        raise RequestError(f"{len(coords)} tile coordinates but {len(scores)} scores")
    return coords, scores


def _polygons(geometry) -> list:
    """The polygons of a (multi)polygon or collection, empty parts dropped."""
    if geometry is None or geometry.is_empty:
        return []
    if geometry.geom_type == "Polygon":
        return [geometry]
    return [g for part in geometry.geoms for g in _polygons(part)]


def roi_polygons(coords, scores, tile_size: int, roi_threshold: float = DEFAULT_ROI_THRESHOLD,
                 min_area_px: float = 0.0) -> list:
    """Tumour ROIs (shapely Polygons in level-0 px, largest first): the union of the squares of
    the tiles scored >= roi_threshold, one polygon per connected component, holes kept, collinear
    vertices removed, components smaller than `min_area_px` dropped."""
    coords, scores = check_scores(coords, scores)
    hot = coords[scores >= roi_threshold].astype(np.float64)
    if len(hot) == 0:
        return []
    boxes = shapely.box(hot[:, 0], hot[:, 1], hot[:, 0] + tile_size, hot[:, 1] + tile_size)
    # Tiles touching only at a corner would make one invalid "bow-tie" polygon; union_all splits
    # them into separate components, which is what a reader of the map sees too.
    union = shapely.simplify(shapely.union_all(boxes), 0.0)  # tolerance 0: drop collinear points
    polygons = [p for p in _polygons(union) if p.area >= min_area_px]
    return sorted(polygons, key=lambda p: -p.area)


def roi_tile_stats(rois: Sequence, coords: np.ndarray, scores: np.ndarray, tile_size: int) -> list[dict]:
    """Per ROI: area (px^2) and the max/mean score of the tiles whose centre lies inside it."""
    cx = coords[:, 0] + tile_size / 2
    cy = coords[:, 1] + tile_size / 2
    stats = []
    for roi in rois:  # one vectorised point-in-polygon test per ROI
        inside = shapely.contains_xy(roi, cx, cy) if len(coords) else np.zeros(0, bool)
        selected = scores[inside]
        stats.append({"area_px": float(roi.area), "tiles": int(inside.sum()),
                      "max_score": float(selected.max()) if len(selected) else None,
                      "mean_score": float(selected.mean()) if len(selected) else None})
    return stats


def with_tile_stats(polygons: Sequence, coords, scores, tile_size: int, mpp: float) -> list[Roi]:
    """`Roi`s of `polygons` (level-0 px) with their area in um^2 and the tiles whose centre lies
    inside (count, max and mean score; NaN scores for an ROI that holds no tile centre)."""
    coords, scores = check_scores(coords, scores)
    stats = roi_tile_stats(polygons, coords, scores, tile_size)
    return [Roi(polygon, s["area_px"] * mpp * mpp,
                np.nan if s["max_score"] is None else s["max_score"],
                np.nan if s["mean_score"] is None else s["mean_score"], s["tiles"])
            for polygon, s in zip(polygons, stats)]


def tumour_rois(coords, scores, tile_size: int, roi_threshold: float, mpp: float) -> list[Roi]:
    """The tumour ROIs of clean tiles' scores, largest first, with their statistics."""
    coords, scores = check_scores(coords, scores)
    if len(coords) == 0:
        return []
    return with_tile_stats(roi_polygons(coords, scores, tile_size, roi_threshold), coords, scores,
                           tile_size, mpp)
