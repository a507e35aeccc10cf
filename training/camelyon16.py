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

from core.cli import add_ray_arguments, add_tracking_uri_argument
from core.errors import ConfigError
from core.ray_cluster import RayOptions
from core.tracking import resolve_tracking_uri
from training.evaluate import DEFAULT_BOOTSTRAP, add_evaluation_arguments, evaluate_run, format_result
from training.extraction import (
    ExtractionOptions,
    FeatureModelOptions,
    add_feature_arguments,
    extract_features,
    feature_model,
)
from training.feature_file import feature_path
from training.fit import FitOptions, add_training_arguments, fit
from training.labels import read_labels
from wsi.discovery import find_slides, slide_name

log = logging.getLogger(__name__)

PROJECT_PER_CLASS = 60
SPLITS = ("project", "full")
DEFAULT_EXPERIMENT = "camelyon16"


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
    return {slide_name(p): p for p in find_slides(folder).slides}


def read_layout(root: str | Path) -> Layout:
    """Check the distributed layout and list its slides; a missing part is one clear error."""
    root = Path(root)
    parts = {"training/normal": root / "training" / "normal",
             "training/tumor": root / "training" / "tumor",
             "testing/images": root / "testing" / "images"}
    for label, folder in parts.items():
        if not folder.is_dir():
            raise ConfigError(f"{root} is not a Camelyon16 folder: {label}/ is missing")
    reference = root / "testing" / "reference.csv"
    if not reference.is_file():
        raise ConfigError(f"{root} is not a Camelyon16 folder: testing/reference.csv is missing")
    layout = Layout(root, _slides(parts["training/normal"]), _slides(parts["training/tumor"]),
                    _slides(parts["testing/images"]), reference,
                    root / "training" / "lesion_annotations",
                    root / "testing" / "lesion_annotations")
    if not layout.normal or not layout.tumor or not layout.test:
        raise ConfigError(f"{root}: no slides in training/normal, training/tumor or testing/images")
    return layout


def training_split(layout: Layout, split: str = "project", per_class: int = PROJECT_PER_CLASS,
                   seed: int = 0) -> dict[str, int]:
    """Training slide name -> label; `project` samples `per_class` of each class (seeded)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose project or full")
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


def extract_all(paths: list[Path], features_dir: Path, model_options: FeatureModelOptions,
                options: ExtractionOptions, ray_options: RayOptions | None = None) -> None:
    """Features of every slide that has none yet (training.extraction, one h5 per slide), here
    or over Ray actors (training.ray_features)."""
    if ray_options is not None:
        from training.ray_features import extract_on_ray  # imports ray: only with --ray

        if extract_on_ray(paths, features_dir, model_options, options, ray_options) != 0:
            raise ConfigError("features failed for some slides (named in the log above); the "
                              "protocol needs every slide of the split")
        return
    model, device = feature_model(model_options)
    for i, path in enumerate(paths, 1):
        log.info("features %d/%d: %s", i, len(paths), path.name)
        extract_features(path, feature_path(features_dir, slide_name(path)), model, options,
                         device=device, progress=False)


@dataclass(frozen=True)
class ProtocolOptions:
    """The whole run: which split, and the options of each step it runs."""

    root: Path
    out: Path
    split: str = SPLITS[0]
    per_class: int = PROJECT_PER_CLASS
    fit: FitOptions = FitOptions()
    features: FeatureModelOptions = FeatureModelOptions()
    extraction: ExtractionOptions = ExtractionOptions()
    bootstrap: int = DEFAULT_BOOTSTRAP
    roi_threshold: float | None = None   # default: the run's roi_threshold
    ray: RayOptions | None = None        # features over Ray actors
    experiment: str = DEFAULT_EXPERIMENT
    tracking_uri: str | None = None   # default: OUT/mlflow.db (after $MLFLOW_TRACKING_URI)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ProtocolOptions:
        return cls(Path(args.root), Path(args.out), args.split, args.per_class,
                   FitOptions.from_args(args), FeatureModelOptions.from_args(args),
                   ExtractionOptions.from_args(args), args.bootstrap, args.roi_threshold,
                   RayOptions.from_args(args), args.experiment, args.tracking_uri)


def run_protocol(options: ProtocolOptions) -> dict:
    o = options
    layout = read_layout(o.root)
    out = o.out
    out.mkdir(parents=True, exist_ok=True)
    train = training_split(layout, o.split, o.per_class, o.fit.seed)
    test_labels = read_labels(layout.reference)
    missing = sorted(set(test_labels) - set(layout.test))
    if missing:
        raise ConfigError(f"{layout.reference} lists slides not in testing/images: {missing[:5]}")
    log.info("%s split: %d training slides (%d tumour), %d test slides", o.split, len(train),
             sum(train.values()), len(test_labels))
    slides = {**layout.normal, **layout.tumor}
    features_dir = out / "features"
    extract_all([slides[n] for n in sorted(train)] + [layout.test[n] for n in sorted(test_labels)],
                features_dir, o.features, o.extraction, o.ray)
    labels_csv = write_labels(out / "train_labels.csv", train)
    tracking_uri = resolve_tracking_uri(o.tracking_uri,
                                        default=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    result = fit(features_dir, labels_csv, o.fit, tracking_uri=tracking_uri,
                 experiment=o.experiment, slides_dir=layout.root / "training",
                 run_name=f"camelyon16-{o.split}-{o.fit.head}")
    evaluation = evaluate_run(result.run_id, features_dir, layout.reference,
                              layout.test_annotations if layout.test_annotations.is_dir() else None,
                              tracking_uri, n_bootstrap=o.bootstrap,
                              roi_threshold=o.roi_threshold)
    summary = {"split": o.split, "head": o.fit.head, "run_id": result.run_id,
               "tracking_uri": tracking_uri, "train_slides": len(train),
               "train_tumor": int(sum(train.values())), "test_slides": len(test_labels),
               "validation": {k: v for k, v in result.metrics.items()
                              if k in {"val_auc", "cv_auc_mean", "cv_auc_std", "slide_threshold",
                                      "roi_threshold"}},
               "test": {k: v for k, v in evaluation.items() if k != "predictions"}}
    (out / "camelyon16.json").write_text(json.dumps(summary, indent=2))
    print(format_result(evaluation))
    return summary


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Every option of the steps it runs (features, fit, evaluate), from their own definitions."""
    parser.add_argument("root", help="Camelyon16 folder (training/, testing/) as distributed")
    parser.add_argument("--out", default="camelyon16-out", help="features, labels, results, mlflow")
    parser.add_argument("--split", choices=SPLITS, default=SPLITS[0],
                        help=f"project: {PROJECT_PER_CLASS} normal + {PROJECT_PER_CLASS} tumour "
                             "training slides; full: all 270")
    parser.add_argument("--per-class", type=int, default=PROJECT_PER_CLASS,
                        help=f"training slides per class in the project split ({PROJECT_PER_CLASS})")
    add_training_arguments(parser)
    add_feature_arguments(parser)
    add_ray_arguments(parser, actor_holds="backbone")
    add_evaluation_arguments(parser)
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    add_tracking_uri_argument(parser)   # default after $MLFLOW_TRACKING_URI: OUT/mlflow.db


def run(args: argparse.Namespace) -> int:
    summary = run_protocol(ProtocolOptions.from_args(args))
    print(f"run_id={summary['run_id']}")
    return 0
