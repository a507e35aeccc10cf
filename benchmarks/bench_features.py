"""Feature extraction throughput on this machine: `python -m benchmarks.bench_features`.

Four numbers in tiles/s, same tiles, same batch size, same process, median of `--repeats`
(the four take turns within each repeat):

- milroi end to end with each engine: `training.extraction.extract_features` on a synthetic
  slide (open, tissue mask, grid, background tile reading, ResNet-50, h5 write), the ResNet-50
  in onnxruntime (`training.onnx_backbone.OnnxBackbone`, the CPU default) and in torch eager;
- the bare backbone in onnxruntime (that same session) and in torch eager (inference_mode):
  the ceilings of the two end-to-end rows.

Also the one-off cost of the onnxruntime engine (export + parity check, once per run).

Prints a markdown table and writes benchmarks/results/features.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "features.json"


def _interleaved_rates(n_tiles: int, repeats: int, paths: dict) -> dict[str, dict]:
    """tiles/s of each path, median of `repeats`; the paths take turns within every repeat, so
    a change in the machine's load over the run falls on all of them alike."""
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: {"tiles_per_s": round(n_tiles / statistics.median(s), 2),
                   "seconds": [round(x, 3) for x in s]} for name, s in seconds.items()}


def _batches(tiles: np.ndarray, batch_size: int):
    for i in range(0, len(tiles), batch_size):
        yield tiles[i:i + batch_size]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=64, help="tiles per measurement (64)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer", default="pool", choices=["pool", "layer3"])
    parser.add_argument("--workers", type=int, default=2, help="tile reader threads (2)")
    parser.add_argument("--slide", type=Path, default=None,
                        help="measure on this slide instead of a wsi.synth synthetic one")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from training.backbone import build_backbone
    from training.extraction import ExtractionOptions, extract_features
    from training.onnx_backbone import OnnxBackbone
    from wsi.grid import tiles_for_slide
    from wsi.slide import open_slide

    backbone = build_backbone("none", layer=args.layer, seed=0)
    start = time.perf_counter()
    onnx_backbone = OnnxBackbone(backbone)
    export_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.slide is None:
            from wsi.synth import write_synthetic_slide

            slide_path = tmp / "bench_slide.tif"
            write_synthetic_slide(slide_path, 4096, 4096, seed=0, tumor=True)
        else:
            slide_path = args.slide
        with open_slide(slide_path) as slide:
            _, grid = tiles_for_slide(slide)
            coords = grid.coords[:args.tiles]
            tiles = np.stack([slide.read_region(int(x), int(y), 224, 224) for x, y in coords])
        n = len(tiles)
        if n < args.tiles:
            print(f"note: the synthetic slide has only {n} tissue tiles")

        def end_to_end(model):
            def run():
                out = tmp / "h5_files" / "bench_slide.h5"
                out.unlink(missing_ok=True)
                extract_features(slide_path, out, model,
                                 ExtractionOptions(batch_size=args.batch_size,
                                                   workers=args.workers, limit_tiles=n),
                                 progress=False)
            return run

        def onnxruntime_backbone():
            for batch in _batches(tiles, args.batch_size):
                onnx_backbone(batch)

        def torch_backbone():
            with torch.inference_mode():
                for batch in _batches(tiles, args.batch_size):
                    backbone(torch.from_numpy(batch))

        # one warm-up pass each (allocators, oneDNN primitive caches), not timed
        torch_backbone()
        onnxruntime_backbone()
        rows = _interleaved_rates(n, args.repeats, {
            "milroi extract_features, onnxruntime (default on CPU)": end_to_end(onnx_backbone),
            "milroi extract_features, torch": end_to_end(backbone),
            "backbone, onnxruntime CPU": onnxruntime_backbone,
            "backbone, torch eager": torch_backbone})

    result = {
        "benchmark": "features", "slide": str(args.slide or "wsi.synth 4096 x 4096"), "tiles": n,
        "batch_size": args.batch_size,
        "repeats": args.repeats, "layer": args.layer, "weights": "none",
        "tile_reader_workers": args.workers, "results": rows,
        "onnxruntime_engine_setup_s": round(export_seconds, 1),
        "end_to_end_ratio_onnxruntime_vs_torch": round(
            rows["milroi extract_features, onnxruntime (default on CPU)"]["tiles_per_s"]
            / rows["milroi extract_features, torch"]["tiles_per_s"], 2),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nResNet-50 ({args.layer}) features, {n} tiles of 224 px, batch {args.batch_size}, "
          f"median of {args.repeats}, {os.cpu_count()} CPUs\n")
    print("| path | tiles/s |\n|---|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['tiles_per_s']:.1f} |")
    print(f"\nend to end, onnxruntime / torch: {result['end_to_end_ratio_onnxruntime_vs_torch']}x; "
          f"onnxruntime engine setup (export + parity, once per run): "
          f"{result['onnxruntime_engine_setup_s']} s")
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
