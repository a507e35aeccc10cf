"""Analysis windows (spatiopath_analysis.windows) and cell files (wsi.cells): the geometry and the
readers the Spatiopath command stands on, without the engine."""
from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from conftest import ANALYSIS_ZONE_UM
from shapely.geometry import Point

from core.errors import ConfigError
from results.outputs import ScoredRois, read_scored_rois
from spatiopath_analysis.windows import (
    choose_downsample,
    merge_boxes,
    plan_windows,
    read_windows_json,
    tissue_polygons,
    windows_for_slide,
    write_windows_json,
)
from wsi.cells import read_cells, write_cells_csv
from wsi.tissue import TissueMask


def _scores_json(scored, name):
    return scored["scores"] / name / f"{name}_spatiopath.json"


def test_window_coordinates_round_trip_to_level0(scored, tmp_path):
    """A window at downsample > 1: a level-0 point lands in the window pixel (floor of
    (p - offset) / downsample), comes back to itself, and the window's setA and roi are the ROI
    and the tissue of the level-0 frame, moved and scaled."""
    from wsi.slide import open_slide
    from wsi.tissue import compute_tissue_mask

    slide_path = scored["slides"] / "tumor_a.tif"
    windows = windows_for_slide(_scores_json(scored, "tumor_a"), slide_path,
                                analysis_zone_um=ANALYSIS_ZONE_UM, window_px=512)
    rois = read_scored_rois(_scores_json(scored, "tumor_a"))
    assert rois.polygons and windows.windows
    assert windows.downsample >= 2 and windows.pixel_size_um == pytest.approx(rois.mpp * windows.downsample)
    with open_slide(slide_path) as slide:
        tissue = compute_tissue_mask(slide)
        assert windows.level is not None
        assert slide.level_downsamples[windows.level] == pytest.approx(windows.downsample, rel=0.02)
    for window in windows.windows:
        assert max(window.size) <= 512
        x0, y0, x1, y1 = window.box
        # a cell at a known level-0 point: its window pixel, and back
        point = np.array([[x0 + 301.0, y0 + 157.0]])
        uv = window.to_window(point)
        assert np.floor(uv).astype(int).tolist() == [[301 // windows.downsample, 157 // windows.downsample]]
        np.testing.assert_allclose(window.to_level0(uv), point)
        # setA back in level 0 is the ROIs clipped to the box
        back = shapely.union_all([shapely.transform(p, window.to_level0) for p in window.set_a])
        expected = shapely.union_all(rois.polygons).intersection(shapely.box(*window.box))
        assert back.symmetric_difference(expected).area < 1e-6 * max(expected.area, 1)
        # roi back in level 0 is the tissue of the box (the mask at its own resolution)
        roi = shapely.union_all([shapely.transform(p, window.to_level0) for p in window.roi])
        mask_tissue = shapely.union_all(tissue_polygons(tissue, window.box))
        assert roi.symmetric_difference(mask_tissue).area < 1e-6 * max(mask_tissue.area, 1)
        assert roi.area > 0
    # every ROI is in some window with its margin (up to the slide's edge)
    margin = ANALYSIS_ZONE_UM / rois.mpp
    width, height = rois.dimensions
    boxes = [shapely.box(*w.box) for w in windows.windows]
    for polygon in rois.polygons:
        need = polygon.buffer(margin, cap_style="square", join_style="mitre").envelope.intersection(
            shapely.box(0, 0, width, height))
        assert shapely.union_all(boxes).buffer(1e-6).contains(need)
    # the JSON says the same
    path = write_windows_json(tmp_path / "w.json", windows)
    again = read_windows_json(path)
    assert again.to_dict() == json.loads(path.read_text())
    assert [w.box for w in again.windows] == [w.box for w in windows.windows]
    assert again.downsample == windows.downsample and again.canvas == windows.canvas


def test_overlapping_rois_merge_and_windows_never_share_a_cell():
    """Two ROIs whose margins overlap share one window; a third far away gets its own; a pair
    that would not fit stays two windows whose rois do not overlap, and a cell in both boxes
    goes to the first only."""
    full = TissueMask(mask=np.ones((100, 100), bool), downsample=32.0, level=0)
    rois = ScoredRois("s", 0.5, (3200, 3200),
                      [Point(500, 500).buffer(100), Point(800, 500).buffer(100),
                       Point(2800, 2800).buffer(50)],
                      [1, 2, 3])
    windows = plan_windows(rois, full, analysis_zone_um=50.0, window_px=1024)   # margin 100 px
    assert windows.downsample == 1.0
    assert [w.rois for w in windows.windows] == [[1, 2], [3]]
    assert windows.windows[0].box == (300, 300, 1000, 700)
    assert windows.windows[0].size == (700, 400)
    assert windows.canvas == (700, 400)

    big = ScoredRois("s", 0.5, (3200, 3200),
                     [shapely.box(100, 100, 1100, 1100), shapely.box(1050, 100, 2050, 1100)], [1, 2])
    windows = plan_windows(big, full, analysis_zone_um=10.0, window_px=1100)   # 1040 px each
    assert windows.downsample == 1.0 and len(windows.windows) == 2   # merged: 1990 px > 1100
    first, second = (shapely.union_all([shapely.transform(p, w.to_level0) for p in w.roi])
                     for w in windows.windows)
    assert first.intersection(second).area == pytest.approx(0, abs=1e-6)
    cells = np.array([[1070.0, 500.0], [500.0, 500.0], [1900.0, 500.0], [3000.0, 100.0]])
    split = windows.split_cells(cells)
    assert [len(s) for s in split] == [2, 1]       # (1070, 500) is in both boxes: the first's
    assert choose_downsample(5000, 4096) == 2.0 and choose_downsample(4096, 4096) == 1.0
    assert choose_downsample(9000, 1000) == 16.0


def test_merge_boxes_keeps_sides_within_the_limit():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 5000, (40, 2))
    boxes = np.column_stack([corners, corners + rng.uniform(50, 400, (40, 2))]).astype(np.int64)
    groups = merge_boxes(boxes, 1000)
    assert sorted(i for _, members in groups for i in members) == list(range(40))
    for box, members in groups:
        assert box[2] - box[0] <= 1000 and box[3] - box[1] <= 1000
        for i in members:   # each group's box holds its members
            assert box[0] <= boxes[i, 0] and box[2] >= boxes[i, 2]
    assert len(groups) < 40


def test_tissue_polygons_keep_holes():
    mask = np.zeros((20, 20), bool)
    mask[2:18, 2:18] = True
    mask[8:12, 8:12] = False     # a hole
    polygons = tissue_polygons(TissueMask(mask=mask, downsample=10.0, level=0), (0, 0, 200, 200))
    assert len(polygons) == 1 and len(polygons[0].interiors) == 1
    assert polygons[0].area == pytest.approx((16 * 16 - 16) * 100)
    clipped = tissue_polygons(TissueMask(mask=mask, downsample=10.0, level=0), (0, 0, 100, 200))
    assert shapely.union_all(clipped).area == pytest.approx((8 * 16 - 8) * 100)


def test_a_slide_without_roi_has_no_window(scored):
    rois = read_scored_rois(_scores_json(scored, "normal_a"))
    assert rois.polygons == []
    windows = windows_for_slide(_scores_json(scored, "normal_a"), scored["slides"] / "normal_a.tif")
    assert windows.windows == [] and windows.canvas == (0, 0)


def test_windows_refuse_another_slide(scored, tmp_path):
    from slide_testing import write_blank_slide

    other = write_blank_slide(tmp_path / "other.tif", 1024, 768)
    with pytest.raises(ConfigError, match="not the same slide"):
        windows_for_slide(_scores_json(scored, "tumor_a"), other)


# ---------------------------------------------------------------------------------------------
# Cell files


def test_csv_cells_with_class_filter(tmp_path):
    path = write_cells_csv(tmp_path / "c.csv", [[10, 20], [30.5, 40], [50, 60]],
                           ["Immune cells", "Tumor", "Immune cells"])
    cells = read_cells(path, "Immune cells", dimensions=(100, 100))
    assert cells.xy.tolist() == [[10, 20], [50, 60]] and cells.read == 3
    assert cells.classes == {"Immune cells": 2, "Tumor": 1}
    assert len(read_cells(path)) == 3
    assert read_cells(path, boxes=[(0, 0, 40, 50)]).xy.tolist() == [[10, 20], [30.5, 40]]
    # column order and case do not matter; extra columns are ignored
    (tmp_path / "d.csv").write_text("id,Y,X,area\n1,5,7,3\n")
    assert read_cells(tmp_path / "d.csv").xy.tolist() == [[7, 5]]


@pytest.mark.parametrize("content, match", [
    ("a,b\n1,2\n", "no x and y columns"),
    ("", "empty file"),
    ("x,y\n1,2\n3,abc\n", "line 3: x, y not numbers"),
    ("x,y\n1,2\n", "no class column"),
    ("x,y,class\n1,2,Tumor\n", "no cell of class 'Immune cells' \\(classes found: 'Tumor' 1\\)"),
    ("x,y\n1,2\n150,20\n", "1 cell\\(s\\) outside the slide \\(100 x 100 px at level 0\\), the first at "
                           "x=150, y=20 \\(line 3\\)"),
    ("x,y\n-3,2\n", "outside the slide"),
])
def test_bad_csv_cells_get_a_clear_message(tmp_path, content, match):
    path = tmp_path / "cells.csv"
    path.write_text(content)
    cell_class = "Immune cells" if "class" in match else None
    with pytest.raises(ConfigError, match=match) as info:
        read_cells(path, cell_class, dimensions=(100, 100))
    assert str(path) in str(info.value)


def _qupath_feature(polygon, name):
    return {"type": "Feature", "id": "x",
            "geometry": shapely.geometry.mapping(polygon),
            "properties": {"objectType": "detection",
                           "classification": {"name": name, "color": [1, 2, 3]}}}


def test_qupath_geojson_centroids_and_classification(tmp_path):
    features = [_qupath_feature(Point(40, 30).buffer(5), "Immune cells"),
                _qupath_feature(shapely.box(60, 60, 70, 80), "Tumor"),
                _qupath_feature(Point(10, 90).buffer(3), "Immune cells")]
    path = tmp_path / "cells.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    cells = read_cells(path, "Immune cells", dimensions=(100, 100))
    np.testing.assert_allclose(cells.xy, [[40, 30], [10, 90]], atol=1e-6)
    everything = read_cells(path)
    np.testing.assert_allclose(everything.xy[1], [65, 70])
    (tmp_path / "list.json").write_text(json.dumps(features))   # QuPath's "array" export
    assert len(read_cells(tmp_path / "list.json", "Tumor")) == 1
    shifted = read_cells(path, "Immune cells", dimensions=(100, 100), offset=(5, -10))
    np.testing.assert_allclose(shifted.xy, [[45, 20], [15, 80]], atol=1e-6)   # QuPath frame -> level 0
    with pytest.raises(ConfigError, match="outside the slide .* x=65, y=70 \\(feature 1\\)"):
        read_cells(path, dimensions=(65, 100))
    (tmp_path / "bad.geojson").write_text(json.dumps({"type": "Topology"}))
    with pytest.raises(ConfigError, match="not GeoJSON features"):
        read_cells(tmp_path / "bad.geojson")
    (tmp_path / "nogeom.geojson").write_text(json.dumps([{"type": "Feature", "properties": {}}]))
    with pytest.raises(ConfigError, match="feature 0 has no usable geometry"):
        read_cells(tmp_path / "nogeom.geojson")
    with pytest.raises(ConfigError, match="unknown format"):
        read_cells(write_cells_csv(tmp_path / "c.csv", [[1, 1]]).rename(tmp_path / "c.txt"))


def test_synthetic_cells_follow_the_asked_pattern(scored):
    """The nuclei drawn on the slide, with immune cells enriched in / excluded from a band."""
    from wsi.synth import IMMUNE_CLASS, TUMOR_CELL_CLASS, synthetic_cells

    truth = scored["truths"]["tumor_a"]
    band_px = 50.0 / truth.mpp
    share = {}
    for mode in ("uniform", "enriched", "excluded"):
        xy, classes = synthetic_cells(truth, mode, band_um=50.0)
        classes = np.array(classes)
        assert (xy >= 0).all() and (xy[:, 0] < truth.dimensions[0]).all()
        tumour = classes == TUMOR_CELL_CLASS
        assert tumour.any() and shapely.contains_xy(truth.region, *xy[tumour].T).all()
        d = shapely.distance(truth.region, shapely.points(xy[~tumour]))
        immune = classes[~tumour] == IMMUNE_CLASS
        share[mode] = (immune[d <= band_px].mean(), immune[d > band_px].mean())
    assert share["enriched"][0] == 1.0 and share["enriched"][1] < 0.1
    assert share["excluded"][0] == 0.0 and share["excluded"][1] > 0.2
    assert 0.2 < share["uniform"][0] < 0.4 and 0.2 < share["uniform"][1] < 0.4


def test_synth_command_writes_cells_csvs(tmp_path):
    """`milroi-train synth --cells MODE` writes OUT/cells/<slide>.csv that read_cells reads."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "proto")])}
    done = subprocess.run([sys.executable, "-m", "training.cli", "synth", str(tmp_path), "--tumor", "1",
                           "--normal", "1", "--size", "1536x1536", "--cells", "enriched"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in ("tumor_001", "normal_001"):
        cells = read_cells(tmp_path / "cells" / f"{name}.csv", dimensions=(1536, 1536))
        assert len(cells) > 100 and "Immune cells" in cells.classes
    assert read_cells(tmp_path / "cells" / "tumor_001.csv").classes["Tumor"] > 0
