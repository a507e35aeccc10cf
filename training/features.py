"""`milroi-train features SLIDES_DIR --out FEATURES_DIR`: encoder features (training.encoders:
ResNet-50 by default, `--encoder NAME`) of every tissue tile of every slide, one h5 file per slide
(training.feature_file's CLAM/TRIDENT layout), resumable.

The slides are `wsi.discovery.find_slides`'s; each is extracted by `training.extraction`, here
or (`--ray`) in Ray actors (`training.ray_features`). A corrupt slide is reported and counted,
the others go on, and the exit code is non-zero.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tqdm import tqdm

from core.cli import add_ray_arguments
from core.errors import ConfigError, SlideError
from core.ray_cluster import RayOptions
from training.extraction import (
    ExtractionOptions,
    FeatureModelOptions,
    add_feature_arguments,
    extract_features,
    feature_model,
)
from training.feature_file import feature_path
from wsi.discovery import find_slides, slide_name

log = logging.getLogger(__name__)


def slides_to_extract(slides_dir: Path, out: Path) -> list[Path]:
    """The slides under `slides_dir` (not under `out`), checked for names that would collide."""
    if not slides_dir.is_dir():
        raise ConfigError(f"slides folder {slides_dir} does not exist")
    found = find_slides(slides_dir, exclude=out)
    for path in found.skipped:
        log.info("skipping %s: not a slide OpenSlide can read", path)
    names: dict[str, Path] = {}
    for path in found.slides:
        name = slide_name(path)
        if name in names:
            raise ConfigError(f"two slides named {name!r} ({names[name]} and {path}): their "
                              f"feature files would collide")
        names[name] = path
    if not found.slides:
        raise ConfigError(f"no slides found under {slides_dir}")
    return found.slides


def extract_folder(slides: list[Path], out: Path, model_options: FeatureModelOptions,
                   options: ExtractionOptions, progress: bool = True) -> int:
    """Features of `slides` into `out` in this process; the command's exit code."""
    model, device = feature_model(model_options)
    log.info("%d slides, encoder %s (weights %s) in %s on %s", len(slides), model_options.encoder,
             model_options.weights, model.describe()["feature_engine"], device)
    failed, no_tissue = [], []
    done = skipped = 0
    for path in tqdm(slides, desc="slides", unit="slide", disable=not progress):
        try:
            summary = extract_features(path, feature_path(out, slide_name(path)), model, options,
                                       device=device, progress=progress)
        except SlideError as exc:  # a corrupt slide: report, go on with the others
            log.error("%s", exc)
            failed.append(path)
            continue
        skipped += summary["skipped"]
        done += not summary["skipped"]
        if summary.get("no_tissue"):
            no_tissue.append(path)
    log.info("features: %d slides written, %d already done, %d failed", done, skipped,
             len(failed))
    if no_tissue:
        log.warning("features: %d of the slides written have no tissue tile (no_tissue): %s",
                    len(no_tissue), ", ".join(str(p) for p in no_tissue))
    if failed:
        log.error("failed slides: %s", ", ".join(str(p) for p in failed))
        return 1
    return 0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides_dir", type=Path, help="folder of slides (searched recursively)")
    parser.add_argument("--out", type=Path, required=True,
                        help="features folder; files go to OUT/h5_files/<slide>.h5")
    add_feature_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_ray_arguments(parser, actor_holds="backbone")


def run(args: argparse.Namespace) -> int:
    model_options = FeatureModelOptions.from_args(args)
    options = ExtractionOptions.from_args(args)
    ray_options = RayOptions.from_args(args)
    slides = slides_to_extract(args.slides_dir, args.out)
    if ray_options is not None:
        from training.ray_features import extract_on_ray  # imports ray: only with --ray

        return extract_on_ray(slides, args.out, model_options, options, ray_options)
    return extract_folder(slides, args.out, model_options, options, not args.no_progress)
