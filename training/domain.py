"""Describe a model's training data for the domain check (core.domain), from its feature files.

`describe(bags)` builds the `DomainModel` that `fit` logs (artifact `domain/`) and `export`
puts in the bundle, from the clean tiles of the training slides (at most MAX_TILES, spread
evenly over the slides):

- features: a PCA projection (COMPONENTS dimensions) of the tiles' backbone features and the
  Ledoit-Wolf shrunk covariance of the projection (scikit-learn). Its tile limits (the
  TILE_QUANTILE of T^2 and of the residual Q) are measured out of sample: the slides are split
  in two halves, each half's fit scores the other half's tiles, and the quantile is taken over
  both. Measured in sample, the limits would be tighter than new slides of the same kind can
  meet (a projection fits its own tiles best), and held-out slides of the training
  distribution would be flagged.
- stain: the mean and standard deviation of the training slides' stain statistics (wsi.stain,
  the `stain` attribute of their feature files); limits at STAIN_SPREAD_SD standard
  deviations, floored (core.domain);
- the training slides' pixel sizes (those read from their metadata).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from core.domain import (
    MIN_STAIN_LOG_RATIO,
    STAIN_SPREAD_SD,
    TILE_QUANTILE,
    DomainModel,
    StainDomain,
    TileDistribution,
)
from training.feature_file import Bag
from wsi.stain import STATISTICS

log = logging.getLogger(__name__)

COMPONENTS = 16        # PCA dimensions of the feature description
MAX_TILES = 20_000     # tiles the description is fitted on, spread over the slides
RESIDUAL_FLOOR = 1e-3  # the smallest Q limit, as a share of the median squared tile norm


def describe(bags: Sequence[Bag], seed: int = 0) -> DomainModel:
    """The description of the training data in `bags` (their clean tiles)."""
    bags = [b for b in bags if len(b.features)]
    rng = np.random.default_rng(seed)
    per_slide = max(1, MAX_TILES // max(1, len(bags)))
    features = []
    for bag in bags:
        n = len(bag.features)
        pick = np.sort(rng.choice(n, per_slide, replace=False)) if n > per_slide else np.arange(n)
        features.append(np.asarray(bag.features[pick], np.float64))
    seed = int(rng.integers(2**31))
    stain = [b.stain for b in bags if b.stain is not None]
    mpps = [b.attrs.mpp for b in bags if b.attrs is not None and b.attrs.mpp_source == "metadata"]
    model = DomainModel(_distribution(features, seed) if features else None,
                        _stain_domain(stain) if stain else None,
                        (min(mpps), max(mpps)) if mpps else None,
                        slides=len(bags), tiles=int(sum(len(f) for f in features)))
    log.info("training data described: %d slides, %d tiles%s%s%s", model.slides, model.tiles,
             "" if model.features is None else
             f", features in {model.features.components.shape[0]} components",
             "" if model.stain is None else f", the stain of {len(stain)} slides",
             "" if model.mpp_range is None else
             f", {model.mpp_range[0]:.3g}-{model.mpp_range[1]:.3g} um/px")
    return model


def _fit(x: np.ndarray, seed: int) -> TileDistribution:
    """The cloud of rows x [n, D]: PCA to COMPONENTS dimensions, Ledoit-Wolf in the
    projection; limits not set yet."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    k = max(1, min(COMPONENTS, len(x) - 1, x.shape[1]))
    pca = PCA(n_components=k, svd_solver="randomized", random_state=seed).fit(x)
    lw = LedoitWolf().fit(pca.transform(x))
    return TileDistribution(pca.mean_, pca.components_, lw.precision_, lw.location_, 1.0, 1.0)


def _distribution(samples: list[np.ndarray], seed: int) -> TileDistribution:
    """`_fit` on every sample, with its limits measured out of sample (module docstring)."""
    everything = np.concatenate(samples)
    fitted = _fit(everything, seed)
    if len(samples) >= 2:
        order = np.random.default_rng(seed).permutation(len(samples))
        halves = [order[: len(order) // 2], order[len(order) // 2:]]
        t2, q = [], []
        for fit_on, score_on in (halves, halves[::-1]):
            half = _fit(np.concatenate([samples[i] for i in fit_on]), seed)
            a, b = half.statistics(np.concatenate([samples[i] for i in score_on]))
            t2.append(a)
            q.append(b)
        t2, q = np.concatenate(t2), np.concatenate(q)
    else:   # one slide: nothing to hold out
        t2, q = fitted.statistics(everything)
    # Where the projection keeps (nearly) every dimension, Q is rounding noise: a residual below
    # RESIDUAL_FLOOR of a typical tile's spread is never a reason to flag it.
    spread = float(np.median(((everything - fitted.mean) ** 2).sum(axis=1)))
    return TileDistribution(fitted.mean, fitted.components, fitted.precision, fitted.location,
                            max(float(np.quantile(t2, TILE_QUANTILE)), 1e-9),
                            max(float(np.quantile(q, TILE_QUANTILE)), RESIDUAL_FLOOR * spread,
                                1e-9))


def _stain_domain(statistics: list[dict[str, float]]) -> StainDomain:
    """Mean and limit of each stain statistic every slide has (wsi.stain.STATISTICS)."""
    names = tuple(n for n in STATISTICS if all(n in s for s in statistics))
    values = np.array([[s[n] for n in names] for s in statistics], np.float64)
    limit = np.maximum(STAIN_SPREAD_SD * values.std(axis=0), MIN_STAIN_LOG_RATIO)
    return StainDomain(names, values.mean(axis=0), limit)


def describe_summary(model: DomainModel) -> dict[str, float]:
    """A few figures of the description, for the fit run's metrics."""
    out = {"domain_slides": float(model.slides), "domain_tiles": float(model.tiles)}
    if model.features is not None:
        out["domain_feature_components"] = float(model.features.components.shape[0])
    return out
