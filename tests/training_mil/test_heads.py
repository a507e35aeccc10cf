"""MIL heads: the streaming pooling gives the training slide score, outputs in range, ONNX export."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from core.errors import MilroiError
from training.heads import HEAD_KINDS, attention_pool, build_head, extremes_pool

D = 12


def _head(kind, **extra):
    torch.manual_seed(0)
    head = build_head({"kind": kind, "in_dim": D, **extra})
    return head.eval()


def _streamed_pool(head, features, chunk):
    """What the server does: run patch_module chunk by chunk and keep only a small state."""
    outputs = [head.patch_module()(features[i:i + chunk]) for i in range(0, len(features), chunk)]
    if head.pooling["kind"] == "extremes":
        k = head.pooling["k"]
        top = torch.empty(0)
        bottom = torch.empty(0)
        for _, logits in outputs:
            top = torch.topk(torch.cat([top, logits]), min(k, len(top) + len(logits))).values
            bottom = torch.topk(torch.cat([bottom, logits]), min(k, len(bottom) + len(logits)),
                                largest=False).values
        n = len(features)
        if n < k:  # N < k: the whole bag fits in the state; tile it as the contract says
            return extremes_pool(top, k)[None]
        return torch.cat([top, bottom.flip(0)])[None]
    # attention: online softmax with a running log-sum-exp and a rescaled weighted sum
    running_max, denom, acc = -torch.inf, torch.tensor(0.0), None
    for _, _, att, emb in outputs:
        new_max = max(running_max, float(att.max()))
        scale = torch.exp(torch.tensor(running_max - new_max)) if acc is not None else 0.0
        w = torch.exp(att - new_max)
        denom = denom * scale + w.sum()
        acc = (acc * scale if acc is not None else 0.0) + w @ emb
        running_max = new_max
    return (acc / denom)[None]


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("n,chunk", [(1, 1), (3, 2), (40, 7), (257, 64)])
def test_streaming_pooling_gives_training_slide_logit(kind, n, chunk):
    head = _head(kind)
    features = torch.randn(n, D, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        out = head(features)
        streamed = head.aggregator_module()(_streamed_pool(head, features, chunk))
    assert streamed.shape == (1,)
    assert torch.allclose(streamed[0], out.slide_logit, atol=1e-5)
    # chunk order must not matter either
    with torch.no_grad():
        reversed_ = head.aggregator_module()(_streamed_pool(head, features.flip(0), chunk))
    assert torch.allclose(reversed_[0], out.slide_logit, atol=1e-5)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_outputs_shapes_and_ranges(kind):
    head = _head(kind)
    features = torch.randn(50, D) * 30  # large inputs: scores must still be probabilities
    with torch.no_grad():
        out = head(features)
    assert out.slide_logit.shape == ()
    assert out.patch_logits.shape == out.patch_scores.shape == (50,)
    assert torch.all((out.patch_scores >= 0) & (out.patch_scores <= 1))
    assert torch.allclose(out.patch_scores, torch.sigmoid(out.patch_logits))
    if kind == "abmil":
        assert out.attention.shape == (50,) and out.embeddings.shape[0] == 50
        assert head.pooling == {"kind": "attention"}
        assert len(head.patch_output_names) == 4
    else:
        assert out.attention is None
        assert head.pooling == {"kind": "extremes", "k": 5}
        assert head.patch_output_names == ("patch_scores", "patch_logits")


def test_extremes_pool_order_and_padding():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.0, 1.0, -2.0])
    assert extremes_pool(logits, 2).tolist() == [3.0, 2.0, -1.0, -2.0]
    # N < k: tiled until k, each group descending
    assert extremes_pool(torch.tensor([1.0, 3.0, 2.0]), 5).tolist() == [3, 3, 2, 2, 1, 3, 2, 2, 1, 1]
    with pytest.raises(MilroiError, match="empty bag"):
        extremes_pool(torch.empty(0), 5)


def test_attention_pool_is_softmax_weighted_mean():
    att = torch.tensor([0.0, 0.0, float(np.log(2.0))])
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert torch.allclose(attention_pool(att, emb), torch.tensor([0.75, 0.75]))


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_config_rebuilds_same_architecture(kind):
    head = _head(kind, dropout=0.1)
    clone = build_head(head.config)
    assert clone.config == head.config
    clone.load_state_dict(head.state_dict())  # strict: same parameter names and shapes
    clone.eval()
    x = torch.randn(9, D)
    with torch.no_grad():
        assert torch.equal(clone(x).slide_logit, head(x).slide_logit)


def test_bad_configs_are_clear_errors():
    with pytest.raises(MilroiError, match="unknown MIL head 'gnn'"):
        build_head({"kind": "gnn", "in_dim": 4})
    with pytest.raises(MilroiError, match="in_dim"):
        build_head({"kind": "chowder"})
    with pytest.raises(MilroiError, match="unknown chowder head option"):
        build_head({"kind": "chowder", "in_dim": 4, "heads": 3})


def test_abmil_instance_loss_uses_pseudo_labels():
    head = _head("abmil", instance_b=2, instance_weight=1.0)
    x = torch.randn(10, D)
    out = head(x)
    # the instance term of a tumour bag must pull the most attended patches up
    loss = head.loss(out, 1.0)
    loss.backward()
    assert loss.item() > 0 and head.patch_module().instance.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_onnx_export_of_patch_and_aggregator_modules(kind, tmp_path):
    head = _head(kind)
    x = torch.randn(13, D)
    with torch.no_grad():
        expected = head(x)
    patch_path, agg_path = tmp_path / "head.onnx", tmp_path / "aggregator.onnx"
    n = torch.export.Dim("n", min=1)
    torch.onnx.export(head.patch_module(), (x,), patch_path, input_names=["features"],
                      output_names=list(head.patch_output_names), dynamic_shapes=({0: n},),
                      dynamo=True, verbose=False)
    pooled = head.pool(head.patch_module()(x)).detach()
    torch.onnx.export(head.aggregator_module(), (pooled,), agg_path, input_names=["pooled"],
                      output_names=["slide_logit"], dynamo=True, verbose=False)
    patch_sess = ort.InferenceSession(patch_path, providers=["CPUExecutionProvider"])
    agg_sess = ort.InferenceSession(agg_path, providers=["CPUExecutionProvider"])
    # another N than the one traced: the patch graph has a dynamic first axis
    x2 = torch.randn(31, D)
    outs = dict(zip(head.patch_output_names, patch_sess.run(None, {"features": x2.numpy()})))
    with torch.no_grad():
        ref = head(x2)
    np.testing.assert_allclose(outs["patch_scores"], ref.patch_scores.numpy(), atol=1e-5)
    (slide,) = agg_sess.run(None, {"pooled": pooled.numpy()})
    np.testing.assert_allclose(slide, [expected.slide_logit.item()], atol=1e-5)
