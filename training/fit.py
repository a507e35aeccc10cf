"""`milroi-train fit`: train a MIL head on slide labels from feature files, tracked in MLflow.

Protocol (what the logged metrics mean and which model is exported):

- The slides are those of the labels CSV (Camelyon16 `reference.csv` format: `name,Tumor|Normal[,...]`,
  an optional header); slides listed in `--test-slides` are held out from everything below.
- `--folds K` (K >= 2): stratified K-fold cross-validation. In each fold the training part is split
  again (stratified, `--val-fraction`) into an inner training set and an inner validation set used
  only for early stopping on validation AUC; the held-out fold is predicted by the best epoch.
  `val_auc` is the AUC of these out-of-fold predictions (every slide predicted by a model that never
  saw it); `threshold` is Youden's J on them. The registered/exported model is then a refit on all
  training slides for the median early-stopping epoch count of the folds.
- `--folds 1`: a single stratified train/validation split; the early-stopped model is the exported
  one, `val_auc` and `threshold` come from its validation slides.
- `patch_threshold`, the patch score at and above which tiles form tumour ROI polygons (the
  manifest's ROI threshold), comes from the same out-of-fold (or validation) slides, slide labels
  only: a normal slide should get no ROI and a tumour slide at least one, so it is the Youden cut
  on each slide's highest patch logit, halfway (in logit space) across the gap it falls in
  (`roi_threshold`). A fixed 0.5 drew ROIs on normal slides, whose top patch scores a MIL head
  is never trained to keep under 0.5.

One bag (slide) per optimisation step, slide-level BCE with `pos_weight = n_normal / n_tumour`;
all features are loaded into memory once. Fixed seeds and deterministic algorithms make two runs
with the same inputs give the same numbers.

The run holds: `head/head.pt` (state_dict) and `head/head_config.json` (for `build_head`),
params (feature provenance copied from the h5 attributes, hyperparameters), per-epoch and final
metrics, tag `data_fingerprint`, `predictions.csv`, `roc_curve.png` and, when `--slides` points at
the slide files, a few heatmaps. The last line printed is `run_id=<id>`.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import h5py
import numpy as np
import torch
from scipy.special import expit
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold, train_test_split

from training.heads import HEAD_KINDS, MILHead, build_head
from wsi.errors import WsiError

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# h5 attributes copied to the run params under these names (the export reads them back)
PROVENANCE_PARAMS = {"backbone_layer": "backbone_layer", "weights": "weights",
                     "weights_seed": "weights_seed", "patch_size": "tile_size",
                     "patch_level": "patch_level", "min_tissue": "min_tissue", "mpp": "mpp"}
HEATMAPS = 4


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class Bag:
    """One slide's features, as read from FEATURES_DIR/h5_files/<name>.h5."""

    name: str
    features: torch.Tensor          # [N, D] float32
    coords: np.ndarray              # [N, 2] int64, level-0 top-left
    attrs: dict[str, Any] = field(default_factory=dict)
    digest: str = ""                # sha256 of the h5 file


_POSITIVE = {"tumor", "tumour", "1", "positive", "true"}
_NEGATIVE = {"normal", "0", "negative", "false"}


def read_labels(path: str | Path) -> dict[str, int]:
    """Slide name -> 1 (tumour) / 0 (normal) from a Camelyon16-style reference CSV."""
    path = Path(path)
    if not path.is_file():
        raise WsiError(f"labels file {path} does not exist")
    labels: dict[str, int] = {}
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or not row[0].strip():
                continue
            name, value = row[0].strip(), (row[1].strip().lower() if len(row) > 1 else "")
            if lineno == 1 and value not in _POSITIVE | _NEGATIVE:
                continue  # header line
            if value not in _POSITIVE | _NEGATIVE:
                raise WsiError(f"labels file {path}, line {lineno}: label {row[1:2]} is neither "
                               "Tumor nor Normal")
            labels[Path(name).stem] = int(value in _POSITIVE)
    if not labels:
        raise WsiError(f"labels file {path} lists no slides")
    return labels


def feature_path(features_dir: str | Path, name: str) -> Path:
    return Path(features_dir) / "h5_files" / f"{name}.h5"


def load_bag(path: str | Path) -> Bag:
    """Read one features h5 file (CLAM layout) into memory."""
    path = Path(path)
    if not path.is_file():
        raise WsiError(f"feature file {path} does not exist (run `milroi-train features` first)")
    try:
        with h5py.File(path, "r") as f:
            features = np.asarray(f["features"], dtype=np.float32)
            coords = np.asarray(f["coords"], dtype=np.int64)
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    except (OSError, KeyError) as exc:
        raise WsiError(f"feature file {path} is not a readable features h5: {exc}") from exc
    if features.ndim != 2 or len(features) == 0 or len(coords) != len(features):
        raise WsiError(f"feature file {path} holds no tiles or mismatched features/coords")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    return Bag(path.stem, torch.from_numpy(features), coords, attrs, digest)


def load_bags(features_dir: str | Path, names: Sequence[str]) -> list[Bag]:
    bags = [load_bag(feature_path(features_dir, n)) for n in names]
    dims = {b.features.shape[1] for b in bags}
    if len(dims) > 1:
        raise WsiError(f"feature files in {features_dir} have different dimensions {sorted(dims)}")
    return bags


def data_fingerprint(bags: Sequence[Bag], labels: dict[str, int]) -> str:
    """sha256 over (slide name, label, feature file digest), in name order."""
    h = hashlib.sha256()
    for bag in sorted(bags, key=lambda b: b.name):
        h.update(f"{bag.name}\t{labels[bag.name]}\t{bag.digest}\n".encode())
    return h.hexdigest()


def provenance_params(bags: Sequence[Bag]) -> dict[str, Any]:
    """The feature extraction settings (same for every bag, else the features don't mix)."""
    params: dict[str, Any] = {}
    for attr, param in PROVENANCE_PARAMS.items():
        values = {str(b.attrs.get(attr)) for b in bags}
        if len(values) > 1:
            raise WsiError(f"feature files disagree on {attr}: {sorted(values)}")
        params[param] = values.pop()
    params["feature_dim"] = int(bags[0].features.shape[1])
    return params


# ---------------------------------------------------------------------------------------------
# Training


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def safe_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC, NaN when only one class is present (not defined)."""
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def youden_threshold(y: np.ndarray, p: np.ndarray, default: float = 0.5) -> float:
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


# `patch_threshold` stays strictly inside (0, 1) (the server's roi_threshold range) and apart
# from 1.0 in float32, where saturated tumour patch scores land.
ROI_THRESHOLD_RANGE = (1e-6, 1.0 - 1e-6)


def roi_threshold(max_patch_logits: np.ndarray, y: np.ndarray, default: float = 0.5) -> float:
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


@torch.no_grad()
def max_patch_logit(head: MILHead, bag: Bag) -> float:
    head.eval()
    return float(head(bag.features).patch_logits.max())


@torch.no_grad()
def predict(head: MILHead, bags: Sequence[Bag]) -> np.ndarray:
    """Slide probabilities, sigmoid(slide_logit), one per bag."""
    head.eval()
    return np.array([torch.sigmoid(head(b.features).slide_logit).item() for b in bags])


@dataclass
class TrainResult:
    state: dict[str, torch.Tensor]
    best_epoch: int                 # 1-based epoch whose weights are kept
    best_val_auc: float
    history: list[dict[str, float]]  # per epoch: train_loss, val_auc, val_loss


def train_head(config: dict, train: Sequence[Bag], labels: dict[str, int], *, epochs: int,
               lr: float, weight_decay: float, seed: int, val: Sequence[Bag] = (),
               patience: int = 10, monitor: str = "auc",
               on_epoch: Callable[[int, MILHead], None] | None = None) -> TrainResult:
    """Adam, one bag per step; keeps the epoch with the best validation AUC (val loss on ties),
    or with `monitor="loss"` the lowest validation loss (better calibrated at a 0.5 threshold).

    Without validation bags it trains for exactly `epochs` epochs and keeps the last weights.
    `on_epoch(epoch, head)`, when given, sees the head after every epoch (1-based), e.g. to score
    held-out bags along the whole schedule from one run.
    """
    seed_everything(seed)
    head = build_head(config)
    stacked = torch.cat([b.features for b in train])
    head.set_feature_stats(stacked.mean(0), stacked.std(0))
    y_train = np.array([labels[b.name] for b in train])
    n_pos, n_neg = int(y_train.sum()), int(len(y_train) - y_train.sum())
    pos_weight = n_neg / n_pos if n_pos and n_neg else 1.0
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    order_rng = np.random.default_rng(seed)
    y_val = np.array([labels[b.name] for b in val])
    best = TrainResult({k: v.clone() for k, v in head.state_dict().items()}, 0, -np.inf, [])
    best_key = (-np.inf, -np.inf)
    stale = 0
    for epoch in range(1, epochs + 1):
        head.train()
        losses = []
        for i in order_rng.permutation(len(train)):
            out = head(train[i].features)
            loss = head.loss(out, labels[train[i].name], pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        row = {"train_loss": float(np.mean(losses))}
        if len(val):
            p = predict(head, val)
            eps = 1e-7
            row["val_loss"] = float(-np.mean(y_val * np.log(p + eps) + (1 - y_val) * np.log(1 - p + eps)))
            row["val_auc"] = safe_auc(y_val, p)
            auc = np.nan_to_num(row["val_auc"], nan=0.0)
            key = (auc, -row["val_loss"]) if monitor == "auc" else (-row["val_loss"], auc)
            if key > best_key:
                best_key, stale = key, 0
                best.state = {k: v.clone() for k, v in head.state_dict().items()}
                best.best_epoch, best.best_val_auc = epoch, row["val_auc"]
            else:
                stale += 1
        best.history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, head)
        if len(val) and stale >= patience:
            break
    if not len(val):
        best.state, best.best_epoch = head.state_dict(), epochs
    return best


def head_from_state(config: dict, state: dict) -> MILHead:
    head = build_head(config)
    head.load_state_dict(state)
    return head.eval()


# ---------------------------------------------------------------------------------------------
# Protocol


@dataclass
class FitResult:
    run_id: str
    metrics: dict[str, float]
    predictions: list[dict[str, Any]]  # slide, label, score, max_patch_score, fold
    head: MILHead
    threshold: float
    patch_threshold: float = 0.5


def _split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(len(y))
    n_val = max(2, int(round(fraction * len(y))))
    stratify = y if min(np.bincount(y, minlength=2)) >= 2 and n_val >= 2 else None
    return train_test_split(idx, test_size=n_val, random_state=seed, stratify=stratify)


def _history_metrics(prefix: str, history: list[dict[str, float]]):
    from mlflow.entities import Metric

    return [Metric(f"{prefix}{k}", v, 0, step) for step, row in enumerate(history, 1)
            for k, v in row.items() if np.isfinite(v)]


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Experiment id; a new experiment on a sqlite store keeps artifacts beside the db file."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):]).resolve()
        location = (db.parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def fit(features_dir: str | Path, labels_path: str | Path, *, head: str = "chowder",
        head_config: dict | None = None, folds: int = 5, seed: int = 0, epochs: int = 50,
        lr: float = 1e-3, weight_decay: float = 1e-4, patience: int = 10,
        val_fraction: float = 0.2, test_slides: Sequence[str] = (),
        tracking_uri: str = DEFAULT_TRACKING_URI, experiment: str = "milroi",
        slides_dir: str | Path | None = None, run_name: str | None = None) -> FitResult:
    """Run the protocol in the module docstring and log it to one MLflow run."""
    import mlflow
    from mlflow.entities import Metric

    if head not in HEAD_KINDS:
        raise WsiError(f"unknown MIL head {head!r}; choose one of {', '.join(HEAD_KINDS)}")
    labels = read_labels(labels_path)
    held_out = {Path(s).stem for s in test_slides}
    names = sorted(n for n in labels if n not in held_out)
    bags = load_bags(features_dir, names)
    y = np.array([labels[b.name] for b in bags])
    if min(np.bincount(y, minlength=2)) < max(2, folds):
        raise WsiError(f"labels file {labels_path}: need at least {max(2, folds)} tumour and "
                       f"normal slides for {folds}-fold training, got {int(y.sum())} tumour, "
                       f"{int(len(y) - y.sum())} normal")
    config = {"kind": head, "in_dim": int(bags[0].features.shape[1]), **(head_config or {})}
    config = build_head(config).config  # fills and validates the defaults
    hyper = dict(epochs=epochs, lr=lr, weight_decay=weight_decay)
    preds: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}

    experiment_id = ensure_experiment(tracking_uri, experiment)
    client = mlflow.MlflowClient()
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        run_id = run.info.run_id
        mlflow.log_params({**provenance_params(bags), "head": head,
                           "head_config": json.dumps(config, sort_keys=True), **hyper,
                           "patience": patience, "val_fraction": val_fraction, "folds": folds,
                           "seed": seed, "n_slides": len(bags), "n_tumor": int(y.sum()),
                           "n_test_slides": len(held_out)})
        mlflow.set_tag("data_fingerprint", data_fingerprint(bags, labels))

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
                p = predict(model, test)
                metrics[f"fold{fold}_auc"] = safe_auc(y[test_idx], p)
                metrics[f"fold{fold}_best_epoch"] = res.best_epoch
                best_epochs.append(res.best_epoch)
                preds += [_prediction(model, b, labels, s, fold) for b, s in zip(test, p)]
                client.log_batch(run_id, metrics=_history_metrics(f"fold{fold}_", res.history))
                log.info("fold %d: AUC %.3f (best epoch %d)", fold, metrics[f"fold{fold}_auc"],
                         res.best_epoch)
            fold_aucs = [metrics[f"fold{f}_auc"] for f in range(folds)]
            metrics["cv_auc_mean"] = float(np.nanmean(fold_aucs))
            metrics["cv_auc_std"] = float(np.nanstd(fold_aucs))
            refit_epochs = max(1, int(np.median(best_epochs)))
            metrics["refit_epochs"] = refit_epochs
            final = train_head(config, bags, labels, seed=seed, **{**hyper, "epochs": refit_epochs})
            client.log_batch(run_id, metrics=_history_metrics("refit_", final.history))
        else:
            tr_idx, va_idx = _split(y, val_fraction, seed)
            va = [bags[i] for i in va_idx]
            final = train_head(config, [bags[i] for i in tr_idx], labels, val=va,
                               patience=patience, seed=seed, **hyper)
            client.log_batch(run_id, metrics=_history_metrics("", final.history))
            metrics["best_epoch"] = final.best_epoch
            early_stopped = head_from_state(config, final.state)
            p = predict(early_stopped, va)
            preds += [_prediction(early_stopped, b, labels, s, 0) for b, s in zip(va, p)]

        model = head_from_state(config, final.state)
        y_pred = np.array([r["label"] for r in preds])
        p_pred = np.array([r["score"] for r in preds])
        metrics["val_auc"] = safe_auc(y_pred, p_pred)
        threshold = youden_threshold(y_pred, p_pred)
        metrics["threshold"] = threshold
        metrics["val_accuracy"] = float(np.mean((p_pred >= threshold) == y_pred))
        mlflow.log_param("threshold", threshold)
        patch_threshold = _log_patch_threshold(preds, metrics)
        if held_out:
            test_bags = load_bags(features_dir, sorted(held_out))
            y_test = np.array([labels[b.name] for b in test_bags])
            p_test = predict(model, test_bags)
            metrics["test_auc"] = safe_auc(y_test, p_test)
            metrics["test_accuracy"] = float(np.mean((p_test >= threshold) == y_test))
            preds += [_prediction(model, b, labels, s, "test") for b, s in zip(test_bags, p_test)]
        client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()
                                          if np.isfinite(v)])
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            _write_artifacts(tmp, model, final.state, preds, y_pred, p_pred, bags, slides_dir)
            mlflow.log_artifacts(str(tmp / "head"), artifact_path="head")
            for extra in sorted(tmp.iterdir()):
                if extra.is_file():
                    mlflow.log_artifact(str(extra))
                elif extra.name != "head":
                    mlflow.log_artifacts(str(extra), artifact_path=extra.name)
    return FitResult(run_id, metrics, preds, model, threshold, patch_threshold)


def _prediction(head: MILHead, bag: Bag, labels: dict[str, int], score: float, fold) -> dict:
    """One predictions.csv row; the highest patch logit is kept for `roi_threshold`."""
    logit = max_patch_logit(head, bag)
    return {"slide": bag.name, "label": labels[bag.name], "score": float(score),
            "max_patch_score": float(expit(logit)), "max_patch_logit": logit,
            "fold": fold}


def _log_patch_threshold(preds: list[dict], metrics: dict[str, float]) -> float:
    """`roi_threshold` on the out-of-fold / validation slides, logged as param and metrics,
    with how many of those slides it gets wrong (a normal slide with an ROI, a tumour slide
    without one)."""
    import mlflow

    y = np.array([r["label"] for r in preds])
    logits = np.array([r["max_patch_logit"] for r in preds])
    patch_threshold = roi_threshold(logits, y)
    hot = expit(logits) >= patch_threshold
    metrics["patch_threshold"] = patch_threshold
    metrics["val_normal_slides_with_roi"] = int(np.sum(hot & (y == 0)))
    metrics["val_tumor_slides_without_roi"] = int(np.sum(~hot & (y == 1)))
    mlflow.log_param("patch_threshold", patch_threshold)
    log.info("patch_threshold %.6g: %d of %d held-out normal slides with an ROI, %d of %d "
             "tumour slides without one", patch_threshold, metrics["val_normal_slides_with_roi"],
             int(np.sum(y == 0)), metrics["val_tumor_slides_without_roi"], int(np.sum(y == 1)))
    return patch_threshold


def _write_artifacts(out: Path, model: MILHead, state: dict, preds: list[dict], y: np.ndarray,
                     p: np.ndarray, bags: Sequence[Bag], slides_dir) -> None:
    (out / "head").mkdir()
    torch.save(state, out / "head" / "head.pt")
    (out / "head" / "head_config.json").write_text(json.dumps(model.config, indent=2))
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide", "label", "score", "max_patch_score",
                                               "fold"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(preds)
    write_roc_png(out / "roc_curve.png", y, p)
    if slides_dir is not None:
        write_heatmaps(out / "heatmaps", model, bags, slides_dir)


def write_roc_png(path: Path, y: np.ndarray, p: np.ndarray, title: str = "validation") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"AUC {roc_auc_score(y, p):.3f}")
        ax.legend(loc="lower right")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC ({title})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def find_slide(slides_dir: str | Path, name: str) -> Path | None:
    """The slide file called `name` (any extension) under `slides_dir`, if there is one."""
    for candidate in sorted(Path(slides_dir).rglob(f"{name}.*")):
        if candidate.suffix.lower() in {".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn"}:
            return candidate
    return None


def write_heatmaps(out: Path, model: MILHead, bags: Sequence[Bag], slides_dir,
                   limit: int = HEATMAPS) -> list[Path]:
    """Heatmap PNGs (wsi.outputs) of the highest-scored slides whose files are reachable."""
    from wsi.outputs import write_heatmap_png
    from wsi.slide import open_slide

    out.mkdir(parents=True, exist_ok=True)
    scores = predict(model, bags)
    written = []
    for i in np.argsort(-scores):
        path = find_slide(slides_dir, bags[i].name)
        if path is None:
            continue
        with torch.no_grad():
            patch_scores = model(bags[i].features).patch_scores.numpy()
        with open_slide(path) as slide:
            target = out / f"{bags[i].name}.png"
            write_heatmap_png(target, slide, bags[i].coords, patch_scores,
                              int(bags[i].attrs.get("patch_size", 224)))
        written.append(target)
        if len(written) >= limit:
            break
    return written


def load_run_head(run_id: str, tracking_uri: str = DEFAULT_TRACKING_URI) -> tuple[MILHead, Any]:
    """The head a fit run logged (eval mode) and the MLflow run itself."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise WsiError(f"no MLflow run {run_id!r} at {tracking_uri}: {exc}") from exc
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, "head", tmp))
        config = json.loads((local / "head_config.json").read_text())
        state = torch.load(local / "head.pt", map_location="cpu", weights_only=True)
    return head_from_state(config, state), run


# ---------------------------------------------------------------------------------------------
# CLI


def add_tracking_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI,
                        help=f"MLflow tracking URI (default {DEFAULT_TRACKING_URI}, artifacts in "
                             "./mlartifacts); any MLflow server URI works")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("features_dir", help="features folder (h5_files/<slide>.h5)")
    parser.add_argument("--labels", required=True,
                        help="slide labels CSV (Camelyon16 reference.csv format: name,Tumor|Normal)")
    parser.add_argument("--head", choices=HEAD_KINDS, default="chowder")
    parser.add_argument("--head-config", type=json.loads, default=None,
                        help='JSON overrides of the head config, e.g. \'{"k": 10}\'')
    parser.add_argument("--folds", type=int, default=5, help="stratified CV folds (1 = one split)")
    parser.add_argument("--seed", type=int, default=0)
    add_tracking_args(parser)
    parser.add_argument("--experiment", default="milroi")
    parser.add_argument("--run-name", default=None)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--patience", type=int, default=10,
                        help="epochs without validation AUC gain before stopping")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="inner validation share for early stopping")
    parser.add_argument("--test-slides", default=None,
                        help="file with slide names (one per line or CSV) held out of training "
                             "and scored by the final model")
    parser.add_argument("--slides", default=None,
                        help="folder searched for slide files, for heatmap artifacts")


def _read_names(path: str | None) -> list[str]:
    if not path:
        return []
    if not Path(path).is_file():
        raise WsiError(f"test slides file {path} does not exist")
    with open(path, newline="") as f:
        return [row[0].strip() for row in csv.reader(f) if row and row[0].strip()]


def run(args: argparse.Namespace) -> int:
    result = fit(args.features_dir, args.labels, head=args.head, head_config=args.head_config,
                 folds=args.folds, seed=args.seed, epochs=args.epochs, lr=args.lr,
                 weight_decay=args.weight_decay, patience=args.patience,
                 val_fraction=args.val_fraction, test_slides=_read_names(args.test_slides),
                 tracking_uri=args.tracking_uri, experiment=args.experiment,
                 slides_dir=args.slides, run_name=args.run_name)
    for key in ("val_auc", "val_accuracy", "threshold", "cv_auc_mean", "cv_auc_std",
                "test_auc", "test_accuracy"):
        if key in result.metrics:
            print(f"{key}={result.metrics[key]:.4f}")
    print(f"patch_threshold={result.patch_threshold:.6g}")
    print(f"run_id={result.run_id}")
    return 0
