"""The tile-supervised linear probe: how far the features alone separate tumour tiles.

A MIL head learns from slide labels. To know how much of its error is the weak supervision and
how much is the features, the hard benchmark (docs/hard_benchmark.md) puts beside it a logistic
regression trained on *tile* labels from the annotations: the ceiling a head on these features
could reach. Its regularisation C is chosen by cross-validation grouped by slide (tiles of one
slide never sit on both sides of a split), on the development slides only.

As a scorer of slides (`ProbeScorer`, for `training.evaluate.evaluate_scores`) its patch score is
the tile probability and its slide score the highest tile probability of the slide.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import logit
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from core.errors import ConfigError
from training.evaluate import annotation_targets
from training.feature_file import Bag, feature_path, load_bag
from training.labels import read_labels
from training.thresholds import choose_roi_threshold, safe_auc, youden_threshold

log = logging.getLogger(__name__)

PROBE_CS = (1e-4, 1e-3, 1e-2, 1e-1)   # inverse L2 strengths tried by the grouped CV
PROBE_FOLDS = 4


@dataclass
class TileSet:
    """Labelled tiles of a split: features, tile targets (1 tumour, 0 normal) and their slides."""

    features: np.ndarray     # [T, D]
    targets: np.ndarray      # [T] 0/1
    slide_index: np.ndarray  # [T] index into `slides`
    slides: list[str]
    slide_labels: np.ndarray  # [S] 0/1


def tile_set(features_dir: str | Path, labels_path: str | Path,
             annotations_dir: str | Path) -> TileSet:
    """Every usable tile of the labelled slides with its annotation target. Tiles of normal
    slides are normal; tumour slides need their XML; ambiguous tiles (partly tumour, or touching
    an exclusion) are left out, as in patch AUC."""
    from wsi.annotations import read_asap_xml

    labels = read_labels(labels_path)
    feats, targets, index, slides, slide_labels = [], [], [], [], []
    for name in sorted(labels):
        bag = load_bag(feature_path(features_dir, name))
        if bag.no_tissue:
            continue
        xml = Path(annotations_dir) / f"{name}.xml"
        if xml.is_file():
            tgt = annotation_targets(read_asap_xml(xml), bag.coords, bag.attrs.tiling.tile_size)
        elif labels[name] == 0:
            tgt = np.zeros(len(bag.coords), np.int8)
        else:
            raise ConfigError(f"tumour slide {name} has no annotation {xml}: the probe needs "
                              f"tile labels")
        keep = tgt >= 0
        feats.append(bag.features.numpy()[keep])
        targets.append(tgt[keep].astype(np.int8))
        index.append(np.full(int(keep.sum()), len(slides)))
        slides.append(name)
        slide_labels.append(labels[name])
    if not slides:
        raise ConfigError(f"no slide of {labels_path} has a usable tissue tile")
    return TileSet(np.concatenate(feats), np.concatenate(targets), np.concatenate(index),
                   slides, np.array(slide_labels))


def _pipeline(c: float, seed: int) -> Pipeline:
    return make_pipeline(StandardScaler(),
                         LogisticRegression(C=c, class_weight="balanced", max_iter=2000,
                                            random_state=seed))


def _slide_max(values: np.ndarray, slide_index: np.ndarray, n_slides: int) -> np.ndarray:
    out = np.full(n_slides, -np.inf)
    np.maximum.at(out, slide_index, values)
    return out


@dataclass
class Probe:
    """A fitted probe, its chosen C, the grouped-CV tile AUC of every C tried, and the slide and
    ROI thresholds from its out-of-fold predictions on the development slides."""

    model: Pipeline
    c: float
    cv_tile_auc: dict[float, float]
    threshold: float
    roi_threshold: float
    extra: dict[str, Any] = field(default_factory=dict)

    def __call__(self, bag: Bag) -> tuple[float, np.ndarray]:
        """`training.evaluate.SlideScorer`: (highest tile probability, tile probabilities)."""
        scores = self.model.predict_proba(bag.features.numpy())[:, 1]
        return float(scores.max()), scores


def fit_probe(tiles: TileSet, cs: Sequence[float] = PROBE_CS, folds: int = PROBE_FOLDS,
              seed: int = 0) -> Probe:
    """Choose C by `folds`-fold CV grouped by slide (tile AUC of the out-of-fold predictions),
    refit on every tile; thresholds from the best C's out-of-fold slide maxima."""
    splits = list(GroupKFold(n_splits=folds).split(tiles.features, tiles.targets,
                                                   tiles.slide_index))
    aucs, oof_by_c = {}, {}
    for c in cs:
        oof = np.zeros(len(tiles.targets))
        for train, test in splits:
            model = _pipeline(c, seed).fit(tiles.features[train], tiles.targets[train])
            oof[test] = model.predict_proba(tiles.features[test])[:, 1]
        aucs[float(c)], oof_by_c[float(c)] = safe_auc(tiles.targets, oof), oof
        log.info("probe C=%g: grouped %d-fold tile AUC %.4f", c, folds, aucs[float(c)])
    best = max(aucs, key=lambda c: (np.nan_to_num(aucs[c]), -c))   # ties: the stronger penalty
    oof = np.clip(oof_by_c[best], 1e-12, 1 - 1e-12)
    slide_max = _slide_max(oof, tiles.slide_index, len(tiles.slides))
    model = _pipeline(best, seed).fit(tiles.features, tiles.targets)
    return Probe(model, best, aucs, threshold=youden_threshold(tiles.slide_labels, slide_max),
                 roi_threshold=choose_roi_threshold(logit(slide_max), tiles.slide_labels),
                 extra={"oof_slide_auc": safe_auc(tiles.slide_labels, slide_max),
                        "oof_tile_auc": aucs[best], "n_tiles": int(len(tiles.targets)),
                        "n_tumor_tiles": int(tiles.targets.sum()),
                        "oof_max_patch_score_normal": float(
                            slide_max[tiles.slide_labels == 0].max())})
