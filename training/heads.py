"""Multiple-instance learning heads: per-patch tumour scores and a slide score from slide labels.

Two heads, both built from a json-able config by `build_head(config)`:

- ``chowder``: CHOWDER, Courtiol et al. 2018, "Classification and disease localization in
  histopathology using only global labels: a weakly-supervised approach" (arXiv:1802.02212).
  A 1x1 convolution (a Linear D -> 1 on each patch's features) gives one logit per patch; the
  k highest and k lowest patch logits feed a small MLP that gives the slide logit.
- ``abmil``: gated attention MIL pooling, Ilse, Tomczak & Welling 2018, "Attention-based deep
  multiple instance learning" (ICML), with the instance-level clustering branch of CLAM-SB,
  Lu et al. 2021, "Data-efficient and weakly supervised computational pathology on whole-slide
  images" (Nat. Biomed. Eng.): an instance classifier on the embeddings is trained on pseudo
  labels of the most and least attended patches, so per-patch scores are calibrated
  probabilities rather than raw attention weights.

Every head splits into what the server runs per batch of patches (`patch_module`) and what it
runs once per slide on a small pooled state (`aggregator_module`), with the streaming pooling of
docs/INTERFACES.md in between (`MILHead.pool`). `forward` is written as exactly that
composition, so the slide score served from streamed patches equals the training slide score.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import ConfigError, RequestError

HEAD_KINDS = ("chowder", "abmil")


@dataclass
class MILOutput:
    """What a head says about one bag (slide) of N patches."""

    slide_logit: Tensor          # scalar (0-d) tensor
    patch_logits: Tensor         # [N]
    patch_scores: Tensor         # [N], sigmoid(patch_logits), tumour probability in [0, 1]
    attention: Tensor | None     # [N] attention logits (abmil) or None
    embeddings: Tensor | None = None  # [N, H] (abmil) or None


def extremes_pool(patch_logits: Tensor, k: int) -> Tensor:
    """The k highest then the k lowest patch logits, each group in descending order: [2k].

    When N < k the logits are repeated (tiled) until there are at least k of them, so each
    group is still k long and the result depends only on the multiset of logits, not their
    order (a streaming server can merge chunks in any order). Example, logits {3, 2, 1}, k=5:
    top [3, 3, 2, 2, 1], bottom [3, 2, 2, 1, 1].
    """
    n = patch_logits.shape[0]
    if n == 0:
        raise RequestError("cannot pool an empty bag (a slide without tissue tiles)")
    if n < k:
        patch_logits = patch_logits.repeat(math.ceil(k / n))
    top = torch.topk(patch_logits, k, largest=True, sorted=True).values
    bottom = torch.topk(patch_logits, k, largest=False, sorted=True).values.flip(0)
    return torch.cat([top, bottom])


def attention_pool(attention: Tensor, embeddings: Tensor) -> Tensor:
    """softmax(attention)-weighted sum of the embeddings: [N], [N, H] -> [H]."""
    if attention.shape[0] == 0:
        raise RequestError("cannot pool an empty bag (a slide without tissue tiles)")
    return torch.softmax(attention, dim=0) @ embeddings


class _Standardize(nn.Module):
    """(features - mean) / std with the training set's statistics, kept as buffers.

    ResNet-50 features (random-init ones especially) share a large common offset; without this
    the patch logits start far from 0 and their sigmoid saturates, which ties every patch score.
    Inside the patch module, so the exported head.onnx standardises exactly as training did.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, features: Tensor) -> Tensor:
        return (features - self.mean) / self.std


def _mlp(in_dim: int, hidden: list[int], out_dim: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class MILHead(nn.Module):
    """Base class: a config, a pooling description and the patch/aggregator split."""

    kind: str = ""
    defaults: dict[str, Any] = {}
    patch_output_names: tuple[str, ...] = ("patch_scores", "patch_logits")

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        unknown = set(config) - set(self.defaults) - {"kind", "in_dim"}
        if unknown:
            raise ConfigError(f"unknown {self.kind} head option(s): {sorted(unknown)}")
        if int(config.get("in_dim", 0)) <= 0:
            raise ConfigError(f"{self.kind} head needs a positive 'in_dim' (feature dimension)")
        self.config = {"kind": self.kind, "in_dim": int(config["in_dim"]),
                       **copy.deepcopy(self.defaults),
                       **{k: v for k, v in config.items() if k not in {"kind", "in_dim"}}}

    @property
    def pooling(self) -> dict[str, Any]:
        raise NotImplementedError

    def patch_module(self) -> nn.Module:
        """features [N, D] -> tuple of tensors named `patch_output_names` (ONNX-exportable)."""
        raise NotImplementedError

    def aggregator_module(self) -> nn.Module:
        """pooled [1, P] -> slide_logit [1] (ONNX-exportable)."""
        raise NotImplementedError

    def set_feature_stats(self, mean: Tensor, std: Tensor) -> None:
        """Standardise input features with these per-dimension training-set statistics."""
        norm = self.patch_module().norm
        norm.mean.copy_(torch.as_tensor(mean, dtype=norm.mean.dtype))
        norm.std.copy_(torch.clamp(torch.as_tensor(std, dtype=norm.std.dtype), min=1e-6))

    def pool(self, patch_outputs: tuple[Tensor, ...]) -> Tensor:
        """The streaming pooling of docs/INTERFACES.md on a whole bag: patch outputs -> [1, P]."""
        raise NotImplementedError

    def forward(self, features: Tensor) -> MILOutput:
        outputs = dict(zip(self.patch_output_names, self.patch_module()(features)))
        slide_logit = self.aggregator_module()(self.pool(tuple(outputs.values())))
        return MILOutput(slide_logit=slide_logit.reshape(()),
                         patch_logits=outputs["patch_logits"],
                         patch_scores=outputs["patch_scores"],
                         attention=outputs.get("attention"),
                         embeddings=outputs.get("embeddings"))

    def loss(self, output: MILOutput, label: float, pos_weight: float = 1.0) -> Tensor:
        """Slide-level BCE on the logit, positives weighted by `pos_weight` (class balance)."""
        target = torch.tensor(float(label), dtype=output.slide_logit.dtype)
        weight = torch.tensor(pos_weight if label >= 0.5 else 1.0, dtype=target.dtype)
        return weight * F.binary_cross_entropy_with_logits(output.slide_logit, target)


# ---------------------------------------------------------------------------------------------
# CHOWDER


class _ChowderPatches(nn.Module):
    def __init__(self, norm: nn.Module, scorer: nn.Module):
        super().__init__()
        self.norm, self.scorer = norm, scorer

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.scorer(self.norm(features)).squeeze(-1)
        return torch.sigmoid(logits), logits


class _Aggregator(nn.Module):
    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, pooled: Tensor) -> Tensor:
        return self.mlp(pooled).reshape(-1)


class ChowderHead(MILHead):
    """CHOWDER (Courtiol et al. 2018): patch scores by a 1x1 conv, min-max (top/bottom-k) pooling.

    Config: `in_dim` D, `k` (extremes kept on each side, 5 as in the paper's default range),
    `patch_hidden` (optional hidden widths before the per-patch score, [] = the paper's 1x1 conv),
    `mlp_hidden` (the paper uses [200, 100]), `dropout` (between hidden layers),
    `instance_weight`: weight of the max-instance loss that calibrates the patch scores.

    CHOWDER's MLP reads the patch logits only through their order statistics, so nothing ties
    the logits themselves to a probability: they can all sit at +100 on every slide and still
    separate slides. milroi serves sigmoid(patch logit) as a tumour probability, so it adds the
    standard MIL max-instance loss (as in MI-Net, Wang et al. 2018, and the max-instance stream of
    DSMIL, Li et al. 2021): BCE(max patch logit, slide label). A normal slide pushes every patch
    below 0.5, a tumour slide lifts at least one above it.
    """

    kind = "chowder"
    defaults = {"k": 5, "patch_hidden": [], "mlp_hidden": [200, 100], "dropout": 0.5,
                "instance_weight": 0.5}

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        c = self.config
        self.k = int(c["k"])
        if self.k < 1:
            raise ConfigError("chowder head needs k >= 1")
        # no dropout on the features themselves: the paper regularises the 1x1 conv with L2
        # (weight decay) and uses dropout in the MLP only
        self._patches = _ChowderPatches(_Standardize(c["in_dim"]),
                                        _mlp(c["in_dim"], list(c["patch_hidden"]), 1, c["dropout"]))
        self._aggregator = _Aggregator(_mlp(2 * self.k, list(c["mlp_hidden"]), 1, c["dropout"]))

    @property
    def pooling(self) -> dict[str, Any]:
        return {"kind": "extremes", "k": self.k}

    def patch_module(self) -> nn.Module:
        return self._patches

    def aggregator_module(self) -> nn.Module:
        return self._aggregator

    def pool(self, patch_outputs: tuple[Tensor, ...]) -> Tensor:
        return extremes_pool(patch_outputs[1], self.k)[None]

    def loss(self, output: MILOutput, label: float, pos_weight: float = 1.0) -> Tensor:
        w = float(self.config["instance_weight"])
        slide = super().loss(output, label, pos_weight)
        if w == 0:
            return slide
        target = torch.tensor(float(label), dtype=output.patch_logits.dtype)
        instance = F.binary_cross_entropy_with_logits(output.patch_logits.max(), target)
        return (1.0 - w) * slide + w * instance


# ---------------------------------------------------------------------------------------------
# Gated-attention MIL with a CLAM-SB instance branch


class _AbmilPatches(nn.Module):
    def __init__(self, norm: nn.Module, embed: nn.Module, attn_v: nn.Module, attn_u: nn.Module,
                 attn_w: nn.Module, instance: nn.Module):
        super().__init__()
        self.norm = norm
        self.embed, self.attn_v, self.attn_u, self.attn_w = embed, attn_v, attn_u, attn_w
        self.instance = instance

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        h = self.embed(self.norm(features))
        # gated attention (Ilse et al. 2018, eq. 9): w^T (tanh(V h) * sigm(U h))
        attention = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h)))
        logits = self.instance(h).squeeze(-1)
        return torch.sigmoid(logits), logits, attention.squeeze(-1), h


class AbmilHead(MILHead):
    """Gated attention MIL (Ilse et al. 2018) + CLAM-SB instance classifier (Lu et al. 2021).

    Config: `in_dim` D, `hidden` (embedding widths; the last one is H, CLAM uses [512]),
    `attn_dim` (gated attention width), `dropout`, `instance_b` (B most / least attended patches
    pseudo-labelled per slide, CLAM uses 8), `instance_weight` (weight of the instance loss in the
    total, CLAM uses 0.3 for the instance term).
    """

    kind = "abmil"
    defaults = {"hidden": [512], "attn_dim": 256, "dropout": 0.25, "instance_b": 8,
                "instance_weight": 0.3}
    patch_output_names = ("patch_scores", "patch_logits", "attention", "embeddings")

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        c = self.config
        hidden = list(c["hidden"])
        if not hidden:
            raise ConfigError("abmil head needs at least one embedding width in 'hidden'")
        layers: list[nn.Module] = []
        in_dim = c["in_dim"]
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(c["dropout"])]
            in_dim = width
        self._patches = _AbmilPatches(
            norm=_Standardize(c["in_dim"]), embed=nn.Sequential(*layers),
            attn_v=nn.Linear(in_dim, c["attn_dim"]), attn_u=nn.Linear(in_dim, c["attn_dim"]),
            attn_w=nn.Linear(c["attn_dim"], 1), instance=nn.Linear(in_dim, 1))
        self._aggregator = _Aggregator(nn.Linear(in_dim, 1))
        self.embedding_dim = in_dim

    @property
    def pooling(self) -> dict[str, Any]:
        return {"kind": "attention"}

    def patch_module(self) -> nn.Module:
        return self._patches

    def aggregator_module(self) -> nn.Module:
        return self._aggregator

    def pool(self, patch_outputs: tuple[Tensor, ...]) -> Tensor:
        return attention_pool(patch_outputs[2], patch_outputs[3])[None]

    def instance_loss(self, output: MILOutput, label: float) -> Tensor:
        """CLAM-SB instance loss on pseudo labels.

        Tumour slide: the B most attended patches are pseudo-positive, the B least attended
        pseudo-negative (CLAM's in-class branch). Normal slide: by the MIL assumption every patch
        is negative, so the B most attended and the B highest-scored patches are pushed to 0.
        """
        n = output.patch_logits.shape[0]
        b = min(int(self.config["instance_b"]), n)
        attention, logits = output.attention, output.patch_logits
        top = torch.topk(attention, b).indices
        if label >= 0.5:
            if 2 * b > n:  # too few patches to separate most from least attended
                b = n // 2
                if b == 0:
                    return logits.sum() * 0.0
                top = torch.topk(attention, b).indices
            bottom = torch.topk(attention, b, largest=False).indices
            idx = torch.cat([top, bottom])
            target = torch.cat([torch.ones(b), torch.zeros(b)]).to(logits.dtype)
        else:
            idx = torch.unique(torch.cat([top, torch.topk(logits, b).indices]))
            target = torch.zeros(idx.shape[0], dtype=logits.dtype)
        return F.binary_cross_entropy_with_logits(logits[idx], target)

    def loss(self, output: MILOutput, label: float, pos_weight: float = 1.0) -> Tensor:
        w = float(self.config["instance_weight"])
        slide = super().loss(output, label, pos_weight)
        return (1.0 - w) * slide + w * self.instance_loss(output, label)


_KINDS: dict[str, type[MILHead]] = {"chowder": ChowderHead, "abmil": AbmilHead}


def build_head(config: dict[str, Any]) -> MILHead:
    """A fresh head from its config; `build_head(head.config)` recreates the same architecture."""
    kind = config.get("kind")
    if kind not in _KINDS:
        raise ConfigError(f"unknown MIL head {kind!r}; choose one of {', '.join(_KINDS)}")
    return _KINDS[kind](config)
