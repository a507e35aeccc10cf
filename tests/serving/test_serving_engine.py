"""onnxruntime engine: provider choice, outputs, dynamic batching across concurrent requests."""
import threading

import numpy as np
import onnxruntime as ort
import pytest

from core.bundle import BundleManifest, bundle_digest
from core.errors import BundleError, MilroiError
from serving.aggregate import make_state, slide_score
from serving.engine import CPU, Engine
from training.export import synthetic_parity_tiles


@pytest.fixture(scope="module")
def tiles():
    return synthetic_parity_tiles(n=12, seed=3)


def _reference(bundle, tiles):
    """The bundle run directly with plain onnxruntime sessions."""
    opts = dict(providers=["CPUExecutionProvider"])
    backbone = ort.InferenceSession(str(bundle / "backbone.onnx"), **opts)
    head = ort.InferenceSession(str(bundle / "head.onnx"), **opts)
    features = backbone.run(["features"], {"tiles": tiles})[0]
    return dict(zip([o.name for o in head.get_outputs()], head.run(None, {"features": features})))


def test_auto_provider_reports_what_really_runs(chowder_bundle):
    with Engine(chowder_bundle, provider="auto", backend="onnxruntime", precision="fp32",
                batch_size=4) as engine:
        assert engine.provider in engine.backbone.get_providers()
        assert engine.providers == engine.backbone.get_providers()
        if engine.provider == CPU:   # this machine has no usable CUDA: the fallback was taken
            assert engine.describe()["provider"] == "cpu" and not engine.on_gpu


def test_explicit_gpu_provider_that_does_not_initialise_is_an_error(chowder_bundle):
    probe = Engine(chowder_bundle, provider="auto", batch_size=1)
    probe.close()
    if probe.provider != CPU:
        pytest.skip("a GPU provider initialises on this machine")
    with pytest.raises(MilroiError, match="cuda"):
        Engine(chowder_bundle, provider="cuda")


def test_scores_equal_plain_onnxruntime(chowder_bundle, tiles):
    expected = _reference(chowder_bundle, tiles)
    # Exact parity needs the exact runtime: onnxruntime fp32 (auto may pick bf16 or int8).
    with Engine(chowder_bundle, provider="cpu", backend="onnxruntime", precision="fp32",
                batch_size=5) as engine:
        got = engine.score(tiles)     # 12 tiles: split into runs of 5, 5, 2
        assert engine.stats.runs == 3 and engine.stats.tiles == 12
    assert set(got) >= {"patch_scores", "patch_logits"}
    np.testing.assert_allclose(got["patch_scores"], expected["patch_scores"], atol=1e-6)
    np.testing.assert_allclose(got["patch_logits"], expected["patch_logits"], atol=1e-5)
    assert ((got["patch_scores"] >= 0) & (got["patch_scores"] <= 1)).all()


def test_slide_logit_through_aggregator_equals_torch(chowder_export, tiles):
    import torch

    bundle, backbone, head = chowder_export
    with Engine(bundle, provider="cpu", backend="onnxruntime", precision="fp32",
                batch_size=8) as engine:
        state = make_state(engine.pooling)
        for part in np.array_split(tiles, 3):
            state.update(engine.score(part))
        logit, probability = slide_score(engine, state)
    with torch.inference_mode():
        reference = head(backbone(torch.from_numpy(tiles))).slide_logit.item()
    assert logit == pytest.approx(reference, abs=1e-4)
    assert probability == pytest.approx(1 / (1 + np.exp(-reference)), abs=1e-5)


def test_concurrent_requests_share_batches(chowder_bundle, tiles):
    """Four clients submitting 4 tiles each at once run as one batch of 16, not four of 4."""
    with Engine(chowder_bundle, provider="cpu", batch_size=16, max_wait_s=0.5) as engine:
        expected = [engine.score(tiles[i:i + 4])["patch_scores"] for i in range(0, 12, 4)]
        runs_before = engine.stats.runs
        barrier = threading.Barrier(4)
        results = [None] * 4

        def client(i):
            barrier.wait()
            results[i] = engine.score(tiles[(i % 3) * 4:(i % 3) * 4 + 4])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert engine.stats.runs - runs_before == 1
        assert engine.stats.merged_runs == 1
        for i, result in enumerate(results):   # every client got its own tiles' scores back
            np.testing.assert_allclose(result["patch_scores"], expected[i % 3], atol=1e-6)


def test_lone_full_request_does_not_wait(chowder_bundle, tiles):
    import time

    with Engine(chowder_bundle, provider="cpu", batch_size=4, max_wait_s=30) as engine:
        started = time.perf_counter()
        engine.score(tiles[:4])
        assert time.perf_counter() - started < 20   # full batch: no 30 s wait for company


def test_bad_tiles_and_closed_engine(chowder_bundle):
    engine = Engine(chowder_bundle, provider="cpu", batch_size=4)
    with pytest.raises(MilroiError, match="uint8"):
        engine.submit(np.zeros((2, 224, 224, 3), np.float32))
    with pytest.raises(MilroiError, match="224"):
        engine.submit(np.zeros((2, 100, 100, 3), np.uint8))
    engine.close()
    with pytest.raises(MilroiError, match="closed"):
        engine.submit(np.zeros((1, 224, 224, 3), np.uint8))


def test_bundle_checks(chowder_bundle, tmp_path):
    assert BundleManifest.read(chowder_bundle).to_dict()["format"] == "milroi-bundle/1"
    digest = bundle_digest(chowder_bundle)
    assert len(digest) == 12 and digest == bundle_digest(chowder_bundle)
    with pytest.raises(BundleError, match="no manifest.json"):
        BundleManifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "milroi-bundle/1"}')
    with pytest.raises(BundleError, match="lacks"):
        BundleManifest.read(tmp_path)
    with pytest.raises(MilroiError, match="unknown provider"):
        Engine(chowder_bundle, provider="rocm")
