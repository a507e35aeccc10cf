"""Multiple-instance learning heads: per-patch tumour scores and a slide score from slide labels.

Four heads, all built from a json-able config by `build_head(config)`. Two are served
(HEAD_KINDS: their pooling streams); two are benchmark-only (BENCHMARK_HEAD_KINDS: DSMIL and
TransMIL, whose pooling needs the whole bag; see the end of this module):

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

HEAD_KINDS = ("chowder", "abmil")          # exported to ONNX and served (streaming pooling)
BENCHMARK_HEAD_KINDS = ("dsmil", "transmil")  # trained and evaluated; need the whole bag at once
TRAINABLE_HEAD_KINDS = HEAD_KINDS + BENCHMARK_HEAD_KINDS

# Options any head accepts, kept in its config only when given (so the configs of runs that do
# not use them are unchanged). They act before the head (`prepare`) or in training (trainer):
# - slide_standardize: centre and scale each bag by its own tiles (against per-slide stain
#   offsets); the server streams tiles, so a head with it is not exportable;
# - instance_sampling: share of a bag's tiles drawn at random for each training step (1 = all).
BAG_OPTIONS: dict[str, Any] = {"slide_standardize": False, "instance_sampling": 1.0}
# Set by `fit` after training (training.calibration), never a training option: the Platt maps
# {"slide": {"slope", "intercept", ...}, "patch": {...}} of the slide logit and the patch logits.
# Inside the patch and aggregator modules, so every exported graph serves calibrated numbers.
CALIBRATION = "calibration"


@dataclass
class MILOutput:
    """What a head says about one bag (slide) of N patches."""

    slide_logit: Tensor          # scalar (0-d) tensor, calibrated (MILHead.calibration)
    patch_logits: Tensor         # [N], as the head computes them (what the pooling reads)
    patch_scores: Tensor         # [N], tumour probability in [0, 1]: sigmoid of the calibrated
                                 # patch logits
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


def clustering_loss(ranking: Tensor, logits: Tensor, label: float, b: int) -> Tensor:
    """CLAM's instance clustering loss (Lu et al. 2021) on pseudo labels ranked by `ranking`.

    Tumour slide: the b top-ranked patches are pseudo-positive, the b lowest pseudo-negative
    (CLAM's in-class branch). Normal slide: by the MIL assumption every patch is negative, so the
    b top-ranked and the b highest-scored patches are pushed to 0.
    """
    n = logits.shape[0]
    b = min(b, n)
    top = torch.topk(ranking, b).indices
    if label >= 0.5:
        if 2 * b > n:  # too few patches to separate the top from the bottom
            b = n // 2
            if b == 0:
                return logits.sum() * 0.0
            top = torch.topk(ranking, b).indices
        bottom = torch.topk(ranking, b, largest=False).indices
        idx = torch.cat([top, bottom])
        target = torch.cat([torch.ones(b), torch.zeros(b)]).to(logits.dtype)
    else:
        idx = torch.unique(torch.cat([top, torch.topk(logits, b).indices]))
        target = torch.zeros(idx.shape[0], dtype=logits.dtype)
    return F.binary_cross_entropy_with_logits(logits[idx], target)


class _CalibratedPatches(nn.Module):
    """A patch module whose first output is sigmoid(slope * patch_logit + intercept)."""

    def __init__(self, patches: nn.Module, platt: dict[str, float]):
        super().__init__()
        self.patches = patches
        self.slope, self.intercept = float(platt["slope"]), float(platt["intercept"])

    def forward(self, features: Tensor) -> tuple[Tensor, ...]:
        outputs = self.patches(features)
        return (torch.sigmoid(outputs[1] * self.slope + self.intercept), *outputs[1:])


class _CalibratedLogit(nn.Module):
    """An aggregator whose slide logit is slope * logit + intercept."""

    def __init__(self, aggregator: nn.Module, platt: dict[str, float]):
        super().__init__()
        self.aggregator = aggregator
        self.slope, self.intercept = float(platt["slope"]), float(platt["intercept"])

    def forward(self, pooled: Tensor) -> Tensor:
        return self.aggregator(pooled) * self.slope + self.intercept


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
        unknown = (set(config) - set(self.defaults) - set(BAG_OPTIONS)
                   - {"kind", "in_dim", CALIBRATION})
        if unknown:
            raise ConfigError(f"unknown {self.kind} head option(s): {sorted(unknown)}")
        if int(config.get("in_dim", 0)) <= 0:
            raise ConfigError(f"{self.kind} head needs a positive 'in_dim' (feature dimension)")
        self.config = {"kind": self.kind, "in_dim": int(config["in_dim"]),
                       **copy.deepcopy(self.defaults),
                       **{k: v for k, v in config.items() if k not in {"kind", "in_dim"}}}
        sampling = float(self.option("instance_sampling"))
        if not 0.0 < sampling <= 1.0:
            raise ConfigError(f"instance_sampling must be in (0, 1], got {sampling}")

    def option(self, name: str) -> Any:
        """A BAG_OPTIONS value: the config's, else its default."""
        return self.config.get(name, BAG_OPTIONS[name])

    @property
    def streamable(self) -> bool:
        """Whether the server can score this head patch by patch (and export can write it)."""
        return self.kind in HEAD_KINDS and not self.option("slide_standardize")

    def prepare(self, features: Tensor) -> Tensor:
        """What reaches the patch module: the features, or with `slide_standardize` the features
        centred and scaled by this bag's own per-dimension mean and std."""
        if not self.option("slide_standardize"):
            return features
        mean = features.mean(0, keepdim=True)
        std = features.std(0, unbiased=False, keepdim=True).clamp_min(1e-6)
        return (features - mean) / std

    @property
    def pooling(self) -> dict[str, Any]:
        raise NotImplementedError

    def patch_module(self) -> nn.Module:
        """features [N, D] -> tuple of tensors named `patch_output_names` (ONNX-exportable),
        the patch scores calibrated (`calibration`)."""
        patch = self.calibration.get("patch")
        return self._patches if patch is None else _CalibratedPatches(self._patches, patch)

    def aggregator_module(self) -> nn.Module:
        """pooled [1, P] -> slide_logit [1] (ONNX-exportable), calibrated (`calibration`)."""
        slide = self.calibration.get("slide")
        return self._aggregator if slide is None else _CalibratedLogit(self._aggregator, slide)

    @property
    def calibration(self) -> dict[str, dict[str, float]]:
        """The config's Platt maps ("slide", "patch": slope and intercept, training.calibration),
        each left out while it is the identity: an uncalibrated head's graphs are as before."""
        return {level: platt for level, platt in self.config.get(CALIBRATION, {}).items()
                if (float(platt["slope"]), float(platt["intercept"])) != (1.0, 0.0)}

    def feature_norm(self) -> _Standardize:
        """The module that standardises input features with the training set's statistics."""
        return self._patches.norm

    def set_feature_stats(self, mean: Tensor, std: Tensor) -> None:
        """Standardise input features with these per-dimension training-set statistics."""
        norm = self.feature_norm()
        norm.mean.copy_(torch.as_tensor(mean, dtype=norm.mean.dtype))
        norm.std.copy_(torch.clamp(torch.as_tensor(std, dtype=norm.std.dtype), min=1e-6))

    def pool(self, patch_outputs: tuple[Tensor, ...]) -> Tensor:
        """The streaming pooling of docs/INTERFACES.md on a whole bag: patch outputs -> [1, P]."""
        raise NotImplementedError

    def forward(self, features: Tensor) -> MILOutput:
        outputs = dict(zip(self.patch_output_names, self.patch_module()(self.prepare(features))))
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
    `instance_weight`: weight of the max-instance loss that calibrates the patch scores,
    `cluster_b` / `cluster_weight`: CLAM's instance clustering (Lu et al. 2021) on the patch
    logits themselves (0 = off): on a tumour slide the `cluster_b` highest-scored patches are
    pseudo-positive and the `cluster_b` lowest pseudo-negative; on a normal slide the highest are
    pushed to 0 (every patch of a normal slide is normal). On by default (B = 8, weight 0.3):
    on the hard benchmark's held-out split (docs/hard_benchmark.md, row c) it took CHOWDER's patch
    AUC from 0.27 (tumour tiles ranked below normal ones) to 0.97 and its slide AUC from 0.69 to
    0.90; `cluster_b` 0 is the head as it was.

    CHOWDER's MLP reads the patch logits only through their order statistics, so nothing ties
    the logits themselves to a probability: they can all sit at +100 on every slide and still
    separate slides. milroi serves sigmoid(patch logit) as a tumour probability, so it adds the
    standard MIL max-instance loss (as in MI-Net, Wang et al. 2018, and the max-instance stream of
    DSMIL, Li et al. 2021): BCE(max patch logit, slide label). A normal slide pushes every patch
    below 0.5, a tumour slide lifts at least one above it.
    """

    kind = "chowder"
    defaults = {"k": 5, "patch_hidden": [], "mlp_hidden": [200, 100], "dropout": 0.5,
                "instance_weight": 0.5, "cluster_b": 8, "cluster_weight": 0.3}

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

    def pool(self, patch_outputs: tuple[Tensor, ...]) -> Tensor:
        return extremes_pool(patch_outputs[1], self.k)[None]

    def loss(self, output: MILOutput, label: float, pos_weight: float = 1.0) -> Tensor:
        w = float(self.config["instance_weight"])
        total = super().loss(output, label, pos_weight)
        if w > 0:
            target = torch.tensor(float(label), dtype=output.patch_logits.dtype)
            instance = F.binary_cross_entropy_with_logits(output.patch_logits.max(), target)
            total = (1.0 - w) * total + w * instance
        b, cw = int(self.config["cluster_b"]), float(self.config["cluster_weight"])
        if b > 0 and cw > 0:
            total = (1.0 - cw) * total + cw * clustering_loss(output.patch_logits,
                                                              output.patch_logits, label, b)
        return total


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

    def pool(self, patch_outputs: tuple[Tensor, ...]) -> Tensor:
        return attention_pool(patch_outputs[2], patch_outputs[3])[None]

    def instance_loss(self, output: MILOutput, label: float) -> Tensor:
        """CLAM-SB instance loss on pseudo labels from the attention (`clustering_loss`)."""
        return clustering_loss(output.attention, output.patch_logits, label,
                               int(self.config["instance_b"]))

    def loss(self, output: MILOutput, label: float, pos_weight: float = 1.0) -> Tensor:
        w = float(self.config["instance_weight"])
        slide = super().loss(output, label, pos_weight)
        return (1.0 - w) * slide + w * self.instance_loss(output, label)


# ---------------------------------------------------------------------------------------------
# Benchmark-only heads: their pooling needs the whole bag at once, so the streaming server
# cannot run them (`streamable` is False and export refuses them). They are here to be compared
# on the hard benchmark (docs/hard_benchmark.md).


def max_instance_loss(patch_logits: Tensor, label: float) -> Tensor:
    """BCE(max patch logit, slide label): the MIL max-instance loss."""
    target = torch.tensor(float(label), dtype=patch_logits.dtype)
    return F.binary_cross_entropy_with_logits(patch_logits.max(), target)


class _DsmilPatches(nn.Module):
    def __init__(self, norm: nn.Module, instance: nn.Module, query: nn.Module, value: nn.Module):
        super().__init__()
        self.norm, self.instance, self.query, self.value = norm, instance, query, value

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        h = self.norm(features)
        logits = self.instance(h).squeeze(-1)
        return torch.sigmoid(logits), logits, self.query(h), self.value(h)


class _DsmilAggregator(nn.Module):
    """[bag embedding, max instance logit] -> mean of the bag logit and the max-instance logit."""

    def __init__(self, value_dim: int):
        super().__init__()
        self.bag = nn.Linear(value_dim, 1)

    def forward(self, pooled: Tensor) -> Tensor:
        return ((self.bag(pooled[:, :-1]).squeeze(-1) + pooled[:, -1]) / 2).reshape(-1)


class DsmilHead(MILHead):
    """DSMIL (Li, Li & Eliceiri 2021, "Dual-stream multiple instance learning network for whole
    slide image classification with self-supervised contrastive learning", CVPR).

    Stream 1, the max-instance stream: a linear instance classifier scores every patch; its
    highest-scored patch is the critical instance, and BCE(max patch logit, slide label) trains it.
    Stream 2: each patch's query is compared with the critical instance's (dot product /
    sqrt(query_dim), softmax over the bag) and the bag embedding is that weighted sum of the
    values; a linear layer gives the bag logit. Loss: the mean of the two BCEs, slide logit: the
    mean of the two logits (the paper's code). The served patch score is the instance stream's.

    Config: `query_dim` (128 as in the paper), `value_dim` (the paper keeps D; a 512-d
    projection here keeps the head small on 2048-d features), `dropout` (on the values).
    """

    kind = "dsmil"
    defaults = {"query_dim": 128, "value_dim": 512, "dropout": 0.0}
    patch_output_names = ("patch_scores", "patch_logits", "queries", "values")

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        c = self.config
        d, q = c["in_dim"], int(c["query_dim"])
        self._patches = _DsmilPatches(
            norm=_Standardize(d), instance=nn.Linear(d, 1),
            query=nn.Sequential(nn.Linear(d, q), nn.ReLU(), nn.Linear(q, q), nn.Tanh()),
            value=nn.Sequential(nn.Dropout(c["dropout"]), nn.Linear(d, int(c["value_dim"])),
                                nn.ReLU()))
        self._aggregator = _DsmilAggregator(int(c["value_dim"]))

    @property
    def pooling(self) -> dict[str, Any]:
        return {"kind": "dsmil"}

    def pool(self, patch_outputs: tuple[Tensor, ...]) -> Tensor:
        _, logits, queries, values = patch_outputs
        if logits.shape[0] == 0:
            raise RequestError("cannot pool an empty bag (a slide without tissue tiles)")
        critical = int(torch.argmax(logits))
        weights = torch.softmax(queries @ queries[critical] / math.sqrt(queries.shape[1]), dim=0)
        return torch.cat([weights @ values, logits[critical].reshape(1)])[None]

    def loss(self, output: MILOutput, label: float, pos_weight: float = 1.0) -> Tensor:
        bag = super().loss(output, label, pos_weight)  # on the mean logit, as the paper predicts
        return 0.5 * bag + 0.5 * max_instance_loss(output.patch_logits, label)


class _PPEG(nn.Module):
    """TransMIL's pyramid position encoding: depthwise 7/5/3 convolutions over the token square."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, tokens: Tensor, side: int) -> Tensor:
        cls, patches = tokens[:, :1], tokens[:, 1:]
        grid = patches.transpose(1, 2).reshape(1, -1, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class _TransLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.norm(tokens)
        return tokens + self.attn(x, x, x, need_weights=False)[0]


class TransMilHead(MILHead):
    """TransMIL (Shao et al. 2021, "TransMIL: Transformer based correlated multiple instance
    learning for whole slide image classification", NeurIPS).

    Features -> Linear(D, dim) + ReLU; a class token; the patch tokens padded (by repeating the
    first ones) to a square; transformer layer, PPEG, transformer layer, LayerNorm; the class
    token gives the slide logit. Exact multi-head attention stands in for the paper's Nystrom
    approximation, which exists for bags of 10^4 tokens; at a few hundred it is exact and cheaper.

    TransMIL has no patch score. milroi needs one, so a linear instance classifier on the output
    patch tokens is trained with the max-instance loss (weight `instance_weight`), as CHOWDER's is.
    Config: `dim` (512 as in the paper), `heads` (8), `dropout` (0.1), `instance_weight` (0.5).
    """

    kind = "transmil"
    defaults = {"dim": 512, "heads": 8, "dropout": 0.1, "instance_weight": 0.5}

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        c = self.config
        dim = int(c["dim"])
        self.norm = _Standardize(c["in_dim"])
        self.embed = nn.Sequential(nn.Linear(c["in_dim"], dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.layer1 = _TransLayer(dim, int(c["heads"]), float(c["dropout"]))
        self.ppeg = _PPEG(dim)
        self.layer2 = _TransLayer(dim, int(c["heads"]), float(c["dropout"]))
        self.out_norm = nn.LayerNorm(dim)
        self.slide = nn.Linear(dim, 1)
        self.instance = nn.Linear(dim, 1)

    @property
    def pooling(self) -> dict[str, Any]:
        return {"kind": "transmil"}

    def patch_module(self) -> nn.Module:
        raise ConfigError("transmil scores patches only together (self-attention over the bag): "
                          "it has no per-patch module to serve")

    def feature_norm(self) -> _Standardize:
        return self.norm

    def forward(self, features: Tensor) -> MILOutput:
        n = features.shape[0]
        if n == 0:
            raise RequestError("cannot pool an empty bag (a slide without tissue tiles)")
        h = self.embed(self.norm(self.prepare(features)))[None]      # [1, N, dim]
        side = math.ceil(math.sqrt(n))
        h = torch.cat([h, h[:, : side * side - n]], dim=1) if side * side > n else h
        while h.shape[1] < side * side:                              # tiny bags: repeat again
            h = torch.cat([h, h[:, : side * side - h.shape[1]]], dim=1)
        tokens = torch.cat([self.cls_token, h], dim=1)
        tokens = self.layer2(self.ppeg(self.layer1(tokens), side))
        tokens = self.out_norm(tokens)
        patch_logits = self.instance(tokens[0, 1: n + 1]).squeeze(-1)
        slide_logit = self.slide(tokens[0, 0]).reshape(())
        slide, patch = (self.calibration.get(level, {"slope": 1.0, "intercept": 0.0})
                        for level in ("slide", "patch"))
        return MILOutput(slide_logit=slide_logit * slide["slope"] + slide["intercept"],
                         patch_logits=patch_logits,
                         patch_scores=torch.sigmoid(patch_logits * patch["slope"]
                                                    + patch["intercept"]),
                         attention=None)

    def loss(self, output: MILOutput, label: float, pos_weight: float = 1.0) -> Tensor:
        w = float(self.config["instance_weight"])
        slide = super().loss(output, label, pos_weight)
        return (1.0 - w) * slide + w * max_instance_loss(output.patch_logits, label)


_KINDS: dict[str, type[MILHead]] = {"chowder": ChowderHead, "abmil": AbmilHead,
                                    "dsmil": DsmilHead, "transmil": TransMilHead}


def build_head(config: dict[str, Any]) -> MILHead:
    """A fresh head from its config; `build_head(head.config)` recreates the same architecture."""
    kind = config.get("kind")
    if kind not in _KINDS:
        raise ConfigError(f"unknown MIL head {kind!r}; choose one of {', '.join(_KINDS)}")
    return _KINDS[kind](config)
