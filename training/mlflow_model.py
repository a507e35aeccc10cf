"""A bundle as an MLflow model: what `milroi-train export` logs for each registered version.

`log_bundle_model` writes an MLflow pyfunc model (python_function flavour, core.pyfunc's
`BundleModel`) holding the bundle folder as its artifact `bundle`, and logs it as a new MLflow
*logged model* of the fit run. Each export is its own logged model with its own artifact
location (`<experiment artifacts>/models/<model id>/artifacts`), so re-exporting a run never
writes over the files an earlier version was registered from.

The model carries:
- the signature uint8 tiles (-1, T, T, 3) -> float32 patch scores (-1,) and one input tile;
- pip requirements: the `serve` extra of milroi's own metadata (what a serve-only install has;
  the model needs onnxruntime, numpy and mlflow of them), and milroi's `core` package as model
  code, so an environment built from the requirements alone (`mlflow models serve` with a
  virtualenv, KServe's MLflow runtime) can load it without milroi installed;
- metadata: the bundle's sha256 (`bundle_digest`), also the version's tag.

Everything goes through an MlflowClient on the run's tracking URI (mlflow's fluent
`log_model` works on a process-wide URI and active run; see training.runs.fit_run).
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

import numpy as np

import core
from core.bundle import BUNDLE_ARTIFACT_PATH, BundleManifest
from core.errors import ExportError
from core.pyfunc import BundleModel, tile_signature

MODEL_TYPE = "milroi-bundle"
# Of milroi's base dependencies, what core.pyfunc imports (the rest read slides).
MODEL_BASE_REQUIREMENTS = ("numpy",)


def serve_requirements() -> list[str]:
    """The `serve` extra of the installed milroi (plus numpy), as pip requirement lines."""
    from packaging.requirements import Requirement

    try:
        lines = requires("milroi") or []
    except PackageNotFoundError:
        raise ExportError("milroi is not installed as a package (pip install -e .): its "
                          "metadata gives the MLflow model's requirements (the serve extra)") from None
    out = []
    for line in lines:
        req = Requirement(line)
        in_serve = req.marker is not None and req.marker.evaluate({"extra": "serve"})
        base = req.marker is None and req.name in MODEL_BASE_REQUIREMENTS
        if in_serve or base:
            req.marker = None
            out.append(str(req))
    if not any(r.startswith("onnxruntime") for r in out):
        raise ExportError(f"milroi's metadata has no serve extra with onnxruntime: {lines}")
    return out


def _model_code(into: Path) -> Path:
    """A copy of the `core` package's sources (no caches), shipped as the model's code."""
    package = Path(core.__file__).parent
    target = into / "core"
    target.mkdir(parents=True)
    for source in package.glob("*.py"):
        shutil.copy2(source, target / source.name)
    return target


@contextlib.contextmanager
def _quiet_save():
    """Silence save_model's caution about cloudpickle: the class is pickled by reference
    (core.pyfunc.BundleModel, importable wherever milroi's core is, and shipped as model code)."""
    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def log_bundle_model(client, run_id: str, bundle: Path, example: np.ndarray, *,
                     model_name: str, metadata: dict[str, str] | None = None):
    """Log `bundle` as a new MLflow pyfunc logged model of `run_id`; returns the LoggedModel
    (READY; `models:/<model_id>` is its URI)."""
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    manifest = BundleManifest.read(bundle)
    requirements = serve_requirements()
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name=model_name, source_run_id=run_id,
                                        model_type=MODEL_TYPE,
                                        tags={"head": manifest.head, **(metadata or {})})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            # the artifact keeps the folder's name: always `bundle` (core.bundle.BUNDLE_LOCATIONS)
            staged = tmp / "staged" / BUNDLE_ARTIFACT_PATH
            shutil.copytree(bundle, staged)
            local = tmp / "model"
            with _quiet_save():
                mlflow.pyfunc.save_model(
                    path=str(local), python_model=BundleModel(),
                    artifacts={BUNDLE_ARTIFACT_PATH: str(staged)},
                    code_paths=[str(_model_code(tmp / "code"))],
                    signature=tile_signature(manifest.tiling.tile_size),
                    input_example=np.ascontiguousarray(example, dtype=np.uint8),
                    pip_requirements=requirements, metadata=metadata,
                    mlflow_model=Model(artifact_path=logged.artifact_location,
                                       model_uuid=logged.model_id, run_id=run_id,
                                       model_id=logged.model_id))
            client.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


def model_description(manifest: BundleManifest, digest: str, val_auc: str | None) -> str:
    """What a registered version is, in a few lines (its description in the registry)."""
    tiling = manifest.tiling
    auc = f"validation AUC {float(val_auc):.4f}" if val_auc not in (None, "") else \
        "no validation AUC"
    int8 = ", with a static int8 backbone (--precision int8)" if manifest.int8 else ""
    return (
        f"milroi tumour ROI model `{manifest.name}`: {manifest.head or 'MIL'} head "
        f"(pooling {manifest.pooling.get('kind')}) on {manifest.encoder_name or 'ResNet-50'} "
        f"features ({manifest.feature_dim}-d, weights {manifest.weights}){int8}.\n"
        f"MLflow pyfunc: uint8 RGB tiles [n, {tiling.tile_size}, {tiling.tile_size}, 3] at "
        f"{tiling.target_mpp} um/px -> float32 patch tumour probabilities [n]. "
        f"The milroi server (milroi-serve) reads the ONNX bundle in artifacts/"
        f"{BUNDLE_ARTIFACT_PATH}/ and adds slide scores (threshold {manifest.slide_threshold:g}) and "
        f"ROIs (patch threshold {manifest.roi_threshold:g}).\n"
        f"Run {manifest.run_id or '-'}, data fingerprint {manifest.fingerprint or '-'}, {auc}; "
        f"bundle sha256 {digest}.")
