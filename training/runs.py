"""The MLflow runs of `milroi-train fit`: what a run holds, written once and read back typed.

A fit run logs the feature provenance (`provenance_params`, from the feature files'
`FeatureAttrs`), the hyperparameters, the two thresholds it chose, `head/head_config.json` +
`head/head.pt`, and the tag `data_fingerprint`. `evaluate` and `export` read it back through
`FitRun.load` and `load_run_head`; the parameter names are stated here only.
"""
from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.bundle import (
    DEFAULT_ROI_THRESHOLD,
    DEFAULT_SLIDE_THRESHOLD,
    LAYER_ENCODERS,
    LEGACY_ROI_THRESHOLD_KEY,
    LEGACY_SLIDE_THRESHOLD_KEY,
)
from core.domain import DOMAIN_FILE, DomainModel
from core.errors import ConfigError, RegistryError
from core.tiling import DEFAULT_TILING, ArtefactParams, TilingParams, TissueParams
from core.tracking import mlflow_client, resolve_tracking_uri
from training.encoders import encoder_spec
from training.feature_file import MIXED_ENCODERS, Bag, group_listing

HEAD_ARTIFACT_PATH = "head"
# The description of the training data (core.domain): domain/domain.json (the manifest entry)
# and domain/domain.npz (the arrays); runs from before it have none.
DOMAIN_ARTIFACT_PATH = "domain"
DOMAIN_ENTRY = "domain.json"
HEAD_STATE, HEAD_CONFIG = "head.pt", "head_config.json"
FINGERPRINT_TAG = "data_fingerprint"
RANKING_TAG = "ranking_check"   # training.head_check's verdict: "passed" or what failed


def provenance_params(bags: Sequence[Bag]) -> dict[str, Any]:
    """The run params of the feature extraction settings (the same for every bag, else the
    features do not mix: one head is trained on one encoder's features): what `export` needs to
    rebuild the backbone and the tile grid, and the encoder's licence."""
    rows = []
    for bag in bags:
        a = bag.attrs
        rows.append({"encoder": a.encoder, "backbone_layer": a.backbone_layer,
                     "weights": a.weights,
                     "weights_seed": a.weights_seed, "tile_size": a.tiling.tile_size,
                     "target_mpp": a.tiling.target_mpp, "min_tissue": a.tiling.min_tissue,
                     "artefacts": json.dumps(a.artefacts.to_dict(), sort_keys=True),
                     "tissue": json.dumps(a.tissue.to_dict(), sort_keys=True)})
    params: dict[str, Any] = {}
    for key in rows[0]:
        values = {str(row[key]) for row in rows}
        if len(values) > 1:   # name the files of each value: the user must re-extract some
            listing = group_listing([(bag.name, row[key]) for bag, row in zip(bags, rows)])
            why = " (tiles at different pixel sizes mean different features)" \
                if key in ("target_mpp", "tile_size") else ""
            if key == "encoder":
                why = MIXED_ENCODERS
            raise ConfigError(f"feature files disagree on {key}{why}: {listing}")
        params[key] = values.pop()
    spec = encoder_spec(params["encoder"])
    params["encoder_licence"] = f"{spec.licence}{', gated' if spec.gated else ''}"
    params["feature_dim"] = int(bags[0].features.shape[1])
    params["n_artefact_tiles"] = sum(bag.artefacts for bag in bags)
    return params


@dataclass(frozen=True)
class FitRun:
    """A fit run as export and evaluate need it."""

    run_id: str
    encoder: str              # training.encoders name
    weights: str
    weights_seed: int
    tiling: TilingParams
    artefacts: ArtefactParams  # the limits the training bags were filtered with
    tissue: TissueParams       # the tissue mask the training tiles were chosen with
    slide_threshold: float    # slide probability threshold (Youden on held-out slides)
    roi_threshold: float    # ROI threshold (runs from before fit chose it: the old fixed one)
    val_auc: float | None
    fingerprint: str | None
    metrics: dict[str, float]
    ranking_check: str | None = None   # training.head_check.verdict; None: run from before it

    @classmethod
    def load(cls, run_id: str, tracking_uri: str | None = None) -> FitRun:
        from mlflow.exceptions import MlflowException

        uri = resolve_tracking_uri(tracking_uri)
        try:
            run = mlflow_client(uri).get_run(run_id)
        except MlflowException as exc:
            raise RegistryError(f"no MLflow run {run_id!r} at {uri}: {exc.message}") from None
        params, metrics = run.data.params, dict(run.data.metrics)
        missing = [k for k in ("backbone_layer", "weights", "weights_seed") if k not in params]
        if missing:
            raise RegistryError(f"run {run_id} lacks the feature params {missing}: was it made "
                                f"by milroi-train fit?")

        def number(key: str) -> float | None:   # thresholds are logged as metric and param
            if key in metrics:
                return float(metrics[key])
            return float(params[key]) if key in params else None

        tiling = DEFAULT_TILING.replace(
            tile_size=int(params["tile_size"]) if "tile_size" in params else None,
            # runs from before target_mpp: level-0 tiles of Camelyon16's 0.243 um/px
            target_mpp=float(params["target_mpp"]) if "target_mpp" in params else None,
            min_tissue=float(params["min_tissue"]) if "min_tissue" in params else None)
        slide_threshold = number("slide_threshold")
        if slide_threshold is None:   # runs logged before the rename
            slide_threshold = number(LEGACY_SLIDE_THRESHOLD_KEY)
        roi_threshold = number("roi_threshold")
        if roi_threshold is None:   # runs logged before the rename
            roi_threshold = number(LEGACY_ROI_THRESHOLD_KEY)
        artefacts = ArtefactParams.from_dict(json.loads(params["artefacts"])) if "artefacts" in params \
            else ArtefactParams()
        # runs from before the param: their features used the default mask
        tissue = TissueParams.from_dict(json.loads(params["tissue"])) if "tissue" in params \
            else TissueParams()
        # runs from before the encoder registry name their ResNet-50 by its stage
        encoder = params.get("encoder") or LAYER_ENCODERS[params["backbone_layer"]]
        return cls(run_id, encoder, params["weights"],
                   int(params["weights_seed"]), tiling, artefacts, tissue,
                   DEFAULT_SLIDE_THRESHOLD if slide_threshold is None else slide_threshold,
                   DEFAULT_ROI_THRESHOLD if roi_threshold is None else roi_threshold,
                   number("val_auc"), run.data.tags.get(FINGERPRINT_TAG), metrics,
                   run.data.tags.get(RANKING_TAG))


def load_run_head(run_id: str, tracking_uri: str | None = None):
    """The MIL head a fit run logged under `head/` (eval mode)."""
    import torch

    from training.trainer import head_from_state

    client = mlflow_client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(client.download_artifacts(run_id, HEAD_ARTIFACT_PATH, tmp))
            config = json.loads((local / HEAD_CONFIG).read_text())
            state = torch.load(local / HEAD_STATE, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - MlflowException, OSError: no usable head
            raise RegistryError(f"run {run_id} has no usable {HEAD_ARTIFACT_PATH}/ artifact "
                                f"({HEAD_CONFIG} + {HEAD_STATE}) at "
                                f"{resolve_tracking_uri(tracking_uri)}: {exc}") from None
    return head_from_state(config, state)


def write_run_domain(out: Path, model: DomainModel) -> Path:
    """The domain artifact folder of a fit run, written under `out`."""
    folder = out / DOMAIN_ARTIFACT_PATH
    folder.mkdir()
    entry = model.write(folder)
    (folder / DOMAIN_ENTRY).write_text(json.dumps(entry, indent=2))
    return folder


def load_run_domain(run_id: str, tracking_uri: str | None = None) -> DomainModel | None:
    """The description of the training data a fit run logged; None for a run from before."""
    client = mlflow_client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(client.download_artifacts(run_id, DOMAIN_ARTIFACT_PATH, tmp))
            entry = json.loads((local / DOMAIN_ENTRY).read_text())
        except Exception:  # noqa: BLE001 - MlflowException, OSError: a run from before
            return None
        return DomainModel.load(local, entry, DOMAIN_FILE)


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Experiment id; a new experiment on a sqlite store keeps artifacts beside the db file."""
    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):]).resolve()
        location = (db.parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


@contextlib.contextmanager
def fit_run(tracking_uri: str, experiment: str, run_name: str | None = None):
    """A new run of `experiment` for the block: yields (client, run_id); FINISHED at the end,
    FAILED on an exception. Through MlflowClient on `tracking_uri` only: mlflow's fluent API
    (start_run, log_param) works on a process-wide URI, and `mlflow.set_tracking_uri` also
    writes $MLFLOW_TRACKING_URI, which would redirect every later command of the process."""
    from mlflow.tracking.context.registry import resolve_tags

    client = mlflow_client(tracking_uri)
    run = client.create_run(ensure_experiment(tracking_uri, experiment), run_name=run_name,
                            tags=resolve_tags())   # source and user tags, as start_run sets
    try:
        yield client, run.info.run_id
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    """Params as strings in one call (what mlflow.log_params sends)."""
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])


def history_metrics(prefix: str, history: list[dict[str, float]]):
    """Per-epoch rows as MLflow Metric objects (step = epoch), for one log_batch call."""
    from mlflow.entities import Metric

    return [Metric(f"{prefix}{k}", v, 0, step) for step, row in enumerate(history, 1)
            for k, v in row.items() if math.isfinite(v)]
