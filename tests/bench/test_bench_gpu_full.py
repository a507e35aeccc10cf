"""benchmarks/gpu.sh --full (benchmarks.bench_gpu_full) on a CPU: its dry run scores a small
Camelyon-layout slide through the real pipeline, writes the JSON layout, and is refused (exit 3)
because end-to-end figures on fewer than 10^4 tiles are not reported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_testing import export_test_bundle

from benchmarks.bench_gpu_full import MIN_TILES, REFUSED_EXIT, report

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_full_dry_run_writes_the_layout_and_refuses_a_small_slide(tmp_path):
    bundle = export_test_bundle(tmp_path / "bundle", "gpu-full-dry-run")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out),
           "MILROI_BENCH_CACHE": str(tmp_path / "cache"), "MILROI_TRT_CACHE": str(tmp_path / "trt")}
    run = subprocess.run(["bash", "benchmarks/gpu.sh", "--full", "--dry-run", "--bundle", str(bundle),
                          "--streams", "2", "--reader-tiles", "64"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == REFUSED_EXIT, run.stdout[-3000:] + run.stderr[-3000:]
    assert "REFUSED: refusing to report end-to-end figures measured on" in run.stderr
    result = json.loads((out / "gpu_full.json").read_text())
    assert result["mode"] == "dry-run" and result["refused"].startswith("refusing") and result["complete"]
    assert 0 < result["slide"]["tissue_tiles"] < MIN_TILES
    assert result["machine"]["model"] and "onnxruntime" in result and result["reader_threads"] >= 2
    assert set(result["gpu"]) >= {"gpus"} and "available" in result["gpu_decode"]
    cpu_reader = result["readers"]["cpu_decode_once"]
    assert cpu_reader["tiles"] == min(64, result["slide"]["tissue_tiles"]) and cpu_reader["tiles_per_s"] > 0
    assert "available" in result["readers"]["gpu_nvimagecodec"]
    (row,) = result["providers"]
    assert row["provider"] == "cpu" and row["active_provider"] == "CPUExecutionProvider"
    assert row["bare_backbone"]["tiles_per_s"] > 0
    assert row["alone"] is None and row["concurrent"] is None        # measured, withheld
    assert any("decode-once" in line for line in row["tile_readers_used"])


def test_end_to_end_figures_stand_from_ten_thousand_tiles_on():
    def raw(tiles):
        return {"mode": "full", "slide": {"tissue_tiles": tiles},
                "providers": [{"provider": "cuda", "alone": {"tiles_per_s": 6000.0},
                               "concurrent": {"aggregate_tiles_per_s": 11000.0}},
                              {"provider": "tensorrt", "error": "libnvinfer not found"}]}

    out, refused = report(raw(MIN_TILES))
    assert refused is None and out["refused"] is None
    assert out["providers"][0]["alone"]["tiles_per_s"] == 6000.0
    assert "below a Camelyon-size" in out["note"]
    out, refused = report(raw(113_110))
    assert refused is None and "note" not in out
    out, refused = report(raw(MIN_TILES - 1))
    assert "9999 tiles" in refused and out["providers"][0]["alone"] is None
    assert out["providers"][0]["concurrent"] is None and out["providers"][1]["error"]
