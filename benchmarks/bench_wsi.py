"""Slide-core benchmark: tissue mask + tile grid of a Camelyon16-size slide, and tile-read rate.

    python -m benchmarks.bench_wsi [--slide PATH] [--repeats 5] [--tiles 512]

Without --slide it writes a Camelyon16-size synthetic slide (98304 x 196608 px at level 0,
0.243 um/px, JPEG tiles, pyramid down to 1/64) into a cache folder, once: with wsi.synth's
`write_camelyon_size_slide` when that module is present, else with the small writer below
(pre-encoded tiles: glass tiles everywhere, H&E-like tiles where the tissue is).
Prints a markdown table and writes benchmarks/results/wsi.json.
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

from wsi.grid import tiles_for_slide
from wsi.slide import open_slide
from wsi.synth import write_camelyon_size_slide
from wsi.tiles import TileReader

RESULTS = Path(__file__).resolve().parent / "results" / "wsi.json"
# The 2 GB slide is written once and reused by every benchmark run (outside the git tree).
CACHE = Path(os.environ.get("MILROI_BENCH_CACHE", Path.home() / ".cache" / "milroi" / "bench"))
LEGACY_CACHE = Path(tempfile.gettempdir()) / "milroi-bench"   # where earlier runs put it
CAMELYON_SIZE = (98_304, 196_608)


def camelyon_size_slide(size: tuple[int, int] = CAMELYON_SIZE) -> Path:
    """The cached synthetic slide of `size` (w, h) level-0 px, written on first use."""
    CACHE.mkdir(parents=True, exist_ok=True)
    name = "camelyon_size.tif" if tuple(size) == CAMELYON_SIZE else f"camelyon_{size[0]}x{size[1]}.tif"
    path = CACHE / name
    if path.exists():
        return path
    if (LEGACY_CACHE / name).exists():
        return LEGACY_CACHE / name
    partial = path.with_suffix(".partial.tif")
    started = time.perf_counter()
    write_camelyon_size_slide(partial, width=size[0], height=size[1], seed=0)
    os.replace(partial, path)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.0f} s")
    return path


def bench_mask_and_grid(path: Path, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        with open_slide(path) as slide:   # open included: what `milroi-train tiles` pays
            tissue, grid = tiles_for_slide(slide)
        times.append(time.perf_counter() - started)
    return {"slide": str(path), "dimensions": list(slide.dimensions),
            "mask_shape": list(tissue.mask.shape), "mask_level": tissue.level,
            "tissue_fraction": round(tissue.tissue_fraction, 4), "tiles": len(grid),
            "seconds_median": round(statistics.median(times), 3),
            "seconds_all": [round(t, 3) for t in times]}


def bench_tile_reads(path: Path, n_tiles: int, thread_counts=(1, 2, 4)) -> list[dict]:
    """wsi.tiles.TileReader rate for each thread count, on n_tiles spread over the tissue."""
    with open_slide(path) as slide:
        _, grid = tiles_for_slide(slide)
        # Spread the tiles over the slide: a contiguous run would hit the decoder's tile cache.
        pick = np.linspace(0, len(grid) - 1, min(n_tiles, len(grid))).astype(np.int64)
        coords = grid.coords[pick]
        rows = []
        for workers in thread_counts:
            # Every run gets a fresh slide handle: OpenSlide caches decoded tiles per handle.
            with open_slide(path) as fresh:
                started, cpu_started = time.perf_counter(), time.process_time()
                n = sum(len(b.index) for b in TileReader(fresh, coords, workers=workers, batch_size=64))
                elapsed = time.perf_counter() - started
                cpu = time.process_time() - cpu_started
            # cpu / wall near the thread count means the threads really ran in parallel; near 1
            # with several threads means the cores were busy with something else.
            rows.append({"threads": workers, "tiles": n, "tiles_per_s": round(n / elapsed, 1),
                         "cpu_per_wall": round(cpu / elapsed, 2)})
    base = rows[0]["tiles_per_s"]
    for row in rows:
        row["speedup"] = round(row["tiles_per_s"] / base, 2)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, help="slide to time (default: Camelyon-size synthetic)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of mask + grid (median)")
    parser.add_argument("--tiles", type=int, default=512, help="tiles read per thread count")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    path = args.slide or camelyon_size_slide()
    mask = bench_mask_and_grid(path, args.repeats)
    reads = bench_tile_reads(path, args.tiles)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_average_1min": round(os.getloadavg()[0], 2)},
              "mask_and_grid": mask, "tile_reads": reads}
    print(f"\nslide {path.name}: {mask['dimensions'][0]} x {mask['dimensions'][1]} px, mask "
          f"{mask['mask_shape'][1]} x {mask['mask_shape'][0]} (level {mask['mask_level']}), "
          f"{mask['tiles']} tiles, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    print("| measure | value |\n|---|---|")
    print(f"| open + tissue mask + tile grid (median of {args.repeats}) | {mask['seconds_median']:.2f} s |")
    for row in reads:
        print(f"| tile reads, {row['threads']} thread(s) | {row['tiles_per_s']:.0f} tiles/s "
              f"(x{row['speedup']:.2f}, cpu/wall {row['cpu_per_wall']:.2f}) |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
