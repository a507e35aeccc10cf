"""A model promotion (new version registered, alias moved, then moved back) in a real
`mlflow server` while ScoreSlide, ScoreTiles and GetModel traffic runs: no request fails, and
every response names the version that computed it."""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from mlflow_testing import register_bundle

from milroi.v1 import scoring_pb2 as pb
from milroi.v1 import scoring_pb2_grpc as pb_grpc


def register(client, bundle: Path) -> str:
    return register_bundle(client, "milroi", bundle, experiment="hardening")


@pytest.mark.slow
def test_promotion_and_rollback_during_mixed_traffic_fail_no_request(
        mlflow_server, serve_process, bundle, good_root, tmp_path):
    from mlflow import MlflowClient

    registry = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    second = tmp_path / "bundle2"          # the same graphs, slide threshold 0: always "tumor"
    shutil.copytree(bundle, second)
    manifest = json.loads((second / "manifest.json").read_text())
    (second / "manifest.json").write_text(json.dumps({**manifest, "slide_threshold": 0.0}))
    v1 = register(registry, bundle)
    registry.set_registered_model_alias("milroi", "champion", v1)
    server = serve_process(["--model", "models:/milroi@champion", "--tracking-uri", mlflow_server,
                            "--slide-root", str(good_root), "--batch-size", "8",
                            "--poll-interval", "0.5", "--grace", "5"])
    stop = threading.Event()
    failures, slides, tiles = [], [], []
    tile_batch = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), np.uint8).tobytes()

    def slide_client(name):
        stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(server.address))
        for _ in range(200):                       # bounded; stopped by the test long before
            if stop.is_set():
                return
            try:
                r = list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path=name), timeout=120))
                slides.append((r[0].header.model.version, r[-1].summary.model.version,
                               r[-1].summary.label))
            except grpc.RpcError as exc:
                failures.append(f"ScoreSlide {exc.code()}: {exc.details()}")

    def tiles_client():
        stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(server.address))
        for _ in range(2000):
            if stop.is_set():
                return
            try:
                replies = list(stub.ScoreTiles(iter([pb.ScoreTilesRequest(
                    tiles=tile_batch, count=2, tile_size=224)] * 3), timeout=60))
                assert len(replies) == 3
                tiles.append({r.model.version for r in replies})
                stub.GetModel(pb.GetModelRequest(), timeout=30)
            except grpc.RpcError as exc:
                failures.append(f"ScoreTiles/GetModel {exc.code()}: {exc.details()}")

    def wait_version(stub, version):
        deadline = time.monotonic() + 120
        while stub.GetModel(pb.GetModelRequest(), timeout=10).model.version != version:
            assert time.monotonic() < deadline, f"the server did not move to version {version}"
            time.sleep(0.2)

    def wait_streams(count):
        deadline = time.monotonic() + 180
        while len(slides) < count and not failures:
            assert time.monotonic() < deadline, "streams stalled"
            time.sleep(0.1)

    workers = [threading.Thread(target=slide_client, args=(n,)) for n in ("s0.tif", "s1.tif")]
    workers.append(threading.Thread(target=tiles_client))
    stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(server.address))
    try:
        for t in workers:
            t.start()
        wait_streams(2)
        v2 = register(registry, second)
        registry.set_registered_model_alias("milroi", "champion", v2)   # promotion
        wait_version(stub, v2)
        wait_streams(len(slides) + 2)
        registry.set_registered_model_alias("milroi", "champion", v1)   # rollback
        wait_version(stub, v1)
        wait_streams(len(slides) + 2)
    finally:
        stop.set()
        for t in workers:
            t.join(180)
    assert failures == []
    assert all(header == summary for header, summary, _ in slides)   # no stream changed model
    versions = [v for v, _, _ in slides]
    assert v1 in versions and v2 in versions and versions[-1] == v1
    assert all(label == "tumor" for v, _, label in slides if v == v2)
    assert all(len(batch_versions) == 1 for batch_versions in tiles)   # one model per stream
    assert set().union(*tiles) <= {v1, v2}
    log = server.log_path.read_text()
    assert f"version {v1} -> {v2}" in log and f"version {v2} -> {v1}" in log
