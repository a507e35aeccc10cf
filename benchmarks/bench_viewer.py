"""`milroi-serve view`: deep-zoom tile latency and heatmap load time, through real HTTP.

    python -m benchmarks.bench_viewer [--quick] [--slide PATH] [--tiles 100000] [--requests 64]
                                      [--live] [--live-batch-sizes 64,8]

The viewer runs as `python -m serving.cli view` in a subprocess (uvicorn, as users run it) on a
Camelyon-size synthetic slide (98304 x 196608 px, benchmarks.bench_wsi's cached slide; --quick:
1/4 side) and a patch CSV of --tiles tiles written by results.outputs.write_patch_csv. Measured:

1. cold tile requests (never requested before: OpenSlide decode + JPEG encode), one at a time,
   median and p90, against the baseline of the same tiles made by OpenSlide in this process
   right after (`DeepZoomGenerator.get_tile` on a fresh handle: no HTTP, no JPEG encode);
2. warm tile requests (the same tiles again: the bounded cache), median;
3. 16 concurrent cold requests: each one's latency, and the latency of a small page request
   (/api/summary) made while they are in flight (is the event loop free?), against the same
   request made alone;
4. the heatmap of the --tiles tiles: /api/heatmap (PNG, one pixel per tile) and /api/scores
   (the hover table), first (CSV parsed) and again (parsed table cached).

5. with --live: the first painted tile of live scoring, as the page gets it: the time from the
   request of /api/live/<slide> to its first `tiles` event and to its `summary`, on a demo-size
   slide (3072 x 3072 px, wsi.synth) through a real `milroi-serve serve` (ResNet-50 random init
   + Chowder, --weights none as in the demo) at each --live-batch-sizes (the server's
   --batch-size: the first scores leave the server when its first batch is scored).

Targets (issue 28): tile median <= 50 ms warm and <= 300 ms cold, 16 concurrent requests without
blocking the page, the heatmap of a 10^5-tile slide in < 1 s, the first live tile within 2 s.
Prints a markdown table, writes benchmarks/results/viewer.json with the CPU model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.bench_wsi import CAMELYON_SIZE, camelyon_size_slide
from benchmarks.machine import cpu_facts

RESULTS = Path(__file__).resolve().parent / "results" / "viewer.json"
ROOT = Path(__file__).resolve().parents[1]


def _get(url: str) -> tuple[float, bytes]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        body = r.read()
    return time.perf_counter() - started, body


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_scores(folder: Path, slide: Path, n_tiles: int, tile_size: int = 224) -> Path:
    """SCORES_DIR for `slide`: summary.csv and a patch CSV of `n_tiles` tiles of the grid."""
    from results.layout import output_path, write_summary
    from results.outputs import write_patch_csv
    from wsi.slide import open_slide

    with open_slide(slide) as s:
        width, height = s.dimensions
    cols = width // tile_size
    index = np.arange(min(n_tiles, cols * (height // tile_size)))
    coords = np.column_stack([(index % cols) * tile_size, (index // cols) * tile_size])
    scores = np.random.default_rng(0).random(len(index))
    out = folder / "scores"
    write_patch_csv(output_path(out / slide.stem, slide.stem, "csv"), coords, scores, tile_size)
    write_summary(out, [{"slide": slide.stem, "status": "ok", "label": "tumor", "score": 0.9,
                         "tiles": len(index), "rois": 0, "error": "", "path": str(slide)}])
    return out


def _start_viewer(scores: Path, slides: Path, log_path: Path, *extra: str):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "proto"),
                                                         os.environ.get("PYTHONPATH", "")])}
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "view", str(scores), "--slides",
                             str(slides), "--port", str(port), *extra], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            _get(f"{url}/api/summary")
            return proc, url
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(log_path.read_text()) from None
            time.sleep(0.1)


def live_first_tile(work: Path, batch_sizes: list[int]) -> list[dict]:
    """Seconds from the request of a live score to its first `tiles` event and its summary."""
    from benchmarks.bench_serving import ServerProcess
    from training.backbone import build_backbone
    from training.export import export_bundle
    from training.heads import build_head
    from wsi.synth import write_synthetic_slide

    backbone = build_backbone("none", seed=0)
    bundle = export_bundle(work / "bundle", backbone,
                           build_head({"kind": "chowder", "in_dim": backbone.feature_dim}))
    slides = work / "live_slides"
    slides.mkdir()
    slide = slides / "demo_tumor.tif"
    write_synthetic_slide(slide, 3072, 3072, seed=11, tumor=True)
    scores = make_scores(work / "live", slide, 10)
    rows = []
    for batch_size in batch_sizes:
        server = ServerProcess(bundle, slides, "cpu", batch_size, work / f"server_{batch_size}.log")
        proc, url = _start_viewer(scores, slides, work / f"viewer_live_{batch_size}.log",
                                  "--server", server.address)
        try:
            times = {}
            for attempt in ("warm-up", "measured"):
                started = time.perf_counter()
                with urllib.request.urlopen(f"{url}/api/live/{slide.stem}", timeout=600) as r:
                    for line in r:
                        event = line.decode().strip()
                        if event == "event: tiles" and "first" not in times:
                            times["first"] = time.perf_counter() - started
                        if event == "event: summary":
                            times["summary"] = time.perf_counter() - started
                        if event.startswith("data:") and "tile_count" in event and "header" not in times:
                            times["tiles"] = json.loads(event[5:]).get("tile_count")
                            times["header"] = time.perf_counter() - started
                if attempt == "warm-up":
                    times = {}
            rows.append({"batch_size": batch_size, "first_tile_s": times.get("first"),
                         "summary_s": times.get("summary"), "tiles": times.get("tiles")})
        finally:
            proc.terminate()
            proc.wait(20)
            server.stop()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, help="slide (default: the cached Camelyon-size one)")
    parser.add_argument("--quick", action="store_true", help="a 1/4-side slide")
    parser.add_argument("--tiles", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=64, help="cold tile requests")
    parser.add_argument("--live", action="store_true", help="also time live scoring's first tile")
    parser.add_argument("--live-batch-sizes", default="64,8",
                        help="server --batch-size values of the live rows (default 64,8)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    from viewer.tiles import OVERLAP, TILE_SIZE

    size = (CAMELYON_SIZE[0] // 4, CAMELYON_SIZE[1] // 4) if args.quick else CAMELYON_SIZE
    slide = args.slide or camelyon_size_slide(size)
    work = Path(tempfile.mkdtemp(prefix="bench_viewer_"))
    scores = make_scores(work, slide, args.tiles)
    key = slide.stem
    dz = DeepZoomGenerator(OpenSlide(str(slide)), tile_size=TILE_SIZE, overlap=OVERLAP,
                           limit_bounds=False)
    # Tiles a user meets: the last 4 levels (full resolution and the 3 above), inside the image.
    rng = np.random.default_rng(1)
    picks = []
    for level in range(dz.level_count - 4, dz.level_count):
        cols, rows = dz.level_tiles[level]
        picks += [(level, int(rng.integers(cols)), int(rng.integers(rows)))
                  for _ in range(args.requests // 4)]
    concurrent = [(dz.level_count - 1, int(rng.integers(dz.level_tiles[-1][0])),
                   int(rng.integers(dz.level_tiles[-1][1]))) for _ in range(16)]
    proc, url = _start_viewer(scores, slide.parent, work / "viewer.log")
    try:
        _get(f"{url}/api/slide/{key}")   # opens the slide (once per process)
        alone = statistics.median(_get(f"{url}/api/summary")[0] for _ in range(20))
        tile_url = f"{url}/api/tile/{{}}/{{}}/{{}}/{key}"
        cold = [_get(tile_url.format(*p))[0] for p in picks]
        # The floor: the same tiles decoded in this process through a fresh OpenSlide handle
        # (its own tile cache cold, the OS page cache as warm as the viewer left it).
        dz = DeepZoomGenerator(OpenSlide(str(slide)), tile_size=TILE_SIZE, overlap=OVERLAP,
                               limit_bounds=False)
        baseline = []
        for level, col, row in picks:
            started = time.perf_counter()
            dz.get_tile(level, (col, row))
            baseline.append(time.perf_counter() - started)
        warm = [_get(tile_url.format(*p))[0] for p in picks]
        with ThreadPoolExecutor(17) as pool:
            started = time.perf_counter()
            futures = [pool.submit(_get, tile_url.format(*p)) for p in concurrent]
            time.sleep(0.005)
            during = _get(f"{url}/api/summary")[0]
            parallel = [f.result()[0] for f in futures]
            wall = time.perf_counter() - started
        heat_first, png = _get(f"{url}/api/heatmap/{key}?threshold=0")
        scores_first, table = _get(f"{url}/api/scores/{key}")
        heat_again = statistics.median(_get(f"{url}/api/heatmap/{key}?threshold=0.5")[0] for _ in range(5))
        scores_again = statistics.median(_get(f"{url}/api/scores/{key}")[0] for _ in range(5))
    finally:
        proc.terminate()
        proc.wait(20)
    try:
        live = live_first_tile(work, [int(b) for b in args.live_batch_sizes.split(",")]) \
            if args.live else []
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ms = 1000.0
    result = {
        "machine": cpu_facts(), "load_avg": os.getloadavg(), "slide": str(slide),
        "slide_size": list(size), "heatmap_tiles": args.tiles,
        "tile_cold_ms": {"median": statistics.median(cold) * ms,
                         "p90": float(np.percentile(cold, 90)) * ms},
        "tile_baseline_in_process_ms": statistics.median(baseline) * ms,
        "tile_warm_ms": {"median": statistics.median(warm) * ms},
        "concurrent16_ms": {"median": statistics.median(parallel) * ms, "max": max(parallel) * ms,
                            "wall": wall * ms},
        "page_request_ms": {"alone": alone * ms, "during_16_tiles": during * ms},
        "heatmap_ms": {"png_first": heat_first * ms, "scores_first": scores_first * ms,
                       "load_first": (heat_first + scores_first) * ms,
                       "png_again": heat_again * ms, "scores_again": scores_again * ms},
        "bytes": {"heatmap_png": len(png), "scores_json": len(table)},
        "live": live,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    r = result
    print(f"CPU: {r['machine'].get('model', r['machine'])}, load {r['load_avg'][0]:.1f}; slide "
          f"{size[0]} x {size[1]}; {args.tiles} heatmap tiles\n")
    print("| measure | value | target / baseline |\n|---|---|---|")
    print(f"| tile, cold (median / p90) | {r['tile_cold_ms']['median']:.1f} / "
          f"{r['tile_cold_ms']['p90']:.1f} ms | <= 300 ms; in-process decode "
          f"{r['tile_baseline_in_process_ms']:.1f} ms "
          f"(x{r['tile_cold_ms']['median'] / r['tile_baseline_in_process_ms']:.2f}) |")
    print(f"| tile, warm (median) | {r['tile_warm_ms']['median']:.1f} ms | <= 50 ms |")
    print(f"| 16 concurrent cold tiles (median / max / wall) | {r['concurrent16_ms']['median']:.0f} / "
          f"{r['concurrent16_ms']['max']:.0f} / {r['concurrent16_ms']['wall']:.0f} ms | |")
    print(f"| page request during them | {r['page_request_ms']['during_16_tiles']:.1f} ms | "
          f"alone {r['page_request_ms']['alone']:.1f} ms |")
    print(f"| heatmap load, first: PNG + hover table | {r['heatmap_ms']['png_first']:.0f} + "
          f"{r['heatmap_ms']['scores_first']:.0f} ms | < 1000 ms |")
    print(f"| heatmap again (cached table): PNG, table | {r['heatmap_ms']['png_again']:.0f}, "
          f"{r['heatmap_ms']['scores_again']:.0f} ms | |")
    for row in live:
        print(f"| live, server --batch-size {row['batch_size']}: first tile / summary "
              f"({row['tiles']} tiles) | {row['first_tile_s']:.2f} / {row['summary_s']:.1f} s | "
              f"first tile < 2 s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
