"""Scoring server throughput, latency and memory: `python -m benchmarks.bench_serving`.

One run, one machine, one bundle (ResNet-50 random init + Chowder head exported with
training.export, or --bundle), the real `milroi-serve serve` process on loopback:

- bare backbone: backbone.onnx alone in onnxruntime (same provider, threads and batch size as the
  server), tiles/s on synthetic tiles, after a warm-up run;
- end to end: one ScoreSlide stream through the server (open, tissue mask, grid, tile reading,
  backbone, head, streaming, gRPC), tiles/s over the scoring phase (first patch header to
  summary) and its ratio to the bare backbone (target >= 0.9);
- first-score latency: request sent -> first PatchScores message received (target < 2 s);
- aggregate tiles/s with 1 and 4 concurrent streams (target: 4 streams >= 0.9 x 1 stream);
- peak server RSS (psutil, sampled every 20 ms) while scoring a small and a 4x larger slide
  (must not grow with the slide size).

Slides are JPEG-tiled pyramidal TIFFs written tile by tile (tifffile, bounded memory): a tissue
disc of H&E-coloured texture on white. Prints a markdown table, writes
benchmarks/results/serving.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "serving.json"
TILE = 256   # TIFF tile side


def write_disc_slide(path: Path, side: int, seed: int = 0, mpp: float = 0.243) -> Path:
    """A side x side slide (3 levels) with a tissue disc, written tile by tile."""
    import tifffile

    from training.export import synthetic_parity_tiles

    rng = np.random.default_rng(seed)
    texture = synthetic_parity_tiles(n=4, seed=seed)   # 224 px H&E-like tiles
    tissue_tiles = [np.pad(t, ((0, TILE - 224), (0, TILE - 224), (0, 0)), mode="reflect")
                    for t in texture]
    white = np.full((TILE, TILE, 3), 242, np.uint8)

    def tiles(level_side: int):
        n = -(-level_side // TILE)   # edge tiles overhang the image; tifffile crops them
        for r in range(n):
            for c in range(n):
                centre = (np.array([r, c]) + 0.5) / n - 0.5
                inside = np.hypot(*centre) < 0.4
                yield tissue_tiles[rng.integers(4)] if inside else white

    px_per_cm = 10_000 / mpp
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(3):
            level_side = side >> level
            tif.write(tiles(level_side), shape=(level_side, level_side, 3), dtype=np.uint8,
                      tile=(TILE, TILE), compression="jpeg", photometric="rgb",
                      resolution=(px_per_cm / 2**level, px_per_cm / 2**level),
                      resolutionunit="CENTIMETER", subfiletype=0 if level == 0 else 1)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_backbone_rate(bundle: Path, provider: str, batch_size: int, batches: int,
                       precision: str = "fp32", tiles: np.ndarray | None = None,
                       backend: str = "onnxruntime") -> dict:
    """The backbone graph alone, as the server's Engine opens it (provider, CPU backend,
    threads, precision; `auto` chosen as the server chooses), one full batch per run after a
    warm-up run; median batch time -> tiles/s.

    On a GPU the tiles are copied from host memory each run (as the server does) with IO binding
    and the features stay on the device."""
    import statistics

    from serving.engine import Engine
    from training.export import synthetic_parity_tiles

    engine = Engine(bundle, provider=provider, backend=backend, batch_size=batch_size,
                    precision=precision)
    if tiles is None:
        tiles = synthetic_parity_tiles(n=batch_size, seed=1)
    tiles = np.ascontiguousarray(np.resize(tiles, (batch_size, *tiles.shape[1:])))

    def run_once():
        if not engine.on_gpu:
            engine.inference.features(tiles)
            return
        binding = engine.backbone.io_binding()
        binding.bind_cpu_input("tiles", tiles)
        binding.bind_output("features", "cuda", 0)
        engine.backbone.run_with_iobinding(binding)
        binding.synchronize_outputs()

    run_once()  # warm-up (allocations, kernel selection)
    seconds = []
    for _ in range(batches):
        started = time.perf_counter()
        run_once()
        seconds.append(time.perf_counter() - started)
    info = engine.describe()
    engine.close()
    return {"tiles_per_s": batch_size / statistics.median(seconds),
            "batch_seconds": [round(s, 4) for s in seconds], **info}


class ServerProcess:
    def __init__(self, bundle: Path, root: Path, provider: str, batch_size: int, log: Path,
                 precision: str = "fp32", max_concurrent: int = 8, backend: str = "onnxruntime"):
        import grpc
        import psutil
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        options = ["--model", str(bundle), "--slide-root", str(root), "--port", str(self.port),
                   "--provider", provider, "--batch-size", str(batch_size),
                   "--max-concurrent", str(max_concurrent), "--grace", "0"]
        # `milroi-serve serve` through this interpreter (no console script needed on a bare box)
        command = [sys.executable, "-m", "serving.cli", "serve", *options, "--precision", precision,
                   "--backend", backend]
        self.process = subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.process.pid)
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(self.address))
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server not SERVING")
            time.sleep(0.2)

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def score(address: str, slide: str, keep_scores: bool = False) -> dict:
    """One ScoreSlide stream: client-side timings and the server's summary timings."""
    import grpc

    from milroi.v1 import scoring_pb2 as pb
    from milroi.v1 import scoring_pb2_grpc as pb_grpc

    stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(address))
    started = time.perf_counter()
    first = header_at = None
    tiles = 0
    scores = []
    for response in stub.ScoreSlide(pb.ScoreSlideRequest(slide_path=slide), timeout=3600):
        kind = response.WhichOneof("kind")
        now = time.perf_counter() - started
        if kind == "header":
            header_at = now
        elif kind == "patches":
            first = first or now
            tiles += len(response.patches.score)
            if keep_scores:
                scores.append(np.asarray(response.patches.score, np.float32))
        else:
            summary = response.summary
    total = time.perf_counter() - started
    result = {"tiles": tiles, "first_score_s": first, "header_s": header_at, "total_s": total,
              "scoring_tiles_per_s": tiles / (total - header_at),
              "server_tiles_per_s": summary.timings.tiles_per_second,
              "slide_score": summary.slide_score}
    if keep_scores:
        result["scores"] = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    return result


def concurrent(address: str, slide: str, streams: int) -> dict:
    results = [None] * streams
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, score(address, slide)))
               for i in range(streams)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    return {"streams": streams, "tiles_per_s": sum(r["tiles"] for r in results) / seconds,
            "seconds": seconds}


def peak_rss_while(server: ServerProcess, work) -> tuple[int, object]:
    peak, done = [server.rss()], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak[0] = max(peak[0], server.rss())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return peak[0], result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: export one)")
    parser.add_argument("--provider", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--side", type=int, default=3072, help="small slide side, px (default 3072)")
    parser.add_argument("--bare-batches", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        tmp = Path(tmp)
        bundle = args.bundle
        if bundle is None:
            from training.backbone import build_backbone
            from training.export import export_bundle
            from training.heads import build_head

            backbone = build_backbone("none", seed=0)
            bundle = export_bundle(tmp / "bundle", backbone,
                                   build_head({"kind": "chowder", "in_dim": backbone.feature_dim}))
        root = tmp / "slides"
        root.mkdir()
        write_disc_slide(root / "small.tiff", args.side)
        write_disc_slide(root / "large.tiff", 2 * args.side, seed=1)   # 4x the area

        bare = bare_backbone_rate(bundle, args.provider, args.batch_size, args.bare_batches)
        server = ServerProcess(bundle, root, args.provider, args.batch_size, tmp / "server.log")
        try:
            score(server.address, "small.tiff")                     # warm-up (sessions, caches)
            rss_small, one = peak_rss_while(server, lambda: score(server.address, "small.tiff"))
            rss_large, large = peak_rss_while(server, lambda: score(server.address, "large.tiff"))
            single = concurrent(server.address, "small.tiff", 1)
            four = concurrent(server.address, "small.tiff", 4)
        finally:
            server.stop()

    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "provider": bare["provider"], "batch_size": args.batch_size,
        "bare_backbone_tiles_per_s": bare["tiles_per_s"],
        "end_to_end_tiles_per_s": one["scoring_tiles_per_s"],
        "end_to_end_over_bare": one["scoring_tiles_per_s"] / bare["tiles_per_s"],
        "first_score_s": one["first_score_s"],
        "small_slide": {"side": args.side, "tiles": one["tiles"], "peak_rss_mb": rss_small / 2**20},
        "large_slide": {"side": 2 * args.side, "tiles": large["tiles"], "peak_rss_mb": rss_large / 2**20},
        "streams_1_tiles_per_s": single["tiles_per_s"],
        "streams_4_tiles_per_s": four["tiles_per_s"],
        "streams_4_over_1": four["tiles_per_s"] / single["tiles_per_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    r = results
    rows = [
        ("bare backbone (onnxruntime)", f"{r['bare_backbone_tiles_per_s']:.1f} tiles/s", ""),
        ("ScoreSlide end to end", f"{r['end_to_end_tiles_per_s']:.1f} tiles/s",
         f"{r['end_to_end_over_bare']:.2f} x bare (target >= 0.9)"),
        ("first-score latency", f"{r['first_score_s']:.2f} s", "target < 2 s"),
        ("1 stream", f"{r['streams_1_tiles_per_s']:.1f} tiles/s", ""),
        ("4 concurrent streams", f"{r['streams_4_tiles_per_s']:.1f} tiles/s",
         f"{r['streams_4_over_1']:.2f} x 1 stream (target >= 0.9)"),
        (f"peak RSS, {r['small_slide']['tiles']} tiles", f"{r['small_slide']['peak_rss_mb']:.0f} MB", ""),
        (f"peak RSS, {r['large_slide']['tiles']} tiles", f"{r['large_slide']['peak_rss_mb']:.0f} MB",
         "must not grow with slide size"),
    ]
    print(f"provider {r['provider']}, batch {r['batch_size']}, {platform.node()}\n")
    print("| measure | value | note |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
