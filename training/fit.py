"""`milroi-train fit`: train a MIL head on slide labels from feature files, tracked in MLflow.

Protocol (what the logged metrics mean and which model is exported):

- The slides are those of the labels CSV (Camelyon16 `reference.csv` format: `name,Tumor|Normal[,...]`,
  an optional header); slides listed in `--test-slides` are held out from everything below.
- `--folds K` (K >= 2): stratified K-fold cross-validation. In each fold the training part is split
  again (stratified, `--val-fraction`) into an inner training set and an inner validation set used
  only for early stopping on validation AUC; the held-out fold is predicted by the best epoch.
  `val_auc` is the AUC of these out-of-fold predictions (every slide predicted by a model that never
  saw it); `slide_threshold` is Youden's J on them. The registered/exported model is then a refit on all
  training slides for the median early-stopping epoch count of the folds.
- `--folds 1`: a single stratified train/validation split; the early-stopped model is the exported
  one, `val_auc` and `slide_threshold` come from its validation slides.
- `roi_threshold`, the patch score at and above which tiles form tumour ROI polygons (the
  manifest's ROI threshold), comes from the same out-of-fold (or validation) slides, slide labels
  only: a normal slide should get no ROI and a tumour slide at least one, so it is the Youden cut
  on each slide's highest patch logit, halfway (in logit space) across the gap it falls in
  (`roi_threshold`). A fixed 0.5 drew ROIs on normal slides, whose top patch scores a MIL head
  is never trained to keep under 0.5.

- The head's patch ranking (training.head_check): on the same out-of-fold tiles, the tumour
  slides' top tiles must rank above the normal slides' top tiles (and lesion tiles above the rest
  with `--annotations`); the run's tag `ranking_check` says whether it held, and `export`
  refuses a run where it did not unless `--force`.
- Calibration (training.calibration): Platt maps of the slide logit and of the patch logits are
  fitted on the same out-of-fold (or validation) predictions (patches: the tiles of normal
  slides as negatives; the tiles inside `--annotations` lesion outlines as positives, else each
  tumour slide's top tiles) and written into the exported head's config, so every runtime serves
  calibrated numbers; both thresholds are chosen on the calibrated scores.

One bag (slide) per optimisation step, slide-level BCE with `pos_weight = n_normal / n_tumour`;
all features are loaded into memory once. Fixed seeds and deterministic algorithms make two runs
with the same inputs give the same numbers.

The run holds (training.runs): `head/head.pt` (state_dict) and `head/head_config.json` (for
`build_head`), params (feature provenance copied from the h5 attributes, hyperparameters),
per-epoch and final metrics, tag `data_fingerprint`, `predictions.csv`, `roc_curve.png` and, when
`--slides` points at the slide files, a few heatmaps. The last line printed is `run_id=<id>`.

This module is the protocol and its command; the parts it runs live with their owners: labels
(training.labels), feature files (training.feature_file), the training loop (training.trainer),
the thresholds (training.thresholds), the MLflow run (training.runs), the plots (training.plots).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import expit
from sklearn.model_selection import StratifiedKFold, train_test_split

from core.bundle import DEFAULT_ROI_THRESHOLD
from core.cli import add_tracking_uri_argument
from core.errors import ConfigError
from core.tracking import resolve_tracking_uri
from training.calibration import Platt, calibration_metrics, fit_platt, patch_calibration_set
from training.domain import describe, describe_summary
from training.feature_file import Bag, data_fingerprint, load_bags
from training.head_check import PASSED, ranking_figures, verdict
from training.heads import CALIBRATION, TRAINABLE_HEAD_KINDS, MILHead, build_head
from training.labels import read_labels, read_slide_names
from training.plots import write_heatmaps, write_roc_png
from training.runs import (
    FINGERPRINT_TAG,
    HEAD_ARTIFACT_PATH,
    HEAD_CONFIG,
    HEAD_STATE,
    RANKING_TAG,
    fit_run,
    history_metrics,
    log_params,
    provenance_params,
    write_run_domain,
)
from training.thresholds import choose_roi_threshold, safe_auc, youden_threshold
from training.trainer import bag_logits, head_from_state, predict, train_head

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "milroi"


@dataclass(frozen=True)
class FitOptions:
    """The head and its training schedule (the flags of `add_training_arguments`)."""

    head: str = "chowder"
    head_config: dict | None = None   # overrides of the head's defaults (training.heads)
    folds: int = 5                    # stratified CV folds; 1 = one train/validation split
    seed: int = 0
    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 10                # epochs without validation AUC gain before stopping
    val_fraction: float = 0.2         # inner validation share for early stopping

    def __post_init__(self) -> None:
        if self.head not in TRAINABLE_HEAD_KINDS:
            raise ConfigError(f"unknown MIL head {self.head!r}; choose one of "
                              f"{', '.join(TRAINABLE_HEAD_KINDS)}")
        if self.folds < 1 or self.epochs < 1 or self.patience < 1:
            raise ConfigError(f"--folds, --epochs and --patience must be >= 1, got {self.folds}, "
                              f"{self.epochs}, {self.patience}")
        if CALIBRATION in (self.head_config or {}):
            raise ConfigError(f"--head-config sets {CALIBRATION!r}: fit fits it after training "
                              f"(training.calibration), it is not a training option")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FitOptions:
        return cls(head=args.head, head_config=args.head_config, folds=args.folds,
                   seed=args.seed, epochs=args.epochs, lr=args.lr,
                   weight_decay=args.weight_decay, patience=args.patience,
                   val_fraction=args.val_fraction)


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of FitOptions (shared by `fit` and `camelyon16`)."""
    d = FitOptions()
    parser.add_argument("--head", choices=TRAINABLE_HEAD_KINDS, default=d.head,
                        help="MIL head; dsmil and transmil are benchmark-only (not exportable)")
    parser.add_argument("--head-config", type=json.loads, default=d.head_config,
                        help='JSON overrides of the head config, e.g. \'{"k": 10}\'')
    parser.add_argument("--folds", type=int, default=d.folds,
                        help=f"stratified CV folds (1 = one split; default {d.folds})")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--patience", type=int, default=d.patience,
                        help="epochs without validation AUC gain before stopping")
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction,
                        help="inner validation share for early stopping")


# ---------------------------------------------------------------------------------------------
# Protocol


@dataclass
class FitResult:
    run_id: str
    metrics: dict[str, float]
    predictions: list[dict[str, Any]]  # slide, label, score, max_patch_score, fold
    head: MILHead
    slide_threshold: float
    roi_threshold: float = DEFAULT_ROI_THRESHOLD
    ranking_check: str = ""   # training.head_check.verdict on the out-of-fold tiles


def _split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices, stratified when both classes allow it; at least 2
    validation slides (early stopping on one slide's AUC is undefined) and 1 to train on."""
    idx = np.arange(len(y))
    n_val = max(2, int(round(fraction * len(y))))
    if n_val >= len(y):
        raise ConfigError(f"{len(y)} training slides cannot be split into a training part and "
                          f"{n_val} validation slides for early stopping: use more slides or "
                          f"fewer --folds")
    stratify = y if min(np.bincount(y, minlength=2)) >= 2 and n_val >= 2 else None
    return train_test_split(idx, test_size=n_val, random_state=seed, stratify=stratify)


def fit(features_dir: str | Path, labels_path: str | Path, options: FitOptions = FitOptions(),
        *, test_slides: Sequence[str] = (), tracking_uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT, slides_dir: str | Path | None = None,
        run_name: str | None = None, annotations_dir: str | Path | None = None) -> FitResult:
    """Run the protocol in the module docstring and log it to one MLflow run
    (`tracking_uri` resolved by core.tracking.resolve_tracking_uri)."""
    from mlflow.entities import Metric

    o = options
    folds, seed, patience, val_fraction = o.folds, o.seed, o.patience, o.val_fraction
    tracking_uri = resolve_tracking_uri(tracking_uri)
    labels = read_labels(labels_path)
    held_out = {Path(s).stem for s in test_slides}
    names = sorted(n for n in labels if n not in held_out)
    bags = load_bags(features_dir, names, skip_no_tissue=True)
    provenance = provenance_params(bags)   # refuses files of mixed encoders or tilings
    no_tissue = len(names) - len(bags)
    y = np.array([labels[b.name] for b in bags])
    if min(np.bincount(y, minlength=2)) < max(2, folds):
        raise ConfigError(f"labels file {labels_path}: need at least {max(2, folds)} tumour and "
                          f"normal slides for {folds}-fold training, got {int(y.sum())} "
                          f"tumour, {int(len(y) - y.sum())} normal")
    config = {"kind": o.head, "in_dim": int(bags[0].features.shape[1]), **(o.head_config or {})}
    config = build_head(config).config  # fills and validates the defaults
    hyper = dict(epochs=o.epochs, lr=o.lr, weight_decay=o.weight_decay)
    preds: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}

    with fit_run(tracking_uri, experiment, run_name) as (client, run_id):
        log_params(client, run_id, {
            **provenance, "head": o.head,
            "head_config": json.dumps(config, sort_keys=True), **hyper, "patience": patience,
            "val_fraction": val_fraction, "folds": folds, "seed": seed, "n_slides": len(bags),
            "n_tumor": int(y.sum()), "n_test_slides": len(held_out), "n_no_tissue": no_tissue})
        client.set_tag(run_id, FINGERPRINT_TAG, data_fingerprint(bags, labels))

        if folds >= 2:
            skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            best_epochs = []
            for fold, (train_idx, test_idx) in enumerate(skf.split(np.zeros(len(y)), y)):
                inner_tr, inner_val = _split(y[train_idx], val_fraction, seed + fold)
                tr = [bags[i] for i in train_idx[inner_tr]]
                va = [bags[i] for i in train_idx[inner_val]]
                res = train_head(config, tr, labels, val=va, patience=patience,
                                 seed=seed + 1000 * (fold + 1), **hyper)
                model = head_from_state(config, res.state)
                test = [bags[i] for i in test_idx]
                rows = [_prediction(model, b, labels, fold) for b in test]
                metrics[f"fold{fold}_auc"] = safe_auc(y[test_idx],
                                                      np.array([r["logit"] for r in rows]))
                metrics[f"fold{fold}_best_epoch"] = res.best_epoch
                best_epochs.append(res.best_epoch)
                preds += rows
                client.log_batch(run_id, metrics=history_metrics(f"fold{fold}_", res.history))
                log.info("fold %d: AUC %.3f (best epoch %d)", fold, metrics[f"fold{fold}_auc"],
                         res.best_epoch)
            fold_aucs = [metrics[f"fold{f}_auc"] for f in range(folds)]
            metrics["cv_auc_mean"] = float(np.nanmean(fold_aucs))
            metrics["cv_auc_std"] = float(np.nanstd(fold_aucs))
            refit_epochs = max(1, int(np.median(best_epochs)))
            metrics["refit_epochs"] = refit_epochs
            final = train_head(config, bags, labels, seed=seed, **{**hyper, "epochs": refit_epochs})
            client.log_batch(run_id, metrics=history_metrics("refit_", final.history))
        else:
            tr_idx, va_idx = _split(y, val_fraction, seed)
            va = [bags[i] for i in va_idx]
            final = train_head(config, [bags[i] for i in tr_idx], labels, val=va,
                               patience=patience, seed=seed, **hyper)
            client.log_batch(run_id, metrics=history_metrics("", final.history))
            metrics["best_epoch"] = final.best_epoch
            early_stopped = head_from_state(config, final.state)
            preds += [_prediction(early_stopped, b, labels, 0) for b in va]

        by_name = {b.name: b for b in bags}
        targets = [_annotation_targets(by_name[r["slide"]], annotations_dir) if r["label"]
                   else None for r in preds]
        ranking = ranking_figures([r["patch_logits"] for r in preds],
                                  [r["label"] for r in preds], targets,
                                  [r["fold"] for r in preds])
        metrics.update(ranking)
        ranking_check = verdict(ranking)
        client.set_tag(run_id, RANKING_TAG, ranking_check)
        if ranking_check != PASSED:
            log.warning("%s: export will refuse this run unless --force", ranking_check)
        calibration = _calibrate(preds, targets, seed, metrics)
        model = head_from_state({**config, CALIBRATION: calibration}, final.state)
        y_pred = np.array([r["label"] for r in preds])
        p_pred = np.array([r["score"] for r in preds])
        metrics["val_auc"] = safe_auc(y_pred, p_pred)
        slide_threshold = youden_threshold(y_pred, p_pred)
        metrics["slide_threshold"] = slide_threshold
        metrics["val_accuracy"] = float(np.mean((p_pred >= slide_threshold) == y_pred))
        client.log_param(run_id, "slide_threshold", slide_threshold)
        roi_threshold = _log_roi_threshold(client, run_id, preds, metrics)
        if held_out:
            test_bags = load_bags(features_dir, sorted(held_out), skip_no_tissue=True)
            y_test = np.array([labels[b.name] for b in test_bags])
            p_test = predict(model, test_bags)   # calibrated: the model carries its maps
            metrics["test_auc"] = safe_auc(y_test, p_test)
            metrics["test_accuracy"] = float(np.mean((p_test >= slide_threshold) == y_test))
            patch = Platt.from_dict(calibration["patch"])
            for b, score in zip(test_bags, p_test):
                row = _prediction(model, b, labels, "test")
                del row["patch_logits"]
                row.update(score=float(score),
                           max_patch_score=float(patch.probability(row["max_patch_logit"])))
                preds.append(row)
        domain = describe(bags, seed)   # what the model knows: the bundle's domain check
        metrics.update(describe_summary(domain))
        client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()
                                          if np.isfinite(v)])
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            _write_artifacts(tmp, model, final.state, preds, y_pred, p_pred, bags, slides_dir)
            write_run_domain(tmp, domain)
            client.log_artifacts(run_id, str(tmp / HEAD_ARTIFACT_PATH),
                                 artifact_path=HEAD_ARTIFACT_PATH)
            for extra in sorted(tmp.iterdir()):
                if extra.is_file():
                    client.log_artifact(run_id, str(extra))
                elif extra.name != HEAD_ARTIFACT_PATH:
                    client.log_artifacts(run_id, str(extra), artifact_path=extra.name)
    return FitResult(run_id, metrics, preds, model, slide_threshold, roi_threshold,
                     ranking_check)


def _prediction(head: MILHead, bag: Bag, labels: dict[str, int], fold) -> dict:
    """One predictions.csv row before calibration: the slide logit and the patch logits (kept
    for the calibration and `roi_threshold`); `_calibrate` adds the calibrated scores."""
    slide_logit, patch_logits = bag_logits(head, bag)
    return {"slide": bag.name, "label": labels[bag.name], "logit": slide_logit,
            "patch_logits": patch_logits, "max_patch_logit": float(patch_logits.max()),
            "fold": fold}


def _calibrate(preds: list[dict], targets: list[np.ndarray | None], seed: int,
               metrics: dict[str, float]) -> dict[str, dict]:
    """The Platt maps of the slide and patch logits from the out-of-fold (or validation)
    predictions (training.calibration), with each tumour slide's lesion targets (or None);
    fills in each row's calibrated `score` and `max_patch_score` and adds the calibration
    figures to `metrics`."""
    y = np.array([r["label"] for r in preds])
    logits = np.array([r["logit"] for r in preds])
    slide = fit_platt(logits, y)
    x_patch, y_patch = patch_calibration_set([r["patch_logits"] for r in preds], y.tolist(),
                                             targets, seed)
    patch = fit_platt(x_patch, y_patch, balanced=True)
    for r in preds:
        del r["patch_logits"]
        r["score"] = float(slide.probability(r["logit"]))
        r["max_patch_calibrated_logit"] = float(patch.logit(r["max_patch_logit"]))
        r["max_patch_score"] = float(patch.probability(r["max_patch_logit"]))
    before = calibration_metrics(y, expit(logits))
    after = calibration_metrics(y, [r["score"] for r in preds])
    patch_after = calibration_metrics(y_patch, patch.probability(x_patch))
    metrics.update({
        "val_slide_ece_uncalibrated": before["ece"], "val_slide_brier_uncalibrated": before["brier"],
        "val_slide_ece": after["ece"], "val_slide_brier": after["brier"],
        "val_patch_ece": patch_after["ece"], "val_patch_brier": patch_after["brier"],
        "calibration_slide_slope": slide.slope, "calibration_slide_intercept": slide.intercept,
        "calibration_patch_slope": patch.slope, "calibration_patch_intercept": patch.intercept,
        "calibration_patch_tiles": len(y_patch),
        "calibration_annotated_slides": sum(t is not None for t in targets)})
    log.info("calibration: slide ECE %.3f -> %.3f (slope %.3g, intercept %.3g); patch slope "
             "%.3g, intercept %.3g on %d tiles", before["ece"], after["ece"], slide.slope,
             slide.intercept, patch.slope, patch.intercept, len(y_patch))
    return {"slide": slide.to_dict(), "patch": patch.to_dict()}


def _annotation_targets(bag: Bag, annotations_dir) -> np.ndarray | None:
    """The tile targets of a tumour slide's lesion outline (`<name>.xml` in `annotations_dir`,
    Camelyon16's ASAP XML), or None where it has none."""
    if annotations_dir is None:
        return None
    xml = Path(annotations_dir) / f"{bag.name}.xml"
    if not xml.is_file():
        return None
    from training.evaluate import annotation_targets
    from wsi.annotations import read_asap_xml

    return annotation_targets(read_asap_xml(xml), bag.coords, bag.attrs.tiling.tile_size)


def _log_roi_threshold(client, run_id: str, preds: list[dict],
                         metrics: dict[str, float]) -> float:
    """`roi_threshold` on the out-of-fold / validation slides, logged as param and metrics,
    with how many of those slides it gets wrong (a normal slide with an ROI, a tumour slide
    without one)."""
    y = np.array([r["label"] for r in preds])
    # calibrated: the threshold is a cut on the patch scores the server sends
    logits = np.array([r["max_patch_calibrated_logit"] for r in preds])
    roi_threshold = choose_roi_threshold(logits, y)
    hot = np.array([r["max_patch_score"] for r in preds]) >= roi_threshold
    metrics["roi_threshold"] = roi_threshold
    metrics["val_normal_slides_with_roi"] = int(np.sum(hot & (y == 0)))
    metrics["val_tumor_slides_without_roi"] = int(np.sum(~hot & (y == 1)))
    client.log_param(run_id, "roi_threshold", roi_threshold)
    log.info("roi_threshold %.6g: %d of %d held-out normal slides with an ROI, %d of %d "
             "tumour slides without one", roi_threshold, metrics["val_normal_slides_with_roi"],
             int(np.sum(y == 0)), metrics["val_tumor_slides_without_roi"], int(np.sum(y == 1)))
    return roi_threshold


def _write_artifacts(out: Path, model: MILHead, state: dict, preds: list[dict], y: np.ndarray,
                     p: np.ndarray, bags: Sequence[Bag], slides_dir) -> None:
    (out / HEAD_ARTIFACT_PATH).mkdir()
    torch.save(state, out / HEAD_ARTIFACT_PATH / HEAD_STATE)
    (out / HEAD_ARTIFACT_PATH / HEAD_CONFIG).write_text(json.dumps(model.config, indent=2))
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide", "label", "score", "max_patch_score",
                                               "fold"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(preds)
    write_roc_png(out / "roc_curve.png", y, p)
    if slides_dir is not None:
        write_heatmaps(out / "heatmaps", model, bags, slides_dir)


# ---------------------------------------------------------------------------------------------
# CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("features_dir", help="features folder (h5_files/<slide>.h5)")
    parser.add_argument("--labels", required=True,
                        help="slide labels CSV (Camelyon16 reference.csv format: name,Tumor|Normal)")
    add_training_arguments(parser)
    add_tracking_uri_argument(parser)
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    parser.add_argument("--run-name", default=None)
    parser.add_argument("--test-slides", default=None,
                        help="file with slide names (one per line or CSV) held out of training "
                             "and scored by the final model")
    parser.add_argument("--slides", default=None,
                        help="folder searched for slide files, for heatmap artifacts")
    parser.add_argument("--annotations", default=None,
                        help="folder of lesion outlines (<slide>.xml, Camelyon16's ASAP XML): "
                             "their tiles are the positives of the patch calibration "
                             "(training.calibration); without it, each tumour slide's top tiles")


def run(args: argparse.Namespace) -> int:
    result = fit(args.features_dir, args.labels, FitOptions.from_args(args),
                 test_slides=read_slide_names(args.test_slides), tracking_uri=args.tracking_uri,
                 experiment=args.experiment,
                 slides_dir=args.slides, run_name=args.run_name,
                 annotations_dir=args.annotations)
    for key in ("val_auc", "val_accuracy", "slide_threshold", "cv_auc_mean", "cv_auc_std",
                "test_auc", "test_accuracy"):
        if key in result.metrics:
            print(f"{key}={result.metrics[key]:.4f}")
    print(f"roi_threshold={result.roi_threshold:.6g}")
    print(f"ranking_check={result.ranking_check}")
    print(f"run_id={result.run_id}")
    return 0
