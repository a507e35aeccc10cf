"""Tile reader benchmark: the decode-once reader against the OpenSlide reader, per thread.

    python -m benchmarks.bench_reader [--quick] [--slide PATH] [--tiles 4096] [--repeats 3]

The slide is Camelyon16's own layout: generic pyramidal TIFF, 512-px YCbCr JPEG tiles with one
shared JPEGTables tag (`wsi.synth.write_camelyon_size_slide(tile=512, jpeg_tables=True)`,
98304 x 196608 px, `--quick` 24576 x 49152), written once into the bench cache. Both readers
read the same run of `--tiles` consecutive tissue patches from the middle of the grid, in grid
order (the scoring job's access pattern), with 1 thread and with one per core; each run opens a
fresh slide (no warm OpenSlide cache). Speeds are medians of `--repeats`.

The scaled rows read the same middle of the grid for a model at 0.5 um/px (a 20x encoder): pyramid
level 1, 230 px regions resized to 224 (wsi.scale), decode-once plus resize against OpenSlide's
read_region at level 1 plus the same resize, per thread count (the resize is most of the cost:
the decode-once reader spreads it over its threads).

Decodes per patch: the decode-once reader counts its decodes; OpenSlide cannot be asked, so its
row gives the stored tiles each patch touches, which is what OpenSlide decodes per patch when its
tile cache misses (its cache makes the true figure lower, but above the decode-once one).
Prints a markdown table and writes benchmarks/results/reader.json with the CPU (machine.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_wsi import CACHE, CAMELYON_SIZE
from benchmarks.machine import machine_facts
from core.tiling import DEFAULT_TILING, TilingParams
from wsi.decode_once import DecodeOnceReader, make_tile_reader, patch_tiles, tiled_level
from wsi.grid import tiles_for_slide
from wsi.scale import ReadScale
from wsi.slide import open_slide
from wsi.synth import write_camelyon_size_slide

RESULTS = Path(__file__).resolve().parent / "results" / "reader.json"
QUICK_SIZE = (24_576, 49_152)


def camelyon_512_slide(size: tuple[int, int] = CAMELYON_SIZE) -> Path:
    """The cached Camelyon-layout slide (512-px JPEG tiles, shared tables) of `size`."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"camelyon512_{size[0]}x{size[1]}.tif"
    if not path.exists():
        partial = path.with_suffix(".partial.tif")
        started = time.perf_counter()
        write_camelyon_size_slide(partial, width=size[0], height=size[1], seed=0, tile=512,
                                  jpeg_tables=True)
        os.replace(partial, path)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    return path


# The model of the scaled rows: a 20x encoder's 224 px at 0.5 um/px, on this 0.243 um/px slide
# (wsi.scale: pyramid level 1, 230 px regions resized to 224).
SCALED_MPP = 0.5


def grid_run(path: Path, n_tiles: int, tiling: TilingParams = DEFAULT_TILING
             ) -> tuple[np.ndarray, ReadScale]:
    """`n_tiles` consecutive grid patches (grid order) from the middle of the tissue grid at
    `tiling`'s scale, and that scale."""
    with open_slide(path) as slide:
        _, grid = tiles_for_slide(slide, tiling)
    if not len(grid):
        raise ValueError(f"{path}: no tissue tile to read")
    start = max(0, len(grid) // 2 - n_tiles // 2)
    return grid.coords[start:start + n_tiles], grid.scale


def _one_run(path: Path, coords: np.ndarray, workers: int, reader: str,
             scale: ReadScale | None = None) -> dict:
    sizes = {} if scale is None else {"tile_size": scale.read_size, "level": scale.level,
                                      "out_size": scale.tile_size}
    with open_slide(path) as slide:   # fresh handle: OpenSlide caches decoded tiles per handle
        started, cpu_started = time.perf_counter(), time.process_time()
        tile_reader = make_tile_reader(slide, coords, workers=workers, batch_size=64, reader=reader,
                                       **sizes)
        n = sum(len(b.index) for b in tile_reader)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    decodes = tile_reader.decodes if isinstance(tile_reader, DecodeOnceReader) else None
    return {"tiles_per_s": n / elapsed, "cpu_per_wall": cpu / elapsed, "tiles": n, "decodes": decodes}


def bench_readers(path: Path, n_tiles: int, thread_counts=(1, 2), repeats: int = 3) -> dict:
    """Both readers on the same patches, each thread count, median of `repeats` (interleaved,
    so a change in the machine's load hits both)."""
    coords, _ = grid_run(path, n_tiles)
    with open_slide(path) as slide:
        source = tiled_level(slide)
    touched = patch_tiles(coords, 224, source)
    rows = []
    for workers in thread_counts:
        runs: dict[str, list[dict]] = {"openslide": [], "decode-once": []}
        for _ in range(repeats):
            for reader in runs:
                runs[reader].append(_one_run(path, coords, workers, reader))
        row = {"threads": workers, "tiles": len(coords)}
        for reader, rs in runs.items():
            row[reader] = {"tiles_per_s": round(statistics.median(r["tiles_per_s"] for r in rs), 1),
                           "all": [round(r["tiles_per_s"], 1) for r in rs],
                           "cpu_per_wall": round(statistics.median(r["cpu_per_wall"] for r in rs), 2)}
        row["decode-once"]["decodes_per_patch"] = round(runs["decode-once"][0]["decodes"] / len(coords), 3)
        row["openslide"]["tiles_touched_per_patch"] = round(float((touched >= 0).sum(1).mean()), 3)
        row["ratio"] = round(row["decode-once"]["tiles_per_s"] / row["openslide"]["tiles_per_s"], 2)
        rows.append(row)
    return {"slide": str(path), "tile": [source.tile_width, source.tile_height],
            "jpeg_tables": source.jpeg_tables is not None, "rows": rows,
            "scaled": bench_scaled(path, n_tiles, repeats, thread_counts=thread_counts)}


def bench_scaled(path: Path, n_tiles: int, repeats: int = 3, model_mpp: float = SCALED_MPP,
                 thread_counts=(1, 2)) -> dict:
    """Tiles at a model's scale from pyramid level 1: decode-once plus resize against OpenSlide's
    read_region at level 1 plus the same resize (wsi.scale.resize_tile), per thread count,
    medians of `repeats` interleaved runs."""
    coords, scale = grid_run(path, n_tiles, TilingParams(224, model_mpp))
    out = {"model_mpp": model_mpp, "level": scale.level, "read_size": scale.read_size,
           "tile_size": scale.tile_size, "tiles": len(coords), "rows": []}
    for workers in thread_counts:
        runs: dict[str, list[dict]] = {"openslide": [], "decode-once": []}
        for _ in range(repeats):
            for reader in runs:
                runs[reader].append(_one_run(path, coords, workers, reader, scale))
        row = {"threads": workers}
        for reader, rs in runs.items():
            row[reader] = {"tiles_per_s": round(statistics.median(r["tiles_per_s"] for r in rs), 1),
                           "all": [round(r["tiles_per_s"], 1) for r in rs]}
        row["ratio"] = round(row["decode-once"]["tiles_per_s"] / row["openslide"]["tiles_per_s"], 2)
        out["rows"].append(row)
    return out


def table_rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(measure, value, baseline, ratio, note) rows, as benchmarks.run prints them."""
    out = []
    for row in result["rows"]:
        t, once, osl = row["threads"], row["decode-once"], row["openslide"]
        out.append((f"tile reader, OpenSlide read_region, {t} thread(s)",
                    f"{osl['tiles_per_s']:.0f} tiles/s", "", "",
                    f"{osl['tiles_touched_per_patch']:.2f} stored tiles touched per patch, "
                    f"cpu/wall {osl['cpu_per_wall']:.2f}"))
        out.append((f"tile reader, decode-once, {t} thread(s)", f"{once['tiles_per_s']:.0f} tiles/s",
                    f"OpenSlide, {t} thread(s)", f"{row['ratio']:.2f}x",
                    f"target >= 3x; {once['decodes_per_patch']:.3f} decodes per patch, "
                    f"cpu/wall {once['cpu_per_wall']:.2f}"))
    scaled = result.get("scaled")
    if scaled:
        what = (f"{scaled['tile_size']} px at {scaled['model_mpp']} um/px: {scaled['read_size']} px "
                f"at level {scaled['level']}, resized")
        for row in scaled["rows"]:
            t = row["threads"]
            out.append((f"tiles at the model's scale, OpenSlide read_region + resize, {t} thread(s)",
                        f"{row['openslide']['tiles_per_s']:.0f} tiles/s", "", "", what))
            out.append((f"tiles at the model's scale, decode-once + resize, {t} thread(s)",
                        f"{row['decode-once']['tiles_per_s']:.0f} tiles/s",
                        f"OpenSlide + resize, {t} thread(s)", f"{row['ratio']:.2f}x",
                        f"target >= 3x; {what}"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_SIZE[0]} x {QUICK_SIZE[1]} slide")
    parser.add_argument("--slide", type=Path, help="a slide of your own (default: the cached synthetic)")
    parser.add_argument("--tiles", type=int, default=4096, help="consecutive grid patches read per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per reader and thread count")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    path = args.slide or camelyon_512_slide(QUICK_SIZE if args.quick else CAMELYON_SIZE)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    result = bench_readers(path, args.tiles, sorted({1, max(2, cores)}), args.repeats)
    result["machine"] = machine_facts()
    rows = table_rows(result)
    print(f"\n{path.name}, {result['rows'][0]['tiles']} patches in grid order, "
          f"{result['machine']['model']}, {cores} cores, load average {result['machine']['loadavg']}\n")
    print("| measure | value | baseline | ratio | note |\n|---|---:|---|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
