"""ONNX export of a trained model into the bundle of docs/INTERFACES.md, and its registration.

Two entry points:

- `export_bundle(out_dir, backbone, head, manifest_extra)`: in-memory modules -> a bundle folder
  (backbone.onnx, head.onnx, aggregator.onnx, manifest.json), checked with `onnx.checker` and
  for parity with torch in onnxruntime before it is published; no MLflow needed (the serving
  tests use it to make small bundles).
- `milroi-train export RUN_ID --name NAME`: rebuilds the backbone from the run's params and the
  head from its `head/` artifact, exports, checks parity on real tiles of a slide, logs the bundle
  as a new MLflow pyfunc model of the run (training.mlflow_model: its own artifact location, so
  no export rewrites an earlier version's files) and registers it as one new model version
  (optionally under an alias), tagged with head, val_auc, fingerprint and the bundle's digest.
  `--int8` also writes the static int8 backbone (training.quantize: backbone_int8.onnx, listed
  as files["backbone_int8"], served with `--precision int8`), calibrated on tissue tiles of
  `--calibration-slide` (default the parity slide, else a synthetic slide).

Exporter: torch.onnx's dynamo exporter (`dynamo=True`, the default and maintained path in torch
2.x). It handles the uint8 NHWC input and a symbolic batch dimension directly; the legacy
TorchScript exporter gives the same graph and numbers here but is deprecated, so it is not used.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from core.bundle import (
    BACKBONE_DATA_ROLE,
    DIGEST_LENGTH,
    DIGEST_TAG,
    GRAPH_FILES,
    INT8_ROLE,
    BundleManifest,
    bundle_digest,
    current_keys,
)
from core.cli import add_fallback_mpp_argument, add_tracking_uri_argument
from core.domain import DOMAIN_FILE, DOMAIN_ROLE, DomainModel
from core.errors import ConfigError, ExportError
from core.inference_backends import he_like_tiles
from core.tiling import DEFAULT_TILING, TilingParams, TissueParams
from core.tracking import mlflow_client, resolve_tracking_uri
from training.backbone import Backbone
from training.runs import FitRun, load_run_domain, load_run_head

log = logging.getLogger(__name__)

FILES = GRAPH_FILES   # the bundle's graphs, role -> file name (core.bundle)
DEFAULT_OPSET = 18
TILE_SIZE = DEFAULT_TILING.tile_size   # the backbone's input: the tile grid's tiles
# Backbones with more weight bytes than this keep them in backbone.onnx.data (files role
# BACKBONE_DATA_ROLE): protobuf's 2 GB limit, with room for the graph itself.
EXTERNAL_DATA_BYTES = 1 << 30
# Parity tolerances between torch and onnxruntime (float32, CPU): probabilities to 1e-5;
# features and the unbounded outputs (logits, attention, embeddings, tens in size) to 1e-4.
FEATURE_ATOL = 1e-4
SCORE_ATOL = 1e-5
PROBABILITIES = ("patch_scores", "slide_score")


class ParityError(ExportError):
    """The exported ONNX graph does not reproduce the torch model."""


# ---------------------------------------------------------------------------------------------
# ONNX export of the three graphs


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str,
            output_names: tuple[str, ...], dynamic_batch: bool, opset: int,
            external_data: bool = False) -> None:
    dynamic_shapes = {input_name: {0: torch.export.Dim("batch")}} if dynamic_batch else None
    # dynamo's translation steps print progress on stdout and its graph passes log every
    # rewrite at INFO; keep the command output clean.
    with open(os.devnull, "w") as devnull, _redirect_stdout(devnull), _quiet(EXPORTER_LOGGERS):
        program = torch.onnx.export(
            module.eval(), (example,), input_names=[input_name], output_names=list(output_names),
            dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True, verbose=False)
    # One self-contained file per graph where it fits (ResNet-50 is ~95 MB); the weights of
    # the large encoders go to PATH.data beside it (protobuf cannot hold 2 GB).
    program.save(str(path), external_data=external_data)
    onnx.checker.check_model(str(path), full_check=True)


def export_backbone(backbone: Backbone, path: Path, opset: int = DEFAULT_OPSET) -> Path | None:
    """backbone.onnx: input "tiles" uint8 [N, T, T, 3] (T the encoder's tile size), output
    "features", dynamic N. Returns the external weights file (`path`.data) of a backbone whose
    weights exceed EXTERNAL_DATA_BYTES (the ViT-L, ViT-H and ViT-g encoders), else None."""
    tiles = torch.zeros((2, backbone.tile_size, backbone.tile_size, 3), dtype=torch.uint8)
    large = weight_bytes(backbone) > EXTERNAL_DATA_BYTES
    _export(backbone.cpu().eval(), tiles, path, "tiles", ("features",), dynamic_batch=True,
            opset=opset, external_data=large)
    data = path.with_name(path.name + ".data")
    return data if large and data.is_file() else None


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


EXPORTER_LOGGERS = ("onnx_ir", "onnxscript")


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]):
    """Raise these loggers to WARNING for the duration, then restore their levels."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


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


def synthetic_parity_tiles(n: int = 8, seed: int = 0, size: int = TILE_SIZE) -> np.ndarray:
    """Smooth, H&E-coloured uint8 tiles [n, size, size, 3] for a parity check without a slide
    (core.inference_backends.he_like_tiles, which the backend choice is timed on too)."""
    return he_like_tiles(n, size, seed)


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


DEFAULT_BUNDLE_NAME = "milroi"


def build_manifest(backbone: Backbone, head: nn.Module, opset: int,
                   manifest_extra: dict[str, Any] | None = None) -> BundleManifest:
    """The manifest of docs/INTERFACES.md for these modules (the tiling, tissue and threshold
    defaults are core.tiling's and core.bundle's); `manifest_extra` overrides or adds keys of
    its JSON form. The tiling defaults to the encoder's input (its tile size and pixel size)."""
    spec = backbone.spec
    manifest = BundleManifest(
        name=DEFAULT_BUNDLE_NAME, head=head.kind, head_config=head.config,
        feature_dim=backbone.feature_dim, backbone_layer=backbone.layer,
        encoder=spec.describe(),
        weights=backbone.weights, weights_seed=backbone.seed, pooling=head.pooling,
        tiling=spec.tiling,
        tissue=TissueParams(), files=dict(FILES),
        versions={"milroi": _package_version("milroi"), "torch": torch.__version__,
                  "onnx": onnx.__version__, "opset": opset})
    if not manifest_extra:
        return manifest
    return BundleManifest.from_dict({**manifest.to_dict(),
                                     **current_keys(manifest_extra, "manifest_extra")},
                                    "manifest_extra")


def export_bundle(out_dir: str | os.PathLike, backbone: Backbone, head: nn.Module,
                  manifest_extra: dict[str, Any] | None = None, *, opset: int = DEFAULT_OPSET,
                  parity_tiles: np.ndarray | None = None, overwrite: bool = False,
                  int8_calibration: np.ndarray | None = None,
                  domain: DomainModel | None = None) -> Path:
    """Write a model bundle folder from in-memory modules; returns its path.

    `backbone` from `training.backbone.build_backbone`, `head` a `training.heads.MILHead`.
    The graphs are written to a temporary sibling folder, checked (onnx.checker, parity with
    torch on `parity_tiles`, default `synthetic_parity_tiles()`), then moved into place, so a
    failed export never leaves a half bundle. Raises `ParityError` when parity fails.

    `int8_calibration` (uint8 tissue tiles [n, 224, 224, 3], n > 8): also write the static int8
    backbone (training.quantize), listed as files["backbone_int8"] with its calibration and its
    feature agreement with fp32 under manifest["int8"]; raises QuantizationError when it
    disagrees (feature cosine < 0.99).

    `domain`: the description of the training data (core.domain, from the fit run), written as
    files["domain"] with its summary under manifest["domain"]; the scorer checks each slide
    against it.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ExportError(f"bundle folder {out_dir} is not empty (pass overwrite=True)")
    if not getattr(head, "streamable", True):
        raise ConfigError(f"a {head.kind} head with config {head.config} cannot be served: its "
                          f"pooling needs the whole bag at once, and the server scores a slide "
                          f"tile batch by tile batch (benchmark-only heads, training.heads)")
    if backbone.feature_dim != head.config["in_dim"]:
        raise ConfigError(f"head expects {head.config['in_dim']}-d features but the backbone "
                          f"({backbone.encoder}) gives {backbone.feature_dim}")
    backbone, head = backbone.cpu().eval(), head.cpu().eval()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the bundle is meant to be shared
    try:
        weights_file = export_backbone(backbone, staging / FILES["backbone"], opset=opset)
        features = torch.randn(_patch_example_count(), backbone.feature_dim)
        _export(head.patch_module(), features, staging / FILES["head"], "features",
                tuple(head.patch_output_names), dynamic_batch=True, opset=opset)
        with torch.inference_mode():
            pooled = head.pool(tuple(head.patch_module()(features)))
        _export(head.aggregator_module(), pooled.clone(), staging / FILES["aggregator"],
                "pooled", ("slide_logit",), dynamic_batch=False, opset=opset)
        if parity_tiles is None:
            parity_tiles = synthetic_parity_tiles(size=backbone.tile_size)
        diffs = check_parity(staging, backbone, head, parity_tiles)
        manifest = build_manifest(backbone, head, opset, manifest_extra).replace(parity=diffs)
        if weights_file is not None:
            manifest = manifest.replace(files={**manifest.files,
                                               BACKBONE_DATA_ROLE: weights_file.name})
        if int8_calibration is not None:
            from training.quantize import add_int8_backbone

            int8 = add_int8_backbone(staging, int8_calibration, method=backbone.spec.int8)
            manifest = manifest.replace(files={**manifest.files, INT8_ROLE: int8.pop("file")},
                                        int8=int8)
        if domain is not None:
            manifest = manifest.replace(files={**manifest.files, DOMAIN_ROLE: DOMAIN_FILE},
                                        domain=domain.write(staging))
        manifest.write(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("bundle written to %s (parity %s)", out_dir,
             ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()))
    return out_dir


# ---------------------------------------------------------------------------------------------
# From an MLflow run to a registered model version


def parity_tiles_from_slide(slide_path: str | os.PathLike, n: int = 8,
                            tiling: TilingParams = DEFAULT_TILING,
                            fallback_mpp: float | None = None) -> np.ndarray:
    """n real tissue tiles (uint8 [n, 224, 224, 3]) spread over a slide's tile grid, read at
    the model's scale (`tiling`, wsi.scale) as the server reads them."""
    from wsi.grid import tiles_for_slide
    from wsi.slide import open_slide

    with open_slide(slide_path, fallback_mpp=fallback_mpp) as slide:
        _, grid = tiles_for_slide(slide, tiling)
        if len(grid.coords) == 0:
            raise ConfigError(f"parity slide {slide_path} has no tissue tiles")
        picks = grid.coords[np.linspace(0, len(grid.coords) - 1, n).astype(int)]
        return np.stack([grid.scale.read(slide, int(x), int(y)) for x, y in picks])


@dataclass
class Registered:
    name: str
    version: str
    source: str
    bundle_dir: Path
    alias: str | None


def export_run(run_id: str, name: str, *, alias: str | None = None,
               tracking_uri: str | None = None, out_dir: str | os.PathLike | None = None,
               opset: int = DEFAULT_OPSET, parity_slide: str | os.PathLike | None = None,
               int8: bool = False, calibration_slides: list | None = None,
               fallback_mpp: float | None = None, force: bool = False) -> Registered:
    """Export a fit run to a bundle, log it to the run under `bundle/`, register one version.
    A run whose head failed fit's ranking check (training.head_check) is refused unless
    `force`."""
    from training.backbone import build_backbone
    from training.head_check import PASSED

    tracking_uri = resolve_tracking_uri(tracking_uri)
    run = FitRun.load(run_id, tracking_uri)
    if run.ranking_check not in (None, PASSED):
        if not force:
            raise ExportError(f"run {run_id}: {run.ranking_check}. Its ROIs would point at the "
                              f"wrong tissue; export it anyway with --force")
        log.warning("run %s exported with --force: %s", run_id, run.ranking_check)
    client = mlflow_client(tracking_uri)
    head = load_run_head(run_id, tracking_uri)
    domain = load_run_domain(run_id, tracking_uri)
    if domain is None:
        log.warning("run %s describes no training data (fit before the domain check): its "
                    "bundle cannot say when a slide is unlike them", run_id)
    backbone = build_backbone(run.weights, encoder=run.encoder, seed=run.weights_seed)
    if parity_slide is not None:
        tiles = parity_tiles_from_slide(parity_slide, tiling=run.tiling, fallback_mpp=fallback_mpp)
    else:
        log.warning("no --parity-slide: parity checked on synthetic H&E-like tiles only")
        tiles = None
    int8_tiles = None
    if int8:
        from training.quantize import calibration_tiles_from_slides, synthetic_calibration_tiles

        slides = calibration_slides or ([parity_slide] if parity_slide is not None else [])
        if slides:
            int8_tiles = calibration_tiles_from_slides(slides, tiling=run.tiling,
                                                       fallback_mpp=fallback_mpp)
        else:
            log.warning("--int8 without --calibration-slide: calibrating on a synthetic slide")
            int8_tiles = synthetic_calibration_tiles(tiling=run.tiling)
    extra = {"name": name, "run_id": run_id, "fingerprint": run.fingerprint,
             "metrics": run.metrics, "slide_threshold": run.slide_threshold,
             "roi_threshold": run.roi_threshold, **run.tiling.to_dict(),
             "artefacts": run.artefacts.to_dict(), "tissue": run.tissue.to_dict()}
    tags = {"val_auc": "" if run.val_auc is None else repr(run.val_auc), "head": head.kind,
            "fingerprint": run.fingerprint or ""}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_bundle(Path(out_dir) if out_dir else Path(tmp) / "bundle", backbone,
                               head, extra, opset=opset, parity_tiles=tiles,
                               overwrite=out_dir is not None, int8_calibration=int8_tiles,
                               domain=domain)
        mv = register_bundle(client, name, run_id, bundle, tags,
                             example=None if tiles is None else tiles[:1])
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    log.info("registered %s version %s from run %s (%s)", name, mv.version, run_id, mv.source)
    return Registered(name, str(mv.version), mv.source, bundle, alias)


def register_bundle(client, name: str, run_id: str, bundle: Path,
                    tags: dict[str, str] | None = None, *, example: np.ndarray | None = None):
    """Log a bundle folder as a new MLflow model of the run and register it as one new version
    of `name` (the registered model is created on first use); returns the ModelVersion.

    The model (training.mlflow_model) has its own artifact location, so a version's files never
    change after registration; their digest is the version's `bundle_digest` tag, which the
    server checks before loading them. `example`: the input example (uint8 tiles [n, T, T, 3]),
    default one synthetic tile.
    """
    from mlflow.exceptions import MlflowException

    from training.mlflow_model import log_bundle_model, model_description

    manifest = BundleManifest.read(bundle)
    digest = bundle_digest(bundle, length=DIGEST_LENGTH)
    if example is None:
        example = synthetic_parity_tiles(1, size=manifest.tiling.tile_size)
    model = log_bundle_model(client, run_id, bundle, example, model_name=name,
                             metadata={DIGEST_TAG: digest})
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description="milroi tumour ROI model: MLflow pyfunc model (uint8 tiles -> "
                              "patch scores) holding the ONNX bundle of docs/INTERFACES.md")
    # The source is the logged model's own artifact location (not `models:/<id>`, which a sqlite
    # registry resolves on mlflow's process-wide tracking URI rather than this client's).
    return client.create_model_version(
        name, source=model.artifact_location, run_id=run_id, model_id=model.model_id,
        tags={**(tags or {}), DIGEST_TAG: digest},
        description=model_description(manifest, digest, (tags or {}).get("val_auc")))


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", help="MLflow run of `milroi-train fit`")
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument("--alias", default=None,
                        help="alias to point at the new version (e.g. champion); unconditional, "
                             "use `milroi-train promote` for the AUC-guarded move")
    add_tracking_uri_argument(parser)
    parser.add_argument("--out", type=Path, default=None,
                        help="also keep the bundle folder here (replaced if present)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--parity-slide", type=Path, default=None,
                        help="real slide whose tissue tiles the torch/ONNX parity check uses")
    parser.add_argument("--int8", action="store_true",
                        help="also write a static int8 backbone (backbone_int8.onnx, "
                             "served with --precision int8)")
    parser.add_argument("--calibration-slide", type=Path, action="append", default=None,
                        dest="calibration_slides",
                        help="slide whose tissue tiles calibrate the int8 backbone (repeatable; "
                             "default the parity slide, else a synthetic slide)")
    add_fallback_mpp_argument(parser)   # for parity and calibration slides without one
    parser.add_argument("--force", action="store_true",
                        help="export a run whose head failed fit's ranking check "
                             "(ranking_check tag: tumour tiles ranked below normal ones)")


def run(args: argparse.Namespace) -> int:
    registered = export_run(args.run_id, args.name, alias=args.alias,
                            tracking_uri=args.tracking_uri, out_dir=args.out, opset=args.opset,
                            parity_slide=args.parity_slide, int8=args.int8,
                            calibration_slides=args.calibration_slides,
                            fallback_mpp=args.fallback_mpp, force=args.force)
    alias = f" @{registered.alias}" if registered.alias else ""
    print(f"{registered.name} version {registered.version}{alias} <- {registered.source}")
    return 0
