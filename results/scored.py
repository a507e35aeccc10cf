"""A scored slide, one type for every producer and consumer.

A score flows as three messages, in this order, and a `ScoredSlide` is the three together:

    SlideHeader   once, after the tissue mask and the grid: geometry, pixel size, tile count, model
    PatchChunk    many: level-0 (x, y), score and artefact flags of consecutive tiles, grid order
    SlideSummary  once, after the last score: slide score and label, ROIs with their statistics,
                  thresholds, timings, the domain check (core.domain: is the slide like the
                  training slides?)

The pipeline (`serving.pipeline`) yields the header, the chunks and the summary; the server turns
them into protobuf and the gRPC client (`serving.client`) turns protobuf back into them. Both
assemble a `ScoredSlide` (`SlideScorer.score_slide`, `SlideScoringStream.collect`), which is what
the batch backends return and what the result writers (`results.outputs.write_scored_slide`)
take. A field added here reaches every side.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from core.domain import UNKNOWN, DomainCheck
from results.decision import Decision, decide


@dataclass(frozen=True)
class ModelRef:
    """Which model computed a score: registry name + version (or the bundle's content digest)."""

    name: str
    version: str
    alias: str = ""
    run_id: str = ""


@dataclass(frozen=True)
class Roi:
    """A tumour region: a polygon in level-0 px with its area and the scores of the tiles whose
    centre lies inside (`tiles` of them; NaN scores for an ROI that holds no tile centre)."""

    polygon: object          # shapely Polygon, level-0 px
    area_um2: float
    max_score: float
    mean_score: float
    tiles: int = 0

    @property
    def area_px(self) -> float:
        return float(self.polygon.area)


@dataclass(frozen=True)
class SlideHeader:
    """What a scorer knows of a slide before its first score."""

    slide_path: str       # as the client named it (relative to the server's slide root)
    name: str             # the slide's name (wsi.discovery.slide_name)
    width: int            # level-0 px
    height: int
    level_count: int
    mpp: float            # um per level-0 px
    mpp_source: str       # "metadata", or "user" (--fallback-mpp, mpp.csv)
    tile_size: int        # side of a grid tile in level-0 px (the coordinates' frame)
    tile_level: int       # the pyramid level this slide's tiles are read from (wsi.scale)
    tile_count: int       # tissue tiles that will be scored
    model: ModelRef
    input_px: int         # side of the model's input tile, px at model_mpp
    bounds_offset: tuple[int, int] = (0, 0)   # OpenSlide's bounds: QuPath's origin, level-0 px
    # The scale (wsi.scale.ReadScale); NaN / False from a server that predates them.
    model_mpp: float = math.nan      # the model's input pixel size, um/px
    scale_factor: float = math.nan   # level-0 px per model px (model_mpp / mpp)
    upsampled: bool = False          # the slide is coarser than the model: pixels enlarged

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.width, self.height

    def scale_record(self) -> dict:
        """How the slide was read, as every output states it (summary, GeoJSON, Spatiopath)."""
        return {"slide_mpp": self.mpp, "mpp_source": self.mpp_source, "model_mpp": self.model_mpp,
                "scale_factor": self.scale_factor, "read_level": self.tile_level,
                "upsampled": self.upsampled}


@dataclass(frozen=True)
class PatchChunk:
    """The scores of consecutive tiles in grid order, from tile index `offset` on."""

    offset: int
    coords: np.ndarray       # int64 [n, 2] level-0 (x, y) top-left
    scores: np.ndarray       # float32 [n] tumour probability
    flags: np.ndarray        # uint8 [n] artefact bits (wsi.tile_quality), 0 = clean
    # float32 [n] distance to the training tiles (core.domain: > 1 out of domain); None or NaN
    # where the model carries no description of its training data
    domain_distance: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class Timings:
    open_s: float = 0.0
    tissue_s: float = 0.0
    scoring_s: float = 0.0
    total_s: float = 0.0
    first_score_s: float = 0.0
    tiles_per_second: float = 0.0


@dataclass(frozen=True)
class SlideSummary:
    """What a scorer knows of a slide after its last score."""

    slide_path: str
    slide_score: float       # slide-level tumour probability (NaN without clean tiles)
    label: str               # "tumor" | "normal" | "no_tissue"
    slide_threshold: float   # the slide probability at which the label is "tumor"
    roi_threshold: float     # the tile score at which a tile joins an ROI
    tile_count: int
    artefact_count: int      # tiles flagged as artefacts: reported, in no ROI, not in the score
    rois: list[Roi]
    mpp: float               # pixel size of the ROI coordinates, um/px
    timings: Timings
    model: ModelRef
    slide_logit: float = math.nan   # NaN where the server does not send it
    domain: DomainCheck = UNKNOWN   # the slide against the training data (core.domain)

    @property
    def polygons(self) -> list:
        return [roi.polygon for roi in self.rois]

    @property
    def decision(self) -> Decision:
        """The one decision of label and ROIs (results.decision)."""
        top = max((roi.max_score for roi in self.rois), default=None)
        return decide(self.label, float(self.slide_score), self.slide_threshold, len(self.rois),
                      self.roi_threshold, top)

    def to_dict(self) -> dict:
        """JSON-ready: polygons as GeoJSON-like coordinate lists (level-0 px)."""
        out = asdict(self)
        out["rois"] = [{"exterior": [list(c) for c in roi.polygon.exterior.coords],
                        "holes": [[list(c) for c in ring.coords] for ring in roi.polygon.interiors],
                        "area_um2": roi.area_um2, "max_score": roi.max_score,
                        "mean_score": roi.mean_score, "tiles": roi.tiles} for roi in self.rois]
        out["decision"] = self.decision.to_dict()
        out["domain"] = self.domain.to_dict()
        return out


@dataclass(frozen=True)
class ScoredSlide:
    """One scored slide: its header, every tile's score and artefact flags, its summary."""

    header: SlideHeader
    coords: np.ndarray = field(repr=False)   # int64 [N, 2] level-0 (x, y) top-left, grid order
    scores: np.ndarray = field(repr=False)   # float32 [N] tumour probability
    flags: np.ndarray = field(repr=False)    # uint8 [N] artefact bits (wsi.tile_quality), 0 = clean
    summary: SlideSummary
    # float32 [N] each tile's distance to the training tiles (core.domain; > 1: out of domain),
    # NaN where the model has no description
    domain_distance: np.ndarray = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.domain_distance is None:
            object.__setattr__(self, "domain_distance",
                               np.full(len(self.scores), np.nan, np.float32))

    @classmethod
    def from_chunks(cls, header: SlideHeader, chunks: Sequence[PatchChunk],
                    summary: SlideSummary) -> ScoredSlide:
        """Concatenate the chunks of a stream (in grid order)."""
        coords = [c.coords for c in chunks]
        scores = [c.scores for c in chunks]
        flags = [c.flags for c in chunks]
        distance = [c.domain_distance if c.domain_distance is not None
                    else np.full(len(c), np.nan, np.float32) for c in chunks]
        return cls(header,
                   np.concatenate(coords).astype(np.int64, copy=False) if len(coords)
                   else np.zeros((0, 2), np.int64),
                   np.concatenate(scores).astype(np.float32, copy=False) if len(scores)
                   else np.zeros(0, np.float32),
                   np.concatenate(flags).astype(np.uint8, copy=False) if len(flags)
                   else np.zeros(0, np.uint8),
                   summary,
                   np.concatenate(distance).astype(np.float32, copy=False) if len(distance)
                   else np.zeros(0, np.float32))

    def with_rois(self, rois: list[Roi]) -> ScoredSlide:
        return replace(self, summary=replace(self.summary, rois=rois))

    # The fields most readers want, without the header / summary split.
    @property
    def name(self) -> str:
        return self.header.name

    @property
    def tile_size(self) -> int:
        """Side of a tile in level-0 px."""
        return self.header.tile_size

    @property
    def mpp(self) -> float:
        return self.header.mpp

    @property
    def rois(self) -> list[Roi]:
        return self.summary.rois

    @property
    def slide_score(self) -> float:
        return self.summary.slide_score

    @property
    def label(self) -> str:
        return self.summary.label

    @property
    def decision(self) -> Decision:
        return self.summary.decision

    @property
    def domain(self) -> DomainCheck:
        return self.summary.domain

    @property
    def tile_count(self) -> int:
        return self.summary.tile_count

    @property
    def model(self) -> ModelRef:
        return self.summary.model

    @property
    def clean(self) -> np.ndarray:
        """bool [N]: the tiles that count (no artefact flag)."""
        return self.flags == 0
