"""`milroi-serve view` on scores that were moved: cached tile and page latency when summary.csv's
slide paths lie under no --slides folder, beside 2,000 other files.

    python -m benchmarks.bench_viewer_moved [--other-files 2000] [--requests 200]

Issue 35 item 3: the viewer found such a slide by searching the slide folder (OpenSlide's format
probe on every other file) on every request, cached tiles included (0.21 s a tile instead of
3 ms). Both viewers run as `python -m serving.cli view` subprocesses over the same slide (a
wsi.synth slide) and the same patch CSV, in this run:

- baseline: summary.csv records the slide's path under --slides (no search);
- moved: the scores and the slide were copied elsewhere, so the recorded path lies under no
  --slides folder, and the copied slide folder holds --other-files text files.

Measured for each: the first request (/api/slide: where the search happens, once), then
--requests cached-tile requests and as many /api/slide requests (median, p90). Prints a markdown
table with the CPU and writes benchmarks/results/viewer_moved.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.bench_viewer import _get, _start_viewer, make_scores
from benchmarks.machine import cpu_facts

RESULTS = Path(__file__).resolve().parent / "results" / "viewer_moved.json"


def measure(url: str, key: str, requests: int) -> dict:
    ms = 1000.0
    tile = f"{url}/api/tile/{{}}/0/0/{key}"
    first, body = _get(f"{url}/api/slide/{key}")   # the first request finds the slide file
    top = json.loads(body)["deepzoom"]["levels"] - 1
    _get(tile.format(top))                          # rendered once, then cached
    cached = [_get(tile.format(top))[0] for _ in range(requests)]
    pages = [_get(f"{url}/api/slide/{key}")[0] for _ in range(requests)]
    return {"first_request_ms": first * ms,
            "cached_tile_ms": {"median": statistics.median(cached) * ms,
                               "p90": float(np.percentile(cached, 90)) * ms},
            "slide_info_ms": {"median": statistics.median(pages) * ms,
                              "p90": float(np.percentile(pages, 90)) * ms}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other-files", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from wsi.synth import write_synthetic_slide

    work = Path(tempfile.mkdtemp(prefix="bench_viewer_moved_"))
    try:
        slides = work / "slides"
        slides.mkdir()
        slide = slides / "slide.tif"
        write_synthetic_slide(slide, 2048, 2048, seed=3, tumor=True)
        scores = make_scores(work, slide, 2000)
        moved = work / "moved"
        moved_slides = moved / "slides"
        shutil.copytree(slides, moved_slides)
        shutil.copytree(scores, moved / "scores")
        for i in range(args.other_files):
            (moved_slides / f"note_{i:05d}.txt").write_text("not a slide\n")
        results = {}
        for name, (scores_dir, slide_dir) in {"baseline": (scores, slides),
                                              "moved": (moved / "scores", moved_slides)}.items():
            proc, url = _start_viewer(scores_dir, slide_dir, work / f"{name}.log")
            try:
                results[name] = measure(url, slide.stem, args.requests)
            finally:
                proc.terminate()
                proc.wait(20)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {"machine": cpu_facts(), "load_avg": os.getloadavg(),
              "other_files": args.other_files, "requests": args.requests, **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    base, moved_r = results["baseline"], results["moved"]
    print(f"CPU: {result['machine'].get('model', result['machine'])}, load "
          f"{result['load_avg'][0]:.1f}; {args.other_files} other files; {args.requests} requests\n")
    print("| measure | baseline (paths under --slides) | moved scores | moved / baseline |")
    print("|---|---:|---:|---:|")
    print(f"| first request, /api/slide (the one search) | {base['first_request_ms']:.1f} ms | "
          f"{moved_r['first_request_ms']:.1f} ms | "
          f"{moved_r['first_request_ms'] / base['first_request_ms']:.1f}x |")
    for label, field in (("cached tile", "cached_tile_ms"), ("/api/slide", "slide_info_ms")):
        b, m = base[field], moved_r[field]
        print(f"| {label}, median (p90) | {b['median']:.2f} ({b['p90']:.2f}) ms | "
              f"{m['median']:.2f} ({m['p90']:.2f}) ms | {m['median'] / b['median']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
