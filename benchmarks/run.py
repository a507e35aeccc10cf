"""`make bench`: milroi's performance table, every row measured in this one run, on the same slides.

    python -m benchmarks.run [--quick] [--slide PATH] [--out benchmarks/results]
                             [--provider auto|cpu|cuda] [--precisions fp32,int8,auto] [--naive-device cpu]

Rows (what each means: benchmarks/README.md), each speed with the baseline it is compared to:

1. open + tissue mask + tile grid of a Camelyon16-size slide (98304 x 196608 px, wsi.synth,
   cached in ~/.cache/milroi/bench; --quick: a 1/4-side slide), median of repeats;
2. tile reads (wsi.tiles.TileReader) with 1 thread and N threads, tiles/s; the decode-once
   reader (wsi.decode_once) against the OpenSlide reader on a Camelyon-layout slide (512-px JPEG
   tiles, shared JPEGTables), tiles/s per thread count and decodes per patch (bench_reader);
3. naive baseline (benchmarks/naive.py: CLAM-style per-tile openslide + PIL + torchvision
   transforms + torch eager ResNet-50), tiles/s on the scoring slide's tissue tiles;
4. per precision (fp32, int8 on CPU; fp32, fp16 on GPU): the bare backbone in onnxruntime at
   the serving batch size (the ceiling), and ScoreSlide end to end through a real
   `milroi-serve serve` process on loopback (tiles/s from the header to the summary: tile reading,
   backbone, head, streaming), as a ratio to its ceiling (target >= 0.9) and to the naive baseline;
5. first-score latency (request sent -> first patch scores received);
6. aggregate tiles/s with 1, 4 and 8 concurrent streams;
7. peak server RSS while scoring the scoring slide and one with 4x its area (must not grow);
8. int8 agreement with fp32: feature cosine on the scoring slide's tiles (held out from the
   calibration), patch score max / mean abs difference over the whole slide;
9. on CPU, the bare backbone for each backend x precision (onnxruntime fp32 / int8, OpenVINO
   fp32 / bf16 / int8 on the same graphs), with its feature cosine to fp32 (bench_backends);
10. on CPU, `auto`: the server started with --backend auto --precision auto (the backend x
   precision it measures at load, core.inference_backends) end to end, against the best bare
   backbone of row 9 (target >= 0.9x), onnxruntime int8 bare (>= 2x on AMX hosts) and the
   naive baseline (>= 12x). The fp32 and int8 rows run onnxruntime, as before.

The model: ResNet-50 (random init, seed 0, `--weights none`: no weights on this machine) + a
Chowder head, exported by training.export (with the static int8 backbone of training.quantize,
calibrated on the real CMU-1-Small-Region.svs and a wsi.synth slide, neither of them scored here).
Prints ONE markdown table; writes <out>/bench.json with every raw number, the machine, and the
load average before and after (the machine may be shared: speeds are medians of repeats).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import bench_backends, bench_reader, bench_serving, bench_wsi
from benchmarks.machine import cpu_facts
from benchmarks.naive import naive_features

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


@dataclass(frozen=True)
class Plan:
    """How much of everything one run measures."""

    mask_slide: tuple[int, int]   # w, h of the cached mask/grid slide
    mask_repeats: int
    read_tiles: int               # tiles per tile-read measurement
    scoring_side: int             # side of the scoring slide (the large one is 2x: 4x the area)
    naive_tiles: int
    bare_batches: int
    score_repeats: int            # ScoreSlide runs per precision (median)
    streams: tuple[int, ...]
    reader_tiles: int = 4096      # consecutive grid patches per reader run (bench_reader)
    reader_repeats: int = 3


FULL = Plan(bench_wsi.CAMELYON_SIZE, 5, 1024, 6144, 96, 6, 3, (1, 4, 8))
QUICK = Plan((24_576, 49_152), 2, 256, 3584, 32, 3, 1, (1, 4, 8), reader_tiles=1024, reader_repeats=2)


def _median_of(runs: list[dict], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def export_model(out: Path, tmp: Path, int8: bool) -> Path:
    """ResNet-50 (random init, seed 0) + Chowder bundle; with the int8 backbone when asked."""
    import torch

    from training.backbone import build_backbone
    from training.export import export_bundle
    from training.heads import build_head
    from wsi.synth import write_synthetic_slide

    backbone = build_backbone("none", layer="pool", seed=0)
    torch.manual_seed(0)
    head = build_head({"kind": "chowder", "in_dim": backbone.feature_dim}).eval()
    calibration = None
    if int8:
        from training.quantize import calibration_tiles_from_slides

        calibration_slide = tmp / "calibration.tif"
        write_synthetic_slide(calibration_slide, 3072, 3072, seed=11, tumor=True)
        calibration = calibration_tiles_from_slides(
            [DATA / "CMU-1-Small-Region.svs", calibration_slide], n=72, seed=0)
    return export_bundle(out, backbone, head, int8_calibration=calibration)


def tissue_coords(slide_path: Path, limit: int | None = None) -> np.ndarray:
    from wsi.grid import tiles_for_slide
    from wsi.slide import open_slide

    with open_slide(slide_path) as slide:
        _, grid = tiles_for_slide(slide)
    if limit is None or limit >= len(grid):
        return grid.coords
    return grid.coords[np.linspace(0, len(grid) - 1, limit).astype(int)]


def read_tiles(slide_path: Path, coords: np.ndarray) -> np.ndarray:
    from wsi.slide import open_slide

    with open_slide(slide_path) as slide:
        return np.stack([slide.read_region(int(x), int(y), 224, 224) for x, y in coords])


def measure_precision(bundle: Path, root: Path, slide: str, large: str | None, precision: str,
                      args, plan: Plan, bare_tiles: np.ndarray, tmp: Path) -> dict:
    """Bare backbone, end-to-end ScoreSlide (median), first score; streams and RSS if `large`.

    The bare backbone is timed just before and just after the server runs (median of all its
    batches): on a shared machine the load drifts, and the ceiling should see the same drift."""
    # The named precisions run onnxruntime (the rows as they were); "auto" lets the engine
    # measure and choose backend and precision, as `serve` does by default.
    backend = "auto" if precision == "auto" else "onnxruntime"

    def bare():
        return bench_serving.bare_backbone_rate(bundle, args.provider, args.batch_size,
                                                plan.bare_batches, precision=precision,
                                                tiles=bare_tiles, backend=backend)

    before = bare()
    result = {"precision": before["precision"], "provider": before["provider"],
              "threads": before["threads"], "backend": before["backend"],
              "requested": precision, "backend_choice": before["backend_choice"]}
    server = bench_serving.ServerProcess(bundle, root, args.provider, args.batch_size,
                                         tmp / f"server-{precision}.log", precision=precision,
                                         max_concurrent=max(plan.streams), backend=backend)
    try:
        bench_serving.score(server.address, slide)   # warm-up (sessions, allocator, caches)
        runs = [bench_serving.score(server.address, slide, keep_scores=True)
                for _ in range(plan.score_repeats)]
        result.update(
            tiles=runs[0]["tiles"], scores=runs[0]["scores"], slide_score=runs[0]["slide_score"],
            end_to_end_tiles_per_s=_median_of(runs, "scoring_tiles_per_s"),
            end_to_end_all=[round(r["scoring_tiles_per_s"], 2) for r in runs],
            first_score_s=_median_of(runs, "first_score_s"))
        if large is not None:
            result["streams"] = {n: bench_serving.concurrent(server.address, slide, n)["tiles_per_s"]
                                 for n in plan.streams}
            rss_small, _ = bench_serving.peak_rss_while(
                server, lambda: bench_serving.score(server.address, slide))
            rss_large, large_run = bench_serving.peak_rss_while(
                server, lambda: bench_serving.score(server.address, large))
            result["rss"] = {"small_tiles": runs[0]["tiles"], "small_mb": rss_small / 2**20,
                             "large_tiles": large_run["tiles"], "large_mb": rss_large / 2**20}
    finally:
        server.stop()
    batch_seconds = before["batch_seconds"] + bare()["batch_seconds"]
    result["bare_batch_seconds"] = batch_seconds
    result["bare_tiles_per_s"] = args.batch_size / statistics.median(batch_seconds)
    return result


def build_rows(r: dict) -> list[tuple[str, str, str, str, str]]:
    """(measure, value, baseline, ratio, target/note) rows of the table."""
    rows = []
    mask = r["mask_and_grid"]
    rows.append((f"open + tissue mask + tile grid, {mask['dimensions'][0]} x {mask['dimensions'][1]} "
                 f"px slide, {mask['tiles']} tiles", f"{mask['seconds_median']:.2f} s", "", "",
                 f"median of {len(mask['seconds_all'])}"))
    reads = r["tile_reads"]
    for row in reads:
        rows.append((f"tile reads, {row['threads']} thread(s)", f"{row['tiles_per_s']:.0f} tiles/s",
                     "1 thread" if row is not reads[0] else "", f"{row['speedup']:.2f}x"
                     if row is not reads[0] else "", f"cpu/wall {row['cpu_per_wall']:.2f}"))
    if "reader" in r:
        rows += bench_reader.table_rows(r["reader"])
    naive = r["naive"]
    rows.append((f"naive baseline (CLAM-style, torch eager, {naive['device']})",
                 f"{naive['tiles_per_s']:.1f} tiles/s", "", "1.00x", f"{naive['tiles']} tiles"))
    for p in r["precisions"]:
        name = p["precision"]
        if p.get("requested") == "auto":
            rows += auto_rows(r, p)
            continue
        if p.get("unavailable"):
            rows.append((f"{name} backbone", "n/a", "", "", p["unavailable"]))
            continue
        ceiling = p["bare_tiles_per_s"]
        rows.append((f"bare backbone {name} ({p['provider']}, batch {r['batch_size']})",
                     f"{ceiling:.1f} tiles/s", "bare fp32" if name != "fp32" else "naive",
                     f"{ceiling / (r['bare_fp32'] if name != 'fp32' else naive['tiles_per_s']):.2f}x",
                     "the ceiling"))
        e2e = p["end_to_end_tiles_per_s"]
        rows.append((f"ScoreSlide end to end, {name}", f"{e2e:.1f} tiles/s", f"bare {name}",
                     f"{e2e / ceiling:.2f}x", "target >= 0.9x"))
        rows.append((f"ScoreSlide end to end, {name}, vs naive", f"{e2e:.1f} tiles/s", "naive",
                     f"{e2e / naive['tiles_per_s']:.2f}x",
                     "target >= 8x" if name == "int8" else ""))
        rows.append((f"first-score latency, {name}", f"{p['first_score_s']:.2f} s", "", "",
                     "target < 2 s"))
    main = r["serving_precision"]
    p = next(p for p in r["precisions"] if p["precision"] == main)
    one = p["streams"][1]
    for n, rate in p["streams"].items():
        rows.append((f"{n} concurrent stream(s), {main}", f"{rate:.1f} tiles/s",
                     "1 stream" if n != 1 else "", f"{rate / one:.2f}x" if n != 1 else "",
                     "target >= 0.9x" if n != 1 else "aggregate tiles/s"))
    rss = p["rss"]
    rows.append((f"peak server RSS, {rss['small_tiles']} tiles", f"{rss['small_mb']:.0f} MB", "", "", main))
    rows.append((f"peak server RSS, {rss['large_tiles']} tiles (4x area)", f"{rss['large_mb']:.0f} MB",
                 f"{rss['small_tiles']} tiles", f"{rss['large_mb'] / rss['small_mb']:.2f}x",
                 "must not grow (~1.0x)"))
    for name, a in r.get("agreement", {}).items():
        if "cosine_min" in a:
            rows.append((f"{name} vs fp32 feature cosine (min / mean)",
                         f"{a['cosine_min']:.4f} / {a['cosine_mean']:.4f}", "", "",
                         f"target >= 0.99, {a['tiles']} tiles"))
        rows.append((f"{name} vs fp32 patch scores, abs diff (max / mean)",
                     f"{a['score_max_abs_diff']:.4f} / {a['score_mean_abs_diff']:.5f}", "", "",
                     f"{a['score_tiles']} patches, slide score diff {a['slide_score_abs_diff']:.4f}"))
    if "backends" in r:
        rows += bench_backends.table_rows(r["backends"])
    rows.append(("naive vs milroi fp32 feature cosine (min)", f"{r['naive_cosine_min']:.5f}", "", "",
                 "same network, same numbers"))
    return rows


def auto_rows(r: dict, p: dict) -> list[tuple[str, str, str, str, str]]:
    """End to end with the backend x precision the server chose itself (`--backend auto
    --precision auto`), against the best bare backbone, onnxruntime int8 bare and naive."""
    choice = f"{p['backend']} {p['precision']}"
    e2e, naive = p["end_to_end_tiles_per_s"], r["naive"]["tiles_per_s"]
    amx = any(f.startswith("amx") for f in r["machine"]["cpu"]["flags"])
    rows = [(f"bare backbone, auto (chose {choice})", f"{p['bare_tiles_per_s']:.1f} tiles/s",
             "", "", "the choice's own ceiling")]
    bare = {(b["backend"], b["precision"]): b for b in r.get("backends", {}).get("rows", [])
            if "tiles_per_s" in b}
    best = max((b for b in bare.values() if b["passes_gate"]), key=lambda b: b["tiles_per_s"],
               default=None)
    if best is not None:
        rows.append((f"ScoreSlide end to end, auto ({choice})", f"{e2e:.1f} tiles/s",
                     f"best bare ({best['backend']} {best['precision']})",
                     f"{e2e / best['tiles_per_s']:.2f}x", "target >= 0.9x"))
    if ("onnxruntime", "int8") in bare:
        rows.append((f"ScoreSlide end to end, auto ({choice}), vs onnxruntime int8 bare",
                     f"{e2e:.1f} tiles/s", "onnxruntime int8 bare",
                     f"{e2e / bare[('onnxruntime', 'int8')]['tiles_per_s']:.2f}x",
                     "target >= 2x on AMX hosts" + ("" if amx else " (this host has no AMX)")))
    rows.append((f"ScoreSlide end to end, auto ({choice}), vs naive", f"{e2e:.1f} tiles/s",
                 "naive", f"{e2e / naive:.2f}x", "target >= 12x"))
    rows.append((f"first-score latency, auto ({choice})", f"{p['first_score_s']:.2f} s", "", "",
                 "target < 2 s"))
    return rows


def markdown(rows) -> str:
    lines = ["| measure | value | baseline | ratio | target / note |", "|---|---:|---|---:|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not isinstance(v, np.ndarray)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small slides, few repeats (minutes)")
    parser.add_argument("--slide", type=Path, default=None,
                        help="slide for the mask/grid and tile-read rows (default: the cached "
                             "Camelyon-size synthetic slide)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--json-name", default="bench.json")
    parser.add_argument("--provider", default="cpu", choices=["auto", "cpu", "cuda", "tensorrt"])
    parser.add_argument("--precisions", default=None,
                        help="comma-separated (default fp32,int8,auto on cpu, fp32,fp16 "
                             "otherwise); auto: --backend auto --precision auto")
    parser.add_argument("--naive-device", default=None, help="torch device of the naive baseline")
    parser.add_argument("--batch-size", type=int, default=32, help="serving batch size (32)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    on_cpu = args.provider == "cpu"
    precisions = (args.precisions or ("fp32,int8,auto" if on_cpu else "fp32,fp16")).split(",")
    naive_device = args.naive_device or ("cpu" if on_cpu else "cuda")
    started, load_before = time.perf_counter(), _load()

    from core.runtime import available_cores
    from training.quantize import feature_agreement
    from wsi.synth import write_synthetic_slide

    mask_slide = args.slide or bench_wsi.camelyon_size_slide(plan.mask_slide)
    print(f"[bench] mask + grid on {mask_slide}", flush=True)
    result: dict = {"quick": args.quick, "batch_size": args.batch_size, "plan": plan.__dict__}
    result["mask_and_grid"] = bench_wsi.bench_mask_and_grid(mask_slide, plan.mask_repeats)
    cores = available_cores()
    result["tile_reads"] = bench_wsi.bench_tile_reads(mask_slide, plan.read_tiles,
                                                      (1, max(2, cores)))
    # A 1/4-side slide in both plans: the rate depends on the tile layout, not the slide size,
    # and a full-size copy would be a second 2 GB write on first use.
    reader_slide = bench_reader.camelyon_512_slide(bench_reader.QUICK_SIZE)
    print(f"[bench] decode-once vs OpenSlide reader on {reader_slide}", flush=True)
    result["reader"] = bench_reader.bench_readers(reader_slide, plan.reader_tiles, (1, max(2, cores)),
                                                  plan.reader_repeats)

    with tempfile.TemporaryDirectory(prefix="milroi-bench-") as tmp:
        tmp = Path(tmp)
        root = tmp / "slides"
        root.mkdir()
        print("[bench] scoring slides and model", flush=True)
        write_synthetic_slide(root / "score.tif", plan.scoring_side, plan.scoring_side, seed=1,
                              tumor=True)
        write_synthetic_slide(root / "large.tif", 2 * plan.scoring_side, 2 * plan.scoring_side,
                              seed=2, tumor=True)
        bundle = export_model(tmp / "bundle", tmp, int8=bool({"int8", "auto"} & set(precisions)))
        # `auto` is measured afresh in this run (the bench process and its server share it),
        # not taken from an earlier run's cache.
        os.environ["MILROI_CACHE_DIR"] = str(tmp / "cache")
        slide = root / "score.tif"
        coords = tissue_coords(slide)
        sample = read_tiles(slide, coords[np.linspace(0, len(coords) - 1, 32).astype(int)])

        print(f"[bench] naive baseline on {naive_device}", flush=True)
        naive_coords = coords[np.linspace(0, len(coords) - 1, min(plan.naive_tiles, len(coords))).astype(int)]
        naive = naive_features(slide, naive_coords, batch_size=args.batch_size, device=naive_device)
        # Same network: the naive features must be milroi's fp32 features (up to float error).
        import onnxruntime as ort
        reference = ort.InferenceSession(str(bundle / "backbone.onnx"),
                                         providers=["CPUExecutionProvider"])
        fp32_features = reference.run(["features"], {"tiles": read_tiles(slide, naive_coords[:16])})[0]
        naive16 = naive["features"][:16]
        result["naive_cosine_min"] = float(
            ((fp32_features * naive16).sum(1)
             / (np.linalg.norm(fp32_features, axis=1) * np.linalg.norm(naive16, axis=1))).min())
        result["naive"] = {k: v for k, v in naive.items() if k != "features"}

        serving_precision = "int8" if "int8" in precisions else precisions[-1]
        result["serving_precision"] = serving_precision
        result["precisions"] = []
        for precision in precisions:
            print(f"[bench] {precision}: bare backbone, server", flush=True)
            if precision == "fp16" and on_cpu:
                result["precisions"].append({"precision": "fp16", "unavailable":
                                             "GPU only (benchmarks/gpu.sh); CPU runs fp32"})
                continue
            measured = measure_precision(bundle, root, "score.tif",
                                         "large.tif" if precision == serving_precision else None,
                                         precision, args, plan, sample, tmp)
            result["precisions"].append(measured)
        by_name = {p["precision"]: p for p in result["precisions"]
                   if "scores" in p and p.get("requested") != "auto"}
        result["bare_fp32"] = by_name["fp32"]["bare_tiles_per_s"] if "fp32" in by_name else float("nan")
        # Agreement of every reduced precision with fp32: patch scores of the same slide (same
        # grid order) and, for int8 (a separate graph), the features on held-out tiles.
        result["agreement"] = {}
        reduced = [name for name in by_name if name != "fp32"] if "fp32" in by_name else []
        for name in reduced:
            diff = np.abs(by_name[name]["scores"] - by_name["fp32"]["scores"])
            agreement = {"score_max_abs_diff": float(diff.max()),
                         "score_mean_abs_diff": float(diff.mean()), "score_tiles": int(len(diff)),
                         "slide_score_abs_diff": abs(by_name[name]["slide_score"]
                                                     - by_name["fp32"]["slide_score"])}
            if name == "int8":
                agreement.update(feature_agreement(bundle / "backbone.onnx",
                                                   bundle / "backbone_int8.onnx", sample))
            result["agreement"][name] = agreement
        result["bundle_int8"] = json.loads((bundle / "manifest.json").read_text()).get("int8")
        if on_cpu:
            print("[bench] bare backbone, each backend x precision", flush=True)
            result["backends"] = bench_backends.bare_rates(bundle, sample, args.batch_size,
                                                           plan.bare_batches)

    result["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                         "cpus": os.cpu_count(), "usable_cores": cores,
                         "python": platform.python_version(), "node": platform.node(),
                         "cpu": cpu_facts()}   # model and SIMD flags (AMX, VNNI): hosts differ
    import onnxruntime
    import torch
    result["versions"] = {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__}
    result["load_average_before"], result["load_average_after"] = load_before, _load()
    result["seconds"] = round(time.perf_counter() - started, 1)
    rows = build_rows(result)
    result["table"] = [dict(zip(("measure", "value", "baseline", "ratio", "note"), r)) for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / args.json_name
    out.write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    print(f"\nmilroi benchmarks ({'quick' if args.quick else 'full'}), provider {args.provider}, "
          f"{result['machine']['cpu']['model']} ({', '.join(result['machine']['cpu']['flags'])}), "
          f"{cores} usable cores, load average {load_before[0]} before / {result['load_average_after'][0]} "
          f"after, {result['seconds']:.0f} s\n")
    print(markdown(rows))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
