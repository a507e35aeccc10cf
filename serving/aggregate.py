"""Streaming slide-level pooling: the slide score without keeping the N x D features of a slide.

The head's patch outputs arrive batch by batch; a small state per slide keeps what the pooling of
`manifest["pooling"]` (docs/INTERFACES.md) needs, and `pooled()` gives the aggregator's input:

- `ExtremesState` (Chowder, `{"kind": "extremes", "k": k}`): the k highest and the k lowest patch
  logits seen so far (2k floats). `pooled()` = the top k then the bottom k, each in descending
  order; with fewer than k patches the logits are repeated, exactly as `training.heads.extremes_pool`.
- `AttentionState` (ABMIL, `{"kind": "attention"}`): softmax(attention)-weighted mean of the
  embeddings with a running log-sum-exp: max attention m, sum of exp(a - m), and the exp(a - m)-
  weighted sum of embeddings (H floats), rescaled whenever m grows. Exact, order independent,
  and overflow-free however large the attention logits.

Both depend only on the multiset of patches, so batches may arrive in any order.
`slide_score(engine, state)` runs aggregator.onnx on it.
"""
from __future__ import annotations

import math

import numpy as np

from core.errors import ConfigError, RequestError


class ExtremesState:
    """Top-k and bottom-k patch logits of a slide so far."""

    def __init__(self, k: int):
        if k < 1:
            raise ConfigError(f"extremes pooling needs k >= 1, got {k}")
        self.k = int(k)
        self.count = 0
        self._top = np.empty(0, np.float32)      # up to k largest, unordered
        self._bottom = np.empty(0, np.float32)   # up to k smallest, unordered

    def update(self, outputs: dict[str, np.ndarray]) -> None:
        logits = np.asarray(outputs["patch_logits"], np.float32).reshape(-1)
        if logits.size == 0:
            return
        self.count += logits.size
        top = np.concatenate([self._top, logits])
        bottom = np.concatenate([self._bottom, logits])
        k = self.k
        # np.partition: O(n) selection of the k extremes, no full sort per batch.
        self._top = top if top.size <= k else np.partition(top, top.size - k)[-k:]
        self._bottom = bottom if bottom.size <= k else np.partition(bottom, k - 1)[:k]

    def pooled(self) -> np.ndarray:
        """float32 [1, 2k]: the k highest then the k lowest logits, each descending."""
        if self.count == 0:
            raise RequestError("cannot pool an empty bag (a slide without tissue tiles)")
        k = self.k
        top, bottom = self._top, self._bottom
        if self.count < k:   # every logit is in both; repeat them as the torch pooling does
            reps = math.ceil(k / self.count)
            top = bottom = np.tile(top, reps)
        top = np.sort(top)[::-1][:k]
        bottom = np.sort(bottom)[:k][::-1]
        return np.concatenate([top, bottom]).astype(np.float32)[None]


class AttentionState:
    """Online softmax(attention)-weighted sum of patch embeddings (running log-sum-exp)."""

    def __init__(self):
        self.count = 0
        self._max = -np.inf
        self._weight = 0.0          # sum of exp(a - max)
        self._sum = None            # sum of exp(a - max) * embedding, float64 [H]

    def update(self, outputs: dict[str, np.ndarray]) -> None:
        attention = np.asarray(outputs["attention"], np.float64).reshape(-1)
        embeddings = np.asarray(outputs["embeddings"], np.float64)
        if attention.size == 0:
            return
        if embeddings.shape[0] != attention.size:
            raise RequestError(f"attention has {attention.size} patches but embeddings {embeddings.shape[0]}")
        self.count += attention.size
        new_max = max(self._max, float(attention.max()))
        scale = math.exp(self._max - new_max) if self._sum is not None else 0.0
        weights = np.exp(attention - new_max)
        batch_sum = weights @ embeddings
        self._sum = batch_sum if self._sum is None else self._sum * scale + batch_sum
        self._weight = self._weight * scale + float(weights.sum())
        self._max = new_max

    def pooled(self) -> np.ndarray:
        """float32 [1, H]: the attention-weighted mean embedding."""
        if self.count == 0:
            raise RequestError("cannot pool an empty bag (a slide without tissue tiles)")
        return (self._sum / self._weight).astype(np.float32)[None]


def make_state(pooling: dict) -> ExtremesState | AttentionState:
    """The streaming state for a manifest's `pooling` entry."""
    kind = pooling.get("kind")
    if kind == "extremes":
        return ExtremesState(int(pooling["k"]))
    if kind == "attention":
        return AttentionState()
    raise ConfigError(f"unknown pooling {pooling!r}")


def sigmoid(x: float) -> float:
    # split by sign so that neither branch overflows
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def slide_score(engine, state) -> tuple[float, float]:
    """(slide logit, slide probability) of a state through the bundle's aggregator.onnx."""
    logit = engine.slide_logit(state.pooled())
    return logit, sigmoid(logit)
