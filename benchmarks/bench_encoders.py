"""Each encoder architecture on the CPU: bare backbone at fp32, bf16 and int8, end to end with the
measured choice, feature dimension and ONNX size (issue 39).

    python -m benchmarks.bench_encoders [--encoders NAME,NAME,...] [--batch-size 32]
                                        [--batches 3] [--out benchmarks/results/encoders.json]

Per encoder (random weights, seed 0: speed does not depend on them), on this machine:
1. the bundle the export writes (training.export: ONNX with the normalisation inside, parity
   with torch, the int8 graph with the cosine gate: static QDQ for the CNNs, dynamic for the
   ViTs, training.quantize), with a Chowder head; the graphs' sizes on disk;
2. the bare backbone for each backend x precision on one fixed batch of tissue tiles
   (benchmarks.bench_backends.bare_rates: onnxruntime fp32 / int8, OpenVINO fp32 / bf16 / int8,
   interleaved, median batch, feature cosine to fp32);
3. end to end: one synthetic slide scored by the serving pipeline (serving.pipeline.SlideScorer
   on an Engine with --backend auto --precision auto: the choice it measures at load), tiles/s
   from the first request to the summary, median of `--repeats`; as a ratio to the best bare
   configuration that passes the gate.

The registry has more entries than architectures: Phikon-v2 has UNI's ViT-L/16, H-optimus-1
H-optimus-0's ViT-g/14. The default list is every architecture that finishes in minutes on 2
cores; ViT-H and ViT-g (2.5-4.5 GB at fp32) are listed "not measured" unless named in
--encoders. GPU rows come from benchmarks/gpu.sh when a GPU is lent; this script is CPU only.
Writes the JSON with the CPU model and flags (machine.py) and prints one markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.bench_backends import bare_rates
from benchmarks.machine import machine_facts

RESULTS = Path(__file__).resolve().parent / "results" / "encoders.json"
# One encoder per architecture (the registry's names, timm:NAME for the ViT-S/16 baseline of
# the eva leaderboard)
ARCHITECTURES = {
    "resnet50-trunc": "ResNet-50 to layer3",
    "resnet50": "ResNet-50",
    "timm:vit_small_patch16_224": "ViT-S/16",
    "uni": "ViT-L/16 (UNI, Phikon-v2)",
    "virchow2": "ViT-H/14, SwiGLU, 4 registers (Virchow2)",
    "uni2-h": "ViT-H/14, SwiGLU, 8 registers (UNI2-h)",
    "h-optimus-0": "ViT-g/14, 4 registers (H-optimus-0, H-optimus-1)",
    "gigapath": "ViT-g/16 (Prov-GigaPath)",
}
DEFAULT = ("resnet50-trunc", "resnet50", "timm:vit_small_patch16_224", "uni")
SLIDE_SIDE_UM = 1100   # the scored slide's side in um: ~70 tiles of 224 px at 0.243 um/px


def _mb(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 1) if path.is_file() else 0.0


def write_slides(folder: Path) -> tuple[Path, Path]:
    """The calibration slide and the scored slide every encoder reads (wsi.synth, 0.243 um/px)."""
    from core.tiling import CAMELYON16_MPP
    from wsi.synth import write_synthetic_slide

    side = int(SLIDE_SIDE_UM / CAMELYON16_MPP)
    calibration_slide, scored_slide = folder / "calibration.tif", folder / "scored.tif"
    write_synthetic_slide(calibration_slide, side, side, seed=21, tumor=True)
    write_synthetic_slide(scored_slide, side, side, seed=22, tumor=True)
    return calibration_slide, scored_slide


def bench_encoder(name: str, tmp: Path, slides: tuple[Path, Path], batch_size: int,
                  batches: int, repeats: int) -> dict:
    import torch

    from serving.engine import Engine
    from serving.pipeline import SlideScorer
    from training.backbone import build_backbone
    from training.export import export_bundle
    from training.heads import build_head
    from training.quantize import calibration_tiles_from_slides

    backbone = build_backbone("none", encoder=name, seed=0)
    spec = backbone.spec
    tiling = spec.tiling
    calibration_slide, scored_slide = slides
    calibration = calibration_tiles_from_slides([calibration_slide], n=40, tiling=tiling)
    sample = calibration_tiles_from_slides([scored_slide], n=batch_size, tiling=tiling)
    head = build_head({"kind": "chowder", "in_dim": spec.feature_dim}).eval()
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bundle = export_bundle(tmp / _safe(name), backbone, head, int8_calibration=calibration)
    export_s = time.perf_counter() - started
    del backbone
    manifest = json.loads((bundle / "manifest.json").read_text())
    row = {"encoder": name, "architecture": ARCHITECTURES.get(name, spec.title),
           "feature_dim": spec.feature_dim, "tile_size": spec.tile_size, "mpp": spec.mpp,
           "export_s": round(export_s, 1),
           "onnx_mb": {"fp32": _mb(bundle / "backbone.onnx") + _mb(bundle / "backbone.onnx.data"),
                       "int8": _mb(bundle / "backbone_int8.onnx")},
           "int8": manifest.get("int8", {}).get("calibration", {}).get("method"),
           "bare": bare_rates(bundle, sample, batch_size, batches)}
    passing = [r for r in row["bare"]["rows"] if r.get("passes_gate")]
    best = max(passing, key=lambda r: r["tiles_per_s"])
    row["best_bare"] = {k: best[k] for k in ("backend", "precision", "tiles_per_s")}
    engine = Engine(bundle, backend="auto", precision="auto", batch_size=batch_size)
    try:
        scorer = SlideScorer(engine)
        scorer.score_slide(scored_slide)   # warm-up
        rates, tiles = [], 0
        for _ in range(repeats):
            started = time.perf_counter()
            scored = scorer.score_slide(scored_slide)
            tiles = len(scored.scores)
            rates.append(tiles / (time.perf_counter() - started))
        row["end_to_end"] = {"backend": engine.backend, "precision": engine.precision,
                             "tiles": tiles, "tiles_per_s": round(statistics.median(rates), 1),
                             "runs": [round(r, 1) for r in rates],
                             "vs_best_bare": round(statistics.median(rates)
                                                   / best["tiles_per_s"], 2)}
    finally:
        engine.close()
    return row


def _safe(name: str) -> str:
    return name.replace(":", "_")


def table(result: dict) -> list[str]:
    lines = ["| encoder | architecture | dim | ONNX fp32 / int8 MB | onnxruntime fp32 | "
             "OpenVINO bf16 | int8 (ort / OpenVINO) | end to end, `auto` | vs best bare |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["encoders"]:
        if "not_measured" in row:
            lines.append(f"| {row['encoder']} | {row['architecture']} | {row['feature_dim']} | "
                         f"| not measured: {row['not_measured']} | | | | |")
            continue
        rates = {(r["backend"], r["precision"]): r for r in row["bare"]["rows"]}

        def rate(backend, precision, rates=rates):
            r = rates.get((backend, precision), {})
            if "tiles_per_s" not in r:
                return "n/a"
            gate = "" if r["passes_gate"] else " (fails gate)"
            return f"{r['tiles_per_s']:.1f}{gate}"

        e = row["end_to_end"]
        lines.append(
            f"| {row['encoder']} | {row['architecture']} | {row['feature_dim']} | "
            f"{row['onnx_mb']['fp32']:.0f} / {row['onnx_mb']['int8']:.0f} | "
            f"{rate('onnxruntime', 'fp32')} | {rate('openvino', 'bf16')} | "
            f"{rate('onnxruntime', 'int8')} / {rate('openvino', 'int8')} ({row['int8']}) | "
            f"{e['tiles_per_s']:.1f} ({e['backend']} {e['precision']}) | {e['vs_best_bare']:.2f}x |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", default=",".join(DEFAULT),
                        help=f"comma-separated encoder names (default {','.join(DEFAULT)}; "
                             f"registry: training.encoders)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3, help="timed batches per configuration")
    parser.add_argument("--repeats", type=int, default=3, help="end-to-end runs per encoder")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from training.encoders import encoder_spec

    names = [n for n in args.encoders.split(",") if n]
    result = {"batch_size": args.batch_size, "batches": args.batches, "repeats": args.repeats,
              "weights": "none (random, seed 0)", "gpu": "not measured (CPU only here; "
              "benchmarks/gpu.sh --full on a lent GPU)", "encoders": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="milroi-encoders-") as tmp:
        # `auto` is measured afresh in this run, not taken from an earlier run's cache
        os.environ["MILROI_CACHE_DIR"] = str(Path(tmp) / "cache")
        slides = write_slides(Path(tmp))
        for name in names:
            print(f"[encoders] {name}", flush=True)
            row_dir = Path(tmp) / _safe(name)
            row_dir.mkdir()
            result["encoders"].append(bench_encoder(name, row_dir, slides, args.batch_size,
                                                    args.batches, args.repeats))
    for name, architecture in ARCHITECTURES.items():
        if name not in names:
            spec = encoder_spec(name)
            why = "not in --encoders" if name in DEFAULT else \
                "not in --encoders: a ViT-H/g takes minutes per batch of 32 on 2 cores"
            result["encoders"].append({"encoder": name, "architecture": architecture,
                                       "feature_dim": spec.feature_dim, "not_measured": why})
    result["machine"] = machine_facts()
    result["seconds"] = round(time.perf_counter() - started, 1)
    m = result["machine"]
    print(f"\n{m['model']} ({', '.join(m['flags'])}), load average {m['loadavg']}, "
          f"batch {args.batch_size}, random weights; GPU: {result['gpu']}\n")
    print("\n".join(table(result)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
