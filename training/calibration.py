"""Calibrated scores: Platt scaling of a head's logits, and how well probabilities are calibrated.

A MIL head trained on slide labels separates slides but its probabilities mean little: on
separable training data the slide logit grows until sigmoid saturates (held-out normal slides
at 1e-5, tumour slides at 1.0, a chosen ROI threshold of 0.999998). `fit` therefore maps both
logits through an affine map fitted on predictions the model never trained on:

- the slide logit on the out-of-fold slides of its own cross-validation (sklearn's
  CalibratedClassifierCV(ensemble=False) protocol: the calibrator is fitted on
  cross_val_predict's out-of-fold scores and applied to the model refitted on every slide);
- the patch logit on the out-of-fold tiles whose truth is known at training time: every tile of
  a normal slide is negative; tiles inside a lesion outline are positive where the training set
  has annotations (`fit --annotations`), else each tumour slide's `TOP_TILES` highest-scored
  tiles (the multiple-instance assumption: a tumour slide holds tumour tiles, and its top-scored
  tiles are the model's claim of where). Both classes are weighted equally, so a patch score is
  the probability under even odds of tumour and normal tiles, whatever their share in the data.

Platt scaling (Platt 1999) fits sigmoid(a * logit + b) with the targets smoothed to
(N+ + 1) / (N+ + 2) and 1 / (N- + 2): on separable held-out data (the common case here) plain
logistic regression would send `a` to infinity and saturate again; the smoothed targets keep a
finite slope, the same prior scikit-learn's sigmoid calibration uses. Two numbers per logit,
so the map sits inside the exported graphs (training.heads) and every runtime (server, batch,
pyfunc, torch) gives the same calibrated numbers. Isotonic regression would need a
piecewise-linear graph and hundreds of slides; Camelyon16's 270 training slides are too few
to fit it per fold.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss

TOP_TILES = 4          # per out-of-fold tumour slide, the positives without annotations
MAX_NEGATIVE_TILES = 20000   # normal tiles kept for the patch fit (a seeded sample above this)
ECE_BINS = 10


@dataclass(frozen=True)
class Platt:
    """sigmoid(slope * logit + intercept); the identity (1, 0) for an uncalibrated head."""

    slope: float = 1.0
    intercept: float = 0.0
    n_positive: int = 0
    n_negative: int = 0

    def logit(self, logits: np.ndarray) -> np.ndarray:
        return self.slope * np.asarray(logits, np.float64) + self.intercept

    def probability(self, logits: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logit(logits)))

    def to_dict(self) -> dict:
        return {"method": "platt", "slope": self.slope, "intercept": self.intercept,
                "n_positive": self.n_positive, "n_negative": self.n_negative}

    @classmethod
    def from_dict(cls, data: dict | None) -> Platt:
        if not data:
            return cls()
        return cls(float(data["slope"]), float(data["intercept"]),
                   int(data.get("n_positive", 0)), int(data.get("n_negative", 0)))


def fit_platt(logits: np.ndarray, y: np.ndarray, *, balanced: bool = False) -> Platt:
    """Platt scaling of `logits` against labels `y` (0/1), with Platt's smoothed targets;
    `balanced` weighs both classes equally (patch scores). The identity when a class is missing
    or the fit would reverse the ranking (a slope <= 0 says the logits carry no signal here,
    and a calibration must never turn the head's order upside down)."""
    x = np.asarray(logits, np.float64).reshape(-1)
    y = np.asarray(y).astype(int).reshape(-1)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if not n_pos or not n_neg:
        return Platt(n_positive=n_pos, n_negative=n_neg)
    target = np.where(y == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    weight = np.where(y == 1, 0.5 / n_pos, 0.5 / n_neg) if balanced else np.ones(len(y))
    # a soft target t is the pair (label 1, weight t) and (label 0, weight 1 - t)
    features = np.concatenate([x, x])[:, None]
    labels = np.concatenate([np.ones(len(x)), np.zeros(len(x))])
    weights = np.concatenate([weight * target, weight * (1.0 - target)])
    model = LogisticRegression(C=np.inf, solver="lbfgs", max_iter=1000)   # unpenalised
    model.fit(features, labels, sample_weight=weights / weights.mean())
    slope, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
    if not slope > 0:
        return Platt(n_positive=n_pos, n_negative=n_neg)
    return Platt(slope, intercept, n_pos, n_neg)


def top_tiles(logits: np.ndarray) -> np.ndarray:
    """A slide's `TOP_TILES` highest patch logits: where the head says its tumour is."""
    return np.sort(np.asarray(logits, np.float64))[-TOP_TILES:]


def patch_calibration_set(patch_logits: list[np.ndarray], labels: list[int],
                          targets: list[np.ndarray | None], seed: int = 0
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(logits, 0/1 truth) of the out-of-fold tiles whose truth is known (module docstring):
    per slide its patch logits, its slide label and its annotation targets (1 tumour, 0 normal,
    -1 left out) or None where the slide has no annotation."""
    xs, ys = [], []
    for logits, label, target in zip(patch_logits, labels, targets):
        logits = np.asarray(logits, np.float64)
        if not label:
            xs.append(logits)
            ys.append(np.zeros(len(logits), int))
        elif target is not None and np.any(target == 1):
            keep = target >= 0
            xs.append(logits[keep])
            ys.append(target[keep].astype(int))
        else:
            top = top_tiles(logits)
            xs.append(top)
            ys.append(np.ones(len(top), int))
    x, y = np.concatenate(xs), np.concatenate(ys)
    negatives = np.flatnonzero(y == 0)
    if len(negatives) > MAX_NEGATIVE_TILES:   # the balanced fit needs no more than this
        drop = np.random.default_rng(seed).choice(negatives, len(negatives) - MAX_NEGATIVE_TILES,
                                                  replace=False)
        keep = np.ones(len(y), bool)
        keep[drop] = False
        x, y = x[keep], y[keep]
    return x, y


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the mean |observed tumour share - mean probability| over equal-width probability
    bins, each weighted by its share of the predictions."""
    y, p = np.asarray(y, float), np.clip(np.asarray(p, float), 0.0, 1.0)
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(y[inside].mean() - p[inside].mean())
    return float(total)


def calibration_metrics(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> dict:
    """ECE, Brier score and the reliability diagram's points (observed share per bin against
    mean probability per bin, scikit-learn's calibration_curve), for one level (slides or
    patches)."""
    y, p = np.asarray(y, int), np.asarray(p, float)
    if len(np.unique(y)) < 2:
        return {"ece": expected_calibration_error(y, p, bins),
                "brier": float(np.mean((p - y) ** 2)), "n": int(len(y))}
    observed, predicted = calibration_curve(y, p, n_bins=bins, strategy="uniform")
    return {"ece": expected_calibration_error(y, p, bins), "brier": float(brier_score_loss(y, p)),
            "n": int(len(y)), "reliability": {"predicted": predicted.tolist(),
                                              "observed": observed.tolist()}}
