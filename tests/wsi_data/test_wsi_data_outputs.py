"""results.outputs: files a scored slide leaves, on constructed score grids and a synthetic slide."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import box, shape

from core.errors import MilroiError
from core.tiling import TilingParams
from results.outputs import (
    atomic_write,
    read_tile_scores,
    score_map,
    write_geojson,
    write_heatmap_png,
    write_patch_csv,
    write_slide_outputs,
    write_spatiopath_json,
)
from results.rois import roi_polygons

TILE = 224


def grid_of(hot: np.ndarray, tile: int = TILE):
    """All cells of a boolean (rows, cols) grid as tiles; score 0.9 where hot, 0.1 elsewhere."""
    rows, cols = np.nonzero(np.ones_like(hot))
    coords = np.column_stack([cols * tile, rows * tile]).astype(np.int64)
    return coords, np.where(hot[rows, cols], 0.9, 0.1)


@pytest.fixture
def two_components_one_hole():
    hot = np.zeros((12, 14), bool)
    hot[1:7, 1:7] = True
    hot[3:5, 3:5] = False            # a 2 x 2 hole in the first component
    hot[8:11, 9:13] = True           # a second component, 3 x 4 tiles
    return hot


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_write(target) as f:
        f.write("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write("half-writ")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temp file left
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    with pytest.raises(MilroiError):
        with atomic_write(target, "r"):
            pass


def test_patch_csv_header_and_values(tmp_path):
    coords = np.array([[0, 0], [224, 0], [448, 672]])
    scores = np.array([0.125, 0.5, 0.999999])
    path = write_patch_csv(tmp_path / "p.csv", coords, scores, TILE)
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["x", "y", "size", "score", "artefact", "domain_distance", "in_domain"]
    assert [r[:3] for r in rows[1:]] == [["0", "0", "224"], ["224", "0", "224"], ["448", "672", "224"]]
    np.testing.assert_allclose([float(r[3]) for r in rows[1:]], scores, atol=1e-6)
    assert [r[4:] for r in rows[1:]] == [["", "", ""]] * 3   # no domain description: not known
    # each tile's distance to the training tiles (core.domain) and its flag: in at <= 1
    known = write_patch_csv(tmp_path / "d.csv", coords, scores, TILE,
                            domain_distance=[0.5, 1.0, 2.25])
    assert [r[5:] for r in list(csv.reader(known.open()))[1:]] == [
        ["0.5000", "1"], ["1.0000", "1"], ["2.2500", "0"]]
    with pytest.raises(MilroiError, match="3 tile coordinates but 2 scores"):
        write_patch_csv(tmp_path / "q.csv", coords, scores[:2], TILE)
    flagged = write_patch_csv(tmp_path / "f.csv", coords, scores, TILE, flags=[0, 1, 6])
    assert [r[4] for r in list(csv.reader(flagged.open()))[1:]] == ["", "ink", "background+blur"]
    with pytest.raises(MilroiError, match="3 tiles but 2 artefact flags"):
        write_patch_csv(tmp_path / "g.csv", coords, scores, TILE, flags=[0, 1])


def test_artefact_tiles_are_listed_but_make_no_roi(tmp_path, tumor_slide):
    """A flagged tile with the highest score is in the CSV and the GeoJSON (class Ignore*) but in
    no ROI, in no Spatiopath polygon, and uncoloured on the heatmap."""
    from wsi.slide import open_slide

    coords = np.array([[0, 0], [224, 0], [448, 0], [1120, 1120]])
    scores = np.array([0.9, 0.95, 0.2, 0.99])
    flags = np.array([0, 0, 0, 1], np.uint8)      # the hottest tile is under pen ink
    with open_slide(tumor_slide.path) as slide:
        paths = write_slide_outputs(tmp_path / "out", slide, coords, scores, TILE, 0.5, flags=flags)
    doc = json.loads(paths["geojson"].read_text())
    detections = [f for f in doc["features"] if f["properties"]["objectType"] == "detection"]
    annotations = [f for f in doc["features"] if f["properties"]["objectType"] == "annotation"]
    assert len(detections) == 4
    assert detections[3]["properties"]["classification"]["name"] == "Ignore*"
    assert detections[3]["properties"]["artefact"] == "ink"
    assert "classification" not in detections[0]["properties"]
    rois = shapely.union_all([shape(a["geometry"]) for a in annotations])
    assert rois.equals(box(0, 0, 448, 224))       # the two clean hot tiles only
    for kind in ("scores", "csv"):                 # both files give the flags back
        np.testing.assert_array_equal(read_tile_scores(paths[kind]).flags, flags)
    assert max(a["properties"]["measurements"]["max_tumor_score"] for a in annotations) == \
        pytest.approx(0.95)
    spatiopath = json.loads(paths["spatiopath"].read_text())
    assert len(spatiopath["polygons"]) == 1


def test_score_map_places_each_tile(two_components_one_hole):
    coords, scores = grid_of(two_components_one_hole)
    keep = np.arange(len(coords)) % 5 != 0  # some tiles not scored: NaN cells
    grid, ds = score_map(coords[keep], scores[keep], TILE, (14 * TILE - 10, 12 * TILE))
    assert ds == TILE and grid.shape == (12, 14)
    np.testing.assert_allclose(grid.ravel()[keep], scores[keep])
    assert np.isnan(grid.ravel()[~keep]).all()


def test_roi_polygons_two_components_and_a_hole(two_components_one_hole):
    coords, scores = grid_of(two_components_one_hole)
    rois = roi_polygons(coords, scores, TILE, roi_threshold=0.5)
    assert len(rois) == 2 and all(r.is_valid for r in rois)
    big, small = rois
    assert big.area == (36 - 4) * TILE**2 and len(big.interiors) == 1
    assert shapely.Polygon(big.interiors[0]).equals(box(3 * TILE, 3 * TILE, 5 * TILE, 5 * TILE))
    assert small.equals(box(9 * TILE, 8 * TILE, 13 * TILE, 11 * TILE))
    assert len(small.exterior.coords) == 5  # collinear tile corners simplified away
    assert roi_polygons(coords, scores, TILE, 0.5, min_area_px=13 * TILE**2) == [big]
    assert roi_polygons(coords, scores, TILE, roi_threshold=0.95) == []


def test_roi_polygons_corner_touching_tiles_are_separate():
    coords = np.array([[0, 0], [224, 224]])
    rois = roi_polygons(coords, [1.0, 1.0], TILE)
    assert len(rois) == 2 and all(r.is_valid for r in rois)


def test_geojson_is_a_valid_qupath_feature_collection(tmp_path, two_components_one_hole):
    coords, scores = grid_of(two_components_one_hole)
    rois = roi_polygons(coords, scores, TILE)
    path = write_geojson(tmp_path / "s.geojson", coords, scores, TILE, rois, mpp=0.243)
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection"
    detections = [f for f in doc["features"] if f["properties"]["objectType"] == "detection"]
    annotations = [f for f in doc["features"] if f["properties"]["objectType"] == "annotation"]
    assert len(detections) == len(coords) and len(annotations) == 2
    first = shape(detections[0]["geometry"])
    assert first.equals(box(coords[0, 0], coords[0, 1], coords[0, 0] + TILE, coords[0, 1] + TILE))
    np.testing.assert_allclose([f["properties"]["measurements"]["tumor_score"] for f in detections], scores)
    for feature, roi in zip(annotations, rois):
        geometry = shape(feature["geometry"])
        assert geometry.is_valid and geometry.equals(roi)
        assert feature["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
        m = feature["properties"]["measurements"]
        assert m["area_um2"] == pytest.approx(roi.area * 0.243**2)
        assert m["max_tumor_score"] == pytest.approx(0.9) and m["tiles"] == round(roi.area / TILE**2)
        assert shapely.LinearRing(feature["geometry"]["coordinates"][0]).is_ccw  # RFC 7946


def test_spatiopath_json_pixel_size_polygons_and_holes(tmp_path, two_components_one_hole):
    coords, scores = grid_of(two_components_one_hole)
    rois = roi_polygons(coords, scores, TILE)
    path = write_spatiopath_json(tmp_path / "sp.json", "slide_a", rois, 0.243, scores,
                                 roi_threshold=0.5)
    doc = json.loads(path.read_text())
    assert doc["slide"] == "slide_a" and doc["pixel_size_um"] == {"mpp": 0.243}
    assert "level-0 pixels" in doc["units"]["coordinates"]
    assert len(doc["polygons"]) == 2
    p = doc["polygons"][0]
    rebuilt = shapely.Polygon(list(zip(p["x"], p["y"])), [list(zip(h["x"], h["y"])) for h in p["holes"]])
    assert rebuilt.equals(rois[0]) and len(p["holes"]) == 1
    assert p["area_um2"] == pytest.approx(rois[0].area * 0.243**2)
    assert doc["score_stats"]["above_threshold"] == int((scores >= 0.5).sum())


def test_heatmap_and_slide_outputs_on_a_synthetic_slide(tmp_path, tumor_slide):
    from wsi.annotations import tile_tumor_fraction
    from wsi.grid import tiles_for_slide
    from wsi.slide import open_slide

    with open_slide(tumor_slide.path) as slide:
        _, grid = tiles_for_slide(slide, TilingParams(tile_size=TILE))
        # Scores = true tumour fraction: the ROIs must then fall on the drawn tumour.
        scores = tile_tumor_fraction(tumor_slide.region, grid.coords, TILE)
        paths = write_slide_outputs(tmp_path / "out", slide, grid.coords, scores, TILE, 0.5)
        thumb = slide.thumbnail(2048)
    assert set(paths) == {"csv", "geojson", "heatmap", "spatiopath", "scores"}
    assert all(p.is_file() for p in paths.values())
    # The binary scores are the scores as computed; the CSV's are the same to 6 decimals.
    binary, text = read_tile_scores(paths["scores"]), read_tile_scores(paths["csv"])
    np.testing.assert_array_equal(binary.coords, grid.coords)
    np.testing.assert_array_equal(binary.scores, np.asarray(scores, np.float32))
    np.testing.assert_array_equal(text.coords, binary.coords)
    np.testing.assert_allclose(text.scores, binary.scores, atol=5e-7)
    assert binary.tile_size == text.tile_size == TILE and not binary.flags.any()
    png = np.asarray(Image.open(paths["heatmap"]).convert("RGB"))
    assert png.shape == thumb.shape
    # Glass far from any tile keeps the thumbnail's colour; scored tiles are coloured.
    changed = np.abs(png.astype(int) - thumb.astype(int)).sum(-1) > 30
    assert not changed[:4, :4].any() and changed.mean() > 0.05
    doc = json.loads(paths["spatiopath"].read_text())
    roi = shapely.union_all([shapely.Polygon(list(zip(p["x"], p["y"]))) for p in doc["polygons"]])
    truth = tumor_slide.region
    assert roi.intersection(truth).area > 0.7 * roi.area  # ROIs lie on tumour
    # The macro-metastasis is mostly found (tile squares cannot follow its outline exactly;
    # micro-metastases smaller than half a tile may have no tile at >= 0.5).
    macro = max(tumor_slide.tumor_polygons, key=lambda p: p.area).intersection(truth)
    assert roi.intersection(macro).area > 0.6 * macro.area


def test_write_heatmap_png_dimensions(tmp_path, normal_slide):
    from wsi.slide import open_slide

    with open_slide(normal_slide.path) as slide:
        path = write_heatmap_png(tmp_path / "h.png", slide, np.array([[0, 0]]), [1.0], TILE, max_size=512)
    assert Image.open(path).size == (512, 384)  # 2048 x 1536 slide, longest side 512
