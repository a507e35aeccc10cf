"""The int8 backbone: built at export from real tissue tiles, loaded by the Engine with
precision int8, and close to fp32 on real tiles it was not calibrated on.

Calibration: tissue tiles of the real CMU-1-Small-Region.svs; check: tissue tiles of the real
TCGA-CR-7395 slide (another lab, JPEG 2000) and a wsi.synth slide scored end to end by the
serving pipeline. One ResNet-50 (random init, seed 0) + Chowder export per module (~40 s on 2
shared CPUs).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from serving.engine import BundleError, Engine
from serving.pipeline import SlideScorer
from training.quantize import (
    INT8_FILE,
    QuantizationError,
    calibration_tiles_from_slides,
    feature_agreement,
    quantize_backbone,
)

DATA = Path(__file__).resolve().parents[1] / "data"
CMU = DATA / "CMU-1-Small-Region.svs"
TCGA = DATA / "TCGA-CR-7395-01A-01-TS1.svs"
TCGA_MPP = 0.243   # none in its metadata: read as these tests always read it, level 0 as it is


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory) -> Path:
    import torch

    from training.backbone import build_backbone
    from training.export import export_bundle
    from training.heads import build_head

    backbone = build_backbone("none", layer="pool", seed=0)
    torch.manual_seed(0)
    head = build_head({"kind": "chowder", "in_dim": backbone.feature_dim}).eval()
    calibration = calibration_tiles_from_slides([CMU], n=40, seed=0)
    return export_bundle(tmp_path_factory.mktemp("int8") / "bundle", backbone, head,
                         int8_calibration=calibration)


@pytest.fixture(scope="module")
def tcga_tiles() -> np.ndarray:
    return calibration_tiles_from_slides([TCGA], n=16, seed=1, fallback_mpp=TCGA_MPP)


def test_export_writes_and_lists_the_int8_backbone(int8_bundle):
    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    assert manifest["files"]["backbone_int8"] == INT8_FILE
    assert (int8_bundle / INT8_FILE).is_file()
    # int8 weights: about a quarter of the fp32 graph (ResNet-50: ~95 MB -> ~25 MB)
    ratio = (int8_bundle / INT8_FILE).stat().st_size / (int8_bundle / "backbone.onnx").stat().st_size
    assert 0.15 < ratio < 0.4
    info = manifest["int8"]
    assert info["calibration"]["tiles"] == 32 and info["calibration"]["per_channel"]
    assert info["agreement"]["tiles"] == 8 and info["agreement"]["cosine_min"] >= 0.99


def test_int8_graph_is_really_quantised(int8_bundle):
    import onnx

    ops = {node.op_type for node in onnx.load(str(int8_bundle / INT8_FILE)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    initializers = onnx.load(str(int8_bundle / INT8_FILE)).graph.initializer
    int8_weights = [t for t in initializers if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 50   # every convolution of ResNet-50 (53) has int8 weights


def test_engine_int8_agrees_with_fp32_on_real_tiles(int8_bundle, tcga_tiles):
    with Engine(int8_bundle, provider="cpu", precision="int8", batch_size=8) as int8, \
            Engine(int8_bundle, provider="cpu", precision="fp32", batch_size=8) as fp32:
        assert int8.precision == "int8" and fp32.precision == "fp32"
        f8, f32 = int8.inference.features(tcga_tiles), fp32.inference.features(tcga_tiles)
        assert not np.array_equal(f8, f32)          # really another graph
        assert _cosine(f8, f32).min() >= 0.99
        s8, s32 = int8.score(tcga_tiles)["patch_scores"], fp32.score(tcga_tiles)["patch_scores"]
    assert s8.shape == s32.shape == (len(tcga_tiles),)
    assert np.abs(s8 - s32).max() < 0.05


def test_pipeline_scores_a_slide_with_int8(int8_bundle, tmp_path):
    from wsi.synth import write_synthetic_slide

    slide = tmp_path / "s.tif"
    write_synthetic_slide(slide, 2048, 2048, seed=3, tumor=True)
    summaries = {}
    for precision in ("fp32", "int8"):
        with Engine(int8_bundle, provider="cpu", precision=precision, batch_size=16) as engine:
            summaries[precision] = SlideScorer(engine, reader_workers=2).score_slide(slide)
    a, b = summaries["fp32"], summaries["int8"]
    assert a.tile_count == b.tile_count > 10
    np.testing.assert_array_equal(a.coords, b.coords)
    assert np.abs(a.scores - b.scores).max() < 0.05
    assert abs(a.slide_score - b.slide_score) < 0.05


def test_int8_without_int8_graph_is_a_clear_error(int8_bundle, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(int8_bundle, plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    del manifest["files"]["backbone_int8"]
    (plain / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="int8 needs an int8 backbone") as info:
        Engine(plain, provider="cpu", precision="int8")
    assert str(plain) in str(info.value)
    # listed but missing: named when the manifest is read
    (plain / INT8_FILE).unlink()
    manifest["files"]["backbone_int8"] = INT8_FILE
    (plain / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="backbone_int8 file 'backbone_int8.onnx' is missing"):
        Engine(plain, provider="cpu", precision="fp32")


def test_bad_calibration_input_is_rejected(int8_bundle, tmp_path):
    with pytest.raises(QuantizationError, match="uint8"):
        quantize_backbone(int8_bundle / "backbone.onnx", tmp_path / "q.onnx",
                          np.zeros((4, 224, 224, 3), np.float32))
    with pytest.raises(QuantizationError, match="failed"):
        (tmp_path / "junk.onnx").write_bytes(b"not an onnx graph")
        quantize_backbone(tmp_path / "junk.onnx", tmp_path / "q.onnx",
                          np.zeros((4, 224, 224, 3), np.uint8))


def test_a_badly_calibrated_graph_is_caught(int8_bundle, tcga_tiles, tmp_path):
    """Calibrating on blank white glass gives activation ranges far from tissue: the agreement
    check must see it (this is what makes the >= 0.99 check at export mean something)."""
    glass = np.full((8, 224, 224, 3), 245, np.uint8)
    bad = quantize_backbone(int8_bundle / "backbone.onnx", tmp_path / "bad.onnx", glass)
    good = feature_agreement(int8_bundle / "backbone.onnx", int8_bundle / INT8_FILE, tcga_tiles)
    worse = feature_agreement(int8_bundle / "backbone.onnx", bad, tcga_tiles)
    assert worse["cosine_min"] < good["cosine_min"]
    assert worse["max_abs_diff"] > good["max_abs_diff"]


@pytest.mark.slow
def test_cli_export_int8_registers_a_bundle_with_the_int8_graph(tmp_path, capsys):
    """`milroi-train export RUN --int8 --calibration-slide SLIDE`: the registered bundle has
    backbone_int8.onnx in its manifest and the Engine serves it with precision int8."""
    import torch
    from mlflow_testing import log_fit_run

    from training.cli import main as train_main
    from training.heads import build_head

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    torch.manual_seed(0)
    head = build_head({"kind": "chowder", "in_dim": 2048})
    run_id = log_fit_run(tracking_uri, head, slide_threshold=0.5, layer="pool",
                         experiment="bench-int8")
    out = tmp_path / "bundle"
    code = train_main(["export", run_id, "--name", "int8-model", "--tracking-uri", tracking_uri,
                       "--out", str(out), "--int8", "--calibration-slide", str(CMU)])
    assert code == 0
    assert "int8-model version 1" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["backbone_int8"] == INT8_FILE
    assert manifest["int8"]["agreement"]["cosine_min"] >= 0.99
    tiles = calibration_tiles_from_slides([TCGA], n=4, seed=2, fallback_mpp=TCGA_MPP)
    with Engine(out, provider="cpu", precision="int8", batch_size=4) as engine:
        scores = engine.score(tiles)["patch_scores"]
    assert scores.shape == (4,) and np.all((scores >= 0) & (scores <= 1))


def test_backend_benchmark_measures_each_backend_and_precision(int8_bundle, tcga_tiles):
    """benchmarks.bench_backends on the bundle's two graphs: every configuration runs, fp32 on
    OpenVINO is exact f32 (not the bf16 OpenVINO picks by itself), agreement is measured."""
    pytest.importorskip("openvino")
    from benchmarks.bench_backends import bare_rates, table_rows

    result = bare_rates(int8_bundle, tcga_tiles, batch_size=8, batches=1)
    rows = {(r["backend"], r["precision"]): r for r in result["rows"]}
    assert set(rows) == {("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"),
                         ("openvino", "bf16"), ("openvino", "int8")}
    assert rows[("onnxruntime", "fp32")]["cosine_min"] > 0.99999          # the reference itself
    assert rows[("openvino", "fp32")]["inference_precision"] == "f32"
    assert rows[("openvino", "fp32")]["cosine_min"] > 0.9999             # same numbers, other runtime
    assert rows[("onnxruntime", "int8")]["passes_gate"]                   # the export's own gate
    for key in [("openvino", "int8"), ("openvino", "bf16")]:
        assert "unavailable" in rows[key] or 0.5 < rows[key]["cosine_min"] <= 1.0001
    assert all(r["tiles_per_s"] > 0 for r in result["rows"] if "unavailable" not in r)
    assert len(table_rows(result)) == 5
