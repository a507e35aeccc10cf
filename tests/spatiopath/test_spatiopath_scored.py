"""End to end on a slide scored by milroi's own model path: `milroi-serve score` with a real
ONNX bundle writes the result files, `milroi-serve spatiopath` analyses them with the real
spatiopath package and the slide's synthetic cells (slow: a bundle export and two scorings)."""
from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
import shapely
from test_spatiopath_command import ROOT, read_summary, run_cli

pytest.importorskip("spatiopath", reason="milroi's optional extra: pip install 'milroi[spatiopath]'")

BAND_UM, ZONE_UM, ANALYSIS_UM = 20.0, 5.0, 60.0


def score(slides, bundle, out, *extra):
    done = subprocess.run([sys.executable, "-m", "serving.cli", "score", str(slides), "--model", str(bundle),
                           "--out", str(out), "--no-progress", *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={"PYTHONPATH": f"{ROOT}:{ROOT / 'proto'}", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.mark.slow
def test_scored_by_milroi_then_analysed(scored, tmp_path):
    from bundle_testing import export_test_bundle

    from results.outputs import read_scored_rois
    from wsi.synth import write_synthetic_cells

    bundle = export_test_bundle(tmp_path / "bundle", "spatiopath-test")
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "tumor_a.tif").symlink_to(scored["slides"] / "tumor_a.tif")
    # The test model is a seeded random network: its ROIs are where its top quarter of patch
    # scores are, taken from a first run.
    first = score(slides, bundle, tmp_path / "first")
    with open(first / "tumor_a" / "tumor_a_patches.csv", newline="") as f:
        patch_scores = np.array([float(row["score"]) for row in csv.DictReader(f)])
    threshold = float(np.quantile(patch_scores, 0.75))
    scores = score(slides, bundle, tmp_path / "scores", "--roi-threshold", f"{threshold:.9f}")
    rois = read_scored_rois(scores / "tumor_a" / "tumor_a_spatiopath.json")
    assert rois.polygons
    around = shapely.union_all(rois.polygons)

    metrics = {}
    for mode in ("uniform", "enriched"):
        cells = write_synthetic_cells(tmp_path / mode / "tumor_a.csv", scored["truths"]["tumor_a"], mode,
                                      band_um=BAND_UM, around=around)
        out = tmp_path / f"out_{mode}"
        done = run_cli(str(scores), "--cells", str(cells), "--out", str(out), "--zone-width", str(ZONE_UM),
                       "--analysis-zone", str(ANALYSIS_UM), "--cell-class", "Immune cells")
        assert done.returncode == 0, done.stdout + done.stderr
        row = read_summary(out)["tumor_a"]
        assert row["status"] == "ok" and int(row["windows"]) >= 1 and int(row["cells"]) > 0
        assert (out / "tumor_a" / "tumor_a_k0.png").exists()
        assert (out / "tumor_a" / "pooled" / "KTable.csv").exists()
        metrics[mode] = {k: float(row[k])
                         for k in ("ASI", "MODIFIED_ASI", "SAI", "ACI", "meanCouplingDistance")}
    for metric in ("ASI", "MODIFIED_ASI", "SAI"):
        assert metrics["enriched"][metric] > metrics["uniform"][metric], (metric, metrics)
    assert 0 < metrics["enriched"]["meanCouplingDistance"] <= BAND_UM + ZONE_UM
