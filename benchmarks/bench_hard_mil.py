"""The hard MIL benchmark (issue 24 part 4): heads trained on slide labels of a development split,
scored once on a held-out split, beside a tile-supervised linear probe (the ceiling).

    python -m benchmarks.bench_hard_mil --root DIR [--rows baseline,abmil,a,b,c,d,e]
                                        [--results benchmarks/results/hard_mil.json]

The protocol, the variants and the adoption rule are docs/hard_benchmark.md, fixed before any
run. `--root` holds (made when absent, by the protocol's commands):

    DIR/dev, DIR/heldout              `milroi-train synth ... --hard` (slides, XML, reference.csv)
    DIR/feat_dev, DIR/feat_heldout    `milroi-train features ... --weights none`
    DIR/mlflow.db, DIR/mlartifacts    the fit runs

Every row is `fit --folds 4` on the development split, then `evaluate` of the run on the held-out
split. Rule 1 of the protocol (the held-out split is scored once per frozen variant) is enforced:
a row already in the results file is not run again; a changed variant is a new row name.
Results go to the JSON after each row, with the machine, the commit and the run ids.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_facts
from training.heads import CALIBRATION

log = logging.getLogger("bench_hard_mil")

RESULTS = Path(__file__).resolve().parent / "results" / "hard_mil.json"
REPO = Path(__file__).resolve().parents[1]

# The protocol's data (docs/hard_benchmark.md, "Data (fixed)")
SPLITS = {"dev": 11, "heldout": 12}
N_PER_CLASS = 40
SIZE = "3072x3072"
FOLDS = 4


@dataclass(frozen=True)
class Row:
    """One variant: a head and its config, fixed before its run (rule 3)."""

    name: str
    head: str
    what: str
    config: dict[str, Any]


def rows(median_bag: int) -> dict[str, Row]:
    """The variants in the protocol's order; `a`'s k is 10 % of the development median bag."""
    k_large = max(5, round(0.10 * median_bag))
    return {r.name: r for r in [
        # the default head when the protocol was fixed; CLAM clustering (row c) is its default
        # since, so the row states the old default to stay the same variant
        Row("baseline", "chowder", "CHOWDER, defaults (the default head)", {"cluster_b": 0}),
        Row("abmil", "abmil", "gated-attention MIL + CLAM-SB instance branch, defaults", {}),
        Row("a", "chowder", f"CHOWDER, k = {k_large} (10 % of the median bag) + instance "
                            f"sampling (half of each bag per step)",
            {"k": k_large, "instance_sampling": 0.5, "cluster_b": 0}),
        Row("b", "chowder", "CHOWDER on per-slide standardised features",
            {"slide_standardize": True, "cluster_b": 0}),
        Row("c", "chowder", "CHOWDER + CLAM instance clustering on its patch logits (B = 8, "
                            "weight 0.3)", {"cluster_b": 8, "cluster_weight": 0.3}),
        Row("d", "dsmil", "DSMIL: max-instance stream + critical-instance attention", {}),
        Row("e", "transmil", "TransMIL (2 layers, PPEG) + max-instance patch classifier", {}),
        # issue 38: the default head as it ships now, its scores calibrated by fit; scored with
        # and without the calibration maps (the same weights) to state what they change
        Row("calibrated", "chowder", "CHOWDER, current defaults, Platt-calibrated by fit "
                                     "(issue 38)", {}),
    ]}


# ---------------------------------------------------------------------------------------------
# Data


def _train_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "training.cli", *args], check=True, cwd=REPO)


def prepare_data(root: Path) -> None:
    """The protocol's two splits and their features, made only where missing."""
    for split, seed in SPLITS.items():
        slides = root / split
        if not (slides / "reference.csv").is_file():
            _train_cli("synth", str(slides), "--tumor", str(N_PER_CLASS), "--normal",
                       str(N_PER_CLASS), "--size", SIZE, "--seed", str(seed), "--hard")
        feats = root / f"feat_{split}"
        done = feats / "h5_files"
        if not done.is_dir() or len(list(done.glob("*.h5"))) < 2 * N_PER_CLASS:
            _train_cli("features", str(slides), "--out", str(feats), "--weights", "none",
                       "--no-progress")


def median_bag_size(features_dir: Path, labels_path: Path) -> int:
    from training.feature_file import load_bags
    from training.labels import read_labels

    bags = load_bags(features_dir, sorted(read_labels(labels_path)), skip_no_tissue=True)
    return int(statistics.median(len(b.features) for b in bags))


# ---------------------------------------------------------------------------------------------
# Rows


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """The held-out figures of an evaluation result (training.evaluate)."""
    s, r = result["slide"], result["roi"]
    calibration = {f"{level}_{k}": m[k] for level, m in result.get("calibration", {}).items()
                   for k in ("ece", "brier")}
    return {**calibration, "slide_auc": s["auc"], "slide_auc_ci": [s["auc_ci_low"], s["auc_ci_high"]],
            "slide_accuracy": s["accuracy"], "patch_auc": result.get("patch_auc"),
            "froc": result.get("froc", {}).get("score"),
            "false_rois_per_normal_slide": r["false_rois_per_normal_slide"],
            "normal_slides_with_roi": r["normal_slides_with_roi"],
            "tumor_slides_with_roi": r["tumor_slides_with_roi"],
            "lesion_sensitivity": r.get("lesion_sensitivity"),
            "n_slides": s["n_slides"], "no_tissue": result.get("no_tissue", [])}


def run_row(row: Row, root: Path, tracking_uri: str) -> dict[str, Any]:
    """fit (4-fold CV on dev) -> evaluate once on the held-out split."""
    from training.evaluate import evaluate_run
    from training.fit import FitOptions, fit

    t0 = time.perf_counter()
    fitted = fit(root / "feat_dev", root / "dev" / "reference.csv",
                 FitOptions(head=row.head, head_config=row.config or None, folds=FOLDS),
                 tracking_uri=tracking_uri, experiment="hard-benchmark", run_name=row.name)
    fit_s = time.perf_counter() - t0
    result = evaluate_run(fitted.run_id, root / "feat_heldout", root / "heldout" / "reference.csv",
                          root / "heldout", tracking_uri)
    m = fitted.metrics
    out = {"row": row.name, "head": row.head, "what": row.what,
           "head_config": fitted.head.config, "run_id": fitted.run_id,
           "dev": {"cv_auc_mean": m.get("cv_auc_mean"), "cv_auc_std": m.get("cv_auc_std"),
                   "oof_auc": m.get("val_auc"), "threshold": fitted.slide_threshold,
                   "roi_threshold": fitted.roi_threshold,
                   **{k: m[k] for k in ("val_slide_ece_uncalibrated", "val_slide_ece",
                                        "val_patch_ece") if k in m}},
           "heldout": _summary(result), "fit_s": round(fit_s, 1),
           "eval_s": round(time.perf_counter() - t0 - fit_s, 1)}
    if CALIBRATION in fitted.head.config:
        out["heldout_uncalibrated"] = _summary(_uncalibrated(fitted, root))
    return out


def _uncalibrated(fitted, root: Path) -> dict[str, Any]:
    """The held-out evaluation of the same head without its calibration maps (same weights,
    same thresholds): what calibration changes."""
    import torch

    from training.evaluate import evaluate_scores
    from training.trainer import head_from_state

    config = {k: v for k, v in fitted.head.config.items() if k != CALIBRATION}
    head = head_from_state(config, fitted.head.state_dict())

    def score(bag):
        with torch.no_grad():
            out = head(bag.features)
        return torch.sigmoid(out.slide_logit).item(), out.patch_scores.numpy()

    return evaluate_scores(score, root / "feat_heldout", root / "heldout" / "reference.csv",
                           root / "heldout", threshold=fitted.slide_threshold,
                           roi_threshold=fitted.roi_threshold)


def run_probe(root: Path) -> dict[str, Any]:
    """The ceiling: a logistic probe on dev tile labels, scored on the held-out split."""
    from training.evaluate import evaluate_scores
    from training.probe import fit_probe, tile_set

    t0 = time.perf_counter()
    probe = fit_probe(tile_set(root / "feat_dev", root / "dev" / "reference.csv", root / "dev"))
    result = evaluate_scores(probe, root / "feat_heldout", root / "heldout" / "reference.csv",
                             root / "heldout", threshold=probe.threshold,
                             roi_threshold=probe.roi_threshold)
    return {"row": "probe", "head": "logistic regression", "what": "tile-supervised linear "
            f"probe (C = {probe.c:g} by grouped 4-fold CV on dev tiles; the ceiling)",
            "dev": {"cv_tile_auc": {f"{c:g}": a for c, a in probe.cv_tile_auc.items()},
                    "threshold": probe.threshold, "roi_threshold": probe.roi_threshold,
                    **probe.extra},
            "heldout": _summary(result), "fit_s": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------------------------
# Adoption (rule 4) and the table


def adoption(results: dict[str, dict]) -> dict[str, Any]:
    """Rule 4: patch AUC >= baseline + 0.02, slide AUC not below the baseline's 95 % interval,
    false ROIs per normal slide <= 0.1; the highest patch AUC among those that qualify."""
    base = results.get("baseline")
    if base is None:
        return {"adopted": None, "why": "no baseline row yet"}
    b = base["heldout"]
    verdicts = {}
    for name, r in results.items():
        if name in ("baseline", "probe"):
            continue
        h = r["heldout"]
        checks = {"patch_auc": (h["patch_auc"] or 0) >= (b["patch_auc"] or 0) + 0.02,
                  "slide_auc": h["slide_auc"] >= b["slide_auc_ci"][0],
                  "false_rois": h["false_rois_per_normal_slide"] <= 0.1}
        verdicts[name] = {**checks, "qualifies": all(checks.values())}
    qualified = [n for n, v in verdicts.items() if v["qualifies"]]
    adopted = max(qualified, key=lambda n: results[n]["heldout"]["patch_auc"]) if qualified else None
    return {"adopted": adopted or "baseline", "verdicts": verdicts}


def _fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(results: dict[str, dict]) -> str:
    lines = ["| row | head | dev CV slide AUC | held-out slide AUC (95% CI) | patch AUC | FROC | "
             "false ROIs / normal slide | tumour slides with ROI | fit s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        h, d = r["heldout"], r["dev"]
        cv = (f"{d['cv_auc_mean']:.3f} ± {d['cv_auc_std']:.3f}" if d.get("cv_auc_mean") is not None
              else f"tile {d.get('oof_tile_auc', float('nan')):.3f}")
        lines.append(
            f"| {name} | {r['what']} | {cv} | {h['slide_auc']:.3f} ({h['slide_auc_ci'][0]:.3f}-"
            f"{h['slide_auc_ci'][1]:.3f}) | {_fmt(h['patch_auc'])} | {_fmt(h['froc'])} | "
            f"{h['false_rois_per_normal_slide']:.2f} ({h['normal_slides_with_roi']} slides) | "
            f"{h['tumor_slides_with_roi']} | {r['fit_s']:.0f} |")
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, type=Path, help="data, features and runs")
    parser.add_argument("--rows", default="probe,baseline,abmil,a,b,c,d,e",
                        help="rows to run, in this order (default all; done rows are skipped)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = args.root.resolve()
    prepare_data(root)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    saved = json.loads(args.results.read_text()) if args.results.is_file() else {}
    results: dict[str, dict] = saved.get("rows", {})
    median_bag = median_bag_size(root / "feat_dev", root / "dev" / "reference.csv")
    variants = rows(median_bag)
    for name in [n.strip() for n in args.rows.split(",") if n.strip()]:
        if name in results:   # rule 1: the held-out split is scored once per frozen variant
            log.info("row %s already scored on the held-out split (%s): not run again", name,
                     results[name].get("run_id", "probe"))
            continue
        if name != "probe" and name not in variants:
            parser.error(f"unknown row {name!r}; rows: probe, {', '.join(variants)}")
        log.info("row %s: %s", name, "probe" if name == "probe" else variants[name].what)
        results[name] = (run_probe(root) if name == "probe"
                         else run_row(variants[name], root, tracking_uri))
        results[name].update(commit=_commit(), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(
            {"protocol": "docs/hard_benchmark.md", "root": str(root), "median_dev_bag": median_bag,
             "machine": machine_facts(), "rows": results, "adoption": adoption(results)},
            indent=2, default=float))
        print(table(results), flush=True)
    print(f"\n{table(results)}\n\nadoption (rule 4): {json.dumps(adoption(results))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
