"""Load and faults of the server: concurrent clients, cancel, SIGTERM drain, memory over many
slides. Every request loop is bounded in count and time; loopback only."""
from __future__ import annotations

import signal
import threading
import time

import grpc
import numpy as np
import pytest
from hardening_helpers import GOOD_SLIDES

from milroi.v1 import scoring_pb2 as pb
from milroi.v1 import scoring_pb2_grpc as pb_grpc

Code = grpc.StatusCode


def stream_arrays(responses):
    """(header, coords [N, 2], scores [N], summary) of one ScoreSlide stream, checked in shape."""
    kinds = [r.WhichOneof("kind") for r in responses]
    assert kinds[0] == "header" and kinds[-1] == "summary" and set(kinds[1:-1]) <= {"patches"}
    chunks = [r.patches for r in responses[1:-1]]
    assert [c.offset for c in chunks] == list(np.cumsum([0] + [len(c.score) for c in chunks])[:-1])
    coords = np.array([(x, y) for c in chunks for x, y in zip(c.x, c.y)], np.int64).reshape(-1, 2)
    scores = np.array([s for c in chunks for s in c.score], np.float32)
    return responses[0].header, coords, scores, responses[-1].summary


def test_eight_concurrent_clients_get_their_own_correct_scores(make_in_process_server, good_root,
                                                               reference_scores):
    server = make_in_process_server([good_root], batch_size=16, max_wait_ms=20)
    results, errors = {}, []

    def client(name):
        # One channel per client, as separate processes would have.
        stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(server.address))
        try:
            results[name] = list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path=name, chunk_size=4),
                                                 timeout=300))
        except grpc.RpcError as exc:
            errors.append(f"{name}: {exc.code()} {exc.details()}")

    threads = [threading.Thread(target=client, args=(name,)) for name in GOOD_SLIDES]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == [] and sorted(results) == sorted(GOOD_SLIDES)
    for name, responses in results.items():
        header, coords, scores, summary = stream_arrays(responses)
        reference = reference_scores[name]
        assert header.slide_path == name and header.tile_count == reference.tile_count > 0
        np.testing.assert_array_equal(coords, reference.coords)
        np.testing.assert_allclose(scores, reference.scores, atol=1e-5)
        assert summary.slide_score == pytest.approx(reference.slide_score, abs=1e-5)
        assert summary.label == reference.label
    stats = server.engine.stats
    assert stats.tiles == sum(r.tile_count for r in reference_scores.values())
    # Whether these ~9-tile streams overlap in time depends on the machine's load (a fresh-clone
    # run saw 8 runs for 8 requests); batch sharing across streams is asserted on long streams
    # in tests/serving/test_serving_server.py::test_concurrent_streams_share_batches.
    assert server.server.service._active == 0


def _sample(metrics, name, labels=None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def test_cancel_mid_stream_stops_the_work_for_it(make_in_process_server, big_root):
    server = make_in_process_server([big_root], batch_size=2)
    metrics, engine = server.server.metrics, server.engine
    threads_before = {t.ident for t in threading.enumerate()}
    stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(server.address))
    call = stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="big.tif", chunk_size=2), timeout=300)
    header = next(call).header
    assert next(call).HasField("patches")
    call.cancel()
    # Within a second the stream's reads and model runs have stopped: nothing grows any more.
    deadline = time.monotonic() + 10
    while _sample(metrics, "milroi_requests_total", {"method": "ScoreSlide", "code": "CANCELLED"}) < 1:
        assert time.monotonic() < deadline, "the cancel was not recorded"
        time.sleep(0.05)
    time.sleep(1.0)
    tiles, scored = engine.stats.tiles, _sample(metrics, "milroi_tiles_scored_total")
    time.sleep(1.5)
    assert engine.stats.tiles == tiles and _sample(metrics, "milroi_tiles_scored_total") == scored
    assert tiles < header.tile_count                 # it really stopped early
    assert _sample(metrics, "milroi_in_flight") == 0 and engine.queue_depth() == 0
    assert server.server.service._active == 0
    # The stream's producer and tile-reader threads are gone.
    deadline = time.monotonic() + 10
    while extra := [t.name for t in threading.enumerate()
                    if t.ident not in threads_before and t.name.startswith(("score-slide", "cancel-watch"))]:
        assert time.monotonic() < deadline, f"threads left after cancel: {extra}"
        time.sleep(0.1)


@pytest.mark.slow
def test_sigterm_drains_every_stream_and_exits_0(serve_process, bundle, good_root, big_root):
    server = serve_process(["--model", str(bundle), "--slide-root", str(good_root),
                            "--slide-root", str(big_root), "--batch-size", "2", "--grace", "120"])
    names = ["big.tif", *GOOD_SLIDES[:3]]
    calls = []
    for name in names:
        stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(server.address))
        call = stub.ScoreSlide(pb.ScoreSlideRequest(slide_path=name, chunk_size=2), timeout=300)
        calls.append((call, [next(call)]))       # every stream has started (header received)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # New calls are refused while draining...
    late = pb_grpc.SlideScoringStub(grpc.insecure_channel(server.address))
    with pytest.raises(grpc.RpcError) as info:
        list(late.ScoreSlide(pb.ScoreSlideRequest(slide_path="s0.tif"), timeout=10))
    assert info.value.code() == Code.UNAVAILABLE
    # ...and every stream in flight still gets all its patches and its summary.
    for name, (call, head) in zip(names, calls):
        header, coords, scores, summary = stream_arrays(head + list(call))
        assert header.slide_path == name
        assert summary.tile_count == header.tile_count == len(scores) > 0
    assert server.proc.wait(120) == 0
    log = server.log_path.read_text()
    assert "draining" in log and "stopped" in log


def _score_rounds(stub, rounds: int, after_each=None) -> None:
    """Score every good slide `rounds` times, one after another; `after_each()` after each."""
    for i in range(rounds * len(GOOD_SLIDES)):
        responses = list(stub.ScoreSlide(pb.ScoreSlideRequest(
            slide_path=GOOD_SLIDES[i % len(GOOD_SLIDES)]), timeout=60))
        assert responses[-1].HasField("summary")
        if after_each is not None:
            after_each()


# Threads that live for one slide (serving.server, serving.pipeline, wsi.tiles, wsi.decode_once).
SLIDE_THREADS = ("score-slide", "cancel-watch", "tile-reader")


@pytest.mark.slow
def test_python_memory_is_flat_over_many_slides(make_in_process_server, good_root):
    """What the server's own code keeps per slide: every Python object and numpy buffer
    allocated while slides are scored and still alive after them (tracemalloc traces both).
    Exact where RSS is not: RSS also moves with glibc's arenas and onnxruntime's arena, in
    steps of up to 30 MiB whose timing depends on the load (tests/hardening/test_load.py's RSS
    test bounds those coarsely)."""
    import gc
    import tracemalloc

    server = make_in_process_server([good_root], backend="onnxruntime", precision="fp32")
    stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(server.address))

    def settled() -> int:
        """Traced bytes once the last slide's own threads (stream producer, cancel watcher, tile
        readers) have ended: what they still hold is not kept."""
        deadline = time.monotonic() + 30
        while any(t.name.startswith(SLIDE_THREADS) for t in threading.enumerate()):
            assert time.monotonic() < deadline, "a slide's threads did not end"
            time.sleep(0.01)
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    _score_rounds(stub, 1)                 # first-use caches, thread pools, the arena
    tracemalloc.start(1)
    try:
        _score_rounds(stub, 2)             # what is allocated once after the start
        after_warm_up = settled()
        rounds = 4
        _score_rounds(stub, rounds)
        growth = settled() - after_warm_up
    finally:
        tracemalloc.stop()
    per_slide = growth / (rounds * len(GOOD_SLIDES))
    print(f"traced Python/numpy memory: {growth / 2**10:+.1f} KiB over "
          f"{rounds * len(GOOD_SLIDES)} slides ({per_slide / 2**10:+.2f} KiB/slide)")
    # One tile batch kept per slide (8 x 224 x 224 x 3 B) would be 1176 KiB/slide; a slide's
    # coordinates and scores (~15 tiles) ~0.4 KiB. Measured: within +-5 KiB/slide.
    assert per_slide < 16 * 2**10, f"{per_slide / 2**10:.1f} KiB kept per slide"


@pytest.mark.slow
def test_server_process_stays_bounded_over_many_slides(serve_process, bundle, good_root):
    """The server process's handles, threads and RSS after warm-up and 80 slides later.
    Handles and threads are exact counts (a slide file or thread kept per slide is +80); RSS is
    compared by round medians with a bound a native leak of 1 MiB/slide would cross (allocator
    steps measured on this 2-core host under a full test run: up to 40 MiB, then back)."""
    import psutil

    # onnxruntime fp32, where these bounds were established. OpenVINO (which the default `auto`
    # picks when it measures faster) frees and re-allocates its intermediate buffers when the
    # batch shape changes, in 15-20 MiB steps.
    server = serve_process(["--model", str(bundle), "--slide-root", str(good_root),
                            "--batch-size", "8", "--backend", "onnxruntime", "--precision", "fp32"])
    process = psutil.Process(server.proc.pid)
    stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(server.address))
    samples = []

    def sample():
        samples.append((process.memory_info().rss / 2**20, process.num_fds(), process.num_threads()))

    started = time.monotonic()
    warm_up, measured = 5, 10      # rounds of the 8 slides
    _score_rounds(stub, warm_up + measured, sample)
    assert time.monotonic() - started < 600, "small slides took too long"
    rss, fds, threads = (np.array(column) for column in zip(*samples))
    n = len(GOOD_SLIDES)
    first, last = slice(warm_up * n - n, warm_up * n), slice(len(samples) - n, len(samples))
    print(f"server after warm-up / {measured * n} slides later: RSS median "
          f"{np.median(rss[first]):.1f} / {np.median(rss[last]):.1f} MiB, fds "
          f"{fds[first].min()} / {fds[last].min()}, threads {threads[first].min()} / "
          f"{threads[last].min()}")
    # A slide's file is open until its summary is sent, and its stream and reader threads may
    # still be ending when the client has it; what ends is gone by some sample of a round, so
    # the minimum over a round counts what stays (a leak of one per slide: +80).
    assert fds[last].min() <= fds[first].min() + 2, f"open files: {fds.tolist()}"
    assert threads[last].min() <= threads[first].min() + 2, f"threads: {threads.tolist()}"
    growth = np.median(rss[last]) - np.median(rss[first])
    assert growth < 60, f"RSS grew {growth:.1f} MiB: {np.round(rss, 1).tolist()}"
