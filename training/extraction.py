"""Encoder features (training.encoders; ResNet-50 by default) of the tissue tiles of one slide
into its h5 file (the library of `milroi-train features`, also run by its Ray actors and by
`camelyon16`). Each slide is read at the encoder's input scale unless --mpp/--tile-size say
otherwise; the file records the encoder (attribute `encoder`).

The tiles are the server's: `wsi.grid.tiles_for_slide` (same tissue mask, same grid), read by
the server's reader (`wsi.decode_once.make_tile_reader`: each stored tile decoded once where the
slide allows, else OpenSlide) in background threads while the model runs on the previous batch.

The engine: on the CPU the ResNet-50 runs in onnxruntime, as the exported backbone.onnx the
server runs (`training.onnx_backbone`; 1.6x torch eager end to end on 2 cores,
benchmarks/README.md); on a GPU it runs in torch. Both give the same features to within the
export's parity tolerance (1e-4); the h5 attribute `feature_engine` says which one made a file.

Each file is written under a temporary name and renamed when complete, so a killed run never
leaves a truncated .h5, and a rerun skips the slides that are done.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm import tqdm

from core.bundle import LAYER_ENCODERS
from core.cli import (
    add_fallback_mpp_argument,
    add_tiling_arguments,
    add_tissue_arguments,
    tiling_from_args,
    tissue_from_args,
)
from core.errors import ConfigError
from core.inference_backends import DEFAULT_BACKEND, DEFAULT_PRECISION, add_backend_arguments
from core.tiling import DEFAULT_TILING, ArtefactParams, TilingParams, TissueParams
from training.backbone import Backbone, build_backbone
from training.encoders import (
    DEFAULT_ENCODER,
    Encoder,
    encoder_for_layer,
    encoder_spec,
    encoders_help,
)
from training.feature_file import STAIN_ATTR, FeatureAttrs
from training.onnx_backbone import OnnxBackbone
from training.weights import PRETRAINED
from wsi.stain import StainSample
from wsi.tile_quality import TileQuality, artefact_flags, measure_tiles

log = logging.getLogger(__name__)

ENGINES = ("auto", "onnxruntime", "torch")


@dataclass(frozen=True)
class FeatureModelOptions:
    """Which encoder computes the features, and where (`build_feature_model`)."""

    weights: str = PRETRAINED     # pretrained (local cache) | none (seeded) | file path
    encoder: str = DEFAULT_ENCODER   # a training.encoders name, or timm:NAME
    weights_seed: int = 0         # seed of the random init for weights "none"
    device: str = "auto"          # auto | cpu | cuda[:N]
    engine: str = "auto"          # auto = the ONNX graph on the CPU, torch on a GPU
    threads: int | None = None    # backbone threads (default: every usable core)
    backend: str = DEFAULT_BACKEND       # what runs the ONNX graph (core.inference_backends)
    precision: str = DEFAULT_PRECISION

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FeatureModelOptions:
        return cls(args.weights, encoder_from_args(args), args.weights_seed, args.device,
                   args.engine, args.threads, args.backend, args.precision)


def encoder_from_args(args: argparse.Namespace) -> str:
    """`--encoder`, or the ResNet-50 entry of the older `--layer` (never both, disagreeing)."""
    if args.layer is None:
        return args.encoder or DEFAULT_ENCODER
    named = encoder_for_layer(args.layer)
    if args.encoder is not None and args.encoder != named:
        raise ConfigError(f"--layer {args.layer} is encoder {named}; it contradicts --encoder "
                          f"{args.encoder} (--layer is the older spelling: drop it)")
    return named


@dataclass(frozen=True)
class ExtractionOptions:
    """How the tiles of one slide are chosen, read and batched (`extract_features`)."""

    tiling: TilingParams = DEFAULT_TILING
    batch_size: int = 64
    workers: int = 4                  # tile reader threads
    limit_tiles: int | None = None    # only the first N tiles (quick runs)
    fallback_mpp: float | None = None
    artefacts: ArtefactParams = ArtefactParams()   # which tiles are flagged (wsi.tile_quality)
    tissue: TissueParams = TissueParams()   # the tissue mask (and the tiles' ink/glass measures)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.workers < 1:
            raise ConfigError(f"--batch-size and --workers must be >= 1, got {self.batch_size} "
                              f"and {self.workers}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExtractionOptions:
        """The flags' options; the tile size and pixel size default to the encoder's input."""
        spec = encoder_spec(encoder_from_args(args))
        tiling = tiling_from_args(args, spec.tile_size, spec.mpp)
        check_tile_size(spec, tiling.tile_size)
        return cls(tiling, args.batch_size, args.workers, args.limit_tiles,
                   args.fallback_mpp, tissue=tissue_from_args(args))


def check_tile_size(spec: Encoder, tile_size: int) -> None:
    """A ViT takes exactly its stated tile size (its position embeddings are fixed)."""
    if spec.fixed_tile_size and tile_size != spec.tile_size:
        raise ConfigError(f"encoder {spec.name} takes {spec.tile_size} px tiles, not "
                          f"--tile-size {tile_size} (read them at another --mpp instead)")


def add_feature_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of FeatureModelOptions and ExtractionOptions (`features`, `camelyon16`)."""
    m, e = FeatureModelOptions(), ExtractionOptions()
    parser.add_argument("--encoder", default=None, metavar="NAME",
                        help=f"the feature extractor (default {m.encoder}). {encoders_help()}")
    parser.add_argument("--weights", default=m.weights,
                        help="pretrained: the encoder's published checkpoint from the local "
                             "cache, never downloaded (ResNet-50: the torch hub cache, also "
                             "called imagenet; others: the Hugging Face cache, $HF_HUB_CACHE) | "
                             "none (random, seeded) | path to a safetensors file or state dict "
                             f"(default {m.weights})")
    parser.add_argument("--weights-seed", type=int, default=m.weights_seed,
                        help=f"seed of the random init for --weights none (default {m.weights_seed})")
    parser.add_argument("--layer", choices=sorted(LAYER_ENCODERS), default=None,
                        help="the older spelling of the ResNet-50 encoders: pool = --encoder "
                             "resnet50, layer3 = --encoder resnet50-trunc")
    add_tiling_arguments(parser, model_states=True)
    add_tissue_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=e.batch_size,
                        help=f"tiles per batch ({e.batch_size})")
    parser.add_argument("--workers", type=int, default=e.workers,
                        help=f"tile reader threads ({e.workers})")
    parser.add_argument("--device", default=m.device,
                        help=f"auto | cpu | cuda[:N] (default {m.device})")
    parser.add_argument("--engine", choices=ENGINES, default=m.engine,
                        help="what runs the encoder: auto = the served ONNX graph on the CPU "
                             "(run by --backend), torch on a GPU; onnxruntime = the ONNX graph "
                             "(default auto)")
    add_backend_arguments(parser)
    parser.add_argument("--threads", type=int, default=m.threads,
                        help="backbone threads (default: every core this process may use; "
                             "with --ray: --ray-num-cpus per actor)")
    parser.add_argument("--limit-tiles", type=int, default=e.limit_tiles,
                        help="only the first N tiles of each slide (quick runs)")
    add_fallback_mpp_argument(parser)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for but torch sees no CUDA device")
    return torch.device(device)


def build_feature_model(weights: str, encoder: str, seed: int, device: torch.device,
                        engine: str = "auto", threads: int | None = None,
                        backend: str = DEFAULT_BACKEND, precision: str = DEFAULT_PRECISION,
                        ) -> Backbone | OnnxBackbone:
    """The feature extractor (`encoder`, training.encoders) for `extract_features`: `auto` is
    the exported ONNX graph on the CPU (run by `backend` at `precision`, chosen as the server
    chooses them) and torch on a GPU. `threads`: the backbone's threads (default: every core
    this process may use)."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown feature engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    if engine == "auto":
        engine = "onnxruntime" if device.type == "cpu" else "torch"
    if engine == "onnxruntime" and device.type != "cpu":
        raise ConfigError(f"--engine onnxruntime runs on the CPU; for --device {device} use "
                          f"--engine torch")
    backbone = build_backbone(weights, encoder=encoder, seed=seed)
    if engine == "onnxruntime":
        return OnnxBackbone(backbone, threads=threads, backend=backend, precision=precision)
    return backbone.to(device)


def feature_model(options: FeatureModelOptions) -> tuple[Backbone | OnnxBackbone, torch.device]:
    """`build_feature_model` for a FeatureModelOptions: (model, the device it runs on)."""
    device = resolve_device(options.device)
    model = build_feature_model(options.weights, options.encoder, options.weights_seed, device,
                                options.engine, options.threads, options.backend,
                                options.precision)
    return model, device


def _temp_path(out_h5: Path) -> Path:
    # Hidden and not ending in .h5: never mistaken for a finished file by a reader or a rerun.
    return out_h5.with_name(f".{out_h5.name}.partial")


def extract_features(slide_path: str | os.PathLike, out_h5: str | os.PathLike,
                     model: Backbone | OnnxBackbone,
                     options: ExtractionOptions = ExtractionOptions(), *,
                     device: str | torch.device = "cpu", progress: bool = True) -> dict[str, Any]:
    """Features of every tissue tile of one slide into `out_h5`; returns a summary dict.

    `model` is a `training.backbone.Backbone` (uint8 NHWC in, torch), already on `device`, or
    a `training.onnx_backbone.OnnxBackbone` (`build_feature_model` picks). An existing `out_h5`
    is a finished slide: it is skipped (summary `skipped=True`).
    Raises `core.errors.SlideError` for a slide that cannot be read.
    """
    from wsi.grid import tiles_for_slide
    from wsi.slide import open_slide

    o = options
    out_h5 = Path(out_h5)
    if out_h5.exists():
        log.info("%s: features already in %s, skipped", Path(slide_path).name, out_h5)
        return {"slide": Path(slide_path).stem, "path": out_h5, "tiles": None, "skipped": True}
    device = torch.device(device)
    out_h5.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(out_h5)
    with open_slide(slide_path, fallback_mpp=o.fallback_mpp) as slide:
        check_tile_size(model.spec, o.tiling.tile_size)
        _, grid = tiles_for_slide(slide, o.tiling, params=o.tissue)
        log.info("%s: %s", slide.name, grid.scale.describe())
        coords, fraction = grid.coords, grid.tissue_fraction
        if o.limit_tiles is not None:
            coords, fraction = coords[:o.limit_tiles], fraction[:o.limit_tiles]
        width, height = slide.dimensions
        facts = model.describe()
        attrs = FeatureAttrs(slide=slide.name, level0_width=width, level0_height=height,
                             mpp=slide.mpp, mpp_source=slide.mpp_source, tiling=o.tiling,
                             read_level=grid.scale.level,
                             backbone_layer=facts["backbone_layer"], encoder=facts["encoder"],
                             weights=facts["weights"],
                             weights_seed=facts["weights_seed"],
                             feature_engine=facts["feature_engine"], artefacts=o.artefacts,
                             tissue=o.tissue).to_h5()
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs.update(attrs)
                f.create_dataset("coords", data=coords.astype(np.int64)).attrs.update(attrs)
                f.create_dataset("tissue_fraction", data=fraction.astype(np.float32))
                features = f.create_dataset(
                    "features", shape=(len(coords), model.feature_dim), dtype=np.float32,
                    # h5py refuses a chunk larger than the data: a 0-tile file is not chunked
                    chunks=(min(len(coords), o.batch_size), model.feature_dim) if len(coords)
                    else None)
                quality, stain = TileQuality.empty(len(coords)), None
                if len(coords):
                    quality, stain = _fill(features, slide, coords, grid.scale, model, o, device,
                                           progress, desc=slide.name)
                if stain is not None:
                    f.attrs[STAIN_ATTR] = json.dumps(stain)
                flags = artefact_flags(quality, o.artefacts)
                f.create_dataset("ink_fraction", data=quality.ink)
                f.create_dataset("background_fraction", data=quality.background)
                f.create_dataset("focus", data=quality.focus)
                f.create_dataset("artefact_flags", data=flags)
            os.replace(tmp, out_h5)
        except BaseException:  # also KeyboardInterrupt: never leave a partial file behind
            tmp.unlink(missing_ok=True)
            raise
    if len(coords):
        log.info("%s: %d tiles (%d flagged as artefacts) -> %s", slide.name, len(coords),
                 int(np.count_nonzero(flags)), out_h5)
    else:
        log.warning("%s: no tissue tile (no tile has %g of tissue under the mask): recorded as "
                    "no_tissue, a features file of 0 tiles -> %s", slide.name,
                    o.tiling.min_tissue, out_h5)
    return {"slide": slide.name, "path": out_h5, "tiles": len(coords), "skipped": False,
            "no_tissue": not len(coords), "artefacts": int(np.count_nonzero(flags))}


def _tile_features(model: Backbone | OnnxBackbone, device: torch.device):
    """uint8 tiles [n, s, s, 3] (numpy) -> float32 features [n, D] (numpy) with `model`."""
    if isinstance(model, OnnxBackbone):
        return model
    pin = device.type == "cuda"

    def run(batch: np.ndarray) -> np.ndarray:
        tiles = torch.from_numpy(batch)
        if pin:
            tiles = tiles.pin_memory().to(device, non_blocking=True)
        return model(tiles).float().cpu().numpy()

    return run


def _fill(features: h5py.Dataset, slide, coords: np.ndarray, scale, model: Backbone | OnnxBackbone,
          options: ExtractionOptions, device: torch.device, progress: bool, desc: str
          ) -> tuple[TileQuality, dict[str, float] | None]:
    """Stream tile batches through the model into the (preallocated) h5 dataset; the artefact
    measures of the same tiles and the slide's stain statistics (wsi.stain, on its clean tiles,
    as the scorer measures a slide) come back."""
    from wsi.decode_once import make_tile_reader

    reader = make_tile_reader(slide, coords, tile_size=scale.read_size, level=scale.level,
                              out_size=scale.tile_size, workers=options.workers,
                              batch_size=options.batch_size)
    tile_features = _tile_features(model, device)
    measures: list[TileQuality] = []
    stain = StainSample(len(coords))
    try:
        with torch.inference_mode(), tqdm(total=len(coords), desc=desc, unit="tile",
                                          disable=not progress, leave=False) as bar:
            for batch in reader:
                out = tile_features(batch.tiles)
                # Batches come in grid order as one contiguous index run: a slice write.
                features[int(batch.index[0]):int(batch.index[-1]) + 1] = out
                measured = measure_tiles(batch.tiles, options.tissue, mpp=scale.read_mpp)
                measures.append(measured)
                stain.add(int(batch.index[0]), batch.tiles,
                          artefact_flags(measured, options.artefacts) == 0)
                bar.update(len(out))
    finally:
        reader.close()
    return TileQuality.concatenate(measures), stain.statistics()


