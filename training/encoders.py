"""The encoder registry: which network turns a tile into features, by name (`--encoder NAME`).

One explicit table, `ENCODERS` (as TRIDENT's `encoder_factory`), plus any timm model as
`timm:NAME`. Each `Encoder` states what a user has to know to use it and what the pipeline needs
to feed it (tiatoolbox's `ModelIOConfigABC`: the model states its resolution):
- its architecture: a timm model name and the keyword arguments its checkpoint was made with
  (or torchvision's ResNet-50);
- its input: `tile_size` px at `mpp` um/px; `features` reads every slide at that scale
  (wsi.scale), so a 0.5 um/px encoder reads Camelyon16 from level 1 (0.486 um/px) or resizes;
- its normalisation (`mean`, `std`), folded into the exported graph (training.backbone);
- its output: `feature_dim` and `pooling` (which tokens make the tile's vector);
- its licence and gating, and where the weights come from (`hf_repo`, `checkpoints`, `page`).

This module only describes; `training.backbone.build_backbone` builds the network and
`training.weights` finds and loads its checkpoint, never from the network.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from core.bundle import LAYER_ENCODERS
from core.errors import ConfigError
from core.tiling import DEFAULT_TILING, TilingParams

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Bioptimus' H&E statistics (H-optimus-0/1 model cards)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
# The foundation models were trained on 20x tiles; 0.5 um/px is the pixel size they state.
MPP_20X = 0.5
# Their input: the 224 px crop they were pretrained on (a fact of those models, not milroi's
# default tile; the ResNet-50 entries take milroi's, core.tiling).
VIT_INPUT_PX = 224
TIMM_PREFIX = "timm:"

# How a network's output becomes one vector per tile (training.backbone.Backbone.forward):
POOLINGS = {
    "avgpool": "global average pool of the last feature map",
    "cls": "the class token after the final norm",
    "cls+mean": "the class token concatenated with the mean of the patch tokens (registers left "
                "out)",
    "timm": "the model's own timm pooling (its global_pool), before the classifier",
}


@dataclass(frozen=True)
class Encoder:
    """What one feature extractor is, takes and gives (module docstring)."""

    name: str
    title: str                     # how people call it: "UNI (ViT-L/16)"
    architecture: str              # timm model name, or "torchvision:resnet50"
    feature_dim: int
    pooling: str                   # a POOLINGS key
    licence: str
    gated: bool                    # the weights need an accepted licence on the Hugging Face Hub
    tile_size: int = VIT_INPUT_PX
    mpp: float = MPP_20X
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # the published checkpoint: a Hugging Face repo and the file names it may hold, else the
    # torch hub cache (ResNet-50's ImageNet weights)
    hf_repo: str | None = None
    checkpoints: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    page: str = ""
    # ResNet-50's stage ("pool"/"layer3"); feature files and manifests before the registry
    # named the network by it (`backbone_layer`)
    layer: str = ""

    @property
    def int8(self) -> str:
        """How `export --int8` quantises it (training.quantize.METHODS): static QDQ for the
        CNNs, dynamic MatMul quantisation for the transformers."""
        return "static" if self.pooling == "avgpool" else "dynamic"

    @property
    def fixed_tile_size(self) -> bool:
        """A ViT's position embeddings fix its input size; a CNN pools any size."""
        return self.pooling != "avgpool"

    @property
    def tiling(self) -> TilingParams:
        """milroi's tiling at this encoder's input (its tile size and pixel size)."""
        return DEFAULT_TILING.replace(tile_size=self.tile_size, target_mpp=self.mpp)

    def describe(self) -> dict[str, Any]:
        """The facts a run, a feature file and a manifest record (JSON-ready)."""
        out = asdict(self)
        out.pop("timm_kwargs")
        out["mean"], out["std"] = list(self.mean), list(self.std)
        out["checkpoints"] = list(self.checkpoints)
        return out

    def help_line(self) -> str:
        gate = "gated" if self.gated else "open"
        return (f"{self.name}: {self.title}, {self.feature_dim}-d ({self.pooling}), "
                f"{self.tile_size} px at {self.mpp:g} um/px; {self.licence}, {gate}")


def _swiglu_silu() -> dict[str, Any]:
    """SwiGLU MLP blocks with SiLU (UNI2-h, Virchow2): callables, so built when asked."""
    import torch
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}


CC_BY_NC_ND = "CC-BY-NC-ND-4.0 (non-commercial, academic research)"
RESNET_PAGE = "https://pytorch.org/vision/stable/models/generated/torchvision.models.resnet50.html"

ENCODERS: dict[str, Encoder] = {e.name: e for e in (
    Encoder("resnet50", "ResNet-50, ImageNet (torchvision), whole trunk", "torchvision:resnet50",
            2048, "avgpool", "BSD-3-Clause (torchvision)", False,
            tile_size=DEFAULT_TILING.tile_size, mpp=DEFAULT_TILING.target_mpp,
            checkpoints=(), page=RESNET_PAGE, layer="pool"),
    Encoder("resnet50-trunc", "ResNet-50, ImageNet (torchvision), truncated after layer3 (CLAM)",
            "torchvision:resnet50", 1024, "avgpool", "BSD-3-Clause (torchvision)", False,
            tile_size=DEFAULT_TILING.tile_size, mpp=DEFAULT_TILING.target_mpp, checkpoints=(),
            page=RESNET_PAGE, layer="layer3"),
    Encoder("uni", "UNI (ViT-L/16, Mahmood lab)", "vit_large_patch16_224", 1024, "cls",
            CC_BY_NC_ND, True,
            timm_kwargs={"img_size": VIT_INPUT_PX, "patch_size": 16, "init_values": 1e-5},
            hf_repo="MahmoodLab/UNI", page="https://huggingface.co/MahmoodLab/UNI"),
    Encoder("uni2-h", "UNI2-h (ViT-H/14, 8 registers, Mahmood lab)", "vit_giant_patch14_224",
            1536, "cls", CC_BY_NC_ND, True,
            timm_kwargs={"img_size": VIT_INPUT_PX, "patch_size": 14, "depth": 24, "num_heads": 24,
                         "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                         "no_embed_class": True, "reg_tokens": 8, "swiglu": True},
            hf_repo="MahmoodLab/UNI2-h", page="https://huggingface.co/MahmoodLab/UNI2-h"),
    Encoder("virchow2", "Virchow2 (ViT-H/14, 4 registers, Paige)", "vit_huge_patch14_224", 2560,
            "cls+mean", CC_BY_NC_ND, True,
            timm_kwargs={"img_size": VIT_INPUT_PX, "init_values": 1e-5, "reg_tokens": 4,
                         "mlp_ratio": 5.3375, "global_pool": "", "swiglu": True},
            hf_repo="paige-ai/Virchow2", page="https://huggingface.co/paige-ai/Virchow2"),
    Encoder("h-optimus-0", "H-optimus-0 (ViT-g/14, 4 registers, Bioptimus)",
            "vit_giant_patch14_reg4_dinov2", 1536, "cls", "Apache-2.0", True,
            mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
            timm_kwargs={"img_size": VIT_INPUT_PX, "init_values": 1e-5, "global_pool": "token"},
            hf_repo="bioptimus/H-optimus-0", page="https://huggingface.co/bioptimus/H-optimus-0"),
    Encoder("h-optimus-1", "H-optimus-1 (ViT-g/14, 4 registers, Bioptimus)",
            "vit_giant_patch14_reg4_dinov2", 1536, "cls",
            "H-optimus-1 licence (non-commercial)", True, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
            timm_kwargs={"img_size": VIT_INPUT_PX, "init_values": 1e-5, "global_pool": "token"},
            hf_repo="bioptimus/H-optimus-1", page="https://huggingface.co/bioptimus/H-optimus-1"),
    # Owkin publishes Phikon-v2 in the transformers Dinov2 layout; training.weights maps its
    # keys onto timm's ViT-L/16 (the same network).
    Encoder("phikon-v2", "Phikon-v2 (ViT-L/16, DINOv2, Owkin)", "vit_large_patch16_224", 1024,
            "cls", "Owkin non-commercial licence", True,
            timm_kwargs={"img_size": VIT_INPUT_PX, "patch_size": 16, "init_values": 1e-5},
            hf_repo="owkin/phikon-v2", page="https://huggingface.co/owkin/phikon-v2"),
    Encoder("gigapath", "Prov-GigaPath tile encoder (ViT-g/16, Providence / Microsoft)",
            "vit_giant_patch14_dinov2", 1536, "cls", "Prov-GigaPath licence (non-commercial)",
            True,
            timm_kwargs={"img_size": VIT_INPUT_PX, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                         "num_heads": 24, "mlp_ratio": 5.33334, "init_values": 1e-5},
            hf_repo="prov-gigapath/prov-gigapath",
            page="https://huggingface.co/prov-gigapath/prov-gigapath"),
)}
DEFAULT_ENCODER = "resnet50"   # the network milroi has always used (ImageNet, whole trunk)


def encoder_spec(name: str) -> Encoder:
    """The registry entry `name`, or an `Encoder` made from timm's metadata for `timm:NAME`."""
    if name in ENCODERS:
        return ENCODERS[name]
    if name.startswith(TIMM_PREFIX):
        return _timm_encoder(name[len(TIMM_PREFIX):])
    raise ConfigError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)} or "
                      f"timm:NAME (any timm model)")


def encoder_for_layer(layer: str) -> str:
    """The registry name of a ResNet-50 stage: how feature files, runs and manifests written
    before the registry (which record only `backbone_layer`) name their network."""
    if layer not in LAYER_ENCODERS:
        raise ConfigError(f"unknown ResNet-50 layer {layer!r}; choose one of "
                          f"{', '.join(LAYER_ENCODERS)}")
    return LAYER_ENCODERS[layer]


def timm_kwargs(spec: Encoder) -> dict[str, Any]:
    """The keyword arguments of `timm.create_model` for `spec` (classifier removed)."""
    kwargs = {k: v for k, v in spec.timm_kwargs.items() if k != "swiglu"}
    if spec.timm_kwargs.get("swiglu"):
        kwargs.update(_swiglu_silu())
    return {**kwargs, "num_classes": 0}


def _timm_encoder(model: str) -> Encoder:
    """A timm model as an encoder: its input size and normalisation from its pretrained config,
    its output from a build on the meta device (no memory, no weights)."""
    import timm
    import torch

    if not timm.is_model(model):
        raise ConfigError(f"timm has no model {model!r} (timm {timm.__version__}; "
                          f"`timm.list_models()` lists them)")
    with torch.device("meta"):
        net = timm.create_model(model, pretrained=False, num_classes=0)
    cfg = net.pretrained_cfg
    _, height, width = cfg.get("input_size", (3, VIT_INPUT_PX, VIT_INPUT_PX))
    if height != width:
        raise ConfigError(f"timm model {model} takes {height}x{width} px input; milroi's tiles "
                          f"are square")
    repo = cfg.get("hf_hub_id") or None
    return Encoder(
        TIMM_PREFIX + model, f"timm {model}", model, int(net.num_features), "timm",
        str(cfg.get("license") or "see the model card"), False, tile_size=int(height),
        # ImageNet models state no pixel size: they read tiles at milroi's default scale
        mpp=DEFAULT_TILING.target_mpp,
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
        hf_repo=repo, page=f"https://huggingface.co/{repo}" if repo else "")


def encoders_help() -> str:
    """The registry as `--help` shows it."""
    return "; ".join(spec.help_line() for spec in ENCODERS.values()) + \
        "; timm:NAME: any timm model (its own pooling and normalisation)"
