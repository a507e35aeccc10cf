"""Export to a real MLflow registry (server and sqlite file) and AUC-guarded promotion."""
from __future__ import annotations

import json

import mlflow
import numpy as np
import onnxruntime as ort
import pytest
import torch
from mlflow_testing import log_fit_run

from core.bundle import find_bundle
from core.errors import MilroiError
from training.cli import main as train_main
from training.export import export_run
from training.registry import resolve_model_uri, validation_auc


def test_export_registers_one_version_with_tags(exported, mlflow_server):
    rid, registered = exported
    client = mlflow.MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    mv = client.get_model_version("milroi-test", registered.version)
    # the version's source is the MLflow model that export logged (its own artifact location)
    assert mv.run_id == rid and "/models/m-" in mv.source
    assert float(mv.tags["val_auc"]) == pytest.approx(0.80)
    assert mv.tags["head"] == "chowder" and mv.tags["fingerprint"] == "f" * 64
    assert resolve_model_uri("models:/milroi-test@champion", mlflow_server).version == mv.version
    assert resolve_model_uri(f"models:/milroi-test/{mv.version}", mlflow_server).run_id == rid


def test_registered_bundle_downloads_and_runs(exported, mlflow_server, real_tiles, tmp_path,
                                              trained_head):
    _, registered = exported
    mlflow.set_tracking_uri(mlflow_server)
    local = find_bundle(mlflow.artifacts.download_artifacts(
        "models:/milroi-test@champion", dst_path=str(tmp_path), tracking_uri=mlflow_server))
    manifest = json.loads((local / "manifest.json").read_text())
    assert manifest["name"] == "milroi-test" and manifest["run_id"] == exported[0]
    assert manifest["slide_threshold"] == pytest.approx(0.42)  # from the run, not the 0.5 default
    assert manifest["roi_threshold"] == pytest.approx(0.97)  # the ROI threshold fit chose
    assert manifest["metrics"]["val_auc"] == pytest.approx(0.80)
    assert manifest["fingerprint"] == "f" * 64
    assert manifest["parity"]["features"] <= 1e-4 and manifest["parity"]["patch_scores"] <= 1e-5
    bb = ort.InferenceSession(str(local / "backbone.onnx"), providers=["CPUExecutionProvider"])
    head = ort.InferenceSession(str(local / "head.onnx"), providers=["CPUExecutionProvider"])
    scores = head.run(["patch_scores"], {"features": bb.run(None, {"tiles": real_tiles[:2]})[0]})[0]
    assert scores.shape == (2,)
    # the head inside is the run's trained head, not a fresh one
    with torch.inference_mode():
        feats = torch.from_numpy(bb.run(None, {"tiles": real_tiles[:2]})[0])
        assert np.abs(trained_head.patch_module()(feats)[0].numpy() - scores).max() <= 1e-5


def test_promote_refuses_worse_and_accepts_with_force(exported, mlflow_server, trained_head,
                                                      capsys):
    client = mlflow.MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    worse_run = log_fit_run(mlflow_server, trained_head, val_auc=0.60)
    # a version registered straight from the run: its AUC comes from the run metric
    worse = client.create_model_version("milroi-test", source=f"runs:/{worse_run}/bundle",
                                        run_id=worse_run).version
    assert validation_auc(client.get_model_version("milroi-test", worse),
                          mlflow_server) == pytest.approx(0.6)
    champion = resolve_model_uri("models:/milroi-test@champion", mlflow_server).version

    code = train_main(["promote", "milroi-test", worse, "--tracking-uri", mlflow_server])
    err = capsys.readouterr().err
    assert code == 1 and "refusing" in err and "--force" in err and "0.6000" in err
    assert resolve_model_uri("models:/milroi-test@champion", mlflow_server).version == champion

    code = train_main(["promote", "milroi-test", worse, "--force", "--tracking-uri",
                       mlflow_server])
    assert code == 0 and f"version {worse}" in capsys.readouterr().out
    assert resolve_model_uri("models:/milroi-test@champion", mlflow_server).version == worse

    # a better one moves the alias without --force
    code = train_main(["promote", "milroi-test", champion, "--tracking-uri", mlflow_server])
    assert code == 0
    assert resolve_model_uri("models:/milroi-test@champion", mlflow_server).version == champion


def test_export_with_default_sqlite_file_uri(tmp_path, monkeypatch, trained_head, capsys):
    """`milroi-train export` with no --tracking-uri uses ./mlflow.db (sqlite) + local artifacts."""
    monkeypatch.chdir(tmp_path)
    uri = "sqlite:///mlflow.db"
    rid = log_fit_run(uri, trained_head, val_auc=0.7)
    code = train_main(["export", rid, "--name", "local-model", "--alias", "champion"])
    assert code == 0
    assert "local-model version 1 @champion" in capsys.readouterr().out
    mv = resolve_model_uri("models:/local-model@champion", uri)
    assert str(mv.version) == "1" and mv.run_id == rid
    assert (tmp_path / "mlflow.db").is_file()


def test_clear_errors(mlflow_server, tmp_path, trained_head):
    with pytest.raises(MilroiError, match="no MLflow run"):
        export_run("0" * 32, "x", tracking_uri=mlflow_server)
    with pytest.raises(MilroiError, match="no model version at models:/nope@champion"):
        resolve_model_uri("models:/nope@champion", mlflow_server)
    with pytest.raises(MilroiError, match="not a model URI"):
        resolve_model_uri("runs:/abc/bundle", mlflow_server)
    with pytest.raises(MilroiError, match="no version 99"):
        from training.registry import promote
        promote("milroi-test", 99, tracking_uri=mlflow_server)
