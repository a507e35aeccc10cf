"""wsi.annotations on the real Camelyon16 tumor_001.xml and on constructed geometries."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon, box

from core.errors import MilroiError
from wsi.annotations import (
    Annotations,
    rasterize,
    read_asap_xml,
    tile_labels,
    tile_tumor_fraction,
    write_asap_xml,
)

MPP = 0.243


def test_real_xml_counts_bounds_and_area(real_xml):
    ann = read_asap_xml(real_xml)
    assert len(ann.tumor_polygons) == 2
    assert ann.vertex_count == 2512
    assert ann.exclusion.is_empty
    minx, miny, maxx, maxy = ann.tumor.bounds
    assert (round(minx), round(maxx)) == (69914, 73235)
    assert (round(miny), round(maxy)) == (122608, 134592)
    assert ann.tumor.is_valid
    area_mm2 = ann.region.area * (MPP * 1e-3) ** 2
    # A macro-metastasis of a ~3 mm x 0.8 mm bounding box: well under the box, well over a micro.
    bbox_mm2 = (maxx - minx) * (maxy - miny) * (MPP * 1e-3) ** 2
    assert 0.2 < area_mm2 < bbox_mm2
    assert ann.region.area == pytest.approx(ann.tumor.area)


@pytest.mark.parametrize("downsample", [4, 16])
def test_rasterisation_matches_shapely_area(real_xml, downsample):
    ann = read_asap_xml(real_xml)
    shape = (135_000 // downsample + 1, 74_000 // downsample + 1)
    mask = rasterize(ann, shape, downsample)
    raster_area = mask.sum() * downsample**2
    assert raster_area == pytest.approx(ann.region.area, rel=0.01 if downsample == 4 else 0.03)
    # And where: the mask's bounding box is the polygon's, within a pixel.
    rows, cols = np.nonzero(mask)
    minx, miny, maxx, maxy = ann.region.bounds
    assert abs(cols.min() * downsample - minx) <= downsample
    assert abs((rows.max() + 1) * downsample - maxy) <= downsample


def test_tile_fraction_is_exact_against_per_tile_clipping(real_xml):
    ann = read_asap_xml(real_xml)
    tile = 224
    xs, ys = np.meshgrid(np.arange(69_000, 74_000, tile), np.arange(122_000, 135_000, tile))
    coords = np.column_stack([xs.ravel(), ys.ravel()])
    fraction = tile_tumor_fraction(ann, coords, tile)
    expected = np.array([ann.region.intersection(box(x, y, x + tile, y + tile)).area
                         for x, y in coords]) / tile**2
    np.testing.assert_allclose(fraction, expected, atol=1e-5)
    assert (fraction == 1).sum() > 100 and ((fraction > 0) & (fraction < 1)).sum() > 50
    # The tiles cover the whole lesion, so their tumour areas add up to it.
    assert (fraction.astype(np.float64) * tile**2).sum() == pytest.approx(ann.region.area, rel=1e-5)
    labels = tile_labels(ann, coords, tile, min_fraction=0.5)
    np.testing.assert_array_equal(labels, (expected >= 0.5).astype(np.int8))


def test_exclusions_are_cut_out_and_round_trip(tmp_path):
    tumor = [Polygon([(0, 0), (1000, 0), (1000, 1000), (0, 1000)]), box(2000, 0, 2400, 400)]
    island = box(200, 200, 600, 600)
    path = write_asap_xml(tmp_path / "a.xml", tumor, [island])
    ann = read_asap_xml(path)
    assert len(ann.tumor_polygons) == 2 and len(ann.exclusion_polygons) == 1
    assert ann.region.area == pytest.approx(1000**2 + 400**2 - 400**2)
    coords = np.array([[200, 200], [0, 0], [2000, 0], [3000, 3000]])
    np.testing.assert_allclose(tile_tumor_fraction(ann, coords, 400), [0, 0.75, 1, 0])


def test_rasterize_holes_and_island_inside_hole():
    outer = Polygon(box(0, 0, 100, 100).exterior, [box(20, 20, 80, 80).exterior])
    island = box(40, 40, 60, 60)
    geom = shapely.MultiPolygon([outer, island])
    mask = rasterize(geom, (100, 100), 1.0)
    assert mask.sum() == pytest.approx(geom.area)
    assert mask[50, 50] and not mask[30, 30] and mask[10, 10]
    # At a downsample, still close to the area.
    assert rasterize(geom, (25, 25), 4.0).sum() * 16 == pytest.approx(geom.area, rel=0.02)


def _xml(groups_and_points) -> str:
    annotations = "".join(
        f'<Annotation Name="A{i}" Type="Polygon" PartOfGroup="{g}"><Coordinates>'
        + "".join(f'<Coordinate Order="{k}" X="{x}" Y="{y}"/>' for k, (x, y) in enumerate(pts))
        + "</Coordinates></Annotation>"
        for i, (g, pts) in enumerate(groups_and_points))
    return f"<ASAP_Annotations><Annotations>{annotations}</Annotations></ASAP_Annotations>"


def test_self_intersecting_polygon_is_made_valid_and_other_groups_ignored(tmp_path, caplog):
    bowtie = [(0, 0), (100, 100), (100, 0), (0, 100)]  # crosses itself at (50, 50)
    path = tmp_path / "bowtie.xml"
    path.write_text(_xml([("_1", bowtie), ("Other", [(0, 0), (5, 0), (5, 5)])]))
    with caplog.at_level(logging.INFO, logger="wsi.annotations"):
        ann = read_asap_xml(path)
    assert ann.tumor.is_valid and ann.tumor.area == pytest.approx(5000)
    assert "'Other' ignored" in caplog.text


@pytest.mark.parametrize("text, cause", [
    ("<ASAP_Annotations><Annotations>", "no element found"),
    ("<Something/>", "not <ASAP_Annotations>"),
    (_xml([("_0", [(0, 0), ("abc", 1), (3, 3)])]), "bad coordinate"),
])
def test_malformed_xml_raises_naming_the_file(tmp_path, text, cause):
    path = tmp_path / "bad.xml"
    path.write_text(text)
    with pytest.raises(MilroiError, match=cause) as info:
        read_asap_xml(path)
    assert str(path) in str(info.value)


def test_missing_xml_raises(tmp_path):
    with pytest.raises(MilroiError, match="missing.xml"):
        read_asap_xml(tmp_path / "missing.xml")


def test_empty_annotations_give_zero_fractions():
    ann = Annotations()
    assert ann.is_empty
    np.testing.assert_array_equal(tile_tumor_fraction(ann, np.zeros((3, 2)), 224), 0)
