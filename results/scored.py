"""The parts of a scored slide that every producer and consumer shares, one type each.

The pipeline (`serving.pipeline`) yields them, the server turns them into protobuf, the gRPC client
(`serving.client`) turns protobuf back into them, and the result writers, the viewer and the batch
job read them: a field added here reaches every side.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelRef:
    """Which model computed a score: registry name + version (or the bundle's content digest)."""

    name: str
    version: str
    alias: str = ""
    run_id: str = ""


@dataclass(frozen=True)
class Roi:
    """A tumour region: a polygon in level-0 px with its area and the scores of its tiles
    (NaN for an ROI that holds no tile centre)."""

    polygon: object          # shapely Polygon, level-0 px
    area_um2: float
    max_score: float
    mean_score: float


@dataclass(frozen=True)
class SlideHeader:
    """What a scorer knows of a slide before its first score."""

    slide_path: str       # as the client named it (relative to the server's slide root)
    name: str             # the slide's name (wsi.discovery.slide_name)
    width: int            # level-0 px
    height: int
    level_count: int
    mpp: float            # um per level-0 px
    mpp_source: str       # "metadata", or "fallback" when the slide has none
    tile_size: int        # side of a grid tile in level-0 px (the coordinates' frame)
    tile_level: int       # the level the model reads its input from
    tile_count: int       # tissue tiles that will be scored
    model: ModelRef
    input_px: int         # side of the model's input tile, px at tile_level
