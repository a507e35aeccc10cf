"""Does a head's patch ranking hold? Checked by `fit` on its own out-of-fold tiles, enforced by
`export`.

A MIL head trained on slide labels can separate slides while ranking tiles the wrong way round:
ABMIL's attention can pick up normal tissue as the tumour slides' signature, and its patch
scores then put tumour tiles below normal ones (patch AUC 0.22 on held-out hard slides,
docs/hard_benchmark.md). Its ROIs would point at the wrong tissue, and nothing in the slide AUC
says so. So `fit` measures, on tiles its fold models never trained on:

- `ranking_top_tile_auc`: the tumour slides' top-scored tiles (`training.calibration.top_tiles`) against the
  normal slides' top-scored tiles, the same selection on both sides (against every normal tile,
  the top of any slide would win by selection alone). By the multiple-instance assumption the
  former are tumour and the latter normal tissue, so a head whose ranking holds puts them above
  (AUC > `MIN_AUC`); a head that fires on some normal tissue ranks them at or below it;
  taken within each fold (one model, one logit scale) and averaged;
- `ranking_lesion_tile_auc`, where `fit --annotations` gives lesion outlines: the tiles inside a
  lesion against every other tile (of normal and tumour slides) whose truth is known.

Each must exceed `MIN_AUC` (0.5: above is the right way round). The run records the figures and
`ranking_check` ("passed" or what failed); `export` refuses a run that failed, naming the
figures, unless `--force`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from training.calibration import top_tiles

MIN_AUC = 0.5
PASSED = "passed"


def ranking_figures(patch_logits: Sequence[np.ndarray], labels: Sequence[int],
                    targets: Sequence[np.ndarray | None],
                    folds: Sequence | None = None) -> dict[str, float]:
    """The module docstring's AUCs from out-of-fold patch logits, per slide with its label, its
    annotation targets (1 lesion, 0 not, -1 left out) or None, and the fold whose model scored
    it: each AUC is taken within a fold (one model, one logit scale) and averaged over the folds
    where it is defined."""
    folds = [0] * len(labels) if folds is None else list(folds)
    per_fold: dict[str, list[float]] = {}
    for fold in dict.fromkeys(folds):
        idx = [i for i, f in enumerate(folds) if f == fold]
        for name, value in _fold_figures([patch_logits[i] for i in idx],
                                         [labels[i] for i in idx],
                                         [targets[i] for i in idx]).items():
            per_fold.setdefault(name, []).append(value)
    return {name: float(np.mean(values)) for name, values in per_fold.items()}


def _fold_figures(patch_logits, labels, targets) -> dict[str, float]:
    tumour_top = [top_tiles(x) for x, label in zip(patch_logits, labels) if label]
    normal_top = [top_tiles(x) for x, label in zip(patch_logits, labels) if not label]
    figures: dict[str, float] = {}
    if tumour_top and normal_top:
        figures["ranking_top_tile_auc"] = _auc(np.concatenate(tumour_top),
                                               np.concatenate(normal_top))
    inside = []
    rest = [np.asarray(x, np.float64) for x, label in zip(patch_logits, labels) if not label]
    for x, target in zip(patch_logits, targets):
        if target is not None and np.any(target == 1):
            inside.append(np.asarray(x)[target == 1])
            rest.append(np.asarray(x)[target == 0])
    if inside and rest:
        figures["ranking_lesion_tile_auc"] = _auc(np.concatenate(inside), np.concatenate(rest))
    return figures


def verdict(figures: dict[str, float]) -> str:
    """PASSED, or the figures that fail, as a sentence for the run's tag and export's error."""
    failed = [f"{name} {value:.3f} <= {MIN_AUC}" for name, value in sorted(figures.items())
              if name.startswith("ranking_") and not value > MIN_AUC]
    if not failed:
        return PASSED
    return ("the head ranks tumour tiles below normal ones on its out-of-fold tiles: "
            + "; ".join(failed))


def _auc(positive: np.ndarray, negative: np.ndarray) -> float:
    y = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    return float(roc_auc_score(y, np.r_[positive, negative]))
