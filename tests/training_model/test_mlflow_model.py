"""Each registered version is a real MLflow model, and its files never change.

On the session's real `mlflow server` (conftest `exported`: a fit run exported by
`export_run` and registered as `milroi-test`):
- the version is an MLflow pyfunc model (MLmodel, signature, input example, the serve extra's
  requirements, milroi's core as model code) with tags and a description;
- `mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(tiles)`, in a fresh process where
  torch and the training side cannot be imported, gives the patch scores of the milroi server's
  own path (serving.model_source downloads the version, checks its digest, serving.engine scores);
- `mlflow models serve -m models:/NAME@ALIAS --env-manager local` answers /invocations;
- re-exporting the run gives a new version and leaves the earlier version's files byte-identical.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from server_testing import free_port

from core.bundle import DIGEST_LENGTH, DIGEST_TAG, bundle_digest, find_bundle
from core.tracking import version_artifact_uri

NAME = "milroi-test"
ALIAS = "pyfunc"          # its own alias: test_registry moves champion around
MODEL_URI = f"models:/{NAME}@{ALIAS}"
MLFLOW = Path(sys.executable).with_name("mlflow")

# A serve-only install (Dockerfile.serve): no torch, no training side. The shim refuses them as
# the image does (ModuleNotFoundError), as tests/architecture/test_train_without_serving.py does
# for serving.
SERVE_ONLY_SHIM = textwrap.dedent('''\
    import importlib.abc
    import sys

    BLOCKED = {"torch", "torchvision", "training", "onnx", "onnxscript", "h5py", "sklearn", "mil"}


    class _ServeOnly(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            top = fullname.partition(".")[0]
            if top in BLOCKED:
                raise ModuleNotFoundError(f"No module named {top!r}", name=top)
            return None


    sys.meta_path.insert(0, _ServeOnly())
    ''')

PREDICT = textwrap.dedent('''\
    import json, sys
    import numpy as np
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(sys.argv[1])
    tiles = np.load(sys.argv[2])
    np.save(sys.argv[3], model.predict(tiles))
    domain = model.predict(tiles, params={"domain": True})
    np.save(sys.argv[3].replace(".npy", "_domain.npy"), domain["domain_distance"])
    print(json.dumps({"pyfunc": sys.modules["core.pyfunc"].__file__,
                      "heavy": sorted(m for m in ("torch", "training") if m in sys.modules)}))
    ''')


def _client(uri):
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def version(exported, mlflow_server):
    _, registered = exported
    client = _client(mlflow_server)
    client.set_registered_model_alias(NAME, ALIAS, registered.version)
    return client.get_model_version(NAME, registered.version)


@pytest.fixture(scope="module")
def downloaded(version, mlflow_server, tmp_path_factory) -> Path:
    return Path(mlflow.artifacts.download_artifacts(
        version_artifact_uri(_client(mlflow_server), version),
        dst_path=str(tmp_path_factory.mktemp("model")), tracking_uri=mlflow_server))


@pytest.fixture(scope="module")
def server_outputs(version, mlflow_server, real_tiles):
    """Patch scores and domain distances (core.domain) of the milroi server's own path:
    ModelSource follows the alias, downloads the version, checks its digest and builds the
    serving Engine (CPU, onnxruntime fp32: what the pyfunc runs; the default `auto` may measure
    OpenVINO bf16 faster, within the cosine gate but not within these tests' 1e-5)."""
    from serving.engine import Engine
    from serving.model_source import ModelSource

    source = ModelSource(MODEL_URI, lambda path, ref: Engine(
        path, provider="cpu", backend="onnxruntime", precision="fp32", model=ref),
        tracking_uri=mlflow_server)
    try:
        assert source.refresh() and source.current.ref.version == str(version.version)
        with source.lease() as model:
            outputs = model.engine.score(real_tiles)
            assert model.engine.domain is not None   # the run's description reached the bundle
            return outputs["patch_scores"], model.engine.domain.tile_distance(outputs["features"])
    finally:
        source.stop()


@pytest.fixture(scope="module")
def server_scores(server_outputs):
    return server_outputs[0]


@pytest.fixture(scope="module")
def server_distances(server_outputs):
    return server_outputs[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _version_files(uri: str, version: str, dst: Path) -> tuple[Path, dict[str, str]]:
    """A registered version's files as the registry serves them now: (folder, sha256 by path)."""
    client = _client(uri)
    source = version_artifact_uri(client, client.get_model_version(NAME, version))
    local = Path(mlflow.artifacts.download_artifacts(source, dst_path=str(dst), tracking_uri=uri))
    return local, {p.relative_to(local).as_posix(): _sha256(p)
                   for p in sorted(local.rglob("*")) if p.is_file()}


def test_version_is_an_mlflow_pyfunc_model(version, downloaded, exported):
    rid, _ = exported
    mlmodel = yaml.safe_load((downloaded / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.model" and pyfunc["python_model"]
    assert pyfunc["artifacts"]["bundle"]["path"] == "artifacts/bundle"
    assert (downloaded / pyfunc["code"] / "core" / "pyfunc.py").is_file()   # milroi's core ships
    assert mlmodel["run_id"] == rid and f"/models/{mlmodel['model_id']}/" in version.source
    # signature: uint8 tiles (-1, 224, 224, 3) -> float32 patch scores (-1,)
    (inputs,) = json.loads(mlmodel["signature"]["inputs"])
    (outputs,) = json.loads(mlmodel["signature"]["outputs"])
    assert inputs["tensor-spec"] == {"dtype": "uint8", "shape": [-1, 224, 224, 3]}
    assert outputs["name"] == "patch_scores"
    assert outputs["tensor-spec"] == {"dtype": "float32", "shape": [-1]}
    # the input example: one real tissue tile of the parity slide
    example = json.loads((downloaded / mlmodel["saved_input_example_info"]["artifact_path"])
                         .read_text())
    assert np.asarray(example, np.uint8).shape == (1, 224, 224, 3)
    # requirements: the serve extra (onnxruntime, grpc, mlflow-skinny, ...), no torch
    requirements = (downloaded / "requirements.txt").read_text().split()
    for package in ("onnxruntime-gpu", "grpcio", "mlflow-skinny", "prometheus-client", "numpy"):
        assert any(r.startswith(package) for r in requirements), (package, requirements)
    assert not any(r.startswith(("torch", "mil==", "h5py")) for r in requirements), requirements
    # the bundle inside is the one the version's digest tag names
    bundle = find_bundle(downloaded)
    assert bundle == (downloaded / "artifacts" / "bundle").resolve()
    assert bundle_digest(bundle, length=DIGEST_LENGTH) == version.tags[DIGEST_TAG]
    assert mlmodel["metadata"][DIGEST_TAG] == version.tags[DIGEST_TAG]


def test_version_tags_and_description(version):
    tags = version.tags
    assert tags["head"] == "chowder" and float(tags["val_auc"]) == pytest.approx(0.80)
    assert tags["fingerprint"] == "f" * 64 and len(tags[DIGEST_TAG]) == 64
    text = version.description
    for fact in ("chowder", "resnet50-trunc", "uint8", "patch", "f" * 64, "0.8000", tags[DIGEST_TAG],
                 "artifacts/bundle"):
        assert fact in text, (fact, text)


@pytest.mark.slow
def test_pyfunc_in_a_serve_only_process_matches_the_server(version, mlflow_server, real_tiles,
                                                           server_scores, server_distances,
                                                           tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SERVE_ONLY_SHIM)
    script = tmp_path / "predict.py"
    script.write_text(PREDICT)
    np.save(tmp_path / "tiles.npy", real_tiles)
    work = tmp_path / "work"     # an empty working directory: nothing of the checkout on the path
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=str(shim), MLFLOW_TRACKING_URI=mlflow_server)
    result = subprocess.run([sys.executable, str(script), MODEL_URI, str(tmp_path / "tiles.npy"),
                             str(tmp_path / "scores.npy")], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    # milroi's core came with the model (its code/), not from an installed milroi
    assert Path(report["pyfunc"]).parts[-3:] == ("code", "core", "pyfunc.py")
    scores = np.load(tmp_path / "scores.npy")
    assert scores.dtype == np.float32 and scores.shape == (len(real_tiles),)
    assert np.abs(scores - server_scores).max() <= 1e-5
    # params={"domain": True}: each tile's distance to the training tiles, as the server has it
    distance = np.load(tmp_path / "scores_domain.npy")
    assert np.allclose(distance, server_distances, rtol=1e-3) and np.isfinite(distance).all()


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(version, mlflow_server, real_tiles,
                                                 server_scores, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # the server runs `uvicorn` by name: the venv's bin first on PATH, as an activated venv has
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server,
           "PATH": os.pathsep.join([str(MLFLOW.parent), os.environ.get("PATH", "")])}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(MLFLOW), "models", "serve", "-m", MODEL_URI, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
            start_new_session=True)   # its own process group: the workers go with it
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping"
            time.sleep(0.5)
        body = json.dumps({"inputs": real_tiles[:3].tolist()}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            predictions = np.asarray(json.loads(response.read())["predictions"], np.float32)
        assert predictions.shape == (3,)
        assert np.abs(predictions - server_scores[:3]).max() <= 1e-5
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest.mark.slow
def test_reexport_adds_a_version_and_leaves_earlier_files_unchanged(exported, mlflow_server,
                                                                    tmp_path):
    from training.export import export_run

    rid, first = exported
    _, before = _version_files(mlflow_server, first.version, tmp_path / "before")
    # the same run again, parity on synthetic tiles this time: a bundle whose manifest differs,
    # which the old export wrote over the folder the first version was registered from
    second = export_run(rid, NAME, tracking_uri=mlflow_server)
    assert int(second.version) > int(first.version) and second.source != first.source
    local, after = _version_files(mlflow_server, first.version, tmp_path / "after")
    assert len(after) > 10 and after == before   # every file of the first version, byte for byte
    client = _client(mlflow_server)
    tags = [client.get_model_version(NAME, v).tags[DIGEST_TAG]
            for v in (first.version, second.version)]
    assert tags[0] != tags[1]     # the second bundle is another one...
    assert bundle_digest(find_bundle(local), length=DIGEST_LENGTH) == tags[0]
