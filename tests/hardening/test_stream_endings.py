"""Every ending of a stream is counted exactly once in the server's metrics: completed, failed,
cancelled by the client (which reaches the handler as CancelledError while it awaits, or as
GeneratorExit while it is paused at `yield`), or the client gone. Tests wait for the event
itself (the in-flight gauge back to 0, set in the same `finally` that counts the ending), never
for a time."""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from hardening_helpers import GOOD_SLIDES

from milroi.v1 import scoring_pb2 as pb
from milroi.v1 import scoring_pb2_grpc as pb_grpc

Code = grpc.StatusCode
METHODS = ("ScoreSlide", "ScoreTiles", "GetModel")


def sample(metrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def endings(metrics) -> dict:
    """{(method, code): count} of milroi_requests_total, and the latency count per method."""
    counts = {}
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == "milroi_requests_total":
                counts[(s.labels["method"], s.labels["code"])] = s.value
    latency = {m: sample(metrics, "milroi_request_seconds_count", method=m) for m in METHODS}
    return {"requests": counts, "latency": latency}


def wait_idle(server, timeout: float = 300) -> None:
    """Until no RPC is in flight: each handler's `finally` counted its ending and then
    decremented the gauge. The deadline only bounds a broken run."""
    deadline = time.monotonic() + timeout
    while sample(server.server.metrics, "milroi_in_flight") > 0:
        assert time.monotonic() < deadline, "streams still in flight"
        time.sleep(0.05)


class _Context:
    """The two things the handlers ask of grpc's ServicerContext on these paths: no deadline,
    and `abort` raising as grpc's does."""

    def time_remaining(self):
        return None

    async def abort(self, code, details):
        raise grpc.aio.AbortError(f"{code}: {details}")


def test_a_cancel_at_yield_is_counted(make_in_process_server, big_root):
    """grpc closes the handler's generator (GeneratorExit, not CancelledError) when the client
    cancels while the handler waits at `yield`: that ending is counted like any other."""
    server = make_in_process_server([big_root], batch_size=2)
    service, metrics = server.server.service, server.server.metrics

    async def close_score_slide_at_yield():
        stream = service.ScoreSlide(pb.ScoreSlideRequest(slide_path="big.tif", chunk_size=2),
                                    _Context())
        assert (await stream.__anext__()).HasField("header")
        assert (await stream.__anext__()).HasField("patches")
        await stream.aclose()

    async def close_score_tiles_at_yield():
        forever = asyncio.Event()

        async def requests():
            yield pb.ScoreTilesRequest(tiles=bytes(224 * 224 * 3), count=1, tile_size=224)
            await forever.wait()

        stream = service.ScoreTiles(requests(), _Context())
        assert len((await stream.__anext__()).score) == 1
        await stream.aclose()

    for _ in range(3):
        server.call(close_score_slide_at_yield())
        server.call(close_score_tiles_at_yield())
    assert sample(metrics, "milroi_requests_total", method="ScoreSlide", code="CANCELLED") == 3
    assert sample(metrics, "milroi_requests_total", method="ScoreTiles", code="CANCELLED") == 3
    assert sample(metrics, "milroi_request_seconds_count", method="ScoreSlide") == 3
    assert sample(metrics, "milroi_request_seconds_count", method="ScoreTiles") == 3
    assert sample(metrics, "milroi_in_flight") == 0
    assert service._active == 0


def test_sixteen_streams_half_cancelled_each_counted_once(make_in_process_server, good_root,
                                                           big_root):
    """8 streams run to their summary while 8 long ones are cancelled mid-stream, 4 ScoreTiles
    streams are cancelled after their first reply, 2 calls fail and 2 GetModel succeed: the
    counters hold exactly those numbers, and the server is healthy afterwards."""
    # 16 ScoreSlide + 4 ScoreTiles streams at once: room for all of them
    server = make_in_process_server([good_root, big_root], batch_size=2, max_concurrent=24)
    metrics = server.server.metrics
    results: dict[str, str] = {}
    lock = threading.Lock()

    def done(name: str, outcome: str) -> None:
        with lock:
            results[name] = outcome

    def complete(name: str) -> None:
        stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(server.address))
        responses = list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path=name, chunk_size=2),
                                         timeout=600))
        done(name, "summary" if responses[-1].HasField("summary") else "no summary")

    def cancel_slide(i: int) -> None:
        stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(server.address))
        call = stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="big.tif", chunk_size=2),
                               timeout=600)
        next(call)
        next(call)
        call.cancel()
        done(f"cancel-{i}", "cancelled")

    def cancel_tiles(i: int) -> None:
        stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(server.address))
        stop = threading.Event()

        def requests():
            yield pb.ScoreTilesRequest(tiles=bytes(224 * 224 * 3), count=1, tile_size=224)
            stop.wait(600)   # the stream stays open until the test cancels it

        call = stub.ScoreTiles(requests(), timeout=600)
        next(call)
        call.cancel()
        stop.set()
        done(f"tiles-{i}", "cancelled")

    def fail(i: int) -> None:
        stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(server.address))
        try:
            list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="missing.tif"), timeout=60))
            done(f"fail-{i}", "no error")
        except grpc.RpcError as exc:
            done(f"fail-{i}", exc.code().name)

    def model(i: int) -> None:
        stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(server.address))
        done(f"model-{i}", str(stub.GetModel(pb.GetModelRequest(), timeout=60).tile_size))

    jobs = ([(complete, name) for name in GOOD_SLIDES] + [(cancel_slide, i) for i in range(8)]
            + [(cancel_tiles, i) for i in range(4)] + [(fail, i) for i in range(2)]
            + [(model, i) for i in range(2)])
    def run(job, arg) -> None:
        try:
            job(arg)
        except Exception as exc:  # noqa: BLE001 - reported in the results below
            done(f"{job.__name__}-{arg}", f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert sorted(results.values()) == sorted(["summary"] * 8 + ["cancelled"] * 12 +
                                              ["NOT_FOUND"] * 2 + ["224"] * 2), results
    wait_idle(server)
    counted = endings(metrics)
    assert counted["requests"] == {("ScoreSlide", "OK"): 8, ("ScoreSlide", "CANCELLED"): 8,
                                   ("ScoreSlide", "NOT_FOUND"): 2, ("ScoreTiles", "CANCELLED"): 4,
                                   ("GetModel", "OK"): 2}
    assert counted["latency"] == {"ScoreSlide": 18, "ScoreTiles": 4, "GetModel": 2}
    assert sample(metrics, "milroi_errors_total", method="ScoreSlide", code="CANCELLED") == 8
    assert server.server.service._active == 0
    # Still healthy: a new stream is scored to its summary.
    stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(server.address))
    responses = list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path=GOOD_SLIDES[0]), timeout=120))
    assert responses[-1].HasField("summary")


@pytest.mark.parametrize("method", ["ScoreSlide", "ScoreTiles"])
def test_a_client_that_goes_away_is_counted(make_in_process_server, big_root, method):
    """The client's channel is closed mid-stream (a process that died): counted CANCELLED."""
    server = make_in_process_server([big_root], batch_size=2)
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.SlideScoringStub(channel)
    if method == "ScoreSlide":
        call = stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="big.tif", chunk_size=2),
                               timeout=600)
    else:
        stop = threading.Event()

        def requests():
            yield pb.ScoreTilesRequest(tiles=bytes(224 * 224 * 3), count=1, tile_size=224)
            stop.wait(600)

        call = stub.ScoreTiles(requests(), timeout=600)
    next(call)
    channel.close()
    if method == "ScoreTiles":
        stop.set()
    wait_idle(server)
    metrics = server.server.metrics
    assert sample(metrics, "milroi_requests_total", method=method, code="CANCELLED") == 1
    assert sample(metrics, "milroi_request_seconds_count", method=method) == 1
