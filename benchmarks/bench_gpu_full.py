"""GPU end to end on a Camelyon-size slide: `bash benchmarks/gpu.sh --full` runs this.

    python -m benchmarks.bench_gpu_full [--slide PATH] [--bundle DIR] [--batch-size 256]
                                        [--providers cuda,tensorrt] [--precision fp16]
                                        [--out DIR] [--budget-s 540] [--dry-run]

One run, one machine (issue 26, item 4):

1. the slide: Camelyon16's own layout (wsi.synth.write_camelyon_size_slide: 98304 x 196608 px,
   512-px YCbCr JPEG tiles, one shared JPEGTables tag), written into the bench cache on first
   use; its tissue tiles counted with the serving grid (>= 10^5 for a Camelyon-size figure);
2. the tile readers alone over the slide's first `--reader-tiles` tissue tiles: the CPU
   decode-once reader with the pipeline's default thread count, and the nvImageCodec GPU
   decoder (wsi.gpu_decode) where it is available, tiles/s;
3. per provider (CUDA, then TensorRT where its libraries load; `--precision`, default fp16,
   TensorRT engine cache on disk: $MILROI_TRT_CACHE): the bare backbone at the batch size
   (the ceiling), then the whole slide scored end to end through the real pipeline
   (serving.pipeline.SlideScorer in process: open, tissue mask, grid, tile reading, backbone,
   head, pooling, ROIs) alone, and as 4 concurrent slides; tiles/s, first-score latency (call
   -> first scores), and which tile reader the pipeline ran (its log line);
4. machine facts: CPU (benchmarks.machine), GPU name / memory / driver (nvidia-smi), the
   onnxruntime version and providers, reader threads, whether the GPU decode is available.

It REFUSES to report end-to-end figures measured on fewer than 10^4 tiles: the 92-tile figure
of an earlier run (283 tiles/s on an H100) measured set-up, not throughput. Then the
end-to-end figures are written as null, the reason goes to "refused", and the exit status is 3.
`--dry-run` runs every step on a small slide with the CPU provider (minutes, no GPU): it checks
the code and the JSON layout, and is refused by that rule. Stages that would overrun
`--budget-s` are skipped and say so. JSON: <out>/gpu_full.json, rewritten after every stage
("complete": false until the end), so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import machine_facts

RESULTS = Path(__file__).resolve().parent / "results"
MIN_TILES = 10_000           # fewer scored tiles: no end-to-end figure is reported
CAMELYON_TISSUE = 100_000    # a Camelyon16 slide's tissue tiles (10^4 - 10^5): the full run's slide
DRY_RUN_SIZE = (4096, 4096)
REFUSED_EXIT = 3


def gpu_facts() -> dict:
    """Name, memory and driver of each GPU nvidia-smi sees; {"error": ...} without one."""
    if shutil.which("nvidia-smi") is None:
        return {"gpus": [], "error": "nvidia-smi not found"}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"gpus": [], "error": repr(exc)}
    if out.returncode != 0:
        return {"gpus": [], "error": (out.stderr or out.stdout).strip()[-300:]}
    keys = ("name", "memory", "driver", "compute_capability")
    return {"gpus": [dict(zip(keys, (v.strip() for v in line.split(","))))
                     for line in out.stdout.strip().splitlines()]}


def runtime_facts() -> dict:
    import onnxruntime as ort

    from serving.pipeline import default_reader_workers
    from wsi.gpu_decode import gpu_decode_available

    ok, reason = gpu_decode_available()
    return {"onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers(),
            "reader_threads": default_reader_workers(),
            "gpu_decode": {"available": ok, "detail": reason}}


# -- slide and model --------------------------------------------------------------------------

def camelyon_slide(size: tuple[int, int]) -> Path:
    from benchmarks.bench_reader import camelyon_512_slide

    return camelyon_512_slide(size)


def tissue_grid(path: Path) -> np.ndarray:
    from wsi.grid import tiles_for_slide
    from wsi.slide import open_slide

    with open_slide(path) as slide:
        return tiles_for_slide(slide)[1].coords


def export_bundle(out: Path) -> Path:
    """ResNet-50 (random init, seed 0) + Chowder head, as `make bench` exports it."""
    from benchmarks.run import export_model

    return export_model(out, out.parent, int8=False)


# -- measurements -----------------------------------------------------------------------------

def reader_rows(path: Path, coords: np.ndarray, batch_size: int) -> dict:
    """The CPU decode-once reader (the pipeline's default threads) and the GPU decoder alone."""
    from serving.pipeline import default_reader_workers
    from wsi.decode_once import make_tile_reader
    from wsi.gpu_decode import gpu_decode_available, make_gpu_tile_reader
    from wsi.slide import open_slide

    threads = default_reader_workers()
    rows = {}
    with open_slide(path) as slide:
        started = time.perf_counter()
        n = sum(len(b.index) for b in make_tile_reader(slide, coords, workers=threads,
                                                       batch_size=batch_size, reader="decode-once"))
        rows["cpu_decode_once"] = {"threads": threads, "tiles": n,
                                   "tiles_per_s": round(n / (time.perf_counter() - started), 1)}
        ok, why = gpu_decode_available()
        reader = make_gpu_tile_reader(slide, coords, batch_size=batch_size) if ok else None
        if reader is None:
            rows["gpu_nvimagecodec"] = {"available": False, "detail": why if not ok else
                                        "this slide is not decoded on the GPU (log)"}
        else:
            started = time.perf_counter()
            n = sum(len(b.index) for b in reader)
            rows["gpu_nvimagecodec"] = {"available": True, "detail": why, "tiles": n,
                                        "decodes": reader.decodes,
                                        "tiles_per_s": round(n / (time.perf_counter() - started), 1)}
    return rows


def bare_backbone(engine, batches: int = 8) -> dict:
    tiles = np.random.default_rng(0).integers(0, 256, (engine.batch_size, engine.tile_size,
                                                       engine.tile_size, 3), dtype=np.uint8)
    engine.infer(tiles)   # warm-up (cuDNN algorithm choice, TensorRT engine load)
    started = time.perf_counter()
    for _ in range(batches):
        engine.infer(tiles)
    seconds = time.perf_counter() - started
    return {"tiles": batches * len(tiles), "tiles_per_s": round(batches * len(tiles) / seconds, 1)}


class _ReaderLog(logging.Handler):
    """Keeps the tile readers' "which reader runs" lines (wsi.decode_once / wsi.gpu_decode)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if "tile reader" in message or "GPU tile decode" in message:
            self.lines.append(message.split(": ", 1)[-1])


def score_slide(engine, path: Path) -> dict:
    """One slide through SlideScorer: tiles, seconds, tiles/s over the whole call and over the
    scoring phase, first-score latency (call -> first patch scores)."""
    from results.scored import PatchChunk, SlideSummary
    from serving.pipeline import SlideScorer

    scorer = SlideScorer(engine)
    started = time.perf_counter()
    first = summary = None
    for event in scorer.score(path):
        if isinstance(event, PatchChunk) and first is None:
            first = time.perf_counter() - started
        elif isinstance(event, SlideSummary):
            summary = event
    seconds = time.perf_counter() - started
    return {"tiles": summary.tile_count, "seconds": round(seconds, 2),
            "tiles_per_s": round(summary.tile_count / seconds, 1),
            "scoring_tiles_per_s": round(summary.timings.tiles_per_second, 1),
            "first_score_s": round(first, 3) if first is not None else None,
            "reader_threads": scorer.reader_workers}


def score_concurrent(engine, path: Path, streams: int) -> dict:
    """`streams` slides scored at once (threads sharing the engine, as the server does)."""
    results: list[dict] = [{}] * streams
    errors: list[BaseException] = []
    barrier = threading.Barrier(streams)

    def one(i: int):
        try:
            barrier.wait()
            results[i] = score_slide(engine, path)
        except BaseException as exc:   # re-raised below, in the caller
            errors.append(exc)

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    seconds = time.perf_counter() - started
    tiles = sum(r["tiles"] for r in results)
    return {"streams": streams, "tiles": tiles, "seconds": round(seconds, 2),
            "aggregate_tiles_per_s": round(tiles / seconds, 1),
            "first_score_s_max": max(r["first_score_s"] or 0 for r in results)}


def measure_provider(bundle: Path, path: Path, provider: str, precision: str, batch_size: int,
                     streams: int, deadline: float) -> dict:
    from serving.engine import Engine

    row: dict = {"provider": provider, "precision": precision, "batch_size": batch_size}
    started = time.perf_counter()
    try:
        engine = Engine(bundle, provider=provider, precision=precision, batch_size=batch_size)
    except Exception as exc:   # TensorRT libraries absent, CUDA not initialising: say so
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        return row
    handler = _ReaderLog()
    logging.getLogger("wsi").addHandler(handler)
    logging.getLogger("wsi").setLevel(logging.INFO)
    try:
        row["load_s"] = round(time.perf_counter() - started, 1)
        row["active_provider"] = engine.provider
        row["bare_backbone"] = bare_backbone(engine)
        row["alone"] = score_slide(engine, path)
        # Skip rather than overrun: the 4 slides take about 4x the one, at best the same rate.
        estimate = streams * row["alone"]["seconds"] / 2
        if time.monotonic() + estimate > deadline:
            row["concurrent"] = {"skipped": f"~{estimate:.0f} s left to run, past --budget-s"}
        else:
            row["concurrent"] = score_concurrent(engine, path, streams)
        row["tile_readers_used"] = sorted(set(handler.lines))
    finally:
        logging.getLogger("wsi").removeHandler(handler)
        engine.close()
    return row


# -- report -----------------------------------------------------------------------------------

END_TO_END = ("alone", "concurrent")


def report(raw: dict, min_tiles: int = MIN_TILES) -> tuple[dict, str | None]:
    """The JSON to write and the refusal (None when the figures stand). Fewer than `min_tiles`
    tiles scored per slide: every end-to-end figure is withheld (null), with the reason."""
    out = json.loads(json.dumps(raw))
    tiles = raw["slide"]["tissue_tiles"]
    refused = None
    if tiles < min_tiles:
        refused = (f"refusing to report end-to-end figures measured on {tiles} tiles "
                   f"(< {min_tiles}): set-up would dominate; score a Camelyon-size slide")
    elif raw["mode"] == "full" and tiles < CAMELYON_TISSUE:
        out["note"] = f"{tiles} tissue tiles: below a Camelyon-size slide's 10^5"
    if refused:
        for row in out["providers"]:
            for key in END_TO_END:
                if key in row:
                    row[key] = None
    out["refused"] = refused
    return out, refused


def write(raw: dict, path: Path, done: bool) -> tuple[dict, str | None]:
    """The report so far (rewritten after every stage: a run cut short keeps what it measured)."""
    out, refused = report(raw)
    out["complete"] = done
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out, refused


def main(argv=None) -> int:
    from benchmarks.bench_wsi import CAMELYON_SIZE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=None, help="a slide of your own")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="a model bundle (default: ResNet-50 + Chowder exported here)")
    parser.add_argument("--providers", default="cuda,tensorrt")
    parser.add_argument("--precision", default="fp16", choices=["fp32", "fp16"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--reader-tiles", type=int, default=20_000)
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip stages past this")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--json-name", default="gpu_full.json")
    parser.add_argument("--dry-run", action="store_true",
                        help="small slide, CPU provider: checks the code and the JSON layout")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.dry_run:
        providers, precision, batch_size = ["cpu"], "fp32", min(args.batch_size, 16)
    else:
        providers, precision = args.providers.split(","), args.precision
        batch_size = args.batch_size

    with tempfile.TemporaryDirectory(prefix="milroi-gpu-full-") as tmp:
        tmp = Path(tmp)
        if args.slide:
            slide = args.slide
        elif args.dry_run:
            from wsi.synth import write_camelyon_size_slide

            slide = tmp / "camelyon_small.tif"
            write_camelyon_size_slide(slide, *DRY_RUN_SIZE, seed=0, tile=512, jpeg_tables=True,
                                      variants=1)
        else:
            slide = camelyon_slide(CAMELYON_SIZE)
        coords = tissue_grid(slide)
        print(f"slide {slide}: {len(coords)} tissue tiles", flush=True)
        raw = {"mode": "dry-run" if args.dry_run else "full", "machine": machine_facts(),
               "gpu": gpu_facts(), **runtime_facts(),
               "slide": {"path": str(slide), "tissue_tiles": int(len(coords)),
                         "layout": "512-px YCbCr JPEG tiles, shared JPEGTables (Camelyon16)"},
               "readers": reader_rows(slide, coords[:args.reader_tiles], batch_size),
               "providers": []}
        print(json.dumps(raw["readers"]), flush=True)
        write(raw, args.out / args.json_name, done=False)
        bundle = args.bundle or export_bundle(tmp / "bundle")
        for provider in providers:
            if time.monotonic() > deadline:
                raw["providers"].append({"provider": provider, "skipped": "past --budget-s"})
                continue
            row = measure_provider(bundle, slide, provider, precision, batch_size, args.streams,
                                   deadline)
            print(json.dumps(row), flush=True)
            raw["providers"].append(row)
            write(raw, args.out / args.json_name, done=False)
    out, refused = write(raw, args.out / args.json_name, done=True)
    print(f"written {args.out / args.json_name}")
    if refused:
        print(f"REFUSED: {refused}", file=sys.stderr)
        return REFUSED_EXIT
    return 0

if __name__ == "__main__":
    sys.exit(main())
