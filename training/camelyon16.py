"""`milroi-train camelyon16`: the whole protocol on the Camelyon16 folder as distributed.

ROOT/training/normal/*.tif, ROOT/training/tumor/*.tif, ROOT/training/lesion_annotations/*.xml,
ROOT/testing/images/*.tif, ROOT/testing/reference.csv (`test_001,Tumor,Macro`, `test_002,Normal,`),
ROOT/testing/lesion_annotations/*.xml.

Split `project` (default): a seeded sample of 60 normal and 60 tumour training slides to train on,
the official 130-slide test set to evaluate on; `full`: all 270 training slides. Steps, each
resumable (feature files that exist are kept): ResNet-50 features of the training and test slides
(training.features) -> `fit` (K-fold CV + refit, MLflow) -> `evaluate` on the test set (slide AUC
and accuracy with bootstrap intervals, patch AUC, lesion FROC). Writes OUT/train_labels.csv and
OUT/camelyon16.json; the last line printed is `run_id=<id>`.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi.errors import WsiError

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = {".tif", ".tiff", ".svs", ".ndpi", ".mrxs"}
PROJECT_PER_CLASS = 60


@dataclass
class Layout:
    """The Camelyon16 folders; slides as name -> path."""

    root: Path
    normal: dict[str, Path]
    tumor: dict[str, Path]
    test: dict[str, Path]
    reference: Path
    train_annotations: Path
    test_annotations: Path


def _slides(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in SLIDE_SUFFIXES}


def read_layout(root: str | Path) -> Layout:
    """Check the distributed layout and list its slides; a missing part is one clear error."""
    root = Path(root)
    parts = {"training/normal": root / "training" / "normal",
             "training/tumor": root / "training" / "tumor",
             "testing/images": root / "testing" / "images"}
    for label, folder in parts.items():
        if not folder.is_dir():
            raise WsiError(f"{root} is not a Camelyon16 folder: {label}/ is missing")
    reference = root / "testing" / "reference.csv"
    if not reference.is_file():
        raise WsiError(f"{root} is not a Camelyon16 folder: testing/reference.csv is missing")
    layout = Layout(root, _slides(parts["training/normal"]), _slides(parts["training/tumor"]),
                    _slides(parts["testing/images"]), reference,
                    root / "training" / "lesion_annotations",
                    root / "testing" / "lesion_annotations")
    if not layout.normal or not layout.tumor or not layout.test:
        raise WsiError(f"{root}: no slides in training/normal, training/tumor or testing/images")
    return layout


def training_split(layout: Layout, split: str = "project", per_class: int = PROJECT_PER_CLASS,
                   seed: int = 0) -> dict[str, int]:
    """Training slide name -> label; `project` samples `per_class` of each class (seeded)."""
    if split not in {"project", "full"}:
        raise WsiError(f"unknown split {split!r}; choose project or full")
    chosen: dict[str, int] = {}
    rng = np.random.default_rng(seed)
    for label, slides in ((0, layout.normal), (1, layout.tumor)):
        names = sorted(slides)
        if split == "project" and len(names) > per_class:
            names = sorted(rng.choice(names, per_class, replace=False).tolist())
        chosen.update({n: label for n in names})
    return chosen


def write_labels(path: Path, labels: dict[str, int]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows((n, "Tumor" if y else "Normal") for n, y in sorted(labels.items()))
    return path


def extract_all(paths: list[Path], features_dir: Path, args: argparse.Namespace) -> None:
    """Features of every slide that has none yet (training.features, one h5 per slide)."""
    from training.features import (build_feature_model, extract_features, feature_path,
                                   resolve_device)

    device = resolve_device(args.device)
    model = build_feature_model(args.weights, args.layer, args.weights_seed, device, args.engine)
    for i, path in enumerate(paths, 1):
        log.info("features %d/%d: %s", i, len(paths), path.name)
        extract_features(path, feature_path(features_dir, path.stem), model,
                         tile_size=args.tile_size, min_tissue=args.min_tissue,
                         batch_size=args.batch_size, workers=args.workers, device=device,
                         limit_tiles=args.limit_tiles, progress=False)


def run_protocol(args: argparse.Namespace) -> dict:
    from training.evaluate import evaluate_run, format_result
    from training.fit import fit, read_labels

    layout = read_layout(args.root)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = training_split(layout, args.split, args.per_class, args.seed)
    test_labels = read_labels(layout.reference)
    missing = sorted(set(test_labels) - set(layout.test))
    if missing:
        raise WsiError(f"{layout.reference} lists slides not in testing/images: {missing[:5]}")
    log.info("%s split: %d training slides (%d tumour), %d test slides", args.split, len(train),
             sum(train.values()), len(test_labels))
    slides = {**layout.normal, **layout.tumor}
    features_dir = out / "features"
    extract_all([slides[n] for n in sorted(train)] + [layout.test[n] for n in sorted(test_labels)],
                features_dir, args)
    labels_csv = write_labels(out / "train_labels.csv", train)
    tracking_uri = args.tracking_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
    result = fit(features_dir, labels_csv, head=args.head, folds=args.folds, seed=args.seed,
                 epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                 patience=args.patience, tracking_uri=tracking_uri, experiment=args.experiment,
                 slides_dir=layout.root / "training", run_name=f"camelyon16-{args.split}-{args.head}")
    evaluation = evaluate_run(result.run_id, features_dir, layout.reference,
                              layout.test_annotations if layout.test_annotations.is_dir() else None,
                              tracking_uri, n_bootstrap=args.bootstrap)
    summary = {"split": args.split, "head": args.head, "run_id": result.run_id,
               "tracking_uri": tracking_uri, "train_slides": len(train),
               "train_tumor": int(sum(train.values())), "test_slides": len(test_labels),
               "validation": {k: v for k, v in result.metrics.items()
                              if k in {"val_auc", "cv_auc_mean", "cv_auc_std", "threshold",
                                      "patch_threshold"}},
               "test": {k: v for k, v in evaluation.items() if k != "predictions"}}
    (out / "camelyon16.json").write_text(json.dumps(summary, indent=2))
    print(format_result(evaluation))
    return summary


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from training.features import ENGINES
    from training.fit import add_tracking_args
    from training.heads import HEAD_KINDS

    parser.add_argument("root", help="Camelyon16 folder (training/, testing/) as distributed")
    parser.add_argument("--out", default="camelyon16-out", help="features, labels, results, mlflow")
    parser.add_argument("--split", choices=["project", "full"], default="project",
                        help="project: 60 normal + 60 tumour training slides; full: all 270")
    parser.add_argument("--per-class", type=int, default=PROJECT_PER_CLASS,
                        help="training slides per class in the project split (60)")
    parser.add_argument("--head", choices=HEAD_KINDS, default="chowder")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--weights", default="imagenet", help="imagenet | none | state_dict path")
    parser.add_argument("--weights-seed", type=int, default=0)
    parser.add_argument("--layer", default="pool", help="pool (2048-d) | layer3 (1024-d)")
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--min-tissue", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="ResNet-50 runtime: auto = onnxruntime on the CPU, torch on a GPU")
    parser.add_argument("--limit-tiles", type=int, default=None, help="first N tiles per slide")
    parser.add_argument("--experiment", default="camelyon16")
    add_tracking_args(parser)
    parser.set_defaults(tracking_uri=None)  # default: OUT/mlflow.db


def run(args: argparse.Namespace) -> int:
    summary = run_protocol(args)
    print(f"run_id={summary['run_id']}")
    return 0
