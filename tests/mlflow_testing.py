"""A real `mlflow server` for the tests that need a registry, bundle registration into it, and
runs logged in the layout of `milroi-train fit`.

One definition for every test folder (tests/ is on pytest's `pythonpath`): a subprocess on a
free loopback port with a sqlite backend and proxied local artifacts, as a deployment would run.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from server_testing import free_port

MLFLOW = Path(sys.executable).with_name("mlflow")


@contextlib.contextmanager
def running_mlflow_server(root: Path, timeout: float = 180) -> Iterator[str]:
    """Start `mlflow server` with its store under `root`; yield its URI; stop it afterwards."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log_path = root / "mlflow.log"
    with open(log_path, "wb") as log:
        # MLFLOW_TRACKING_URI from the caller's environment must not leak into the server
        process = subprocess.Popen(
            [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start within {timeout} s:\n"
                                   f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


def register_bundle(client, name: str, bundle: Path, experiment: str = "tests") -> str:
    """Register a bundle folder as a new version of `name` through the product's own
    training.export.register_bundle, on a fresh run of `experiment`; returns the version."""
    from training.export import register_bundle as register
    from training.runs import ensure_experiment

    run_id = client.create_run(ensure_experiment(client.tracking_uri, experiment)).info.run_id
    version = register(client, name, run_id, bundle)
    client.set_terminated(run_id)
    return str(version.version)


def log_fit_run(tracking_uri: str, head, val_auc: float | None = None, slide_threshold: float = 0.42,
                layer: str = "layer3", experiment: str = "milroi-test",
                roi_threshold: float | None = None, domain=None) -> str:
    """A run in the layout `milroi-train fit` logs (params, head/ artifact, val_auc, tag, and
    the domain/ artifact of a core.domain.DomainModel where given), so that `milroi-train
    export` can read it; on a sqlite store the artifacts sit beside the db."""
    import json
    import tempfile

    import torch
    from mlflow import MlflowClient

    from training.runs import ensure_experiment

    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = client.create_run(ensure_experiment(tracking_uri, experiment)).info.run_id
    for key, value in {"backbone_layer": layer, "weights": "none", "weights_seed": "0",
                       "tile_size": "224", "target_mpp": "0.243", "min_tissue": "0.25",
                       "head": head.kind, "slide_threshold": str(slide_threshold)}.items():
        client.log_param(run_id, key, value)
    if val_auc is not None:
        client.log_metric(run_id, "val_auc", val_auc)
    if roi_threshold is not None:  # as fit logs it: param and metric
        client.log_param(run_id, "roi_threshold", str(roi_threshold))
        client.log_metric(run_id, "roi_threshold", roi_threshold)
    client.set_tag(run_id, "data_fingerprint", "f" * 64)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "head"
        folder.mkdir()
        torch.save(head.state_dict(), folder / "head.pt")
        (folder / "head_config.json").write_text(json.dumps(head.config))
        client.log_artifacts(run_id, str(folder), artifact_path="head")
        if domain is not None:
            from training.runs import DOMAIN_ARTIFACT_PATH, write_run_domain

            client.log_artifacts(run_id, str(write_run_domain(Path(tmp), domain)),
                                 artifact_path=DOMAIN_ARTIFACT_PATH)
    client.set_terminated(run_id)
    return run_id
