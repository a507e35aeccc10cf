"""The CPU backend chosen by measurement (core.inference_backends) inside the engine.

Real graphs of a real bundle (ResNet-50 random init + CHOWDER), onnxruntime and OpenVINO as
installed by the dev extra; each test measures in a cache folder of its own.
"""
import json
import shutil

import numpy as np
import pytest

from core.errors import ConfigError, MilroiError
from core.inference_backends import (
    MIN_COSINE,
    ChoiceCache,
    candidates,
    he_like_tiles,
    openvino_capabilities,
)
from serving.engine import Engine

pytestmark = pytest.mark.skipif(openvino_capabilities() is None, reason="openvino not installed")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MILROI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiles():
    return he_like_tiles(6, 224, seed=5)


def _fp32_features(bundle, tiles):
    with Engine(bundle, provider="cpu", backend="onnxruntime", precision="fp32") as engine:
        return engine.inference.features(tiles)


def test_auto_times_every_candidate_and_keeps_the_fastest_that_passes(chowder_bundle, cache_dir):
    with Engine(chowder_bundle, provider="cpu", batch_size=8) as engine:
        table = engine.describe()["backend_choice"]
        backend, precision = engine.backend, engine.precision
    expected = {(c.backend, c.precision) for c in candidates({"fp32": chowder_bundle / "backbone.onnx"})}
    assert {(r["backend"], r["precision"]) for r in table} == expected
    assert ("onnxruntime", "fp32") in expected and ("openvino", "fp32") in expected
    passing = [r for r in table if r["passes_gate"]]
    fastest = max(passing, key=lambda r: r["tiles_per_s"])
    assert (backend, precision) == (fastest["backend"], fastest["precision"])
    assert all(r["cosine_min"] >= MIN_COSINE for r in passing)
    # The choice is cached for this bundle on this host: the next load does not time again.
    entries = json.loads((cache_dir / "backend_choice.json").read_text())
    assert [e["chosen"] for e in entries.values()] == [[backend, precision]]
    with Engine(chowder_bundle, provider="cpu", batch_size=8) as again:
        assert (again.backend, again.precision) == (backend, precision)
        assert again.choice_table == table   # the cached measurement, not a new one


def test_explicit_openvino_fp32_is_exact_fp32(chowder_bundle, cache_dir, tiles):
    reference = _fp32_features(chowder_bundle, tiles)
    with Engine(chowder_bundle, provider="cpu", backend="openvino", precision="fp32") as engine:
        assert (engine.backend, engine.precision, engine.choice_table) == ("openvino", "fp32", [])
        features = engine.inference.features(tiles)
    # f32 inference, not bf16: the features agree to float rounding, not to bf16's 3 digits.
    np.testing.assert_allclose(features, reference, rtol=1e-3, atol=1e-4)
    assert not (cache_dir / "backend_choice.json").exists()   # nothing was timed


@pytest.mark.skipif("BF16" not in (openvino_capabilities() or ()), reason="no native bf16")
def test_explicit_bf16_runs_bf16_and_stays_within_the_gate(chowder_bundle, cache_dir, tiles):
    reference = _fp32_features(chowder_bundle, tiles)
    with Engine(chowder_bundle, provider="cpu", backend="openvino", precision="bf16") as engine:
        features = engine.inference.features(tiles)
    cosine = (features * reference).sum(1) / (np.linalg.norm(features, axis=1)
                                              * np.linalg.norm(reference, axis=1))
    assert cosine.min() >= MIN_COSINE
    assert np.abs(features - reference).max() > 1e-4   # really bf16, not silently f32


def test_precisions_a_cpu_backend_cannot_run_are_errors(chowder_bundle, cache_dir):
    with pytest.raises(ConfigError, match="fp16"):
        Engine(chowder_bundle, provider="cpu", backend="onnxruntime", precision="fp16")
    with pytest.raises(ConfigError, match="GPU|cpu|CPU"):
        Engine(chowder_bundle, provider="cuda", backend="openvino")
    with pytest.raises(MilroiError, match="int8"):   # this bundle was exported without --int8
        Engine(chowder_bundle, provider="cpu", precision="int8")
    with pytest.raises(ConfigError, match="backend"):
        Engine(chowder_bundle, provider="cpu", backend="tvm")


def test_a_candidate_that_fails_the_gate_is_never_chosen(chowder_bundle, tmp_path, cache_dir):
    """An 'int8' graph that computes other features (a differently seeded ResNet-50) is timed,
    fails the agreement gate and is not kept, however fast it is."""
    import torch

    from training.backbone import build_backbone
    from training.export import export_backbone

    bundle = tmp_path / "bundle"
    shutil.copytree(chowder_bundle, bundle)
    torch.manual_seed(1)
    export_backbone(build_backbone("none", layer="pool", seed=1), bundle / "backbone_int8.onnx")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["backbone_int8"] = "backbone_int8.onnx"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with Engine(bundle, provider="cpu", backend="onnxruntime", batch_size=8) as engine:
        rows = {r["precision"]: r for r in engine.choice_table}
        assert set(rows) == {"fp32", "int8"}
        assert not rows["int8"]["passes_gate"] and rows["int8"]["cosine_min"] < MIN_COSINE
        assert engine.precision == "fp32"


def test_cache_survives_a_corrupt_file(tmp_path):
    cache = ChoiceCache(tmp_path / "backend_choice.json")
    cache.path.write_text("{not json")
    assert cache.get("k") is None
    cache.put("k", {"chosen": ["onnxruntime", "fp32"]})
    assert cache.get("k") == {"chosen": ["onnxruntime", "fp32"]}


def test_measure_keeps_layout_variants_apart(chowder_bundle):
    """The GPU path times fp16 and fp16 NHWC of one graph through its own opener (CUDA sessions);
    here two onnxruntime CPU sessions stand in for the two layouts, to check the bookkeeping:
    one row and one runner per layout, each compared with the fp32 reference."""
    from core.inference_backends import Candidate, OnnxruntimeFeatures, measure, row_label

    graph = chowder_bundle / "backbone.onnx"
    options = [Candidate("onnxruntime", "fp32", graph), Candidate("onnxruntime", "fp16", graph),
               Candidate("onnxruntime", "fp16", graph, "nhwc")]
    opened = []
    rows, runners = measure(options, graph, he_like_tiles(2, 224), threads=1, rounds=1,
                            open_candidate=lambda c: opened.append(c.label)
                            or OnnxruntimeFeatures(c.graph, 1))
    assert opened == ["onnxruntime fp32", "onnxruntime fp16", "onnxruntime fp16 nhwc"]
    assert [row_label(r) for r in rows] == opened and set(runners) == set(opened)
    assert rows[2]["layout"] == "nhwc" and "layout" not in rows[1]
    assert all(r["passes_gate"] and len(r["seconds"]) == 1 for r in rows)
