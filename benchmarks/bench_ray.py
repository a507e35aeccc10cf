"""Batch scoring on Ray against the plain local run: `python -m benchmarks.bench_ray`.

The same folder of synthetic slides (wsi.synth) is scored by `serving.batch.score_folder` four
ways, each into a fresh OUT: in process (`LocalBackend`, the plain run: one engine thread per
core); the actor's class (`ScoringActor`, one engine thread as a 1-CPU actor has) in process, to
isolate what Ray itself costs; and over a local Ray cluster with 1 and 2 actors
(`serving.ray_batch.RayBackend`). Reported per way: tiles/s over the scoring of the folder
(fastest of --repeats), and the one-off costs Ray adds (ray.init of a local cluster; actor
start = worker process + model load, against the plain run's model load).

Prints a markdown table and writes benchmarks/results/ray.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "ray.json"


def make_inputs(root: Path, slides: int, size: int) -> tuple[Path, Path]:
    import torch

    from training.backbone import build_backbone
    from training.export import export_bundle
    from training.heads import build_head
    from wsi.synth import write_synthetic_slide

    torch.manual_seed(0)
    bundle = export_bundle(root / "bundle", backbone=build_backbone("none", layer="layer3", seed=0),
                           head=build_head({"kind": "chowder", "in_dim": 1024, "k": 3}).eval(),
                           manifest_extra={"name": "bench-ray", "slide_threshold": 0.5})
    slides_dir = root / "slides"
    slides_dir.mkdir()
    for i in range(slides):
        write_synthetic_slide(slides_dir / f"slide_{i}.tif", size, size, seed=i, tumor=i % 2 == 1)
    return bundle, slides_dir


def timed_folder(slides_dir: Path, out: Path, backend, repeats: int) -> dict:
    """The folder scored `repeats` times into fresh OUTs; the fastest counts (the machine is
    shared: the slower runs measure the neighbours)."""
    import shutil

    from serving.batch import score_folder

    runs = []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        rows = score_folder(slides_dir, out, backend, workers=getattr(backend, "workers", 1),
                            progress=False)
        runs.append(time.perf_counter() - start)
        assert all(r["status"] == "ok" for r in rows), rows
    tiles = sum(int(r["tiles"]) for r in rows)
    return {"tiles": tiles, "score_seconds": [round(x, 2) for x in runs],
            "tiles_per_s": round(tiles / min(runs), 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--size", type=int, default=2240, help="slide side in pixels")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--repeats", type=int, default=2, help="runs per way, fastest counts")
    args = parser.parse_args(argv)

    import ray

    from core.ray_cluster import RayOptions
    from serving.backends import LocalBackend
    from serving.options import EngineOptions
    from serving.overrides import ScoringOverrides
    from serving.ray_batch import RayBackend, ScoringActor

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle, slides_dir = make_inputs(root, args.slides, args.size)

        start = time.perf_counter()
        cpu = EngineOptions(provider="cpu")
        local = LocalBackend(str(bundle), cpu)
        load = time.perf_counter() - start
        try:
            timed_folder(slides_dir, root / "warm-up", local, 1)  # page cache, first session runs
            results["local (in process)"] = {"model_load_s": round(load, 2),
                                             **timed_folder(slides_dir, root / "local", local, args.repeats)}
        finally:
            local.close()

        start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        init = time.perf_counter() - start
        try:
            # Ray's own cost, isolated: the actor's code and thread count, in this process.
            same = ScoringActor(str(bundle), EngineOptions(provider="cpu", threads=1),
                                ScoringOverrides())
            try:
                assert same.engine.threads == 1
                results["local, 1 engine thread (as an actor)"] = timed_folder(
                    slides_dir, root / "local1", same, args.repeats)
            finally:
                same.close()
            for actors in (1, 2):
                start = time.perf_counter()
                backend = RayBackend(str(bundle), RayOptions("auto", actors=actors), cpu)
                started = time.perf_counter() - start
                try:
                    results[f"ray, {actors} actor{'s' if actors > 1 else ''}"] = {
                        "actor_start_s": round(started, 2),
                        **timed_folder(slides_dir, root / f"ray{actors}", backend,
                                     args.repeats)}
                finally:
                    backend.close()
        finally:
            ray.shutdown()

    base = results["local (in process)"]["tiles_per_s"]
    for r in results.values():
        r["vs_local"] = round(r["tiles_per_s"] / base, 3)
    report = {"benchmark": "ray batch scoring", "slides": args.slides,
              "slide_px": [args.size, args.size], "model": "ResNet-50 layer3 + CHOWDER (ONNX, CPU)",
              "ray_init_s": round(init, 2), "ray_cpus": args.cpus, "repeats": args.repeats,
              "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores (shared)",
              "load_average_1_5_15": [round(x, 1) for x in os.getloadavg()],  # the neighbours
              "results": results}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"ray.init (local cluster, {args.cpus} CPUs): {init:.2f} s\n")
    print("| run | tiles | start s | score s (runs) | tiles/s (fastest) | vs local |\n"
          "|---|---|---|---|---|---|")
    for name, r in results.items():
        start_s = r.get("actor_start_s", r.get("model_load_s", ""))
        print(f"| {name} | {r['tiles']} | {start_s} | {r['score_seconds']} | "
              f"{r['tiles_per_s']} | {r['vs_local']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
