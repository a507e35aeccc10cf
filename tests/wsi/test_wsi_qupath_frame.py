"""The QuPath frame of the outputs: on a slide with OpenSlide bounds (a sparse TIFF, which
OpenSlide >= 4.0.1 gives bounds), the GeoJSON is in the cropped frame QuPath shows, the patch CSV
and the Spatiopath JSON stay in level-0 px and record the offset; a slide without bounds is
unchanged."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import shapely
from format_slides import stained_tissue, write_sparse_tiff

from results.outputs import write_geojson, write_slide_outputs, write_spatiopath_json
from results.rois import roi_polygons
from wsi.grid import tiles_for_slide
from wsi.slide import open_slide

ORIGIN = (1280, 768)      # level-0 top-left of the stored tiles: OpenSlide's bounds-x/-y
BLOCK = (1536, 1280)      # w, h of the stored region


@pytest.fixture(scope="module")
def sparse_slide(tmp_path_factory):
    block = stained_tissue(max(BLOCK), seed=5)[:BLOCK[1], :BLOCK[0]]
    return write_sparse_tiff(tmp_path_factory.mktemp("sparse") / "sparse.tif", block, ORIGIN,
                             width=4096, height=3072)


def _scores(coords: np.ndarray) -> np.ndarray:
    """A 'tumour' in the left part of the tissue, with a hole: an ROI whose shape is known."""
    x, y = coords[:, 0] - ORIGIN[0], coords[:, 1] - ORIGIN[1]
    hot = (x < 900) & (y < 1000)
    hole = (x >= 224) & (x < 448) & (y >= 224) & (y < 448)
    return np.where(hot & ~hole, 0.9, 0.1)


def test_openslide_reports_bounds_for_the_sparse_tiff(sparse_slide):
    with open_slide(sparse_slide) as slide:
        assert slide.reader == "openslide"
        assert slide.properties["openslide.bounds-x"] == str(ORIGIN[0])
        assert slide.properties["openslide.bounds-y"] == str(ORIGIN[1])
        assert slide.bounds_offset == ORIGIN
        # outside the stored tiles: transparent, read as white
        assert (slide.read_region(0, 0, 64, 64) == 255).all()


def test_outputs_on_a_slide_with_bounds(tmp_path, sparse_slide):
    with open_slide(sparse_slide) as slide:
        tissue, grid = tiles_for_slide(slide)
        assert len(grid) > 20
        coords = grid.coords
        scores = _scores(coords)
        paths = write_slide_outputs(tmp_path, slide, coords, scores, 224, roi_threshold=0.5)
        # What QuPath shows: the slide cropped to its bounds (its default for OpenSlide slides).
        bx, by = slide.bounds_offset
        bw, bh = (int(slide.properties[f"openslide.bounds-{k}"]) for k in ("width", "height"))
        cropped = slide.read_region(bx, by, bw, bh)
        # tiles wholly inside the crop (the grid starts at the level-0 origin, not the bounds')
        whole = np.flatnonzero(((coords >= ORIGIN) & (coords + 224 <= np.add(ORIGIN, (bw, bh)))).all(1))
        assert len(whole) > 10
        level0_tiles = [slide.read_region(x, y, 224, 224) for x, y in coords[whole]]

    # Patch CSV: level-0 px, exactly the grid's coordinates.
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    np.testing.assert_array_equal([[int(r["x"]), int(r["y"])] for r in rows], coords)

    # GeoJSON: every tile shifted by the bounds offset, and the offset recorded.
    geo = json.loads(paths["geojson"].read_text())
    assert geo["properties"]["bounds_offset"] == {"x": ORIGIN[0], "y": ORIGIN[1]}
    detections = [f for f in geo["features"] if f["properties"]["objectType"] == "detection"]
    top_left = np.array([f["geometry"]["coordinates"][0][0] for f in detections])
    np.testing.assert_array_equal(top_left, coords - ORIGIN)
    # every tissue tile overlaps QuPath's cropped image
    assert ((top_left > -224) & (top_left < (bw, bh))).all()
    # ... and the pixels at a GeoJSON tile in the cropped image are those of the CSV's tile.
    for (gx, gy), tile in zip(top_left[whole], level0_tiles):
        np.testing.assert_array_equal(cropped[gy:gy + 224, gx:gx + 224], tile)

    # ROIs: the Spatiopath JSON in level-0 px, the GeoJSON annotation the same polygon shifted.
    spatio = json.loads(paths["spatiopath"].read_text())
    assert spatio["bounds_offset"] == {"x": ORIGIN[0], "y": ORIGIN[1]}
    assert spatio["units"]["coordinates"].startswith("level-0")
    expected = roi_polygons(coords, scores, 224, roi_threshold=0.5)
    assert len(spatio["polygons"]) == len(expected) == 1 and len(expected[0].interiors) == 1
    level0 = shapely.Polygon(np.column_stack([spatio["polygons"][0]["x"], spatio["polygons"][0]["y"]]),
                             [np.column_stack([h["x"], h["y"]]) for h in spatio["polygons"][0]["holes"]])
    assert level0.equals(expected[0])
    annotation = next(f for f in geo["features"] if f["properties"]["objectType"] == "annotation")
    in_qupath = shapely.geometry.shape(annotation["geometry"])
    assert in_qupath.equals(shapely.transform(expected[0], lambda xy: xy - ORIGIN))
    assert annotation["properties"]["measurements"]["area_px2"] == pytest.approx(expected[0].area)


def test_a_slide_without_bounds_is_unchanged(tmp_path, lossless_tiff):
    path, _ = lossless_tiff
    coords = np.array([[0, 0], [224, 0], [448, 224], [672, 448]], np.int64)
    scores = np.array([0.9, 0.8, 0.2, 0.7])
    with open_slide(path) as slide:
        assert "openslide.bounds-x" not in slide.properties
        assert slide.bounds_offset == (0, 0)
        paths = write_slide_outputs(tmp_path, slide, coords, scores, 224, roi_threshold=0.5)
    geo = json.loads(paths["geojson"].read_text())
    assert geo["properties"]["bounds_offset"] == {"x": 0, "y": 0}
    top_left = [f["geometry"]["coordinates"][0][0] for f in geo["features"]
                if f["properties"]["objectType"] == "detection"]
    np.testing.assert_array_equal(top_left, coords)
    rois = [shapely.geometry.shape(f["geometry"]) for f in geo["features"]
            if f["properties"]["objectType"] == "annotation"]
    expected = roi_polygons(coords, scores, 224, roi_threshold=0.5)
    assert len(rois) == len(expected) and all(a.equals(b) for a, b in zip(rois, expected))
    assert json.loads(paths["spatiopath"].read_text())["bounds_offset"] == {"x": 0, "y": 0}


def test_the_transform_alone(tmp_path):
    """write_geojson with an offset = write_geojson of the translated coordinates and ROIs;
    areas, scores and the Spatiopath polygons do not move."""
    coords = np.array([[1000, 2000], [1224, 2000], [1000, 2224]], np.int64)
    scores = np.array([0.9, 0.6, 0.1])
    rois = roi_polygons(coords, scores, 224, roi_threshold=0.5)
    offset = (300, 1500)
    shifted = write_geojson(tmp_path / "a.geojson", coords, scores, 224, rois, mpp=0.25,
                            bounds_offset=offset)
    moved_rois = [shapely.transform(r, lambda xy: xy - offset) for r in rois]
    by_hand = write_geojson(tmp_path / "b.geojson", coords - offset, scores, 224, moved_rois,
                            roi_stats=None, mpp=0.25)
    a, b = json.loads(shifted.read_text()), json.loads(by_hand.read_text())
    assert a["features"] != json.loads(write_geojson(tmp_path / "c.geojson", coords, scores, 224,
                                                     rois, mpp=0.25).read_text())["features"]
    # the same features; the ROI tile statistics are computed in one frame (level-0) in both
    assert [f["geometry"] for f in a["features"]] == [f["geometry"] for f in b["features"]]
    assert [f["properties"] for f in a["features"]] == [f["properties"] for f in b["features"]]
    assert a["properties"]["bounds_offset"] == {"x": 300, "y": 1500}
    spatio = json.loads(write_spatiopath_json(tmp_path / "s.json", "s", rois, 0.25,
                                              bounds_offset=offset).read_text())
    assert spatio["polygons"][0]["x"] == list(np.asarray(rois[0].exterior.coords)[:, 0])
    assert spatio["bounds_offset"] == {"x": 300, "y": 1500}
