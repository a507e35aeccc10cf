"""ONNX export of a trained model into the bundle of docs/INTERFACES.md, and its registration.

Two entry points:

- `export_bundle(out_dir, backbone, head, manifest_extra)`: in-memory modules -> a bundle folder
  (backbone.onnx, head.onnx, aggregator.onnx, manifest.json), checked with `onnx.checker` and
  for parity with torch in onnxruntime before it is published; no MLflow needed (the serving
  tests use it to make small bundles).
- `milroi-train export RUN_ID --name NAME`: rebuilds the backbone from the run's params and the
  head from its `head/` artifact, exports, checks parity on real tiles of a slide, logs the bundle
  as run artifacts and registers one MLflow model version (optionally under an alias).

Exporter: torch.onnx's dynamo exporter (`dynamo=True`, the default and maintained path in torch
2.x). It handles the uint8 NHWC input and a symbolic batch dimension directly; the legacy
TorchScript exporter gives the same graph and numbers here but is deprecated, so it is not used.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from training.backbone import Backbone
from wsi.errors import WsiError

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "milroi-bundle/1"
FILES = {"backbone": "backbone.onnx", "head": "head.onnx", "aggregator": "aggregator.onnx"}
DEFAULT_OPSET = 18
TILE_SIZE = 224
TARGET_MPP = 0.243
# Parity tolerances between torch and onnxruntime (float32, CPU): probabilities to 1e-5;
# features and the unbounded outputs (logits, attention, embeddings, tens in size) to 1e-4.
FEATURE_ATOL = 1e-4
SCORE_ATOL = 1e-5
PROBABILITIES = ("patch_scores", "slide_score")
BUNDLE_ARTIFACT_PATH = "bundle"


class ParityError(WsiError):
    """The exported ONNX graph does not reproduce the torch model."""


# ---------------------------------------------------------------------------------------------
# ONNX export of the three graphs


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str,
            output_names: tuple[str, ...], dynamic_batch: bool, opset: int) -> None:
    dynamic_shapes = {input_name: {0: torch.export.Dim("batch")}} if dynamic_batch else None
    # dynamo's translation steps print progress on stdout; keep the command output clean.
    with open(os.devnull, "w") as devnull, _redirect_stdout(devnull):
        program = torch.onnx.export(
            module.eval(), (example,), input_names=[input_name], output_names=list(output_names),
            dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True, verbose=False)
    # One self-contained file per graph (ResNet-50 is ~95 MB, far below protobuf's 2 GB limit).
    program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path), full_check=True)


class _redirect_stdout:
    """contextlib.redirect_stdout, also for the sys.stdout reference torch.onnx captured."""

    def __init__(self, target):
        self.target = target

    def __enter__(self):
        self.saved = sys.stdout
        sys.stdout = self.target

    def __exit__(self, *exc):
        sys.stdout = self.saved


def _patch_example_count() -> int:
    # Example batches of size >= 2 so the exporter does not specialise the batch dimension to 1.
    return 3


def synthetic_parity_tiles(n: int = 8, seed: int = 0) -> np.ndarray:
    """Smooth, H&E-coloured uint8 tiles [n, 224, 224, 3] for a parity check without a slide.

    Pink stroma with purple nuclei-like blobs: real-looking statistics (not white noise, which
    drives a random-init ResNet into unrealistically large activations).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:TILE_SIZE, 0:TILE_SIZE]
    pink, purple = np.array([230, 170, 200.0]), np.array([110, 60, 150.0])
    tiles = np.empty((n, TILE_SIZE, TILE_SIZE, 3), np.uint8)
    for i in range(n):
        centres = rng.uniform(0, TILE_SIZE, (40, 2))
        d2 = ((xx[..., None] - centres[:, 0]) ** 2 + (yy[..., None] - centres[:, 1]) ** 2)
        nuclei = np.exp(-d2 / (2 * rng.uniform(3, 8) ** 2)).max(-1)[..., None]
        rgb = pink * (1 - nuclei) + purple * nuclei + rng.normal(0, 6, (TILE_SIZE, TILE_SIZE, 3))
        tiles[i] = np.clip(rgb, 0, 255).astype(np.uint8)
    return tiles


def check_parity(bundle_dir: Path, backbone: Backbone, head: nn.Module,
                 tiles: np.ndarray) -> dict[str, float]:
    """Run torch and onnxruntime on the same tiles; raise ParityError beyond the tolerances.

    Returns the max abs differences (features, every patch output, slide logit).
    """
    import onnxruntime as ort

    def session(name: str):
        return ort.InferenceSession(str(bundle_dir / FILES[name]),
                                    providers=["CPUExecutionProvider"])

    tiles = np.ascontiguousarray(tiles, dtype=np.uint8)
    with torch.inference_mode():
        ref_features = backbone.cpu()(torch.from_numpy(tiles))
        patch = head.patch_module()
        ref_patch = patch(ref_features)
        pooled = head.pool(tuple(ref_patch))
        ref_slide = head.aggregator_module()(pooled)
    features = session("backbone").run(["features"], {"tiles": tiles})[0]
    diffs = {"features": float(np.abs(features - ref_features.numpy()).max())}
    # The head is checked on the torch features, so its own error is measured, not the backbone's.
    outputs = session("head").run(list(head.patch_output_names),
                                  {"features": ref_features.numpy()})
    for name, got, ref in zip(head.patch_output_names, outputs, ref_patch):
        diffs[name] = float(np.abs(got - ref.numpy()).max())
    slide = session("aggregator").run(["slide_logit"], {"pooled": pooled.numpy()})[0]
    diffs["slide_logit"] = float(np.abs(slide - ref_slide.numpy()).max())
    diffs["slide_score"] = float(np.abs(_sigmoid(slide) - torch.sigmoid(ref_slide).numpy()).max())
    failures = [f"{k} max abs diff {v:.3g} > {_tolerance(k):g}"
                for k, v in diffs.items() if not v <= _tolerance(k)]  # NaN fails too
    if failures:
        raise ParityError(f"ONNX export of {bundle_dir} does not match torch on {len(tiles)} "
                          f"tiles: {'; '.join(failures)}")
    return diffs


def _tolerance(output_name: str) -> float:
    return SCORE_ATOL if output_name in PROBABILITIES else FEATURE_ATOL


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _tissue_params() -> dict[str, Any] | None:
    """The tissue-mask parameters the server must reproduce (wsi.tissue defaults)."""
    try:
        from wsi.tissue import TissueParams
    except ImportError:  # TODO(H3): drop once wsi.tissue has landed in the tree
        return None
    return dataclasses.asdict(TissueParams())


def build_manifest(backbone: Backbone, head: nn.Module, opset: int,
                   manifest_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """manifest.json of docs/INTERFACES.md; `manifest_extra` overrides or adds keys."""
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "name": "milroi",
        "head": head.kind,
        "head_config": head.config,
        "tile_size": TILE_SIZE,
        "level": 0,
        "target_mpp": TARGET_MPP,
        "feature_dim": backbone.feature_dim,
        "backbone_layer": backbone.layer,
        "weights": backbone.weights,
        "weights_seed": backbone.seed,
        "pooling": head.pooling,
        "threshold": 0.5,
        "patch_threshold": 0.5,
        "min_tissue": 0.25,
        "tissue": _tissue_params(),
        "files": dict(FILES),
        "fingerprint": None,
        "metrics": {},
        "run_id": None,
        "versions": {"milroi": _package_version("milroi"), "torch": torch.__version__,
                     "onnx": onnx.__version__, "opset": opset},
    }
    manifest.update(manifest_extra or {})
    return manifest


def export_bundle(out_dir: str | os.PathLike, backbone: Backbone, head: nn.Module,
                  manifest_extra: dict[str, Any] | None = None, *, opset: int = DEFAULT_OPSET,
                  parity_tiles: np.ndarray | None = None, overwrite: bool = False) -> Path:
    """Write a model bundle folder from in-memory modules; returns its path.

    `backbone` from `training.backbone.build_backbone`, `head` a `training.heads.MILHead`.
    The graphs are written to a temporary sibling folder, checked (onnx.checker, parity with
    torch on `parity_tiles`, default `synthetic_parity_tiles()`), then moved into place, so a
    failed export never leaves a half bundle. Raises `ParityError` when parity fails.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise WsiError(f"bundle folder {out_dir} is not empty (pass overwrite=True)")
    if backbone.feature_dim != head.config["in_dim"]:
        raise WsiError(f"head expects {head.config['in_dim']}-d features but the backbone "
                       f"({backbone.layer}) gives {backbone.feature_dim}")
    backbone, head = backbone.cpu().eval(), head.cpu().eval()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the bundle is meant to be shared
    try:
        tiles = torch.zeros((2, TILE_SIZE, TILE_SIZE, 3), dtype=torch.uint8)
        _export(backbone, tiles, staging / FILES["backbone"], "tiles", ("features",),
                dynamic_batch=True, opset=opset)
        features = torch.randn(_patch_example_count(), backbone.feature_dim)
        _export(head.patch_module(), features, staging / FILES["head"], "features",
                tuple(head.patch_output_names), dynamic_batch=True, opset=opset)
        with torch.inference_mode():
            pooled = head.pool(tuple(head.patch_module()(features)))
        _export(head.aggregator_module(), pooled.clone(), staging / FILES["aggregator"],
                "pooled", ("slide_logit",), dynamic_batch=False, opset=opset)
        diffs = check_parity(staging, backbone, head,
                             synthetic_parity_tiles() if parity_tiles is None else parity_tiles)
        manifest = build_manifest(backbone, head, opset, manifest_extra)
        manifest["parity"] = diffs
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("bundle written to %s (parity %s)", out_dir,
             ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()))
    return out_dir
