"""What `milroi-serve spatiopath` costs on a Camelyon16-size slide with 10 ROIs: peak memory and
time, against what scoring the same slide costs on the same machine.

    python -m benchmarks.bench_spatiopath [--sizes 24576x49152,98304x196608] [--cells-per-mm2 5000]

1. two slides, `bench_wsi.camelyon_size_slide` (cached): 1/16 of Camelyon16's area, then
   98304 x 196608 px; open + tissue mask + tile grid timed, tissue tiles counted;
2. 10 ROIs: the tiles whose centre lies in one of 10 discs placed on tissue (radii 80 um to
   1 mm), written by `results.outputs.write_spatiopath_json` as `milroi-serve score` writes them,
   with the done.json that names the slide;
3. cells: `--cells-per-mm2` of tissue, spread uniformly, 30 % of them "Immune cells", as a
   cells CSV (`wsi.cells`): the file grows with the slide;
4. the analysis (`spatiopath_analysis.command.analyse_folder`, K0 plots included) in a fresh process per
   slide and setting: `--window 4096` (the default) and `--window 2048`; each reports its peak
   RSS (VmHWM) and wall time; a process that only imports the same modules gives the floor.
   Memory must follow the window, not the slide: the two slides' rows should match;
5. scoring time, a lower bound: open + mask + grid + tissue tiles / the bare ResNet-50
   backbone's throughput (onnxruntime fp32, the served graph, random init, 64 real tiles of
   the large slide): the fastest scoring could be here, with no tile reading, head or writing.

Prints a markdown table and writes benchmarks/results/spatiopath.json with the CPU model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_wsi import CAMELYON_SIZE, camelyon_size_slide
from benchmarks.machine import cpu_facts

RESULTS = Path(__file__).resolve().parent / "results" / "spatiopath.json"
ROI_RADII_UM = (1000, 600, 400, 300, 250, 200, 150, 120, 100, 80)
IMMUNE_SHARE = 0.3
CELLS_PER_MM2 = 5000.0   # cells on the tissue; real lymph nodes hold 10-20 thousand per mm^2


def _peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, whose count starts at exec (getrusage's ru_maxrss also
    holds the parent's RSS at fork, carried over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(argv: list[str]) -> int:
    """One analysis (or, with no argument, the imports only) in this fresh process."""
    import matplotlib.pyplot  # noqa: F401 - the floor holds what the analysis imports
    import pandas  # noqa: F401
    import spatiopath.engine  # noqa: F401

    from spatiopath_analysis.command import AnalysisOptions, analyse_folder

    if not argv:
        print(json.dumps({"peak_rss_mib": _peak_rss_mib()}))
        return 0
    scores, cells, out, window = Path(argv[0]), Path(argv[1]), Path(argv[2]), int(argv[3])
    started = time.perf_counter()
    [row] = analyse_folder(scores, cells, out, AnalysisOptions(window=window, cell_class="Immune cells"))
    seconds = time.perf_counter() - started
    from spatiopath_analysis.windows import read_windows_json

    [windows_json] = out.rglob("*_windows.json")
    sizes = [list(w.size) for w in read_windows_json(windows_json).windows]
    print(json.dumps({"peak_rss_mib": _peak_rss_mib(), "seconds": seconds, "window_sizes": sizes,
                      "row": {k: (float(v) if isinstance(v, (int, float, np.number)) else v)
                              for k, v in row.items()}}))
    return 0


def _run_child(*args) -> dict:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "proto")])}
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_spatiopath", "--child", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(done.stdout + done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def place_rois(tissue, mpp: float, seed: int = 0) -> list:
    """10 discs (level-0 shapely Polygons) on tissue, apart from each other."""
    from scipy import ndimage
    from shapely.geometry import Point

    rng = np.random.default_rng(seed)
    depth = ndimage.distance_transform_edt(tissue.mask) * tissue.downsample   # level-0 px to the edge
    discs = []
    for radius_um in ROI_RADII_UM:
        radius = radius_um / mpp
        candidates = np.argwhere(depth > radius * 1.2)
        for _ in range(200):
            r, c = candidates[rng.integers(len(candidates))]
            disc = Point((c + 0.5) * tissue.downsample, (r + 0.5) * tissue.downsample).buffer(radius)
            if all(disc.distance(d) > 100 / mpp for d in discs):
                discs.append(disc)
                break
    return discs


def write_inputs(slide_path: Path, work: Path, cells_per_mm2: float) -> dict:
    """The scores (10 ROIs) and the cells CSV of the slide; the mask + grid time and tile count."""
    import shapely

    from results.layout import output_path, write_done_marker
    from results.outputs import write_spatiopath_json
    from results.rois import roi_polygons
    from wsi.cells import write_cells_csv
    from wsi.grid import tiles_for_slide
    from wsi.slide import open_slide

    started = time.perf_counter()
    with open_slide(slide_path) as slide:
        tissue, grid = tiles_for_slide(slide)
        mask_grid_s = time.perf_counter() - started
        mpp, dimensions, name = slide.mpp, slide.dimensions, slide.name
    discs = place_rois(tissue, mpp)
    centres = grid.coords + grid.tile_size / 2
    scores = shapely.contains_xy(shapely.union_all(discs), centres[:, 0], centres[:, 1]).astype(np.float64)
    rois = roi_polygons(grid.coords, scores, grid.tile_size, 0.5)
    folder = work / "scores" / name
    write_spatiopath_json(output_path(folder, name, "spatiopath"), name, rois, mpp, scores, None,
                          0.5, grid.tile_size, dimensions)
    write_done_marker(folder, {"slide": name, "status": "ok", "path": str(slide_path)})
    rng = np.random.default_rng(1)
    n_cells = int(cells_per_mm2 * tissue.mask.sum() * (tissue.downsample * mpp / 1000) ** 2)
    pixels = np.argwhere(tissue.mask)[rng.integers(0, int(tissue.mask.sum()), n_cells)]
    xy = (pixels[:, ::-1] + rng.random((n_cells, 2))) * tissue.downsample
    xy = np.minimum(xy, np.asarray(dimensions) - 1)
    classes = np.where(rng.random(n_cells) < IMMUNE_SHARE, "Immune cells", "Other")
    write_cells_csv(work / "cells" / f"{name}.csv", xy, classes.tolist())
    return {"mask_grid_s": mask_grid_s, "tiles": len(grid), "rois": len(rois), "discs": len(discs),
            "cells": n_cells, "mpp": mpp, "dimensions": list(dimensions),
            "tissue_fraction": tissue.tissue_fraction, "grid": grid}


def backbone_tiles_per_s(slide_path: Path, grid, repeats: int = 3) -> float:
    from training.backbone import build_backbone
    from training.onnx_backbone import OnnxBackbone
    from wsi.slide import open_slide
    from wsi.tiles import TileReader

    with open_slide(slide_path) as slide:
        pick = np.linspace(0, len(grid) - 1, min(64, len(grid))).astype(np.int64)
        reader = TileReader(slide, grid.coords[pick], grid.tile_size, 0)
        tiles = np.concatenate([b.tiles.copy() for b in reader])
    backbone = OnnxBackbone(build_backbone("none", layer="pool", seed=0))
    backbone(tiles)   # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        backbone(tiles)
        times.append(time.perf_counter() - started)
    return len(tiles) / statistics.median(times)


def _size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=f"{CAMELYON_SIZE[0] // 4}x{CAMELYON_SIZE[1] // 4},"
                                           f"{CAMELYON_SIZE[0]}x{CAMELYON_SIZE[1]}",
                        help="slides WxH, the last one scored for the time ratio "
                             "(default: 1/16 of Camelyon16's area, then Camelyon16's)")
    parser.add_argument("--cells-per-mm2", type=float, default=CELLS_PER_MM2,
                        help=f"cells per mm^2 of tissue (default {CELLS_PER_MM2:g})")
    parser.add_argument("--windows", default="4096,2048", help="--window settings to run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    floor = _run_child()
    slides = []
    with tempfile.TemporaryDirectory(prefix="bench-spatiopath-") as tmp:
        for size in (_size(s) for s in args.sizes.split(",")):
            slide_path = camelyon_size_slide(size)
            work = Path(tmp) / f"{size[0]}x{size[1]}"
            inputs = write_inputs(slide_path, work, args.cells_per_mm2)
            grid = inputs.pop("grid")
            runs = {window: _run_child(work / "scores", work / "cells", work / f"out_{window}", window)
                    for window in (int(w) for w in args.windows.split(","))}
            slides.append({"slide": str(slide_path), **inputs, "runs": runs})
        tiles_per_s = backbone_tiles_per_s(slide_path, grid)
    last = slides[-1]
    scoring_floor_s = last["mask_grid_s"] + last["tiles"] / tiles_per_s
    machine = {**cpu_facts(), "platform": platform.platform(),
               "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    result = {"machine": machine, "imports_only_peak_rss_mib": floor["peak_rss_mib"], "slides": slides,
              "backbone_tiles_per_s": tiles_per_s, "scoring_lower_bound_s": scoring_floor_s}
    print(f"\n{machine['model']} ({', '.join(machine['flags'])}), {machine['cpus']} CPUs, load "
          f"{machine['load_average_1min'][0]} -> {machine['load_average_1min'][1]}\n")
    print("| slide | ROIs | cells in file | run | windows | downsample | largest window (px) | cells "
          "analysed | seconds | peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|")
    print(f"| | | | imports only (floor) | | | | | | {floor['peak_rss_mib']:.0f} |")
    for entry in slides:
        w, h = entry["dimensions"]
        for window, run in entry["runs"].items():
            row = run["row"]
            print(f"| {w} x {h} | {entry['rois']} | {entry['cells']} | --window {window} | "
                  f"{row['windows']:.0f} | {row['downsample']:g} | "
                  f"{'x'.join(map(str, max(run['window_sizes'], key=lambda s: s[0] * s[1])))} | "
                  f"{row['cells']:.0f} | "
                  f"{run['seconds']:.1f} | {run['peak_rss_mib']:.0f} |")
    window = next(iter(last["runs"]))
    analysis_s = last["runs"][window]["seconds"]
    print(f"\nscoring {last['dimensions'][0]} x {last['dimensions'][1]}, lower bound: "
          f"{last['mask_grid_s']:.1f} s mask + grid + {last['tiles']} tiles / {tiles_per_s:.1f} tiles/s "
          f"(bare fp32 backbone) = {scoring_floor_s:.0f} s; its analysis (--window {window}, "
          f"{analysis_s:.1f} s) is {analysis_s / scoring_floor_s:.3f} of it")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
