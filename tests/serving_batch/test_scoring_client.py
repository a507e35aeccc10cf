"""serving.client against a real `milroi-serve serve` subprocess."""
from __future__ import annotations

import json
import logging
import threading
import time

import grpc
import numpy as np
import pytest
from server_testing import free_port, write_self_signed_cert
from serving_batch_helpers import ServerProcess
from shapely.geometry import Polygon

from results.scored import ScoredSlide
from serving.cli import main as serve_main
from serving.client import ScoringClient, ScoringError

SLIDE = "sub/synth_tumor.tif"


@pytest.fixture(scope="module")
def in_process(bundle, slides_dir):
    """The same slide scored in this process by the server's own pipeline: the reference."""
    from serving.engine import Engine
    from serving.pipeline import SlideScorer

    with Engine(bundle, provider="cpu") as engine:
        return SlideScorer(engine).score_slide(slides_dir / SLIDE)


@pytest.fixture(scope="module")
def streamed(server) -> tuple[ScoredSlide, list]:
    """The test slide streamed in chunks of 7 patches, and the chunks themselves."""
    with ScoringClient(server.target, timeout=120) as client:
        with client.score_slide(SLIDE, chunk_size=7) as stream:
            chunks = list(stream)
    return ScoredSlide.from_chunks(stream.header, chunks, stream.summary), chunks


def test_score_slide_streams_header_chunks_and_summary(streamed, in_process):
    result, chunks = streamed
    h = result.header
    assert h.slide_path == SLIDE and h.tile_count == in_process.tile_count > 7
    assert h.mpp == pytest.approx(in_process.mpp) and h.tile_size == 224
    assert h.model.name == "batch-test" and h.model.version == in_process.model.version
    # Chunks of 7 in grid order, contiguous, the last one partial.
    assert [c.offset for c in chunks] == list(range(0, h.tile_count, 7))
    assert all(len(c) == 7 for c in chunks[:-1]) and 1 <= len(chunks[-1]) <= 7
    assert result.coords.dtype == np.int64 and result.scores.dtype == np.float32
    np.testing.assert_array_equal(result.coords, in_process.coords)
    np.testing.assert_allclose(result.scores, in_process.scores, atol=1e-5)
    s = result.summary
    assert s.tile_count == h.tile_count
    assert s.slide_score == pytest.approx(in_process.slide_score, abs=1e-5)
    assert s.label == in_process.label and s.mpp == pytest.approx(in_process.mpp)
    assert s.timings.total_s > 0
    assert s.slide_logit == pytest.approx(in_process.summary.slide_logit, abs=1e-4)
    # ROIs arrive as shapely polygons with their area in um^2 at the slide's mpp.
    assert len(s.rois) == len(in_process.rois)
    for got, want in zip(s.rois, in_process.rois):
        assert isinstance(got.polygon, Polygon) and got.polygon.is_valid
        assert got.polygon.equals(want.polygon)
        assert got.area_um2 == pytest.approx(got.polygon.area * s.mpp ** 2, rel=1e-6)
        assert got.tiles == want.tiles > 0
    assert h.bounds_offset == in_process.header.bounds_offset


def test_collect_gives_the_scored_slide_the_pipeline_gives(server, in_process):
    """One type either way: the client's ScoredSlide holds the server's polygons (not computed
    again) with the same tile statistics as the in-process pipeline's, in float64."""
    with ScoringClient(server.target, timeout=120) as client:
        scored = client.score_slide_all(SLIDE)
    assert isinstance(scored, ScoredSlide) and type(scored) is type(in_process)
    np.testing.assert_array_equal(scored.flags, in_process.flags)
    assert scored.header.tile_size == in_process.tile_size == scored.tile_size
    assert len(scored.rois) == len(in_process.rois) > 0
    for got, want in zip(scored.rois, in_process.rois):
        assert got.polygon.equals_exact(want.polygon, 0.0)
        assert (got.tiles, got.max_score) == (want.tiles, pytest.approx(want.max_score, abs=1e-6))
        assert got.mean_score == pytest.approx(want.mean_score, abs=1e-6)


def test_summary_only_after_the_stream_is_exhausted(server):
    with ScoringClient(server.target, timeout=120) as client:
        with client.score_slide(SLIDE, chunk_size=5) as stream:
            with pytest.raises(RuntimeError, match="exhaust"):
                stream.summary  # noqa: B018 - the property raises before the stream is read
            first = next(iter(stream))
            assert first.offset == 0 and len(first) == 5
        # Leaving the block early cancelled the call; the client still works.
        assert client.get_model().model.name == "batch-test"


def test_score_tiles_matches_the_slide_scores(server, streamed, slides_dir):
    from wsi.slide import open_slide

    result, _ = streamed
    pick = np.array([0, 3, len(result.scores) - 1])
    with open_slide(slides_dir / SLIDE) as slide:
        tiles = np.stack([slide.read_region(int(x), int(y), 224, 224)
                          for x, y in result.coords[pick]])
    with ScoringClient(server.target, timeout=60) as client:
        scores = client.score_tiles(tiles, coords=result.coords[pick], batch_size=2)
        assert client.score_tiles(np.zeros((0, 224, 224, 3), np.uint8)).shape == (0,)
        with pytest.raises(ScoringError) as bad:  # wrong tile size: the server refuses it
            client.score_tiles(np.zeros((1, 100, 100, 3), np.uint8))
    np.testing.assert_allclose(scores, result.scores[pick], atol=1e-5)
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and bad.value.attempts == 1


def test_get_model_describes_the_bundle(server, bundle):
    from core.bundle import bundle_digest

    with ScoringClient(server.target) as client:
        model = client.get_model()
    assert model.model.name == "batch-test" and model.model.version == bundle_digest(bundle)
    assert model.head == "chowder" and model.feature_dim == 1024 and model.input_px == 224
    assert model.provider and model.manifest["format"] == "milroi-bundle/1"


@pytest.mark.parametrize("path, code, words", [
    ("broken.svs", grpc.StatusCode.INVALID_ARGUMENT, "broken.svs"),
    ("missing.svs", grpc.StatusCode.NOT_FOUND, "missing.svs"),
    ("../etc/passwd", grpc.StatusCode.PERMISSION_DENIED, ".."),
])
def test_errors_carry_code_and_message_and_are_not_retried(server, path, code, words, caplog):
    with ScoringClient(server.target, retries=3) as client, caplog.at_level(logging.WARNING):
        started = time.monotonic()
        with pytest.raises(ScoringError) as err:
            client.score_slide_all(path)
    assert err.value.code == code and words in err.value.message
    assert err.value.attempts == 1 and "retry" not in caplog.text
    assert time.monotonic() - started < 5  # no backoff sleeps
    assert code.name in str(err.value) and server.target in str(err.value)


def test_deadline_exceeded_mid_stream_surfaces_cleanly(server):
    """The deadline passes after big.tif's header and first scores, before its end."""
    with ScoringClient(server.target, retries=3) as client:
        # Time a full run first, so the deadline falls mid-stream however fast this machine is:
        # the header comes after the tissue mask (~1 % of the time), the end much later than
        # a sixth of this (cold, slower) run.
        timings = client.score_slide_all("big.tif", timeout=120).summary.timings
        deadline = max(timings.total_s / 6, 5 * timings.tissue_s)
        started = time.monotonic()
        stream = client.score_slide("big.tif", chunk_size=8, timeout=deadline)
        assert stream.header.tile_count > 100
        with pytest.raises(ScoringError) as err:
            for _ in stream:
                pass
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and err.value.attempts == 1
        assert stream.received < stream.header.tile_count  # a partial stream is never retried
        assert time.monotonic() - started < deadline + 2
        with pytest.raises(ScoringError) as err:  # expired before the header: same error
            client.score_slide_all(SLIDE, timeout=0.001)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and err.value.attempts == 1
    # The client's default deadline applies to every call; a per-call timeout overrides it.
    with ScoringClient(server.target, timeout=0.001) as client:
        with pytest.raises(ScoringError, match="DEADLINE_EXCEEDED"):
            client.score_slide_all(SLIDE)  # the tissue mask alone takes longer than 1 ms
        assert client.score_slide_all(SLIDE, timeout=120).summary.tile_count > 0


def test_unavailable_retries_with_backoff_then_gives_up(caplog):
    port = free_port()  # nothing listens there
    with ScoringClient(f"127.0.0.1:{port}", retries=2) as client, caplog.at_level(logging.WARNING):
        started = time.monotonic()
        with pytest.raises(ScoringError) as err:
            client.get_model()
        elapsed = time.monotonic() - started
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.attempts == 3
    assert caplog.text.count("retry") == 2
    assert elapsed >= 0.5 * 0.8 + 1.0 * 0.8  # two backoff pauses, 0.5 s then 1 s (+-20 %)
    with ScoringClient(f"127.0.0.1:{port}") as client, pytest.raises(ScoringError) as err:
        client.wait_until_serving(timeout=0.5)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_client_started_before_the_server_retries_until_it_serves(bundle, slides_dir, tmp_path,
                                                                  caplog):
    """A TLS server that wants a token starts after the client's first attempt: the stream is
    retried while nothing listens and while the model loads (UNAVAILABLE), then succeeds."""
    port = free_port()
    (tmp_path / "token").write_text("s3cret\n")
    cert, key = write_self_signed_cert(tmp_path)
    outcome = {}

    def score():
        with ScoringClient(f"127.0.0.1:{port}", token="s3cret", tls_ca=cert, retries=7,
                           timeout=150) as client:
            try:
                outcome["result"] = client.score_slide_all(SLIDE)
            except ScoringError as exc:
                outcome["error"] = exc

    with caplog.at_level(logging.WARNING, logger="serving.client"):
        worker = threading.Thread(target=score)
        worker.start()
        time.sleep(0.3)
        srv = ServerProcess(bundle, [slides_dir], tmp_path / "server.log", port=port,
                            token_file=tmp_path / "token", tls=(cert, key))
        try:
            worker.join(150)
            assert "error" not in outcome, outcome
            assert outcome["result"].summary.tile_count > 0
            assert "retry 1/7" in caplog.text  # it did have to retry
            # The token is checked, and UNAUTHENTICATED is not retried.
            with ScoringClient(srv.target, tls_ca=cert, retries=3) as anonymous, \
                    pytest.raises(ScoringError) as err:
                anonymous.get_model()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and err.value.attempts == 1
            # A plaintext client cannot talk to the TLS port.
            with ScoringClient(srv.target, token="s3cret", retries=0) as plain, \
                    pytest.raises(ScoringError) as err:
                plain.get_model(timeout=10)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
        finally:
            srv.stop()


def test_client_cli_score_and_model(server, slides_dir, tmp_path, capsys):
    out = tmp_path / "one"
    code = serve_main(["client", "score", SLIDE, "--server", server.target, "--json",
                       "--out", str(out), "--local-slide", str(slides_dir / SLIDE),
                       "--chunk-size", "16"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["header"]["slide_path"] == SLIDE
    assert printed["summary"]["tile_count"] == printed["header"]["tile_count"] > 0
    assert len(list(out.iterdir())) >= 4  # the per-slide outputs
    assert serve_main(["client", "score", SLIDE, "--server", server.target]) == 0
    assert "synth_tumor.tif:" in capsys.readouterr().out
    assert serve_main(["client", "model", "--server", server.target]) == 0
    assert "batch-test" in capsys.readouterr().out
    # A bad slide: exit 1, one line naming the code and the file.
    assert serve_main(["client", "score", "broken.svs", "--server", server.target]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "INVALID_ARGUMENT" in err[0] and "broken.svs" in err[0]
    # --out without the slide locally fails before any call.
    assert serve_main(["client", "score", "nowhere.svs", "--server", server.target,
                       "--out", str(tmp_path / "x")]) == 1
    assert "--local-slide" in capsys.readouterr().err


def test_client_and_batch_import_neither_torch_nor_onnxruntime():
    """The client side stays light: no torch (never in serving), no onnxruntime until --model."""
    import subprocess
    import sys

    code = ("import sys, serving.client, serving.batch; "
            "print(sorted(m for m in ('torch', 'training', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
