"""The server as a process: SIGTERM drain; a model swap from a real MLflow server while streaming."""
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from mlflow_testing import register_bundle
from server_testing import free_port as _free_port
from server_testing import wait_serving

from milroi.v1 import scoring_pb2 as pb
from milroi.v1 import scoring_pb2_grpc as pb_grpc

BIN = Path(sys.executable).parent


def _serve(args, log_path):
    log = open(log_path, "wb")
    return subprocess.Popen([str(BIN / "milroi-serve"), "serve", "--provider", "cpu", *args],
                            stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_sigterm_drains_in_flight_streams(chowder_bundle, slide_root, tmp_path):
    port = _free_port()
    address = f"127.0.0.1:{port}"
    server = _serve(["--model", str(chowder_bundle), "--slide-root", str(slide_root),
                     "--port", str(port), "--batch-size", "2", "--grace", "60"], tmp_path / "log")
    try:
        wait_serving(address, server, tmp_path / "log")
        stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(address))
        call = stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="slide.tiff", chunk_size=2))
        assert next(call).HasField("header") and next(call).HasField("patches")
        server.send_signal(signal.SIGTERM)
        rest = list(call)                     # the in-flight stream finishes normally
        assert rest[-1].HasField("summary") and rest[-1].summary.tile_count > 0
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()
    log = (tmp_path / "log").read_text()
    assert f"listening on 127.0.0.1:{port}" in log and "draining" in log


def _register(client, name: str, bundle: Path) -> str:
    return register_bundle(client, name, bundle, experiment="serving-tests")


@pytest.mark.slow
def test_model_swap_while_streaming(mlflow_server, chowder_bundle, slide_root, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    # version 2: the same graphs under a different slide threshold (a new promoted model)
    second = tmp_path / "bundle2"
    shutil.copytree(chowder_bundle, second)
    manifest = json.loads((second / "manifest.json").read_text())
    manifest["slide_threshold"] = 0.0
    (second / "manifest.json").write_text(json.dumps(manifest))
    v1 = _register(client, "milroi", chowder_bundle)
    client.set_registered_model_alias("milroi", "champion", v1)

    port = _free_port()
    address = f"127.0.0.1:{port}"
    server = _serve(["--model", "models:/milroi@champion", "--tracking-uri", mlflow_server,
                     "--slide-root", str(slide_root), "--port", str(port), "--batch-size", "8",
                     "--poll-interval", "0.5", "--grace", "0"], tmp_path / "serve.log")
    stop = threading.Event()
    failures, streams = [], []

    def stream_forever():
        stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(address))
        while not stop.is_set():
            try:
                responses = list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="sub/other.tiff"),
                                                 timeout=120))
                streams.append((responses[0].header.model.version,
                                responses[-1].summary.model.version, responses[-1].summary.label))
            except grpc.RpcError as exc:
                failures.append(f"{exc.code()}: {exc.details()}")

    try:
        wait_serving(address, server, tmp_path / "serve.log")
        stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(address))
        assert stub.GetModel(pb.GetModelRequest()).model.version == v1
        clients = [threading.Thread(target=stream_forever) for _ in range(2)]
        for t in clients:
            t.start()
        while len(streams) < 2 and not failures:
            time.sleep(0.1)
        v2 = _register(client, "milroi", second)
        client.set_registered_model_alias("milroi", "champion", v2)
        deadline = time.monotonic() + 120
        while stub.GetModel(pb.GetModelRequest()).model.version != v2:
            assert time.monotonic() < deadline, "the server did not pick up version 2"
            time.sleep(0.2)
        count = len(streams)
        while len(streams) < count + 2 and not failures:
            time.sleep(0.1)
        stop.set()
        for t in clients:
            t.join(120)
    finally:
        stop.set()
        server.terminate()
        server.wait(60)
    assert failures == []
    assert all(header == summary for header, summary, _ in streams)   # no stream changed model
    versions = [v for v, _, _ in streams]
    assert versions[0] == v1 and versions[-1] == v2
    assert all(label == "tumor" for v, _, label in streams if v == v2)  # threshold 0: new model
    assert "version 1 -> 2" in (tmp_path / "serve.log").read_text()
