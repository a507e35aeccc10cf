"""What reading an OME-TIFF through tiffslide costs, against OpenSlide on the same pixels.

    python -m benchmarks.bench_formats [--side 8192] [--repeats 5] [--workers 4]

One synthetic H&E-like image (glass with a tissue disc, textured) is written twice with the same
256 px JPEG tiles and pyramid: as a generic tiled TIFF (levels as top-level IFDs: OpenSlide) and
as an OME-TIFF (levels in SubIFDs, pixel size in the OME-XML: wsi.slide opens it with tiffslide).
For each, in this one process: open + tissue mask + tile grid, and reading every tissue tile
(224 px) with wsi.tiles.TileReader on 1 and `--workers` threads (tiles/s, median of repeats).
Prints a markdown table with the ratios tiffslide / OpenSlide and writes
benchmarks/results/formats.json with the raw numbers and the machine (CPU model, load average).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from benchmarks.machine import machine_facts

RESULTS = Path(__file__).resolve().parent / "results"
MPP = 0.243


def synthetic_image(side: int, seed: int = 0) -> np.ndarray:
    """Glass with a tissue disc of eosin/haematoxylin noise (texture JPEG has to work for)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    disc = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 <= (0.35 * side) ** 2
    coarse = rng.random((side // 16, side // 16)).astype(np.float32)
    mix = np.asarray(Image.fromarray(coarse).resize((side, side), Image.Resampling.BILINEAR))[..., None]
    stain = np.array([232, 150, 190], np.float32) * (1 - mix) + np.array([125, 80, 160], np.float32) * mix
    stain += rng.normal(0, 8, (side, side, 1)).astype(np.float32)
    image = np.where(disc[..., None], stain, np.array([243, 241, 245], np.float32))
    return np.clip(image, 0, 255).astype(np.uint8)


def pyramid(image: np.ndarray, min_side: int = 512) -> list[np.ndarray]:
    levels = [image]
    while min(levels[-1].shape[:2]) // 2 >= min_side:
        levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(2)))
    return levels


def write_generic(path: Path, levels: list[np.ndarray]) -> Path:
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i, level in enumerate(levels):
            px_per_cm = 1e4 / (MPP * 2**i)
            tif.write(level, tile=(256, 256), compression="jpeg", photometric="rgb",
                      subfiletype=int(i > 0), resolution=(px_per_cm, px_per_cm),
                      resolutionunit="CENTIMETER")
    return path


def write_ome(path: Path, levels: list[np.ndarray]) -> Path:
    metadata = {"axes": "YXS", "PhysicalSizeX": MPP, "PhysicalSizeY": MPP,
                "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, tile=(256, 256), compression="jpeg",
                  photometric="rgb", metadata=metadata)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, tile=(256, 256), compression="jpeg", photometric="rgb")
    return path


def measure(path: Path, repeats: int, workers: int) -> dict:
    from wsi.grid import tiles_for_slide
    from wsi.slide import open_slide
    from wsi.tiles import TileReader

    prepare, reads = [], {1: [], workers: []}
    for _ in range(repeats):
        start = time.perf_counter()
        with open_slide(path) as slide:
            _, grid = tiles_for_slide(slide)
            prepare.append(time.perf_counter() - start)
            reader_name, levels = slide.reader, slide.level_count
            for threads in reads:
                start = time.perf_counter()
                with TileReader(slide, grid.coords, workers=threads) as reader:
                    for _batch in reader:
                        pass
                reads[threads].append(len(grid) / (time.perf_counter() - start))
    return {"reader": reader_name, "levels": levels, "tiles": len(grid),
            "open_mask_grid_s": statistics.median(prepare),
            "tiles_per_s": {str(t): statistics.median(v) for t, v in reads.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS / "formats.json")
    args = parser.parse_args(argv)
    load_before = machine_facts()["loadavg"]
    levels = pyramid(synthetic_image(args.side))
    with tempfile.TemporaryDirectory() as tmp:
        generic = measure(write_generic(Path(tmp) / "generic.tif", levels), args.repeats, args.workers)
        ome = measure(write_ome(Path(tmp) / "pyramid.ome.tif", levels), args.repeats, args.workers)
    result = {"side": args.side, "repeats": args.repeats, "openslide": generic, "tiffslide": ome,
              "machine": machine_facts(), "loadavg_before": load_before}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{args.side} x {args.side} px, {generic['tiles']} tissue tiles, "
          f"{result['machine']['model']}, load {load_before} -> {result['machine']['loadavg']}\n")
    print("| | OpenSlide (generic TIFF) | tiffslide (OME-TIFF) | tiffslide / OpenSlide |")
    print("|---|---|---|---|")
    print(f"| open + mask + grid (s) | {generic['open_mask_grid_s']:.2f} | {ome['open_mask_grid_s']:.2f} "
          f"| {ome['open_mask_grid_s'] / generic['open_mask_grid_s']:.2f} |")
    for threads in generic["tiles_per_s"]:
        a, b = generic["tiles_per_s"][threads], ome["tiles_per_s"][threads]
        print(f"| tile reads, {threads} thread(s) (tiles/s) | {a:.0f} | {b:.0f} | {b / a:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
