"""OME-TIFF pyramids (SubIFDs, pixel size in the OME-XML): OpenSlide sees one level and no pixel
size; wsi.slide opens them through tiffslide with every level and the OME pixel size."""
from __future__ import annotations

import json
import logging

import numpy as np
import openslide
import pytest
import tifffile
from format_slides import GLASS, stained_tissue, write_ome_pyramid, write_sparse_camelyon_ome
from wsi_slides import CMU_SMALL, TCGA_JP2K

from core.errors import SlideError
from wsi.ome import ome_pixel_size, physical_size_um
from wsi.slide import DEFAULT_FALLBACK_MPP, MAX_SCAN_PIXELS, open_slide


@pytest.fixture(scope="module")
def random_rgb():
    return np.random.default_rng(4).integers(0, 256, (1000, 1300, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def ome_tiff(tmp_path_factory, random_rgb):
    """4-level lossless OME-TIFF at 0.5 um/px, its reduced levels in SubIFDs."""
    return write_ome_pyramid(tmp_path_factory.mktemp("ome") / "pyramid.ome.tif", random_rgb,
                             mpp=0.5, unit="µm", levels=4)


def test_openslide_alone_sees_one_level_and_no_pixel_size(ome_tiff):
    """What the issue saw: the reason for the second reader."""
    with openslide.OpenSlide(str(ome_tiff)) as osr:
        assert osr.level_count == 1
        assert "openslide.mpp-x" not in osr.properties


def test_ome_pyramid_has_every_level_and_its_pixel_size(ome_tiff, random_rgb, caplog):
    with caplog.at_level(logging.INFO, logger="wsi.slide"):
        slide = open_slide(ome_tiff)
    with slide:
        assert slide.reader.startswith("tiffslide")
        assert "opened by tiffslide" in caplog.text and "pyramid.ome.tif" in caplog.text
        assert slide.vendor == "ome-tiff"
        assert slide.level_count == 4
        assert slide.dimensions == (1300, 1000)
        assert slide.level_dimensions == ((1300, 1000), (650, 500), (325, 250), (163, 125))
        assert slide.level_downsamples[:3] == pytest.approx((1.0, 2.0, 4.0))
        assert slide.mpp == pytest.approx(0.5) and slide.mpp_source == "metadata"
        assert slide.bounds_offset == (0, 0)
        # exact pixels (zlib tiles) at level 0 and from a SubIFD level
        np.testing.assert_array_equal(slide.read_region(300, 200, 257, 131),
                                      random_rgb[200:331, 300:557])
        with tifffile.TiffFile(ome_tiff) as tif:
            level2 = tif.series[0].levels[2].asarray()
        np.testing.assert_array_equal(slide.read_region(400, 240, 64, 48, level=2),
                                      level2[60:108, 100:164])
        assert slide.get_best_level_for_downsample(3.0) == 1
        assert slide.get_best_level_for_downsample(100.0) == 3
        thumb = slide.thumbnail(300)
        assert thumb.shape == (231, 300, 3)


def test_reads_outside_the_image_are_white_as_with_openslide(ome_tiff, random_rgb):
    """tiffslide pads with black; the Slide contract is white, whichever reader."""
    with open_slide(ome_tiff) as slide:
        region = slide.read_region(1200, 900, 200, 200)
        corner = slide.read_region(-50, -30, 100, 100, level=1)
    np.testing.assert_array_equal(region[:100, :100], random_rgb[900:, 1200:])
    assert (region[100:] == 255).all() and (region[:, 100:] == 255).all()
    assert (corner[:15] == 255).all() and (corner[:, :25] == 255).all()
    assert not (corner[15:, 25:] == 255).all()


@pytest.mark.parametrize("size,unit,expected", [
    (250, "nm", 0.25),
    (0.00025, "mm", 0.25),
    (0.25, None, 0.25),        # no unit attribute: OME's default, µm
    (2500, "Å", 0.25),
    (9.84252e-6, "in", 0.25),
])
def test_pixel_size_in_any_ome_unit(tmp_path, random_rgb, size, unit, expected):
    path = write_ome_pyramid(tmp_path / "unit.ome.tif", random_rgb[:512, :512], mpp=size,
                             unit=unit, levels=2)
    with open_slide(path) as slide:
        assert slide.reader.startswith("tiffslide")
        assert slide.mpp == pytest.approx(expected, rel=1e-5) and slide.mpp_source == "metadata"


def test_ome_pyramid_without_physical_size_falls_back_with_a_warning(tmp_path, random_rgb, caplog):
    path = write_ome_pyramid(tmp_path / "nosize.ome.tif", random_rgb, mpp=None, levels=3)
    with caplog.at_level(logging.INFO, logger="wsi.slide"):
        slide = open_slide(path, fallback_mpp=0.3)
    with slide:
        assert slide.level_count == 3 and slide.reader.startswith("tiffslide")
        assert slide.mpp == pytest.approx(0.3) and slide.mpp_source == "user"
    assert any("0.3 um/px (user)" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wsi.slide"), open_slide(path) as slide:
        assert slide.mpp == pytest.approx(DEFAULT_FALLBACK_MPP) and slide.mpp_source == "assumed"
    assert any(r.levelname == "WARNING" and "no pixel size" in r.getMessage() for r in caplog.records)


def test_ome_tiff_openslide_cannot_open_at_all(tmp_path, random_rgb):
    """WebP tiles: OpenSlide's libtiff has no codec for them, tiffslide (imagecodecs) does."""
    path = write_ome_pyramid(tmp_path / "webp.ome.tif", random_rgb, mpp=0.25, levels=2,
                             compression="webp")
    with pytest.raises(openslide.OpenSlideError):
        openslide.OpenSlide(str(path))
    with open_slide(path) as slide:
        assert slide.level_count == 2 and slide.mpp == pytest.approx(0.25)
        tile = slide.read_region(100, 100, 224, 224)
    # lossy, but the same picture
    assert np.abs(tile.astype(int) - random_rgb[100:324, 100:324]).mean() < 40


def test_slides_openslide_reads_whole_stay_with_openslide(lossless_tiff):
    for path in (lossless_tiff[0], CMU_SMALL, TCGA_JP2K):
        with open_slide(path) as slide:
            assert slide.reader == "openslide"


def test_truncated_ome_tiff_is_a_slide_error(tmp_path, ome_tiff):
    data = ome_tiff.read_bytes()
    bad = tmp_path / "truncated.ome.tif"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="truncated.ome.tif"):
        with open_slide(bad) as slide:
            slide.read_level(0)


def test_concurrent_tile_reads_match_serial_reads(ome_tiff):
    from wsi.tiles import TileReader

    coords = np.random.default_rng(2).integers(0, 760, (96, 2))
    with open_slide(ome_tiff) as slide:
        serial = np.stack([slide.read_region(x, y, 224, 224) for x, y in coords])
        with TileReader(slide, coords, tile_size=224, workers=4, batch_size=16) as reader:
            parallel = np.concatenate([batch.tiles.copy() for batch in reader])
    np.testing.assert_array_equal(serial, parallel)


@pytest.mark.parametrize("value,unit,expected", [
    ("0.25", "µm", 0.25), ("0.25", "\u03bcm", 0.25), ("1e-5", "in", 0.254), ("0.1", "mm", 100.0),
    ("0.25", "pixel", None), ("0.25", "parsec-ish", None), ("-1", "µm", None), ("x", "µm", None),
    (None, "µm", None),
])
def test_physical_size_units(value, unit, expected):
    got = physical_size_um(value, unit)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_ome_pixel_size_mean_of_x_and_y_and_missing_axis():
    xml = ('<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0">'
           '<Pixels ID="Pixels:0" PhysicalSizeX="0.24" PhysicalSizeY="{y}" PhysicalSizeXUnit="µm"'
           ' PhysicalSizeYUnit="µm"/></Image></OME>')
    assert ome_pixel_size(xml.format(y="0.26"))[0] == pytest.approx(0.25)
    assert ome_pixel_size(xml.replace(' PhysicalSizeY="{y}"', ""))[0] == pytest.approx(0.24)
    assert ome_pixel_size("<OME/>")[0] is None
    assert ome_pixel_size("not xml")[0] is None


@pytest.mark.slow
def test_camelyon_size_ome_tiff_goes_through_mask_grid_tiles_and_outputs(tmp_path, caplog):
    """98304 x 196608 px: OpenSlide sees one level of 1.9e10 px, over the scan limit (refused
    before); through tiffslide, the mask is read from a SubIFD level and every tissue tile is
    read exactly (zstd tiles: lossless)."""
    from results.outputs import write_slide_outputs
    from wsi.grid import tiles_for_slide
    from wsi.tiles import TileReader

    block, (ox, oy) = stained_tissue(2048, seed=3), (40_960, 90_112)
    path = write_sparse_camelyon_ome(tmp_path / "camelyon.ome.tif", block, (ox, oy), mpp=0.243)
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.level_count == 1
        assert osr.dimensions[0] * osr.dimensions[1] > MAX_SCAN_PIXELS
    with caplog.at_level(logging.INFO, logger="wsi.slide"):
        slide = open_slide(path)
    with slide:
        assert "opened by tiffslide" in caplog.text
        assert slide.dimensions == (98_304, 196_608) and slide.level_count == 7
        assert slide.mpp == pytest.approx(0.243) and slide.mpp_source == "metadata"
        tissue, grid = tiles_for_slide(slide)
        assert tissue.level > 0     # a SubIFD level, not level 0
        # Every tile whose 224 px square lies inside the tissue block is in the grid, and no
        # tile is more than a tile away from it.
        inside = np.arange(ox + 224 - ox % 224 if ox % 224 else ox, ox + 2048 - 223, 224)
        rows = np.arange(oy + 224 - oy % 224 if oy % 224 else oy, oy + 2048 - 223, 224)
        expected = {(int(x), int(y)) for y in rows for x in inside}
        got = {tuple(c) for c in grid.coords.tolist()}
        assert expected <= got
        assert (grid.coords >= [ox - 224, oy - 224]).all()
        assert (grid.coords <= [ox + 2048, oy + 2048]).all()
        canvas = np.empty((2048 + 2 * 448, 2048 + 2 * 448, 3), np.uint8)
        canvas[:] = GLASS
        canvas[448:448 + 2048, 448:448 + 2048] = block
        with TileReader(slide, grid.coords, workers=2, batch_size=32) as reader:
            for batch in reader:
                for (x, y), tile in zip(batch.coords, batch.tiles):
                    cy, cx = y - oy + 448, x - ox + 448
                    np.testing.assert_array_equal(tile, canvas[cy:cy + 224, cx:cx + 224])
        scores = np.linspace(0, 1, len(grid))
        paths = write_slide_outputs(tmp_path / "out", slide, grid.coords, scores, 224, roi_threshold=0.5)
    document = json.loads(paths["spatiopath"].read_text())
    assert document["pixel_size_um"]["mpp"] == pytest.approx(0.243)
    assert document["bounds_offset"] == {"x": 0, "y": 0}
    assert document["polygons"]
    first = document["polygons"][0]
    assert first["area_um2"] == pytest.approx(first["area_px2"] * 0.243**2)
