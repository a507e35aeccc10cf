"""What a model was trained on, and whether a slide is like it (the domain check).

A score means what it says only on slides like the training slides. `milroi-train fit` describes
its training data (training.domain) and the bundle carries the description (`domain.npz` and the
manifest's `domain` entry, docs/INTERFACES.md); the scorer checks every slide against it
(serving.pipeline) and states the verdict beside the score, as a `DomainCheck`:

- features: each tile's backbone features, projected on the training tiles' main components
  (PCA), against their shrunk covariance (Ledoit-Wolf): Hotelling's T^2 inside the projection and
  the squared residual Q outside it, each divided by its TILE_QUANTILE over training tiles of
  slides the projection was not fitted on (the square root of the larger ratio: 1 is the edge
  of 99 % of training tiles).
  A tile's `domain_distance` is that ratio; it is out of domain above 1. The slide is out of
  domain when more than MAX_OUT_SHARE of its clean tiles are (an in-domain slide has about 1 %
  there; a tumour region is among the training tiles too).
- stain: the slide's stain statistics (wsi.stain: log percentiles of its tissue pixels' H and E
  amounts) against the training slides': each within STAIN_SPREAD_SD standard deviations of
  theirs, never tighter than MIN_STAIN_LOG_RATIO (slides of one stain differ by ~1 %: the
  floor keeps a training set of one stain from refusing the next batch of the same lab).
- scale: the slide's pixel size within the training slides' range, widened SCALE_TOLERANCE
  either way (a 2x coarser scan is upsampled to the model's input: detail it never saw).
- pixel size: a slide whose pixel size is not in its metadata (given by the user) is out of
  domain, whatever it looks like: its scale is a guess.

`DomainCheck.score` is the largest of the features, stain and scale ratios, each 1 at its limit
(for features: the share of tiles beyond the training tiles over MAX_OUT_SHARE): <= 1
lies within the training data on every measured axis; a slide without a pixel size is out of
domain whatever its score. This module is numpy only: training computes the description
(training.domain, scikit-learn), serving applies it.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import BundleError

DOMAIN_ROLE = "domain"             # files[DOMAIN_ROLE] in the manifest
DOMAIN_FILE = "domain.npz"
CRITERIA = ("features", "stain", "scale", "pixel_size")
TILE_QUANTILE = 0.99               # a tile beyond this share of training tiles is out of domain
MAX_OUT_SHARE = 0.2                # a slide with more out-of-domain tiles than this is out
SCALE_TOLERANCE = 1.25             # pixel sizes this factor beyond the training range are out
STAIN_SPREAD_SD = 3.0              # stain limits: this many sd of the training slides' spread
MIN_STAIN_LOG_RATIO = math.log(1.1)   # ... and never tighter than +-10 % of a dye's amount
NO_DESCRIPTION = ("the model carries no description of its training data (a bundle exported "
                  "before milroi checked domains): export the run again")


@dataclass(frozen=True)
class DomainCheck:
    """One slide against the training data. `in_domain` None: the model cannot tell."""

    in_domain: bool | None
    score: float                                   # NaN when unknown
    reasons: tuple[str, ...] = ()                  # "criterion: what and by how much"
    criteria: dict[str, float] = field(default_factory=dict)   # criterion -> ratio to its limit

    def to_dict(self) -> dict:
        return {"in_domain": self.in_domain,
                "domain_score": None if math.isnan(self.score) else round(self.score, 4),
                "reasons": list(self.reasons),
                "criteria": {k: round(v, 4) for k, v in self.criteria.items()}}


UNKNOWN = DomainCheck(None, math.nan, (NO_DESCRIPTION,))


@dataclass(frozen=True)
class TileDistribution:
    """A cloud of training tile vectors: a projection (PCA), its shrunk precision, and the
    limits of T^2 inside it and Q outside it."""

    mean: np.ndarray          # [D]
    components: np.ndarray    # [k, D], orthonormal rows
    precision: np.ndarray     # [k, k], inverse Ledoit-Wolf covariance of the projection
    location: np.ndarray      # [k], the projection's mean
    t2_limit: float           # TILE_QUANTILE of T^2 over held-out training tiles
    q_limit: float            # TILE_QUANTILE of the residual Q

    def statistics(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hotelling's T^2 in the projection and the squared residual Q outside it, per row."""
        x = np.asarray(vectors, np.float64).reshape(len(vectors), -1) - self.mean
        z = x @ self.components.T
        d = z - self.location
        t2 = np.einsum("ij,jk,ik->i", d, self.precision, d)
        q = np.maximum(np.einsum("ij,ij->i", x, x) - np.einsum("ij,ij->i", z, z), 0.0)
        return t2, q

    def distance(self, vectors: np.ndarray) -> np.ndarray:
        """float32 [n]: each row's distance to the cloud, 1 at the TILE_QUANTILE (NaN rows
        stay NaN)."""
        t2, q = self.statistics(vectors)
        return np.sqrt(np.maximum(t2 / self.t2_limit, q / self.q_limit)).astype(np.float32)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}_{k}": np.asarray(getattr(self, k), np.float32)
                for k in ("mean", "components", "precision", "location")}

    @classmethod
    def from_arrays(cls, arrays, prefix: str, limits: dict) -> TileDistribution:
        return cls(*(np.asarray(arrays[f"{prefix}_{k}"], np.float64)
                     for k in ("mean", "components", "precision", "location")),
                   float(limits["t2_limit"]), float(limits["q_limit"]))


@dataclass(frozen=True)
class StainDomain:
    """The training slides' stain statistics (wsi.stain.STATISTICS): mean and limit of each."""

    names: tuple[str, ...]
    mean: np.ndarray     # [m] mean over the training slides (log amounts)
    limit: np.ndarray    # [m] largest allowed |difference| (log)

    def ratios(self, statistics: dict[str, float]) -> np.ndarray:
        """|slide - mean| / limit of each described statistic (wsi.stain: name -> value)."""
        values = np.array([statistics[name] for name in self.names], np.float64)
        return np.abs(values - self.mean) / self.limit

    def reasons(self, statistics: dict[str, float]) -> list[str]:
        out = []
        for name, mean, limit in zip(self.names, self.mean, self.limit):
            value = statistics[name]
            if abs(value - mean) > limit:
                out.append(f"stain: {name.replace('_p', ' ')}th percentile "
                           f"{math.exp(value - mean):.2f}x the training slides' mean (limit "
                           f"{math.exp(-limit):.2f}x-{math.exp(limit):.2f}x)")
        return out

    def to_dict(self) -> dict:
        return {"statistics": list(self.names), "mean": np.round(self.mean, 5).tolist(),
                "limit": np.round(self.limit, 5).tolist()}

    @classmethod
    def from_dict(cls, values: dict) -> StainDomain:
        return cls(tuple(values["statistics"]), np.asarray(values["mean"], float),
                   np.asarray(values["limit"], float))


@dataclass(frozen=True)
class DomainModel:
    """The description a bundle carries (a part may be missing: then it is not checked)."""

    features: TileDistribution | None      # backbone features of the training tiles
    stain: StainDomain | None              # the training slides' stain statistics
    mpp_range: tuple[float, float] | None  # the training slides' pixel sizes, um/px
    slides: int = 0
    tiles: int = 0

    # -- scoring -----------------------------------------------------------------------------
    def tile_distance(self, features: np.ndarray) -> np.ndarray:
        """float32 [n] (TileDistribution.distance); NaN without a feature description."""
        if self.features is None:
            return np.full(len(features), np.nan, np.float32)
        return self.features.distance(features)

    def check(self, tile_distance: np.ndarray, stain: dict[str, float] | None = None,
              mpp: float = math.nan, mpp_source: str = "metadata") -> DomainCheck:
        """The verdict on one slide: `tile_distance` of its clean tiles, its stain statistics
        (wsi.stain, name -> value; None: not measured), its pixel size and where that came from (wsi.slide:
        "metadata", "user")."""
        criteria: dict[str, float] = {}
        reasons: list[str] = []
        distance = np.asarray(tile_distance, np.float64)
        distance = distance[np.isfinite(distance)]
        if self.features is not None and len(distance):
            share = float(np.mean(distance > 1.0))
            criteria["features"] = share / MAX_OUT_SHARE
            if share > MAX_OUT_SHARE:
                reasons.append(f"features: {share:.0%} of the tiles lie beyond "
                               f"{TILE_QUANTILE:.0%} of the training tiles (limit "
                               f"{MAX_OUT_SHARE:.0%})")
        if self.stain is not None and stain is not None and set(self.stain.names) <= set(stain):
            criteria["stain"] = float(self.stain.ratios(stain).max())
            reasons += self.stain.reasons(stain)
        if self.mpp_range is not None and mpp > 0:
            low, high = self.mpp_range
            factor = max(mpp / high, low / mpp, 1.0)
            criteria["scale"] = math.log(factor) / math.log(SCALE_TOLERANCE)
            if factor > SCALE_TOLERANCE:
                reasons.append(f"scale: {mpp:.3g} um/px, the training slides {low:.3g}-{high:.3g} "
                               f"um/px (limit x{SCALE_TOLERANCE:g} either way)")
        if mpp_source != "metadata":
            given = "given by the user" if mpp_source == "user" else mpp_source
            reasons.append(f"pixel_size: not in the slide's metadata ({mpp:.3g} um/px {given}): "
                           f"the scale the model reads it at is a guess")
        score = max(criteria.values()) if criteria else math.nan
        return DomainCheck(not reasons, score, tuple(reasons), criteria)

    # -- the bundle ----------------------------------------------------------------------------
    def write(self, folder: str | os.PathLike) -> dict:
        """Write the arrays to folder/DOMAIN_FILE; returns the manifest's `domain` entry."""
        entry: dict = {"slides": self.slides, "tiles": self.tiles,
                       "tile_quantile": TILE_QUANTILE, "max_out_share": MAX_OUT_SHARE,
                       "scale_tolerance": SCALE_TOLERANCE,
                       "mpp_range": None if self.mpp_range is None else list(self.mpp_range)}
        arrays: dict[str, np.ndarray] = {}
        if self.features is not None:
            f = self.features
            arrays = f.arrays("features")
            entry["features"] = {"dimensions": int(f.components.shape[0]),
                                 "t2_limit": f.t2_limit, "q_limit": f.q_limit}
        if self.stain is not None:
            entry["stain"] = self.stain.to_dict()
        np.savez(Path(folder) / DOMAIN_FILE, **arrays)
        return json.loads(json.dumps(entry))   # plain JSON types

    @classmethod
    def load(cls, folder: str | os.PathLike, entry: dict | None, file_name: str | None
             ) -> DomainModel | None:
        """The description in `folder` (a bundle, a run's artifact); None where there is none."""
        if not entry or not file_name:
            return None
        try:
            features = None
            if entry.get("features"):
                with np.load(Path(folder) / file_name) as arrays:
                    features = TileDistribution.from_arrays(arrays, "features", entry["features"])
            stain = StainDomain.from_dict(entry["stain"]) if entry.get("stain") else None
            mpp = entry.get("mpp_range")
            return cls(features, stain, None if mpp is None else (float(mpp[0]), float(mpp[1])),
                       int(entry.get("slides", 0)), int(entry.get("tiles", 0)))
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise BundleError(folder, f"unreadable domain description {file_name}: {exc}") from None
