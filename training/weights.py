"""Where an encoder's weights come from: a file, or a local cache; never the network.

`--weights` takes:
- ``pretrained`` (or ``imagenet`` for the ResNet-50 entries): the encoder's published checkpoint
  from a local cache: torchvision's ImageNet file in the torch hub cache ($TORCH_HOME), or the
  Hugging Face Hub cache ($HF_HUB_CACHE, else $HF_HOME/hub) for every other entry. The cache is
  read with `huggingface_hub.try_to_load_from_cache`, which looks at the disk only: milroi never
  downloads (hospital networks often cannot, TRIDENT #96), and a missing file is one error that
  names the file, the cache and its variable, and the page to request access from;
- a path: a safetensors file or a torch state dict (a training checkpoint's `state_dict` or
  `model` entry is unwrapped);
- ``none``: seeded random initialisation (tests and speed benchmarks).

`check_and_load` loads a state dict strictly and names the keys and shapes that do not fit.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from core.errors import ConfigError
from training.encoders import Encoder

PRETRAINED = "pretrained"
IMAGENET = "imagenet"   # the ResNet-50 entries' published weights, by their older name
RANDOM = "none"


def canonical_weights(spec: Encoder, weights: str) -> str:
    """The `--weights` value as runs and files record it: `pretrained` of a ResNet-50 entry is
    `imagenet` (the name every earlier run used)."""
    weights = str(weights)
    if spec.architecture.startswith("torchvision:"):
        return IMAGENET if weights == PRETRAINED else weights
    if weights == IMAGENET:
        raise ConfigError(f"--weights imagenet names ResNet-50's ImageNet checkpoint; encoder "
                          f"{spec.name} loads its own with --weights pretrained (or a path, or "
                          f"none)")
    return weights


def hf_cache_dir() -> Path:
    """The Hugging Face Hub cache as huggingface_hub resolves it, read now (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_checkpoint(spec: Encoder) -> Path:
    """The published checkpoint of `spec` in the local Hugging Face cache; ConfigError naming
    what was looked for, and where, when it is not there."""
    from huggingface_hub import try_to_load_from_cache

    if not spec.hf_repo:
        raise ConfigError(f"encoder {spec.name} has no published checkpoint on the Hugging Face "
                          f"Hub: pass --weights PATH (a safetensors file or a state dict) or "
                          f"--weights none")
    cache = hf_cache_dir()
    for name in spec.checkpoints:
        found = try_to_load_from_cache(spec.hf_repo, name, cache_dir=cache)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    access = f"request access at {spec.page} and accept its licence ({spec.licence}), then " \
        if spec.gated else ""
    raise ConfigError(
        f"weights of encoder {spec.name} not found (milroi never downloads them): looked for "
        f"{' or '.join(spec.checkpoints)} of {spec.hf_repo} in the Hugging Face cache {cache} "
        f"(set HF_HUB_CACHE or HF_HOME to use another). To get them: {access}on a machine with "
        f"network run `huggingface-cli download {spec.hf_repo} {spec.checkpoints[0]}` and copy "
        f"its cache here; or pass --weights PATH (a safetensors file or a state dict)")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch file (wrapped `state_dict`/`model`
    entries unwrapped); ConfigError for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist (pass pretrained, none or a "
                          f"file path)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise several types for a bad file
        raise ConfigError(f"cannot load weights file {path}: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    return state


def check_and_load(net: nn.Module, state: dict[str, torch.Tensor], spec: Encoder,
                   source: str | os.PathLike, ignore: tuple[str, ...] = ()) -> None:
    """Load `state` into `net` strictly; ConfigError naming the keys missing, unexpected or of
    the wrong shape (keys starting with one of `ignore` are not needed by the encoder)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    own = {k: v for k, v in net.state_dict().items() if not k.startswith(ignore)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {list(state[k].shape)}, {spec.name} {list(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"weights {source} do not fit encoder {spec.name} ({spec.title}): "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(shapes)} of another shape (e.g. {shapes[:2]})")
    net.load_state_dict(state, strict=False)


# -- Phikon-v2: the transformers Dinov2 layout onto timm's ViT ---------------------------------

_DINOV2_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm(\d)\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.fc(\d)\.", r"blocks.\1.mlp.fc\2."),
    (r"^layernorm\.", "norm."),
)


def from_transformers_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers `Dinov2Model` state dict (Phikon-v2's published layout) with timm
    VisionTransformer keys: separate query/key/value projections become timm's fused `qkv`;
    the mask token (masked-image training only) is dropped. A timm-layout dict passes through."""
    if not any(k.startswith(("embeddings.", "encoder.layer.")) for k in state):
        return state
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("dinov2.")
        match = re.match(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\."
                         r"(weight|bias)$", key)
        if match:
            qkv.setdefault((match[1], match[3]), {})[match[2]] = value
            continue
        if key == "embeddings.mask_token":
            continue
        for pattern, repl in _DINOV2_RENAMES:
            if re.match(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[key] = value
    for (block, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ConfigError(f"Dinov2 checkpoint block {block} lacks some of query/key/value")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0)
    return out
