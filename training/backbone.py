"""The feature extractor shared by feature extraction and the ONNX export: one `Backbone` type
for every encoder of the registry (training.encoders).

`build_backbone(weights, encoder=NAME, seed=0)` returns a `Backbone`: it takes uint8 RGB tiles
as read from the slide (NHWC, [N, T, T, 3], T the encoder's tile size) and does the cast, the
/255 scaling and the encoder's mean/std normalisation itself, so the exported ONNX graph
normalises exactly as training did and no client can get it wrong. Output: float32 features
[N, D] (the encoder's `pooling`), in eval mode.

The networks: torchvision's ResNet-50 for `resnet50` (whole trunk + global average pool, 2048-d)
and `resnet50-trunc` (CLAM's conv1 .. layer3 + pool, 1024-d); `timm.create_model` with the
entry's arguments for every other encoder, its classifier removed.

Weights (training.weights): `pretrained` (or `imagenet` for ResNet-50) from a local cache,
`none` (seeded random initialisation: the same seed gives the same network, so the one that made
the training features and the one that is exported are the same), or a file path.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from core.errors import ConfigError
from training.encoders import (
    DEFAULT_ENCODER,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    encoder_for_layer,
    encoder_spec,
    timm_kwargs,
)
from training.weights import (
    IMAGENET,
    PRETRAINED,
    RANDOM,
    cached_checkpoint,
    canonical_weights,
    check_and_load,
    from_transformers_dinov2,
    read_state_dict,
)

__all__ = ["Backbone", "build_backbone", "IMAGENET_MEAN", "IMAGENET_STD"]


class Backbone(nn.Module):
    """uint8 tiles [N, T, T, 3] RGB -> float32 features [N, D]; normalisation inside."""

    def __init__(self, trunk: nn.Module, spec: Encoder, weights: str, seed: int):
        super().__init__()
        self.trunk = trunk
        self.spec = spec
        self.encoder = spec.name
        # what feature files and manifests call `backbone_layer` (ResNet-50's stage, else the
        # pooling): files from before the registry name their network by it
        self.layer = spec.layer or spec.pooling
        self.weights = weights
        self.seed = seed
        self.feature_dim = spec.feature_dim
        self.tile_size = spec.tile_size
        # Folded into one multiply-add: (x / 255 - mean) / std = x * scale + shift.
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)
        self.eval()

    def forward(self, tiles: Tensor) -> Tensor:
        x = tiles.permute(0, 3, 1, 2).to(self.scale.dtype)
        x = x * self.scale + self.shift
        pooling = self.spec.pooling
        if pooling == "avgpool":
            return torch.flatten(self.trunk(x), 1)
        if pooling == "timm":
            return self.trunk(x)
        tokens = self.trunk.forward_features(x)
        if pooling == "cls":
            return tokens[:, 0]
        # cls+mean: the patch tokens follow the class and register tokens
        patches = tokens[:, self.trunk.num_prefix_tokens:]
        return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)

    def describe(self) -> dict:
        """The facts the feature files record about this network and what runs it."""
        return {"encoder": self.encoder, "backbone_layer": self.layer, "weights": self.weights,
                "weights_seed": self.seed, "feature_dim": self.feature_dim,
                "feature_engine": "torch"}


def imagenet_checkpoint_dir() -> Path:
    """Where torchvision looks for cached checkpoints: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _imagenet_state_dict() -> dict:
    from torchvision.models import ResNet50_Weights

    # Preferred first: V2 (80.9 % top-1), then the original V1 (76.1 %).
    options = (ResNet50_Weights.IMAGENET1K_V2, ResNet50_Weights.IMAGENET1K_V1)
    folder = imagenet_checkpoint_dir()
    names = [w.url.rsplit("/", 1)[-1] for w in options]
    for name in names:
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    raise ConfigError(
        f"ImageNet weights for ResNet-50 not found (this machine does not download them): put "
        f"{names[0]} (IMAGENET1K_V2, {options[0].url}) or {names[1]} (IMAGENET1K_V1) "
        f"in {folder} (set TORCH_HOME to use another cache), or pass --weights none or a "
        f"state_dict path")


def _resnet_trunk(net: nn.Module, layer: str) -> nn.Sequential:
    stages = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3]
    if layer == "pool":
        stages.append(net.layer4)
    return nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1))


def _random_net(spec: Encoder) -> nn.Module:
    if spec.architecture == "torchvision:resnet50":
        from torchvision.models import resnet50

        return resnet50(weights=None)
    import timm

    return timm.create_model(spec.architecture, pretrained=False, **timm_kwargs(spec))


def build_backbone(weights: str = RANDOM, layer: str | None = None, seed: int = 0, *,
                   encoder: str | None = None, device: str | torch.device | None = None,
                   ) -> Backbone:
    """A `Backbone` (eval mode) of `encoder` (a training.encoders name; default resnet50, or the
    ResNet-50 entry of the older `layer` argument); see the module docstring for `weights`.
    `device="meta"` builds the shapes only (no memory, no weights: `weights` must be none)."""
    if layer is not None:
        named = encoder_for_layer(layer)
        if encoder is not None and encoder != named:
            raise ConfigError(f"--layer {layer} is encoder {named}, not {encoder}")
        encoder = named
    spec = encoder_spec(encoder or DEFAULT_ENCODER)
    weights = canonical_weights(spec, weights)
    source, state = _find_weights(spec, weights)   # before the build: fail fast on a big model
    # Random init under a private RNG state: the same seed gives the same network, and the
    # caller's global RNG is left untouched.
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        net = _random_net(spec)
        if state is not None:
            _load_weights(net, spec, state, source)
        trunk = _resnet_trunk(net, spec.layer) if spec.layer else net
        return Backbone(trunk, spec, weights, seed)


def _find_weights(spec: Encoder, weights: str) -> tuple[str, dict | None]:
    if weights == RANDOM:
        return "", None
    if weights == IMAGENET:
        return "ImageNet", _imagenet_state_dict()
    if weights == PRETRAINED:
        path = cached_checkpoint(spec)
        return str(path), read_state_dict(path)
    return weights, read_state_dict(weights)


def _load_weights(net: nn.Module, spec: Encoder, state: dict, source: str) -> None:
    """A checkpoint of the encoder's network (the published layout, or a `Backbone`'s own
    state dict, keys `trunk.*`), into `net` before it is cut to a trunk."""
    if spec.layer:
        _load_resnet(net, spec, state, source)
        return
    state = {k.removeprefix("trunk."): v for k, v in state.items()}
    if spec.name == "phikon-v2":
        state = from_transformers_dinov2(state)
    # timm's classifier is not part of the feature extractor
    check_and_load(net, state, spec, source, ignore=("head.",))


def _load_resnet(net: nn.Module, spec: Encoder, state: dict, source: str) -> None:
    """A torchvision ResNet-50 state dict, or a saved `Backbone.state_dict()`."""
    if any(k.startswith("trunk.") for k in state):  # a Backbone's own state_dict
        trunk = _resnet_trunk(net, spec.layer)
        missing, unexpected = Backbone(trunk, spec, "", 0).load_state_dict(state, strict=False)
    else:
        # fc is not part of the feature extractor: a checkpoint without it (or with another
        # class count) is fine.
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as exc:   # a tensor of another shape
            raise ConfigError(f"weights {source} do not fit encoder {spec.name}: {exc}") from None
        missing = [k for k in missing if not k.startswith("fc.")]
    if spec.layer == "layer3":  # layer4 is not used by the truncated network
        missing = [k for k in missing if "layer4" not in k]
    if missing or unexpected:
        raise ConfigError(f"weights file {source} is not a ResNet-50 state_dict: "
                          f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                          f"{len(unexpected)} unexpected (e.g. {list(unexpected)[:3]})")
