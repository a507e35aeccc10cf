"""export_bundle: ONNX graphs of docs/INTERFACES.md, checker, dynamic batch, parity on real tiles."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from core.errors import MilroiError
from training.export import FILES, ParityError, check_parity, export_bundle
from training.heads import build_head


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_bundle_files_and_manifest(chowder_bundle):
    out, head = chowder_bundle
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES.values(), "manifest.json"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert "level" not in manifest   # the input is stated in um/px; the level is per slide
    for key in ("format", "name", "head", "tile_size", "target_mpp", "feature_dim",
                "backbone_layer", "weights", "pooling", "slide_threshold", "roi_threshold",
                "min_tissue", "tissue", "files", "fingerprint", "metrics", "run_id", "versions"):
        assert key in manifest, key
    assert manifest["format"] == "milroi-bundle/1"
    assert manifest["name"] == "test-chowder" and manifest["slide_threshold"] == 0.4
    assert manifest["head"] == "chowder" and manifest["pooling"] == {"kind": "extremes", "k": 3}
    assert manifest["feature_dim"] == 1024 and manifest["backbone_layer"] == "layer3"
    assert manifest["weights"] == "none" and manifest["weights_seed"] == 0
    assert manifest["versions"]["torch"] == torch.__version__
    assert build_head(manifest["head_config"]).config == head.config


def test_graphs_pass_checker_with_contract_io(chowder_bundle):
    out, _ = chowder_bundle
    for name in FILES.values():
        onnx.checker.check_model(str(out / name), full_check=True)
    bb = _session(out / "backbone.onnx")
    (tiles,) = bb.get_inputs()
    assert (tiles.name, tiles.type) == ("tiles", "tensor(uint8)")
    assert tiles.shape[1:] == [224, 224, 3] and isinstance(tiles.shape[0], str)  # dynamic N
    assert [o.name for o in bb.get_outputs()] == ["features"]
    head = _session(out / "head.onnx")
    assert [o.name for o in head.get_outputs()] == ["patch_scores", "patch_logits"]
    agg = _session(out / "aggregator.onnx")
    assert agg.get_inputs()[0].shape == [1, 6] and agg.get_outputs()[0].name == "slide_logit"


@pytest.mark.parametrize("n", [1, 7])
def test_dynamic_batch_matches_torch_on_real_tiles(chowder_bundle, layer3_backbone, real_tiles, n):
    out, head = chowder_bundle
    tiles = np.concatenate([real_tiles, real_tiles])[:n]
    features = _session(out / "backbone.onnx").run(None, {"tiles": tiles})[0]
    scores, logits = _session(out / "head.onnx").run(None, {"features": features})
    with torch.inference_mode():
        ref = layer3_backbone(torch.from_numpy(tiles))
        ref_scores, ref_logits = head.patch_module()(ref)
    assert features.shape == (n, 1024) and features.dtype == np.float32
    assert np.abs(features - ref.numpy()).max() <= 1e-4
    assert scores.shape == (n,) and np.abs(scores - ref_scores.numpy()).max() <= 1e-5
    assert np.all((scores >= 0) & (scores <= 1))


def test_abmil_bundle_has_attention_outputs(tmp_path, layer3_backbone, real_tiles):
    head = build_head({"kind": "abmil", "in_dim": 1024, "hidden": [32], "attn_dim": 16}).eval()
    out = export_bundle(tmp_path / "abmil", layer3_backbone, head, parity_tiles=real_tiles[:3])
    sess = _session(out / "head.onnx")
    assert [o.name for o in sess.get_outputs()] == [
        "patch_scores", "patch_logits", "attention", "embeddings"]
    outputs = sess.run(None, {"features": np.random.default_rng(0).normal(
        size=(5, 1024)).astype(np.float32)})
    assert [o.shape for o in outputs] == [(5,), (5,), (5,), (5, 32)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pooling"] == {"kind": "attention"}
    assert _session(out / "aggregator.onnx").get_inputs()[0].shape == [1, 32]


def test_parity_failure_is_loud(chowder_bundle, layer3_backbone, real_tiles):
    """A head that differs from the exported one must be caught, not published."""
    out, head = chowder_bundle
    other = build_head(head.config).eval()
    with torch.no_grad():
        linear = [m for m in other.patch_module().modules() if isinstance(m, torch.nn.Linear)]
        linear[-1].bias += 1.0
    with pytest.raises(ParityError, match="patch_logits max abs diff"):
        check_parity(out, layer3_backbone, other, real_tiles[:2])


def test_refuses_mismatched_head_and_nonempty_folder(chowder_bundle, layer3_backbone):
    out, head = chowder_bundle
    with pytest.raises(MilroiError, match="not empty"):
        export_bundle(out, layer3_backbone, head)
    with pytest.raises(MilroiError, match="2048-d features"):
        export_bundle(out.parent / "x", layer3_backbone, build_head({"kind": "chowder",
                                                                     "in_dim": 2048}))
    assert not (out.parent / "x").exists()
