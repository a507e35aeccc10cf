"""The gRPC server on loopback with a real bundle and real slides: every RPC and status code."""
import dataclasses
import json
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from milroi.v1 import scoring_pb2 as pb
from milroi.v1 import scoring_pb2_grpc as pb_grpc
from serving.engine import Engine
from serving.pipeline import SlideScorer
from training.export import synthetic_parity_tiles

Code = grpc.StatusCode


def _code(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def _metrics_once_idle(url: str, timeout: float = 60) -> str:
    """The metrics page once no RPC is in flight. A refused call's status reaches the client
    from `context.abort`, before the handler's `finally` has counted it; the in-flight gauge
    drops only after that count, so waiting on it waits on the count itself."""
    deadline = time.monotonic() + timeout
    while True:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        if "\nmilroi_in_flight 0.0\n" in text:
            return text
        assert time.monotonic() < deadline, "RPCs still in flight:\n" + text
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(chowder_bundle, slide_root):
    """The in-process pipeline's summary of slide.tiff (what the server must stream)."""
    with Engine(chowder_bundle, provider="cpu", batch_size=8) as engine:
        return SlideScorer(engine).score_slide(slide_root / "slide.tiff")


def test_score_slide_stream(make_server, reference):
    server = make_server()
    stub = pb_grpc.SlideScoringStub(server.channel())
    responses = list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="slide.tiff", chunk_size=5),
                                     timeout=120))
    kinds = [r.WhichOneof("kind") for r in responses]
    assert kinds[0] == "header" and kinds[-1] == "summary" and set(kinds[1:-1]) == {"patches"}
    header, summary = responses[0].header, responses[-1].summary
    chunks = [r.patches for r in responses[1:-1]]
    n = reference.tile_count
    assert header.tile_count == n and header.slide_path == "slide.tiff"
    assert [c.offset for c in chunks] == list(range(0, n, 5))
    coords = np.stack([np.concatenate([c.x for c in chunks]), np.concatenate([c.y for c in chunks])], 1)
    np.testing.assert_array_equal(coords, reference.coords)
    np.testing.assert_allclose(np.concatenate([c.score for c in chunks]), reference.scores, atol=1e-5)
    assert summary.slide_score == pytest.approx(reference.slide_score, abs=1e-5)
    assert summary.label == reference.label and summary.tile_count == n
    # the wire states the pipeline's one decision (proto SlideSummary.decision, field 12)
    assert (summary.decision, summary.decision_reason) == (reference.decision.decision,
                                                           reference.decision.reason)
    assert summary.decision in ("tumor", "normal", "review")
    assert summary.mpp == pytest.approx(0.25, rel=1e-3)
    assert header.model.version == summary.model.version == reference.model.version
    assert summary.timings.first_score_s > 0


def test_score_tiles_and_get_model(make_server, chowder_bundle):
    server = make_server()
    stub = pb_grpc.SlideScoringStub(server.channel())
    info = stub.GetModel(pb.GetModelRequest())
    assert info.head == "chowder" and info.tile_size == 224 and info.provider == "cpu"
    assert info.model.version and '"format": "milroi-bundle/1"' in info.manifest_json
    # What runs the backbone, as measured at load (core.inference_backends): reported as it runs.
    assert info.backend in ("onnxruntime", "openvino") and info.precision in ("fp32", "bf16")
    table = json.loads(info.backend_choice_json)
    assert [info.backend, info.precision] in [[r["backend"], r["precision"]] for r in table]
    tiles = synthetic_parity_tiles(n=6, seed=1)
    with Engine(chowder_bundle, provider="cpu", batch_size=8) as engine:
        expected = engine.score(tiles)["patch_scores"]
    requests = [pb.ScoreTilesRequest(tiles=tiles[i:i + 3].tobytes(), count=3, tile_size=224,
                                     x=[i, i + 1, i + 2], y=[0, 0, 0]) for i in (0, 3)]
    replies = list(stub.ScoreTiles(iter(requests), timeout=120))
    assert [r.batch_index for r in replies] == [0, 1]
    assert list(replies[1].x) == [3, 4, 5]
    np.testing.assert_allclose(np.concatenate([r.score for r in replies]), expected, atol=1e-5)
    assert all(r.model.version == info.model.version for r in replies)
    bad = pb.ScoreTilesRequest(tiles=b"\0" * 10, count=1, tile_size=224)
    code, details = _code(lambda: list(stub.ScoreTiles(iter([bad]))))
    assert code == Code.INVALID_ARGUMENT and "bytes" in details


def test_health_reflection_and_metrics(make_server, free_port):
    server = make_server(metrics_port=free_port)
    channel = server.channel()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "milroi.v1.SlideScoring"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"milroi.v1.SlideScoring", "grpc.health.v1.Health"} <= names
    stub = pb_grpc.SlideScoringStub(channel)
    list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="sub/other.tiff")))
    _code(lambda: list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="nope.tiff"))))
    text = _metrics_once_idle(f"http://127.0.0.1:{free_port}/metrics")
    assert 'milroi_requests_total{code="OK",method="ScoreSlide"} 1.0' in text
    assert 'milroi_errors_total{code="NOT_FOUND",method="ScoreSlide"} 1.0' in text
    assert "milroi_tiles_scored_total" in text and "milroi_model_info{" in text
    info = next(line for line in text.splitlines() if line.startswith("milroi_model_info{"))
    assert 'backend="onnxruntime"' in info or 'backend="openvino"' in info
    assert "milroi_queue_depth" in text and "milroi_first_score_seconds_count 1.0" in text


@pytest.mark.parametrize("path,code,words", [
    ("missing.tiff", Code.NOT_FOUND, "no slide"),
    ("broken.svs", Code.INVALID_ARGUMENT, "broken.svs"),
    ("notes.txt", Code.INVALID_ARGUMENT, "notes.txt"),
    ("../outside/secret.tiff", Code.PERMISSION_DENIED, ".."),
    ("/etc/passwd", Code.PERMISSION_DENIED, "relative"),
    ("escape.tiff", Code.PERMISSION_DENIED, "outside"),
    ("", Code.PERMISSION_DENIED, "invalid"),
])
def test_bad_slide_requests_get_one_clear_status(make_server, path, code, words):
    server = make_server()
    stub = pb_grpc.SlideScoringStub(server.channel())
    got, details = _code(lambda: list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path=path))))
    assert got == code and words in details
    # and the server keeps serving
    assert stub.GetModel(pb.GetModelRequest()).tile_size == 224


def test_bad_parameters(make_server):
    stub = pb_grpc.SlideScoringStub(make_server().channel())
    for request in (pb.ScoreSlideRequest(slide_path="slide.tiff", min_tissue=1.5),
                    pb.ScoreSlideRequest(slide_path="slide.tiff", roi_threshold=0.0)):
        code, details = _code(lambda: list(stub.ScoreSlide(request)))  # noqa: B023 - run now
        assert code == Code.INVALID_ARGUMENT and ("min_tissue" in details or "roi_threshold" in details)


def test_token(make_server, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    server = make_server(token_file=str(token))
    stub = pb_grpc.SlideScoringStub(server.channel())
    for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", "s3cret")]):
        code, _ = _code(lambda: stub.GetModel(pb.GetModelRequest(), metadata=metadata))  # noqa: B023
        assert code == Code.UNAUTHENTICATED
    code, _ = _code(lambda: list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="slide.tiff"))))
    assert code == Code.UNAUTHENTICATED
    assert stub.GetModel(pb.GetModelRequest(), metadata=[("authorization", "Bearer s3cret")]).head


def test_unavailable_before_a_model_is_loaded(make_server, tmp_path, slide_root):
    """A registry that does not answer: health NOT_SERVING and every call UNAVAILABLE."""
    server = make_server(wait=False, model="models:/milroi@champion", poll_interval=60,
                         tracking_uri=f"sqlite:///{tmp_path}/empty.db")
    channel = server.channel()
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == \
        health_pb2.HealthCheckResponse.NOT_SERVING
    stub = pb_grpc.SlideScoringStub(channel)
    code, details = _code(lambda: stub.GetModel(pb.GetModelRequest()))
    assert code == Code.UNAVAILABLE and "no model" in details
    code, _ = _code(lambda: list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="slide.tiff"))))
    assert code == Code.UNAVAILABLE


def test_max_concurrent_and_cancel(make_server):
    """A second stream beyond --max-concurrent 1 is refused; a cancelled stream stops its work."""
    server = make_server(max_concurrent=1, batch_size=2)
    stub = pb_grpc.SlideScoringStub(server.channel())
    call = stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="big.tiff", chunk_size=2))
    assert next(call).WhichOneof("kind") == "header"
    assert next(call).WhichOneof("kind") == "patches"
    code, details = _code(lambda: list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="slide.tiff"))))
    assert code == Code.RESOURCE_EXHAUSTED and "max-concurrent" in details
    engine = server.server.source.current.engine
    call.cancel()
    time.sleep(1.0)          # cancel must have stopped the slide's work by now
    tiles = engine.stats.tiles
    time.sleep(1.0)
    assert engine.stats.tiles == tiles
    # the slot is free again
    assert list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="sub/other.tiff")))[-1].HasField("summary")


def test_deadline_stops_the_stream(make_server):
    server = make_server(batch_size=2)
    stub = pb_grpc.SlideScoringStub(server.channel())
    # ~80 tiles take several seconds on any CPU: the deadline comes first
    code, _ = _code(lambda: list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="big.tiff"),
                                                 timeout=0.8)))
    assert code == Code.DEADLINE_EXCEEDED
    engine = server.server.source.current.engine
    time.sleep(1.0)
    tiles = engine.stats.tiles
    time.sleep(1.0)
    assert engine.stats.tiles == tiles


def test_concurrent_streams_share_batches(make_server):
    """Four ScoreSlide streams at once: same scores as alone, and runs merge their tiles.

    The ~80-tile slide keeps each stream busy for several model runs, so the four overlap even
    when the machine is loaded and the streams start at different moments."""
    server = make_server(batch_size=16, max_wait_ms=50)
    stub = pb_grpc.SlideScoringStub(server.channel())
    alone = list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="big.tiff"), timeout=300))
    engine = server.server.source.current.engine
    before = dataclasses.replace(engine.stats)
    results = [None] * 4

    def client(i):
        results[i] = list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="big.tiff"), timeout=300))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for responses in results:
        assert responses[-1].summary.slide_score == pytest.approx(alone[-1].summary.slide_score, abs=1e-5)
    stats = engine.stats
    assert stats.tiles - before.tiles == 4 * alone[0].header.tile_count
    assert stats.merged_runs - before.merged_runs >= 1
    assert stats.runs - before.runs < stats.requests - before.requests


def test_loop_stays_responsive_while_scoring(make_server):
    server = make_server(batch_size=4)
    channel = server.channel()
    stub = pb_grpc.SlideScoringStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    call = stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="slide.tiff"))
    next(call)
    started = time.perf_counter()
    for _ in range(5):
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert (time.perf_counter() - started) / 5 < 0.5
    assert list(call)[-1].HasField("summary")


def test_tls(make_server, tmp_path):
    from server_testing import write_self_signed_cert

    cert, key = write_self_signed_cert(tmp_path)
    cert_pem = cert.read_bytes()
    server = make_server(tls_cert=str(cert), tls_key=str(key))
    channel = grpc.secure_channel(f"localhost:{server.port}", grpc.ssl_channel_credentials(cert_pem))
    assert pb_grpc.SlideScoringStub(channel).GetModel(pb.GetModelRequest(), timeout=30).head
    code, _ = _code(lambda: pb_grpc.SlideScoringStub(server.channel()).GetModel(
        pb.GetModelRequest(), timeout=5))
    assert code == Code.UNAVAILABLE   # plaintext client against a TLS port
