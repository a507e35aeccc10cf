"""`milroi-train evaluate`: slide AUC/accuracy, patch AUC and Camelyon16 lesion FROC of a fit run.

The metric functions are pure (arrays in, numbers out) so they can be checked on constructed cases:

- `slide_metrics`: ROC AUC and accuracy at the run's threshold, 95% percentile bootstrap intervals
  (stratified resampling of slides, sklearn.utils.resample).
- `patch_auc`: tile scores against tile tumour fractions from the XML annotations; a tile is
  tumour when at least half of it lies in tumour (`_0`/`_1` minus `_2` regions), normal when none
  of it does; ambiguous tiles (in between) and tiles touching a `_2` exclusion are left out.
- FROC as the official Camelyon16 script (Evaluation_FROC.py, Bejnordi et al. 2017): evaluation
  mask = annotated tumour at level 5 (32x) grown by 75 um / 2 (distance transform), holes filled,
  8-connected lesions; lesions whose major axis is under 275 um are isolated tumour cells (a hit
  there is neither TP nor FP); each lesion's TP probability is its best detection; a detection
  outside every lesion is a FP; sensitivity is interpolated at 1/4, 1/2, 1, 2, 4, 8 FP per slide
  and averaged. Detections are the local maxima of the tile score map (peak_local_max).
- `roi_metrics`: what a user sees at the ROI threshold (the run's `roi_threshold`): how many
  normal slides get a tumour ROI polygon and how many per slide, how many tumour slides get one,
  and the share of counted lesions that hold a tile scored at or above it.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.measure import label as label_components
from skimage.measure import regionprops
from sklearn.metrics import accuracy_score, precision_score, recall_score, roc_auc_score
from sklearn.utils import resample

from core.bundle import DEFAULT_SLIDE_THRESHOLD
from core.cli import add_tracking_uri_argument
from core.errors import ConfigError
from core.tracking import mlflow_client, resolve_tracking_uri
from training.calibration import calibration_metrics
from training.feature_file import feature_path, load_bag
from training.labels import read_labels
from training.plots import write_reliability_png
from training.runs import FitRun, load_run_head

log = logging.getLogger(__name__)

FROC_FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
EVAL_DOWNSAMPLE = 32        # Camelyon16 evaluation mask level 5
LESION_MARGIN_UM = 75.0     # lesions grown by half of it
ITC_MAX_UM = 275.0          # isolated tumour cells: major axis below this
DEFAULT_BOOTSTRAP = 1000    # resamples of the bootstrap intervals
TUMOR_TILE_MIN_FRACTION = 0.5   # a tile is tumour when at least half of it lies in tumour


# ---------------------------------------------------------------------------------------------
# Slide level


def bootstrap_ci(y: np.ndarray, p: np.ndarray, metric: Callable[[np.ndarray, np.ndarray], float],
                 n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric(y, p)`, resampling slides within each class."""
    y, p = np.asarray(y), np.asarray(p)
    rng = np.random.RandomState(seed)
    stats = []
    for _ in range(n):
        yy, pp = resample(y, p, stratify=y, random_state=rng)
        stats.append(metric(yy, pp))
    lo, hi = np.percentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def slide_metrics(y: Sequence[int], p: Sequence[float],
                  threshold: float = DEFAULT_SLIDE_THRESHOLD, n_bootstrap: int = DEFAULT_BOOTSTRAP,
                  seed: int = 0) -> dict[str, float]:
    """AUC and accuracy (at `threshold`) with 95% bootstrap intervals."""
    y, p = np.asarray(y, int), np.asarray(p, float)
    if len(np.unique(y)) < 2:
        raise ConfigError("slide AUC needs tumour and normal slides among the evaluated ones")

    def accuracy(yy, pp):
        return accuracy_score(yy, pp >= threshold)

    auc_lo, auc_hi = bootstrap_ci(y, p, roc_auc_score, n_bootstrap, seed)
    acc_lo, acc_hi = bootstrap_ci(y, p, accuracy, n_bootstrap, seed)
    return {"auc": float(roc_auc_score(y, p)), "auc_ci_low": auc_lo, "auc_ci_high": auc_hi,
            "accuracy": float(accuracy(y, p)), "accuracy_ci_low": acc_lo,
            "accuracy_ci_high": acc_hi, "n_slides": int(len(y)), "n_tumor": int(y.sum())}


# ---------------------------------------------------------------------------------------------
# Patch level


def patch_targets(tumor_fraction: np.ndarray, excluded: np.ndarray | None = None,
                  min_fraction: float = TUMOR_TILE_MIN_FRACTION) -> np.ndarray:
    """1 tumour, 0 normal, -1 left out (ambiguous or touching an exclusion region)."""
    f = np.asarray(tumor_fraction, float)
    target = np.full(f.shape, -1, np.int8)
    target[f >= min_fraction] = 1
    target[f == 0] = 0
    if excluded is not None:
        target[np.asarray(excluded, bool)] = -1
    return target


def patch_auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """ROC AUC of tile scores over the tiles with a target of 0 or 1."""
    keep = np.asarray(targets) >= 0
    t = np.asarray(targets)[keep]
    if len(np.unique(t)) < 2:
        raise ConfigError("patch AUC needs tumour and normal tiles")
    return float(roc_auc_score(t, np.asarray(scores)[keep]))


def patch_precision_recall(scores: np.ndarray, targets: np.ndarray,
                           threshold: float) -> dict[str, float]:
    """Precision and recall of "tile scored >= threshold" for annotated tumour tiles, over the
    tiles with a target of 0 or 1: how much of an ROI is tumour, how much tumour is in an ROI."""
    keep = np.asarray(targets) >= 0
    t, hot = np.asarray(targets)[keep], np.asarray(scores)[keep] >= threshold
    return {"patch_precision": float(precision_score(t, hot, zero_division=0)),
            "patch_recall": float(recall_score(t, hot, zero_division=0))}


def annotation_targets(annotations, coords: np.ndarray, tile_size: int,
                       min_fraction: float = TUMOR_TILE_MIN_FRACTION) -> np.ndarray:
    """`patch_targets` of a slide's tiles from its wsi.annotations.Annotations."""
    import shapely

    from wsi.annotations import tile_tumor_fraction

    fraction = tile_tumor_fraction(annotations, coords, tile_size)
    excluded = None
    if annotations.exclusion is not None and not annotations.exclusion.is_empty:
        boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + tile_size,
                            coords[:, 1] + tile_size)
        excluded = shapely.intersects(boxes, annotations.exclusion)
    return patch_targets(fraction, excluded, min_fraction)


# ---------------------------------------------------------------------------------------------
# Lesion FROC


def evaluation_mask(tumor_mask: np.ndarray, mpp: float,
                    downsample: float = EVAL_DOWNSAMPLE) -> np.ndarray:
    """Labelled lesions (int, 0 = background) from a tumour mask at `downsample` (official logic)."""
    distance = ndimage.distance_transform_edt(~np.asarray(tumor_mask, bool))
    grown = distance < LESION_MARGIN_UM / (mpp * downsample * 2)
    return label_components(ndimage.binary_fill_holes(grown), connectivity=2)


def itc_labels(lesions: np.ndarray, mpp: float, downsample: float = EVAL_DOWNSAMPLE) -> set[int]:
    """Labels of isolated tumour cell regions (major axis < 275 um)."""
    limit = ITC_MAX_UM / (mpp * downsample)
    return {r.label for r in regionprops(lesions) if r.axis_major_length < limit}


def detections(coords: np.ndarray, scores: np.ndarray, tile_size: int,
               min_distance: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of the tile score map: (level-0 centres [M, 2] as (x, y), probabilities [M])."""
    coords = np.asarray(coords, np.int64)
    if len(coords) == 0:
        return np.zeros((0, 2)), np.zeros(0)
    cells = (coords - coords.min(0)) // tile_size
    grid = np.full(tuple(cells.max(0)[::-1] + 1), -np.inf)  # rows = y, cols = x
    grid[cells[:, 1], cells[:, 0]] = scores
    peaks = peak_local_max(np.where(np.isfinite(grid), grid, grid[np.isfinite(grid)].min() - 1),
                           min_distance=min_distance, exclude_border=False)
    peaks = peaks[np.isin(peaks[:, 0] * grid.shape[1] + peaks[:, 1],
                          cells[:, 1] * grid.shape[1] + cells[:, 0])]
    centres = peaks[:, ::-1] * tile_size + coords.min(0) + tile_size / 2
    return centres.astype(float), grid[peaks[:, 0], peaks[:, 1]]


@dataclass
class SlideHits:
    """One slide's contribution to the FROC (as compute_FP_TP_Probs of the official script)."""

    fp_probs: np.ndarray   # probabilities of detections outside every lesion
    tp_probs: np.ndarray   # best probability per counted lesion (0 = missed)
    n_lesions: int         # lesions that count (ITCs excluded)


def lesion_hits(centres: np.ndarray, probs: np.ndarray, lesions: np.ndarray | None,
                itc: set[int] = frozenset(), downsample: float = EVAL_DOWNSAMPLE) -> SlideHits:
    """Match detections (level-0 x, y) to labelled lesions; `lesions=None` for a normal slide."""
    probs = np.asarray(probs, float)
    if lesions is None or lesions.max() == 0:
        return SlideHits(probs, np.zeros(0), 0)
    rows = np.clip((centres[:, 1] / downsample).astype(int), 0, lesions.shape[0] - 1)
    cols = np.clip((centres[:, 0] / downsample).astype(int), 0, lesions.shape[1] - 1)
    hit = lesions[rows, cols]
    counted = np.array([lab for lab in range(1, lesions.max() + 1) if lab not in itc], int)
    best = np.zeros(lesions.max() + 1)
    np.maximum.at(best, hit, probs)
    return SlideHits(probs[hit == 0], best[counted], len(counted))


def froc(slides: Sequence[SlideHits], fp_rates: Sequence[float] = FROC_FP_RATES) -> dict[str, Any]:
    """FROC curve and the Camelyon16 score (mean sensitivity at the given FP per slide rates)."""
    total = sum(s.n_lesions for s in slides)
    if total == 0:
        raise ConfigError("lesion FROC needs at least one annotated lesion")
    fps = np.concatenate([s.fp_probs for s in slides])
    tps = np.concatenate([s.tp_probs for s in slides])
    # every distinct positive probability; the official script skips its lowest value, which is
    # the 0 of missed lesions (a 0 here means "not detected", never a detection threshold)
    probs = np.concatenate([fps, tps])
    thresholds = np.unique(probs[probs > 0])
    fp_per_slide = np.append((fps[None, :] >= thresholds[:, None]).sum(1), 0) / len(slides)
    sensitivity = np.append((tps[None, :] >= thresholds[:, None]).sum(1), 0) / total
    at = np.interp(fp_rates, fp_per_slide[::-1], sensitivity[::-1])
    return {"fp_per_slide": fp_per_slide, "sensitivity": sensitivity,
            "sensitivity_at": dict(zip(map(float, fp_rates), map(float, at))),
            "score": float(np.mean(at)), "n_lesions": int(total)}


@dataclass
class SlideRois:
    """One slide at the ROI threshold: its ROI polygon count and, for annotated slides, the
    counted lesions (`lesion_hits` of the tiles at or above the threshold)."""

    label: int
    n_rois: int
    hits: SlideHits | None = None


def slide_rois(coords: np.ndarray, scores: np.ndarray, tile_size: int, threshold: float, label: int,
               lesions: np.ndarray | None = None, itc: set[int] = frozenset()) -> SlideRois:
    from results.rois import roi_polygons

    rois = roi_polygons(coords, scores, tile_size, roi_threshold=threshold)
    hits = None
    if lesions is not None:
        hot = scores >= threshold
        hits = lesion_hits(coords[hot] + tile_size / 2, scores[hot], lesions, itc)
    return SlideRois(int(label), len(rois), hits)


def roi_metrics(slides: Sequence[SlideRois], threshold: float) -> dict[str, Any]:
    """ROI counts on normal and tumour slides and lesion sensitivity at one threshold."""
    normal = [s for s in slides if s.label == 0]
    tumor = [s for s in slides if s.label == 1]
    result: dict[str, Any] = {
        "roi_threshold": float(threshold),
        "normal_slides": len(normal),
        "normal_slides_with_roi": sum(s.n_rois > 0 for s in normal),
        "false_rois_per_normal_slide": (float(np.mean([s.n_rois for s in normal]))
                                        if normal else float("nan")),
        "tumor_slides": len(tumor),
        "tumor_slides_with_roi": sum(s.n_rois > 0 for s in tumor)}
    lesions = [s.hits for s in tumor if s.hits is not None and s.hits.n_lesions]
    if lesions:
        n = sum(h.n_lesions for h in lesions)
        result["lesions"] = n
        result["lesion_sensitivity"] = float(sum((h.tp_probs > 0).sum() for h in lesions) / n)
    return result


# ---------------------------------------------------------------------------------------------
# Run evaluation


def evaluate_run(run_id: str, features_dir: str | Path, labels_path: str | Path,
                 annotations_dir: str | Path | None = None, tracking_uri: str | None = None,
                 n_bootstrap: int = DEFAULT_BOOTSTRAP, log_to_run: bool = True,
                 roi_threshold: float | None = None) -> dict[str, Any]:
    """Score every labelled slide with the run's head; slide, patch, lesion and ROI metrics
    (ROIs at `roi_threshold`, by default the run's `roi_threshold`, which export puts in the
    manifest)."""
    import torch

    tracking_uri = resolve_tracking_uri(tracking_uri)
    run = FitRun.load(run_id, tracking_uri)
    head = load_run_head(run_id, tracking_uri)

    def score(bag) -> tuple[float, np.ndarray]:
        with torch.no_grad():
            out = head(bag.features)
        return torch.sigmoid(out.slide_logit).item(), out.patch_scores.numpy()

    result = {"run_id": run_id, **evaluate_scores(
        score, features_dir, labels_path, annotations_dir, threshold=run.slide_threshold,
        roi_threshold=run.roi_threshold if roi_threshold is None else roi_threshold,
        n_bootstrap=n_bootstrap)}
    if log_to_run:
        _log_evaluation(run_id, tracking_uri, result)
    return result


SlideScorer = Callable[[Any], tuple[float, np.ndarray]]   # Bag -> (slide probability, patch scores)


def evaluate_scores(score: SlideScorer, features_dir: str | Path, labels_path: str | Path,
                    annotations_dir: str | Path | None = None, *, threshold: float,
                    roi_threshold: float, n_bootstrap: int = DEFAULT_BOOTSTRAP) -> dict[str, Any]:
    """The metrics of `evaluate_run` for any scorer of bags (a head, a tile-supervised probe):
    slide metrics at `threshold`, patch AUC and FROC against `annotations_dir`, ROIs at
    `roi_threshold`."""
    labels = read_labels(labels_path)
    names = sorted(labels)
    y, p = [], []
    patch_scores, patch_tgts, hits, rois = [], [], [], []
    scored, no_tissue = [], []
    for name in names:
        bag = load_bag(feature_path(features_dir, name))
        if bag.no_tissue:   # nothing to score: left out of every metric, and said so
            no_tissue.append(name)
            continue
        scored.append(name)
        slide_p, scores = score(bag)
        y.append(labels[name])
        p.append(slide_p)
        tile = bag.attrs.tiling.tile_size
        if annotations_dir is None:
            rois.append(slide_rois(bag.coords, scores, tile, roi_threshold, labels[name]))
            continue
        mpp = bag.attrs.mpp
        xml = Path(annotations_dir) / f"{name}.xml"
        if xml.is_file():
            from wsi.annotations import rasterize, read_asap_xml

            ann = read_asap_xml(xml)
            tgt = annotation_targets(ann, bag.coords, tile)
            shape = (int(np.ceil(bag.attrs.level0_height / EVAL_DOWNSAMPLE)),
                     int(np.ceil(bag.attrs.level0_width / EVAL_DOWNSAMPLE)))
            lesions = evaluation_mask(rasterize(ann.tumor, shape, EVAL_DOWNSAMPLE), mpp)
            itc = itc_labels(lesions, mpp)
        else:
            if labels[name]:
                log.warning("tumour slide %s has no annotation %s: left out of patch AUC and FROC",
                            name, xml)
                rois.append(slide_rois(bag.coords, scores, tile, roi_threshold, labels[name]))
                continue
            tgt, lesions, itc = np.zeros(len(scores), np.int8), None, set()
        rois.append(slide_rois(bag.coords, scores, tile, roi_threshold, labels[name],
                               lesions, itc))
        patch_scores.append(scores)
        patch_tgts.append(tgt)
        hits.append(lesion_hits(*detections(bag.coords, scores, tile), lesions, itc))
    result: dict[str, Any] = {"slide_threshold": threshold,
                              "slide": slide_metrics(y, p, threshold, n_bootstrap),
                              "calibration": {"slides": calibration_metrics(y, p)},
                              "predictions": [{"slide": n, "label": int(t), "score": float(s)}
                                              for n, t, s in zip(scored, y, p)],
                              "roi": roi_metrics(rois, roi_threshold)}
    if no_tissue:
        result["no_tissue"] = no_tissue
        log.warning("%d slide(s) without a tissue tile left out of the evaluation (no_tissue): %s",
                    len(no_tissue), ", ".join(no_tissue))
    if patch_scores:
        targets = np.concatenate(patch_tgts)
        if {0, 1} <= set(np.unique(targets).tolist()):
            result["patch_auc"] = patch_auc(np.concatenate(patch_scores), targets)
            known = targets >= 0
            result["calibration"]["patches"] = calibration_metrics(
                targets[known], np.concatenate(patch_scores)[known])
            result["roi"].update(patch_precision_recall(np.concatenate(patch_scores), targets,
                                                        roi_threshold))
        else:
            log.warning("patch AUC left out: the scored tiles are not both tumour and normal")
    if sum(h.n_lesions for h in hits):
        f = froc(hits)
        result["froc"] = {"score": f["score"], "sensitivity_at": f["sensitivity_at"],
                          "n_lesions": f["n_lesions"]}
    return result


def _log_evaluation(run_id: str, tracking_uri: str, result: dict[str, Any]) -> None:
    client = mlflow_client(tracking_uri)
    metrics = {f"test_{k}": v for k, v in result["slide"].items()}
    if "patch_auc" in result:
        metrics["test_patch_auc"] = result["patch_auc"]
    if "froc" in result:
        metrics["test_froc"] = result["froc"]["score"]
    for key in ("normal_slides_with_roi", "false_rois_per_normal_slide", "tumor_slides_with_roi",
                "lesion_sensitivity", "patch_precision", "patch_recall"):
        if key in result["roi"] and np.isfinite(result["roi"][key]):
            metrics[f"test_roi_{key}"] = result["roi"][key]
    for level, m in result["calibration"].items():   # "slides" -> test_slide_ece, ...
        name = {"slides": "slide", "patches": "patch"}[level]
        metrics[f"test_{name}_ece"], metrics[f"test_{name}_brier"] = m["ece"], m["brier"]
    for k, v in metrics.items():
        client.log_metric(run_id, k, float(v))
    client.log_dict(run_id, result, "evaluation/evaluation.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reliability.png"
        write_reliability_png(path, result["calibration"])
        client.log_artifact(run_id, str(path), "evaluation")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", help="MLflow run id printed by `milroi-train fit`")
    parser.add_argument("--features", required=True, help="features folder of the test slides")
    parser.add_argument("--labels", required=True, help="reference CSV of the test slides")
    parser.add_argument("--annotations", default=None,
                        help="folder of <slide>.xml lesion annotations (patch AUC and FROC)")
    add_evaluation_arguments(parser)
    parser.add_argument("--no-log", action="store_true", help="do not log metrics to the run")
    add_tracking_uri_argument(parser)


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """--bootstrap and --roi-threshold (shared by `evaluate` and `camelyon16`)."""
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP,
                        help=f"bootstrap resamples of the slide metrics ({DEFAULT_BOOTSTRAP})")
    parser.add_argument("--roi-threshold", type=float, default=None,
                        help="patch score for tumour ROIs (default the run's roi_threshold)")


def format_result(result: dict[str, Any]) -> str:
    s = result["slide"]
    lines = [f"slide AUC      {s['auc']:.3f} (95% CI {s['auc_ci_low']:.3f}-{s['auc_ci_high']:.3f})",
             f"slide accuracy {s['accuracy']:.3f} (95% CI {s['accuracy_ci_low']:.3f}-"
             f"{s['accuracy_ci_high']:.3f}) at threshold {result['slide_threshold']:.3f}, "
             f"{s['n_slides']} slides"]
    for level, m in result.get("calibration", {}).items():
        lines.append(f"{level + ' ECE':<14} {m['ece']:.3f}, Brier {m['brier']:.3f} ({m['n']} {level})")
    if "patch_auc" in result:
        lines.append(f"patch AUC      {result['patch_auc']:.3f}")
    if "froc" in result:
        at = ", ".join(f"{k:g}: {v:.3f}" for k, v in result["froc"]["sensitivity_at"].items())
        lines.append(f"lesion FROC    {result['froc']['score']:.3f} "
                     f"({result['froc']['n_lesions']} lesions; sensitivity at FP/slide {at})")
    r = result["roi"]
    line = (f"ROIs at {r['roi_threshold']:.6g}: {r['normal_slides_with_roi']} of {r['normal_slides']} "
            f"normal slides ({r['false_rois_per_normal_slide']:.2f} ROIs per normal slide), "
            f"{r['tumor_slides_with_roi']} of {r['tumor_slides']} tumour slides")
    if "lesion_sensitivity" in r:
        line += f", {r['lesion_sensitivity']:.3f} of {r['lesions']} lesions hit"
    if "patch_precision" in r:
        line += (f"; tumour tiles: precision {r['patch_precision']:.3f}, "
                 f"recall {r['patch_recall']:.3f}")
    lines.append(line)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = evaluate_run(args.run_id, args.features, args.labels, args.annotations,
                          args.tracking_uri, args.bootstrap, log_to_run=not args.no_log,
                          roi_threshold=args.roi_threshold)
    print(format_result(result))
    print(json.dumps({k: v for k, v in result.items() if k != "predictions"}))
    return 0
