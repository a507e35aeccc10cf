"""Streaming pooling (serving.aggregate) equals the torch heads' whole-bag pooling."""
import numpy as np
import pytest
import torch

from core.errors import MilroiError
from serving.aggregate import AttentionState, ExtremesState, make_state, sigmoid
from training.heads import attention_pool, build_head, extremes_pool


def _feed(state, arrays, chunk_sizes, rng):
    """Update `state` with the rows of `arrays` in shuffled chunks of random sizes."""
    n = len(next(iter(arrays.values())))
    order = rng.permutation(n)
    start = 0
    while start < n:
        stop = min(n, start + int(rng.choice(chunk_sizes)))
        state.update({k: v[order[start:stop]] for k, v in arrays.items()})
        start = stop
    return state


@pytest.mark.parametrize("n", [1, 3, 5, 7, 10, 250])
def test_extremes_state_matches_torch_pooling(n):
    rng = np.random.default_rng(n)
    logits = rng.normal(0, 3, n).astype(np.float32)
    logits[rng.integers(0, n, n // 3)] = logits[0]   # ties too
    state = _feed(ExtremesState(5), {"patch_logits": logits}, [1, 2, 7, 64], rng)
    expected = extremes_pool(torch.from_numpy(logits), 5).numpy()
    assert state.count == n
    np.testing.assert_array_equal(state.pooled()[0], expected)


@pytest.mark.parametrize("n,scale", [(1, 1.0), (9, 1.0), (300, 1.0), (300, 400.0)])
def test_attention_state_matches_softmax_pooling(n, scale):
    rng = np.random.default_rng(n)
    attention = (rng.normal(0, 1, n) * scale).astype(np.float32)   # scale 400: exp overflows
    embeddings = rng.normal(0, 1, (n, 16)).astype(np.float32)
    state = _feed(AttentionState(), {"attention": attention, "embeddings": embeddings},
                  [1, 3, 64], rng)
    expected = attention_pool(torch.from_numpy(attention).double(),
                              torch.from_numpy(embeddings).double()).numpy()
    assert np.isfinite(state.pooled()).all()
    np.testing.assert_allclose(state.pooled()[0], expected, rtol=1e-5, atol=1e-6)


def test_streaming_slide_logit_equals_torch_head_forward():
    """Patch outputs of a real abmil head in chunks -> state -> its aggregator == head.forward."""
    torch.manual_seed(0)
    for kind in ("chowder", "abmil"):
        head = build_head({"kind": kind, "in_dim": 32}).eval()
        features = torch.randn(57, 32)
        with torch.inference_mode():
            reference = head(features).slide_logit
            outputs = [o.numpy() for o in head.patch_module()(features)]
        state = make_state(head.pooling)
        named = dict(zip(head.patch_output_names, outputs))
        _feed(state, named, [4, 16], np.random.default_rng(0))
        with torch.inference_mode():
            logit = head.aggregator_module()(torch.from_numpy(state.pooled())).item()
        assert logit == pytest.approx(float(reference), abs=1e-5), kind


def test_empty_state_and_bad_pooling_are_clear_errors():
    with pytest.raises(MilroiError, match="empty bag"):
        ExtremesState(3).pooled()
    with pytest.raises(MilroiError, match="empty bag"):
        AttentionState().pooled()
    with pytest.raises(MilroiError, match="unknown pooling"):
        make_state({"kind": "max"})


def test_sigmoid_is_stable():
    assert sigmoid(0.0) == 0.5
    assert sigmoid(-1000.0) == 0.0 and sigmoid(1000.0) == 1.0
