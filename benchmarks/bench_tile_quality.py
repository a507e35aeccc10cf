"""What artefact-aware tiles and the optical-density mask cost, against the work beside them.

    python -m benchmarks.bench_tile_quality [--slide PATH] [--repeats 7] [--batch 64]

Two ratios, each measured against its baseline in this one process, on the same data:

1. `wsi.tile_quality.measure_tiles` on a batch of tissue tiles, against the ResNet-50 backbone
   (onnxruntime, the served graph, random init) on the same batch: the share of the scoring
   time the measures add (they run while the engine works on the batch, so this is an upper
   bound); also with the same tiles taken as 0.486 um/px (a 20x model's: `mpp=`);
2. the tissue mask with the optical-density cue (the default) against the seed's steps alone
   (`TissueParams(optical_density=False)`), open + mask + grid.

Default slide: a 8192 x 8192 synthetic hard slide (pen, marker and blur across tissue, a pale
stain), written once into the benchmark cache. Prints a markdown table and writes
benchmarks/results/tile_quality.json with the CPU model and flags.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_wsi import CACHE
from benchmarks.machine import cpu_facts
from core.tiling import CAMELYON16_MPP, TissueParams
from wsi.grid import tiles_for_slide
from wsi.slide import open_slide
from wsi.tile_quality import measure_tiles
from wsi.tiles import TileReader

RESULTS = Path(__file__).resolve().parent / "results" / "tile_quality.json"


def default_slide() -> Path:
    from wsi.synth import write_synthetic_slide

    path = CACHE / "hard_8192.tif"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        write_synthetic_slide(path, 8192, 8192, seed=3, stain="pale", tissue_artefacts=True)
    return path


def _median_seconds(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, help="slide (default: an 8192 px synthetic hard slide)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    path = args.slide or default_slide()
    load_before = os.getloadavg()[0]

    with open_slide(path) as slide:
        _, grid = tiles_for_slide(slide)
        pick = np.linspace(0, len(grid) - 1, min(args.batch, len(grid))).astype(np.int64)
        tiles = np.concatenate([b.tiles.copy() for b in TileReader(slide, grid.coords[pick])])

    from training.backbone import build_backbone
    from training.onnx_backbone import OnnxBackbone

    backbone = OnnxBackbone(build_backbone("none", layer="pool", seed=0))
    backbone(tiles)   # warm-up: session creation and first-run allocations
    measure_tiles(tiles)
    quality_s, quality_all = _median_seconds(lambda: measure_tiles(tiles), args.repeats)
    # the same pixels as a 20x model's tiles: ink blocks of 4 px, the focus rescaled
    coarse_s, coarse_all = _median_seconds(lambda: measure_tiles(tiles, mpp=2 * CAMELYON16_MPP), args.repeats)
    backbone_s, backbone_all = _median_seconds(lambda: backbone(tiles), args.repeats)

    def mask(params):
        with open_slide(path) as s:
            tiles_for_slide(s, params=params)

    mask(TissueParams())
    od_s, od_all = _median_seconds(lambda: mask(TissueParams()), args.repeats)
    seed_s, seed_all = _median_seconds(lambda: mask(TissueParams(optical_density=False)), args.repeats)

    result = {"machine": {**cpu_facts(), "platform": platform.platform(),
                          "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
              "slide": str(path), "batch": len(tiles), "repeats": args.repeats,
              "measure_tiles_s": quality_all, "measure_tiles_mpp_0486_s": coarse_all,
              "backbone_s": backbone_all,
              "measure_over_backbone": quality_s / backbone_s,
              "mask_with_od_s": od_all, "mask_seed_steps_s": seed_all,
              "mask_od_over_seed": od_s / seed_s}
    print(f"\n{cpu_facts()['model']} ({', '.join(cpu_facts()['flags'])}), {os.cpu_count()} CPUs, "
          f"load {load_before:.1f} -> {os.getloadavg()[0]:.1f}; {path.name}, batch {len(tiles)}\n")
    print(f"| measure (median of {args.repeats}) | seconds | ratio to baseline |\n|---|---|---|")
    print(f"| measure_tiles, {len(tiles)} tiles | {quality_s:.4f} | "
          f"{quality_s / backbone_s:.3f} of the ResNet-50 backbone ({backbone_s:.2f} s) |")
    print(f"| measure_tiles, {len(tiles)} tiles, mpp=0.486 | {coarse_s:.4f} | "
          f"{coarse_s / backbone_s:.3f} of the ResNet-50 backbone |")
    print(f"| open + mask (with OD cue) + grid | {od_s:.3f} | "
          f"{od_s / seed_s:.2f} x the seed's steps alone ({seed_s:.3f} s) |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
