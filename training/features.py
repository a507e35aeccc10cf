"""`milroi-train features`: ResNet-50 features of every tissue tile, one h5 file per slide.

The tiles are the server's: `wsi.grid.tiles_for_slide` (same tissue mask, same grid), read by
`wsi.tiles.TileReader` in background threads while the model runs on the previous batch.

The engine (`--engine`): on the CPU the ResNet-50 runs in onnxruntime, as the exported
backbone.onnx the server runs (`training.onnx_backbone`; 1.6x torch eager end to end on 2
cores, benchmarks/README.md); on a GPU it runs in torch. Both give the same features to within
the export's parity tolerance (1e-4); the h5 attribute `feature_engine` says which one made a file.

Output, the CLAM/TRIDENT layout: FEATURES_DIR/h5_files/<slide>.h5 with `features` float32 [N, D],
`coords` int64 [N, 2] (level-0 top-left x, y, grid order) and `tissue_fraction` float32 [N];
the slide and extraction facts as attributes on the file and on `coords` (where CLAM reads
them). Each file is written under a temporary name and renamed when complete, so a killed run
never leaves a truncated .h5, and a rerun skips the slides that are done.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm import tqdm

from training.backbone import LAYERS, Backbone, build_backbone
from training.onnx_backbone import OnnxBackbone
from wsi.cli import add_ray_arguments
from wsi.errors import SlideError, WsiError

log = logging.getLogger(__name__)

H5_SUBDIR = "h5_files"
ENGINES = ("auto", "onnxruntime", "torch")


def feature_path(features_dir: str | os.PathLike, slide_name: str) -> Path:
    """Where the features of slide `slide_name` (file stem) live."""
    return Path(features_dir) / H5_SUBDIR / f"{slide_name}.h5"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WsiError(f"--device {device} asked for but torch sees no CUDA device")
    return torch.device(device)


def build_feature_model(weights: str, layer: str, seed: int, device: torch.device,
                        engine: str = "auto", threads: int | None = None
                        ) -> Backbone | OnnxBackbone:
    """The ResNet-50 feature extractor for `extract_features`: `auto` is onnxruntime on the CPU
    and torch on a GPU. `threads`: onnxruntime's intra-op threads (default: every core this
    process may use)."""
    if engine not in ENGINES:
        raise WsiError(f"unknown feature engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if threads is not None and threads < 1:
        raise WsiError(f"--threads must be at least 1, got {threads}")
    if engine == "auto":
        engine = "onnxruntime" if device.type == "cpu" else "torch"
    if engine == "onnxruntime" and device.type != "cpu":
        raise WsiError(f"--engine onnxruntime runs on the CPU; for --device {device} use "
                       f"--engine torch")
    backbone = build_backbone(weights, layer=layer, seed=seed)
    if engine == "onnxruntime":
        return OnnxBackbone(backbone, threads=threads)
    return backbone.to(device)


def _temp_path(out_h5: Path) -> Path:
    # Hidden and not ending in .h5: never mistaken for a finished file by a reader or a rerun.
    return out_h5.with_name(f".{out_h5.name}.partial")


def extract_features(slide_path: str | os.PathLike, out_h5: str | os.PathLike,
                     model: Backbone | OnnxBackbone,
                     *, tile_size: int = 224, min_tissue: float = 0.25, batch_size: int = 64,
                     workers: int = 4, device: str | torch.device = "cpu",
                     limit_tiles: int | None = None, fallback_mpp: float | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Features of every tissue tile of one slide into `out_h5`; returns a summary dict.

    `model` is a `training.backbone.Backbone` (uint8 NHWC in, torch), already on `device`, or
    a `training.onnx_backbone.OnnxBackbone` (`build_feature_model` picks). An existing `out_h5`
    is a finished slide: it is skipped (summary `skipped=True`).
    Raises `wsi.errors.SlideError` for a slide that cannot be read.
    """
    from wsi.grid import tiles_for_slide
    from wsi.slide import open_slide

    out_h5 = Path(out_h5)
    if out_h5.exists():
        log.info("%s: features already in %s, skipped", Path(slide_path).name, out_h5)
        return {"slide": Path(slide_path).stem, "path": out_h5, "tiles": None, "skipped": True}
    device = torch.device(device)
    out_h5.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(out_h5)
    with open_slide(slide_path, fallback_mpp=fallback_mpp) as slide:
        _, grid = tiles_for_slide(slide, tile_size=tile_size, min_tissue=min_tissue)
        coords, fraction = grid.coords, grid.tissue_fraction
        if limit_tiles is not None:
            coords, fraction = coords[:limit_tiles], fraction[:limit_tiles]
        width, height = slide.dimensions
        attrs = {"patch_size": tile_size, "patch_level": 0, "level0_width": width,
                 "level0_height": height, "mpp": float(slide.mpp),
                 "mpp_source": slide.mpp_source, "slide": slide.name,
                 "min_tissue": float(min_tissue), **_model_attrs(model)}
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs.update(attrs)
                f.create_dataset("coords", data=coords.astype(np.int64)).attrs.update(attrs)
                f.create_dataset("tissue_fraction", data=fraction.astype(np.float32))
                features = f.create_dataset(
                    "features", shape=(len(coords), model.feature_dim), dtype=np.float32,
                    chunks=(max(1, min(len(coords), batch_size)), model.feature_dim))
                if len(coords):
                    _fill(features, slide, coords, model, tile_size, batch_size, workers, device,
                          progress, desc=slide.name)
            os.replace(tmp, out_h5)
        except BaseException:  # also KeyboardInterrupt: never leave a partial file behind
            tmp.unlink(missing_ok=True)
            raise
    log.info("%s: %d tiles -> %s", slide.name, len(coords), out_h5)
    return {"slide": slide.name, "path": out_h5, "tiles": len(coords), "skipped": False}


def _model_attrs(model: Backbone | OnnxBackbone) -> dict[str, Any]:
    facts = model.describe()
    return {k: facts[k] for k in ("backbone_layer", "weights", "weights_seed", "feature_engine")}


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


def _fill(features: h5py.Dataset, slide, coords: np.ndarray, model: Backbone | OnnxBackbone,
          tile_size: int, batch_size: int, workers: int, device: torch.device, progress: bool,
          desc: str) -> None:
    """Stream tile batches through the model into the (preallocated) h5 dataset."""
    from wsi.tiles import TileReader

    reader = TileReader(slide, coords, tile_size=tile_size, level=0, workers=workers,
                        batch_size=batch_size)
    tile_features = _tile_features(model, device)
    try:
        with torch.inference_mode(), tqdm(total=len(coords), desc=desc, unit="tile",
                                          disable=not progress, leave=False) as bar:
            for batch in reader:
                out = tile_features(batch.tiles)
                # Batches come in grid order as one contiguous index run: a slice write.
                features[int(batch.index[0]):int(batch.index[-1]) + 1] = out
                bar.update(len(out))
    finally:
        reader.close()


# ---------------------------------------------------------------------------------------------
# command line


# Extensions of the formats OpenSlide reads: a file with one of these that OpenSlide does not
# recognise is a damaged slide (reported, counted as a failure), any other file is skipped.
SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
                  ".bif", ".dcm", ".czi"}


def find_slides(root: Path, exclude: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(candidates, skipped) under `root`, recursively, sorted.

    Candidates: files OpenSlide recognises, and files with a slide extension (opening a damaged
    one then gives a SlideError that is reported). Skipped: everything else.
    """
    import openslide

    slides, skipped = [], []
    exclude = exclude.resolve() if exclude else None
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if exclude and exclude in path.resolve().parents:
            continue
        try:
            fmt = openslide.OpenSlide.detect_format(str(path))
        except Exception:  # unreadable file: let open_slide report it
            fmt = None
        (slides if fmt or path.suffix.lower() in SLIDE_SUFFIXES else skipped).append(path)
    return slides, skipped


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides_dir", type=Path, help="folder of slides (searched recursively)")
    parser.add_argument("--out", type=Path, required=True,
                        help="features folder; files go to OUT/h5_files/<slide>.h5")
    parser.add_argument("--weights", default="imagenet",
                        help="imagenet (torch hub cache, no download) | none (random, seeded) | "
                             "path to a state_dict (default imagenet)")
    parser.add_argument("--weights-seed", type=int, default=0,
                        help="seed of the random init for --weights none (default 0)")
    parser.add_argument("--layer", choices=sorted(LAYERS), default="pool",
                        help="pool: 2048-d after layer4; layer3: CLAM's 1024-d (default pool)")
    parser.add_argument("--tile-size", type=int, default=224, help="level-0 tile size (224)")
    parser.add_argument("--min-tissue", type=float, default=0.25,
                        help="minimum tissue fraction of a tile (default 0.25)")
    parser.add_argument("--batch-size", type=int, default=64, help="tiles per batch (64)")
    parser.add_argument("--workers", type=int, default=4, help="tile reader threads (4)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="what runs the ResNet-50: auto = onnxruntime on the CPU (the "
                             "served graph, faster there), torch on a GPU (default auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="onnxruntime threads (default: every core this process may use; "
                             "with --ray: --ray-num-cpus per actor)")
    parser.add_argument("--limit-tiles", type=int, default=None,
                        help="only the first N tiles of each slide (quick runs)")
    parser.add_argument("--fallback-mpp", type=float, default=None,
                        help="um/px for slides without MPP metadata (default: the core's 0.243)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_ray_arguments(parser, actor_holds="backbone")


def run(args: argparse.Namespace) -> int:
    if not args.slides_dir.is_dir():
        raise WsiError(f"slides folder {args.slides_dir} does not exist")
    slides, skipped = find_slides(args.slides_dir, exclude=args.out)
    for path in skipped:
        log.info("skipping %s: not a slide OpenSlide can read", path)
    stems: dict[str, Path] = {}
    for path in slides:
        if path.stem in stems:
            raise WsiError(f"two slides named {path.stem!r} ({stems[path.stem]} and {path}): "
                           f"their feature files would collide")
        stems[path.stem] = path
    if not slides:
        raise WsiError(f"no slides found under {args.slides_dir}")
    if getattr(args, "ray", None) is not None:
        from training.ray_features import extract_on_ray  # imports ray: only with --ray

        return extract_on_ray(args, slides)
    device = resolve_device(args.device)
    model = build_feature_model(args.weights, args.layer, args.weights_seed, device, args.engine,
                                args.threads)
    log.info("%d slides, ResNet-50 %s (%s) in %s on %s", len(slides), args.layer, args.weights,
             model.describe()["feature_engine"], device)
    failed = []
    done = skipped_count = 0
    for path in tqdm(slides, desc="slides", unit="slide", disable=args.no_progress):
        try:
            summary = extract_features(
                path, feature_path(args.out, path.stem), model, tile_size=args.tile_size,
                min_tissue=args.min_tissue, batch_size=args.batch_size, workers=args.workers,
                device=device, limit_tiles=args.limit_tiles, fallback_mpp=args.fallback_mpp,
                progress=not args.no_progress)
        except SlideError as exc:  # a corrupt slide: report, go on with the others
            log.error("%s", exc)
            failed.append(path)
            continue
        skipped_count += summary["skipped"]
        done += not summary["skipped"]
    log.info("features: %d slides written, %d already done, %d failed", done, skipped_count,
             len(failed))
    if failed:
        log.error("failed slides: %s", ", ".join(str(p) for p in failed))
        return 1
    return 0
