"""`milroi-serve spatiopath` with the real spatiopath package: synthetic slides scored into
milroi's result files, cells from the nuclei drawn on them, the engine run per window."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
from conftest import ANALYSIS_ZONE_UM, BAND_UM

pytest.importorskip("spatiopath", reason="milroi's optional extra: pip install 'milroi[spatiopath]'")

ROOT = Path(__file__).resolve().parents[2]
ZONE_WIDTH_UM = 10.0
HEADLINE = ("ASI", "MODIFIED_ASI", "SAI", "ACI")


def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "proto"),
                                                        os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "serving.cli", "spatiopath", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def read_summary(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="") as f:
        return {row["slide"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def patterns(scored, tmp_path_factory):
    """The tumour slide analysed three times, its immune cells uniform, enriched in a 50 um
    band around the ROIs milroi wrote, and excluded from it; summary rows by mode."""
    from results.outputs import read_scored_rois
    from spatiopath_analysis.command import AnalysisOptions, analyse_folder
    from wsi.synth import write_synthetic_cells

    root = tmp_path_factory.mktemp("patterns")
    scores = root / "scores"
    shutil.copytree(scored["scores"] / "tumor_a", scores / "tumor_a")
    rois = read_scored_rois(scores / "tumor_a" / "tumor_a_spatiopath.json")
    around = shapely.union_all(rois.polygons)
    rows = {}
    for mode in ("uniform", "enriched", "excluded"):
        cells = write_synthetic_cells(root / mode / "tumor_a.csv", scored["truths"]["tumor_a"], mode,
                                      band_um=BAND_UM, around=around)
        options = AnalysisOptions(zone_width=ZONE_WIDTH_UM, analysis_zone=ANALYSIS_ZONE_UM,
                                  window=2048, cell_class="Immune cells", plots=mode == "enriched")
        out = root / f"out_{mode}"
        [row] = analyse_folder(scores, cells, out, options)
        assert row["status"] == "ok", row
        rows[mode] = {"row": row, "out": out, "summary": read_summary(out)["tumor_a"]}
    return rows


def test_metrics_move_with_the_cell_pattern(patterns):
    """Spatiopath's headline metrics, read back from summary.csv: immune cells enriched near
    the tumour are attracted to it (ASI, MODIFIED_ASI, SAI, ACI up, a coupling distance inside
    the band); uniform ones are not (no coupling distance: Spatiopath's -1)."""
    s = {mode: {k: float(v) for k, v in p["summary"].items() if k not in ("slide", "status", "error")}
         for mode, p in patterns.items()}
    for metric in HEADLINE:
        assert s["enriched"][metric] > s["uniform"][metric], metric
    assert s["enriched"]["ASI"] > 0.1 and s["uniform"]["ASI"] < 0.05
    assert 0 < s["enriched"]["meanCouplingDistance"] <= BAND_UM + ZONE_WIDTH_UM
    assert s["uniform"]["meanCouplingDistance"] == -1
    # excluded from the band: no zone within it is attracted, and any coupling is beyond it
    band_zones = int(BAND_UM // ZONE_WIDTH_UM)
    import pandas as pd

    k_table = pd.read_csv(patterns["excluded"]["out"] / "tumor_a" / "pooled" / "KTable.csv", index_col=0)
    assert (k_table["K0"].iloc[:band_zones] < 0).all()
    enriched_k = pd.read_csv(patterns["enriched"]["out"] / "tumor_a" / "pooled" / "KTable.csv", index_col=0)
    threshold = s["enriched"]["Threshold"]
    assert enriched_k["K0"].iloc[:band_zones].max() > threshold       # attracted within the band
    assert (enriched_k["K0"].iloc[band_zones + 1:] < 0).all()         # depleted beyond it
    excluded_coupling = s["excluded"]["meanCouplingDistance"]
    assert excluded_coupling == -1 or excluded_coupling > BAND_UM
    # the columns are the pooled result's own, the counts add up
    assert s["enriched"]["totalNumberOfPoints"] == s["enriched"]["cells"] > 0
    assert s["enriched"]["zoneWidth"] == ZONE_WIDTH_UM
    assert s["enriched"]["numberOfLevelsets"] == ANALYSIS_ZONE_UM / ZONE_WIDTH_UM


def test_results_are_spatiopaths_own_files(patterns):
    """Every window and the pooled result saved by SpatioPathResult.save, loadable by its
    load; K0 plots; the windows JSON beside them."""
    from spatiopath.engine import SpatioPathResult

    from spatiopath_analysis.windows import read_windows_json

    out = patterns["enriched"]["out"] / "tumor_a"
    windows = read_windows_json(out / "tumor_a_windows.json")
    assert len(windows.windows) == patterns["enriched"]["row"]["windows"] >= 1
    total = 0
    for window in windows.windows:
        result = SpatioPathResult.load(str(out / "windows" / window.id))
        assert result.name == window.id
        total += result.total_points
        assert (out / "windows" / window.id / "k0.png").stat().st_size > 1000
    pooled = SpatioPathResult.load(str(out / "pooled"))
    assert pooled.total_points == total == patterns["enriched"]["row"]["cells"]
    assert pooled.analysis["ASI"].iloc[0] == pytest.approx(float(patterns["enriched"]["summary"]["ASI"]),
                                                          rel=1e-5)
    assert (out / "tumor_a_k0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pooling_matches_the_single_window_result(patterns):
    """One window pooled is that window: the pooling (compute_pooling, or its stand-in where
    spatiopath 0.5.0's raises) gives the window's own metrics back."""
    out = patterns["enriched"]["out"] / "tumor_a"
    import pandas as pd

    if patterns["enriched"]["row"]["windows"] != 1:
        pytest.skip("the layout gave several windows")
    window = pd.read_csv(out / "windows" / "w01" / "analysis.csv")
    pooled = pd.read_csv(out / "pooled" / "analysis.csv")
    for column in ("ACI", "SAI", "ASI", "MODIFIED_ASI", "meanCouplingDistance", "omega"):
        assert pooled[column].iloc[0] == pytest.approx(window[column].iloc[0], rel=1e-9), column


def test_command_line_no_roi_and_bad_cells(scored, tmp_path):
    """Through the real CLI: a slide without ROI gets no window and one clear line (not an
    error); a slide whose cells are outside it fails with a message naming the file, the others
    are still analysed; the exit code says a slide failed."""
    cells = tmp_path / "cells"
    cells.mkdir()
    (cells / "normal_a.csv").write_text("x,y\n10,10\n")
    (cells / "tumor_a.csv").write_text("x,y\n10,10\n5000,10\n")     # 5000 > 2048: another frame
    out = tmp_path / "out"
    done = run_cli(str(scored["scores"]), "--cells", str(cells), "--out", str(out),
                   "--analysis-zone", str(ANALYSIS_ZONE_UM), "--window", "2048", "--no-plots")
    assert done.returncode == 1, done.stderr
    assert "normal_a: no tumour ROI in normal_a_spatiopath.json: no window, nothing to analyse" in done.stdout
    assert "failed tumor_a: cells file" in done.stdout and "outside the slide" in done.stdout
    rows = read_summary(out)
    assert rows["normal_a"]["status"] == "no_roi" and rows["normal_a"]["windows"] == "0"
    assert rows["tumor_a"]["status"] == "failed" and "tumor_a.csv" in rows["tumor_a"]["error"]
    assert "Traceback" not in done.stderr

    (cells / "tumor_a.csv").write_text("x,y\n700,700\n900,800\n")
    done = run_cli(str(scored["scores"]), "--cells", str(cells), "--out", str(out),
                   "--analysis-zone", str(ANALYSIS_ZONE_UM), "--window", "2048", "--no-plots")
    assert done.returncode == 0, done.stdout + done.stderr
    assert read_summary(out)["tumor_a"]["status"] == "ok"

    one_file = run_cli(str(scored["scores"]), "--cells", str(cells / "tumor_a.csv"), "--out", str(out))
    assert one_file.returncode == 1 and "is one file but SCORES_DIR holds several slides" in one_file.stdout
    missing = tmp_path / "empty"
    missing.mkdir()
    done = run_cli(str(scored["scores"]), "--cells", str(missing), "--out", str(tmp_path / "o2"))
    assert done.returncode == 1 and "no cells file for tumor_a" in done.stdout


def test_without_spatiopath_the_command_says_how_to_install_it(scored, tmp_path):
    """spatiopath made unimportable (as in an install without the extra): one line, the pip
    command, exit 1, before any work."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "spatiopath.py").write_text("raise ImportError('No module named spatiopath')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT), str(ROOT / "proto")])}
    done = subprocess.run([sys.executable, "-m", "serving.cli", "spatiopath", str(scored["scores"]),
                           "--cells", str(tmp_path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert "pip install 'milroi[spatiopath]'" in done.stderr and "GPL-3.0" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_python_api_is_what_the_engine_takes(scored):
    """windows_for_slide + split_cells feed SpatioPath.add_patch directly, as docs/INTERFACES.md
    shows a Spatiopath user."""
    from spatiopath.engine import SpatioPath

    from spatiopath_analysis.windows import windows_for_slide
    from wsi.synth import synthetic_cells

    windows = windows_for_slide(scored["scores"] / "tumor_a" / "tumor_a_spatiopath.json",
                                scored["slides"] / "tumor_a.tif", analysis_zone_um=ANALYSIS_ZONE_UM,
                                window_px=1024)
    xy, classes = synthetic_cells(scored["truths"]["tumor_a"], "uniform")
    width, height = windows.canvas
    engine = SpatioPath(ZONE_WIDTH_UM, windows.analysis_zone_um, windows.pixel_size_um,
                        height=height, width=width)
    immune = xy[np.array(classes) == "Immune cells"]
    for window, points in zip(windows.windows, windows.split_cells(immune)):
        result = engine.add_patch(window.id, window.set_a, points, window.roi)
        assert result.total_points == len(points)
        assert result.analysis["pixelSize"].iloc[0] == pytest.approx(windows.pixel_size_um)


def test_client_layout_needs_the_slides_folder(scored, tmp_path):
    """`client score --out` leaves no done.json: the slide file is asked for (--slides), then
    found by name; the no-ROI slide still writes its empty windows file."""
    from spatiopath_analysis.command import AnalysisOptions, analyse_folder
    from spatiopath_analysis.windows import read_windows_json

    scores = tmp_path / "scores"
    scores.mkdir()
    for name in ("tumor_a", "normal_a"):
        shutil.copy(scored["scores"] / name / f"{name}_spatiopath.json", scores)
    cells = tmp_path / "cells"
    cells.mkdir()
    for name in ("tumor_a", "normal_a"):
        (cells / f"{name}.csv").write_text("x,y\n700,700\n1200,900\n")
    options = AnalysisOptions(analysis_zone=ANALYSIS_ZONE_UM, window=2048, plots=False)
    rows = {r["slide"]: r for r in analyse_folder(scores, cells, tmp_path / "out", options)}
    assert rows["tumor_a"]["status"] == "failed" and "give --slides DIR" in rows["tumor_a"]["error"]
    assert rows["normal_a"]["status"] == "no_roi"
    assert read_windows_json(tmp_path / "out" / "normal_a" / "normal_a_windows.json").windows == []
    rows = {r["slide"]: r for r in analyse_folder(scores, cells, tmp_path / "out", options,
                                                  slides_dir=scored["slides"])}
    assert rows["tumor_a"]["status"] == "ok" and rows["tumor_a"]["cells"] == 2

    # A QuPath GeoJSON is in QuPath's frame: on a slide with OpenSlide bounds, level 0 minus the
    # offset the scores record. The same two cells, exported from QuPath with an offset of 600:
    import json

    doc = json.loads((scores / "tumor_a_spatiopath.json").read_text())
    doc["bounds_offset"] = {"x": 600, "y": 600}
    (scores / "tumor_a_spatiopath.json").write_text(json.dumps(doc))
    (cells / "tumor_a.csv").unlink()
    (cells / "tumor_a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": xy},
         "properties": {"objectType": "detection"}} for xy in ([100, 100], [600, 300])]}))
    rows = {r["slide"]: r for r in analyse_folder(scores, cells, tmp_path / "out2", options,
                                                  slides_dir=scored["slides"])}
    assert rows["tumor_a"]["status"] == "ok" and rows["tumor_a"]["cells"] == 2
    (cells / "tumor_a.geojson").write_text(json.dumps([
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1500, 100]}}]))
    rows = {r["slide"]: r for r in analyse_folder(scores, cells, tmp_path / "out3", options,
                                                  slides_dir=scored["slides"])}
    assert "x=2100, y=700" in rows["tumor_a"]["error"]     # reported in level 0, off the slide
