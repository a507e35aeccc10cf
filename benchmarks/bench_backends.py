"""Bare backbone on the CPU, each backend x precision: onnxruntime and OpenVINO on a bundle's graphs.

    python -m benchmarks.bench_backends [--bundle DIR] [--batch-size 32] [--batches 5]

The same two graphs of one bundle (`backbone.onnx`, `backbone_int8.onnx`), the same batch of
real tissue tiles, one fixed batch shape, all the host's cores:

- onnxruntime fp32 and int8: sessions as the server opens them (`core.runtime.session_options`);
- OpenVINO (`openvino` on PyPI, which reads the ONNX and QDQ graphs as they are) fp32 with the
  f32 inference precision hint (exact fp32, not the bf16 OpenVINO picks by itself on CPUs
  with AMX), bf16 (the fp32 graph with the bf16 hint, on CPUs that report BF16), and int8 (the
  QDQ graph, f32 hint for what is not quantised).

Runs are interleaved (one batch of each configuration in turn), so a change in the machine's
load hits all of them; each rate is the median batch. Each configuration's features are
compared with onnxruntime fp32's (per-tile cosine, min and mean): the agreement gate of the
bundle is cosine >= 0.99. OpenVINO missing: its rows say so. This is what `--backend auto
--precision auto` chooses from (core.inference_backends, which times the same configurations
at model load on smaller batches); `make bench` puts its end-to-end row beside these.
Writes benchmarks/results/backends.json with the CPU model and flags (machine.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import machine_facts
from core.inference_backends import (
    OPENVINO_HINTS,
    OnnxruntimeFeatures,
    feature_cosine,
    open_openvino,
    openvino_capabilities,
)
from core.runtime import available_cores

RESULTS = Path(__file__).resolve().parent / "results" / "backends.json"


def configurations(bundle: Path) -> list[tuple[str, str, Path]]:
    """(backend, precision, graph) of every configuration this bundle allows, bf16 included
    where this CPU cannot run it (its row then says so)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    fp32 = bundle / manifest["files"]["backbone"]
    int8 = bundle / manifest["files"]["backbone_int8"] if "backbone_int8" in manifest["files"] else None
    out = [("onnxruntime", "fp32", fp32)]
    if int8:
        out.append(("onnxruntime", "int8", int8))
    out.append(("openvino", "fp32", fp32))
    out.append(("openvino", "bf16", fp32))
    if int8:
        out.append(("openvino", "int8", int8))
    return out


def bare_rates(bundle: Path, tiles: np.ndarray, batch_size: int = 32, batches: int = 5,
               threads: int | None = None) -> dict:
    """Median tiles/s of each configuration on `tiles` (>= batch_size real tiles), and its
    feature agreement with onnxruntime fp32."""
    threads = threads or available_cores()
    batch = np.ascontiguousarray(tiles[:batch_size], dtype=np.uint8)
    if len(batch) < batch_size:
        batch = np.concatenate([batch] * (-(-batch_size // len(batch))))[:batch_size]
    runners, rows = {}, []
    capabilities = openvino_capabilities()
    for backend, precision, graph in configurations(bundle):
        row = {"backend": backend, "precision": precision, "graph": graph.name}
        if backend == "openvino" and capabilities is None:
            row["unavailable"] = "not installed: openvino"
        elif backend == "openvino" and precision == "bf16" and "BF16" not in capabilities:
            row["unavailable"] = "this CPU has no bf16 (OpenVINO's OPTIMIZATION_CAPABILITIES)"
        else:
            started = time.perf_counter()
            if backend == "onnxruntime":
                run = OnnxruntimeFeatures(graph, threads)
            else:   # one fixed batch shape; open_openvino checks the precision it runs
                run = open_openvino(graph, threads, precision, input_shape=batch.shape)
                row["inference_precision"] = OPENVINO_HINTS[precision]
            row["load_s"] = round(time.perf_counter() - started, 2)
            row["features"] = run(batch)   # warm-up, and the features compared below
            runners[(backend, precision)] = run
        rows.append(row)
    seconds: dict = {key: [] for key in runners}
    for _ in range(batches):
        for key, run in runners.items():
            started = time.perf_counter()
            run(batch)
            seconds[key].append(time.perf_counter() - started)
    reference = rows[0]["features"]
    for row in rows:
        key = (row["backend"], row["precision"])
        if key not in runners:
            continue
        cos = feature_cosine(row.pop("features"), reference)
        row.update(tiles_per_s=round(batch_size / statistics.median(seconds[key]), 1),
                   batch_seconds=[round(s, 4) for s in seconds[key]],
                   cosine_min=round(float(cos.min()), 5), cosine_mean=round(float(cos.mean()), 5),
                   passes_gate=bool(cos.min() >= 0.99))
    base = rows[0].get("tiles_per_s")
    for row in rows:
        if "tiles_per_s" in row and base:
            row["vs_onnxruntime_fp32"] = round(row["tiles_per_s"] / base, 2)
    return {"batch_size": batch_size, "batches": batches, "threads": threads, "rows": rows}


def table_rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(measure, value, baseline, ratio, note) rows, as benchmarks.run prints them."""
    out = []
    for row in result["rows"]:
        name = f"bare backbone, {row['backend']} {row['precision']} (CPU, batch {result['batch_size']})"
        if "unavailable" in row:
            out.append((name, "n/a", "", "", row["unavailable"]))
            continue
        hint = f", OpenVINO precision {row['inference_precision']}" if "inference_precision" in row else ""
        out.append((name, f"{row['tiles_per_s']:.1f} tiles/s", "onnxruntime fp32",
                    f"{row['vs_onnxruntime_fp32']:.2f}x",
                    f"feature cosine to fp32 min {row['cosine_min']:.4f}"
                    f"{' (gate 0.99 passed)' if row['passes_gate'] else ' (FAILS the 0.99 gate)'}{hint}"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a bundle (default: export ResNet-50 + int8 here)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=5, help="timed batches per configuration")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from benchmarks.run import export_model, read_tiles, tissue_coords
    from wsi.synth import write_synthetic_slide

    with tempfile.TemporaryDirectory(prefix="milroi-backends-") as tmp:
        tmp = Path(tmp)
        bundle = args.bundle or export_model(tmp / "bundle", tmp, int8=True)
        slide = tmp / "tiles.tif"
        write_synthetic_slide(slide, 2048, 2048, seed=21, tumor=True)   # not a calibration slide
        coords = tissue_coords(slide)
        tiles = read_tiles(slide, coords[np.linspace(0, len(coords) - 1, args.batch_size).astype(int)])
        result = bare_rates(bundle, tiles, args.batch_size, args.batches)
    result["machine"] = machine_facts()
    print(f"\n{result['machine']['model']} ({', '.join(result['machine']['flags'])}), "
          f"{result['threads']} threads, load average {result['machine']['loadavg']}\n")
    print("| measure | value | baseline | ratio | note |\n|---|---:|---|---:|---|")
    for row in table_rows(result):
        print("| " + " | ".join(row) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
