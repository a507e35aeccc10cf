"""The ResNet-50 feature extractor shared by feature extraction and the ONNX export.

`build_backbone(weights, layer, seed)` returns a `Backbone`: it takes uint8 RGB tiles as read
from the slide (NHWC, [N, 224, 224, 3]) and does the cast, the /255 scaling and the ImageNet
mean/std normalisation itself, so the exported ONNX graph normalises exactly as training did and
no client can get it wrong. Output: float32 features [N, D], in eval mode.

Layers (CLAM's choices):
- ``pool``: the whole trunk + global average pool, D = 2048 (torchvision's `fc` dropped);
- ``layer3``: CLAM's truncated ResNet-50 (conv1 .. layer3) + adaptive average pool, D = 1024.

Weights:
- ``imagenet``: torchvision's IMAGENET1K_V2 (else V1) checkpoint from the torch hub cache,
  never downloaded (this machine has no network); a missing file is one clear error naming the
  file and the folder to put it in.
- ``none``: random initialisation under a fixed seed, so the network that made the training
  features and the one that is exported are the same.
- a path: a state_dict file (a torchvision ResNet-50's, or a `Backbone`'s own).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import ResNet50_Weights, resnet50

from core.errors import ConfigError

LAYERS = {"pool": 2048, "layer3": 1024}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Preferred first: V2 (80.9 % top-1), then the original V1 (76.1 %).
IMAGENET_WEIGHTS = (ResNet50_Weights.IMAGENET1K_V2, ResNet50_Weights.IMAGENET1K_V1)


class Backbone(nn.Module):
    """uint8 tiles [N, H, W, 3] RGB -> float32 features [N, D]; normalisation inside."""

    def __init__(self, trunk: nn.Module, layer: str, weights: str, seed: int):
        super().__init__()
        self.trunk = trunk
        self.layer = layer
        self.weights = weights
        self.seed = seed
        self.feature_dim = LAYERS[layer]
        # Folded into one multiply-add: (x / 255 - mean) / std = x * scale + shift.
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)
        self.eval()

    def forward(self, tiles: Tensor) -> Tensor:
        x = tiles.permute(0, 3, 1, 2).to(self.scale.dtype)
        x = x * self.scale + self.shift
        return torch.flatten(self.trunk(x), 1)

    def describe(self) -> dict:
        """The facts the feature files record about this network and what runs it."""
        return {"backbone_layer": self.layer, "weights": self.weights,
                "weights_seed": self.seed, "feature_dim": self.feature_dim,
                "feature_engine": "torch"}


def imagenet_checkpoint_dir() -> Path:
    """Where torchvision looks for cached checkpoints: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _imagenet_state_dict() -> dict:
    folder = imagenet_checkpoint_dir()
    names = [os.path.basename(w.url) for w in IMAGENET_WEIGHTS]
    for name in names:
        if (folder / name).is_file():
            return _load_state_dict(folder / name)
    raise ConfigError(
        f"ImageNet weights for ResNet-50 not found (this machine does not download them): put "
        f"{names[0]} (IMAGENET1K_V2, {IMAGENET_WEIGHTS[0].url}) or {names[1]} (IMAGENET1K_V1) "
        f"in {folder} (set TORCH_HOME to use another cache), or pass --weights none or a "
        f"state_dict path")


def _load_state_dict(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise ConfigError(f"cannot load weights file {path}: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint that wraps the state_dict
    if not isinstance(state, dict):
        raise ConfigError(f"weights file {path} holds a {type(state).__name__}, not a state_dict")
    return state


def _trunk(net: nn.Module, layer: str) -> nn.Sequential:
    if layer == "pool":
        stages = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                  net.layer4]
    else:
        stages = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3]
    return nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1))


def build_backbone(weights: str = "none", layer: str = "pool", seed: int = 0) -> Backbone:
    """A ResNet-50 `Backbone` (eval mode, CPU); see the module docstring for `weights`, `layer`."""
    if layer not in LAYERS:
        raise ConfigError(f"unknown backbone layer {layer!r}; choose one of {', '.join(LAYERS)}")
    weights = str(weights)
    # Random init under a private RNG state: the same seed gives the same network, and the
    # caller's global RNG is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = resnet50(weights=None)
    if weights == "imagenet":
        net.load_state_dict(_imagenet_state_dict())
    elif weights != "none":
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"weights file {path} does not exist (use imagenet, none or a "
                              f"state_dict path)")
        _load_into(net, layer, _load_state_dict(path), path)
    return Backbone(_trunk(net, layer), layer, weights, seed)


def _load_into(net: nn.Module, layer: str, state: dict, path: Path) -> None:
    """Load a torchvision ResNet-50 state_dict, or a saved `Backbone.state_dict()`."""
    if any(k.startswith("trunk.") for k in state):  # a Backbone's own state_dict
        trunk = _trunk(net, layer)
        missing, unexpected = Backbone(trunk, layer, "", 0).load_state_dict(state, strict=False)
    else:
        # fc is not part of the feature extractor: a checkpoint without it (or with another
        # class count) is fine.
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
    if layer == "layer3":  # layer4 is not used by the truncated network
        missing = [k for k in missing if "layer4" not in k]
    if missing or unexpected:
        raise ConfigError(f"weights file {path} is not a ResNet-50 state_dict: "
                          f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                          f"{len(unexpected)} unexpected (e.g. {list(unexpected)[:3]})")
