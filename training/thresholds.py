"""The two decision thresholds a fit run chooses from held-out slides, and the AUC they rest on.

- `youden_threshold`: the slide-probability cut (Youden's J) for the tumour / normal label;
- `roi_threshold`: the patch-score cut at and above which tiles form tumour ROIs, chosen so that
  normal slides get no ROI and tumour slides get one (see training.fit's protocol).
"""
from __future__ import annotations

import numpy as np
from scipy.special import expit
from sklearn.metrics import roc_auc_score, roc_curve

from core.bundle import DEFAULT_ROI_THRESHOLD, DEFAULT_SLIDE_THRESHOLD


def safe_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC, NaN when only one class is present (not defined)."""
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def youden_threshold(y: np.ndarray, p: np.ndarray, default: float = DEFAULT_SLIDE_THRESHOLD) -> float:
    """Probability threshold maximising sensitivity + specificity - 1 (Youden's J)."""
    if len(np.unique(y)) < 2:
        return default
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    # roc_curve's threshold is the lowest positive score kept, so a slide scored exactly there (or
    # a hair below it after float32 inference in onnxruntime) would flip; take the midpoint to the
    # next lower score instead, where the decision is equally good on these slides.
    lower = thresholds[best + 1] if best + 1 < len(thresholds) else 0.0
    return float(np.clip((thresholds[best] + lower) / 2, 0.0, 1.0))


# `roi_threshold` stays strictly inside (0, 1) (the server's roi_threshold range) and apart
# from 1.0 in float32, where saturated tumour patch scores land.
ROI_THRESHOLD_RANGE = (1e-6, 1.0 - 1e-6)


def choose_roi_threshold(max_patch_logits: np.ndarray, y: np.ndarray,
                  default: float = DEFAULT_ROI_THRESHOLD) -> float:
    """The patch-score threshold for tumour ROIs from held-out slides' highest patch logits.

    A slide gets an ROI when its highest patch score reaches the threshold, so the threshold is
    a slide classifier on that maximum: the cut with the best Youden's J (sensitivity on tumour
    slides + specificity on normal slides - 1), placed halfway between the two neighbouring
    maxima in logit space (patch sigmoids saturate, so a probability midpoint would sit at the
    normal side's edge); ties between equally good cuts go to the widest gap. Returned as a
    probability within ROI_THRESHOLD_RANGE; `default` when a class is missing.
    """
    logits, y = np.asarray(max_patch_logits, np.float64), np.asarray(y)
    if len(np.unique(y)) < 2:
        return default
    values = np.unique(logits)
    if len(values) == 1:
        return default
    cuts = (values[:-1] + values[1:]) / 2
    gaps = values[1:] - values[:-1]
    tpr = (logits[y == 1][None, :] >= cuts[:, None]).mean(1)
    fpr = (logits[y == 0][None, :] >= cuts[:, None]).mean(1)
    best = max(range(len(cuts)), key=lambda i: (tpr[i] - fpr[i], gaps[i]))
    return float(np.clip(expit(cuts[best]), *ROI_THRESHOLD_RANGE))


