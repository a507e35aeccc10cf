"""wsi.slide: metadata, pixel reads, and one clear SlideError for every kind of bad file."""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tifffile
from wsi_slides import BROKEN_SVS, CMU_SMALL, TCGA_JP2K, write_pyramid_tiff

from core.errors import ConfigError, MilroiError, SlideError
from core.tiling import DEFAULT_TILING
from wsi.scale import plan_read
from wsi.slide import DEFAULT_FALLBACK_MPP, open_slide, rgba_to_rgb_on_white


def test_generic_tiff_metadata_and_exact_pixels(lossless_tiff):
    path, rgb = lossless_tiff
    with open_slide(path) as slide:
        assert slide.vendor == "generic-tiff"
        assert slide.name == "lossless"
        assert slide.dimensions == (1300, 1000)
        assert slide.level_count == 3
        assert slide.level_dimensions == ((1300, 1000), (650, 500), (325, 250))
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert slide.mpp == pytest.approx(0.243)
        assert slide.mpp_source == "metadata"
        region = slide.read_region(300, 200, 257, 131)
        assert region.dtype == np.uint8 and region.shape == (131, 257, 3)
        np.testing.assert_array_equal(region, rgb[200:331, 300:557])
        np.testing.assert_array_equal(slide.read_level(0), rgb)
        assert slide.get_best_level_for_downsample(3.0) == 1
        thumb = slide.thumbnail(200)
        assert max(thumb.shape[:2]) == 200 and thumb.shape[2] == 3


def test_read_outside_the_slide_is_white(lossless_tiff):
    path, rgb = lossless_tiff
    with open_slide(path) as slide:
        region = slide.read_region(1200, 900, 200, 200)
    np.testing.assert_array_equal(region[:100, :100], rgb[900:, 1200:])
    assert (region[100:, :] == 255).all() and (region[:, 100:] == 255).all()


def test_rgba_compositing_on_white():
    rgba = np.array([[[200, 100, 50, 255], [0, 0, 0, 0], [100, 100, 100, 128]]], np.uint8)
    rgb = rgba_to_rgb_on_white(rgba)
    np.testing.assert_array_equal(rgb, [[[200, 100, 50], [255, 255, 255], [177, 177, 177]]])


def test_real_aperio_jpeg_svs_has_its_mpp():
    with open_slide(CMU_SMALL) as slide:
        assert slide.vendor == "aperio"
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.mpp_source == "metadata"
        tile = slide.read_region(1000, 1500, 224, 224)
        assert tile.shape == (224, 224, 3) and tile.std() > 5   # real image content


def test_real_jpeg2000_svs_without_mpp_opens_for_viewing_and_is_refused_for_tiles(caplog):
    """No pixel size: the slide opens (the viewer shows it) at an assumed 0.243 um/px, with a
    warning, and the model-scale plan refuses it, naming the fix; the user's value is taken."""
    with caplog.at_level(logging.WARNING, logger="wsi.slide"):
        with open_slide(TCGA_JP2K) as slide:
            assert slide.level_count == 2
            assert slide.mpp == DEFAULT_FALLBACK_MPP == 0.243
            assert slide.mpp_source == "assumed"
            level1 = slide.read_level(1)   # JPEG 2000 tiles decode
            assert level1.shape == (1783, 2221, 3) and level1.std() > 5
            with pytest.raises(SlideError, match="no pixel size.*--fallback-mpp.*mpp.csv"):
                plan_read(slide, DEFAULT_TILING)
    assert "no pixel size" in caplog.text and "TCGA-CR-7395" in caplog.text
    with open_slide(TCGA_JP2K, fallback_mpp=0.5) as slide:
        assert slide.mpp == 0.5 and slide.mpp_source == "user"
        assert plan_read(slide, DEFAULT_TILING).upsampled


def test_mpp_csv_beside_the_slides_gives_the_pixel_size(tmp_path):
    """`mpp.csv` (slide,mpp) names a slide by file name or stem; --fallback-mpp comes first; a
    garbled table is an error naming it, not ignored."""
    image = np.full((300, 300, 3), 200, np.uint8)
    a = write_pyramid_tiff(tmp_path / "a.tif", image, mpp=None, levels=1)
    b = write_pyramid_tiff(tmp_path / "b.tif", image, mpp=None, levels=1)
    (tmp_path / "mpp.csv").write_text("slide,mpp\na.tif,0.5\nb,0.26\n")
    with open_slide(a) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.5, "user")
    with open_slide(b) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.26, "user")
    with open_slide(b, fallback_mpp=0.3) as slide:
        assert slide.mpp == 0.3
    (tmp_path / "mpp.csv").write_text("slide,mpp\nb,zero\n")
    with pytest.raises(ConfigError, match="mpp.csv"):
        open_slide(b)


def test_tiff_without_physical_resolution_uses_fallback(tmp_path):
    path = write_pyramid_tiff(tmp_path / "nounit.tif", np.full((300, 300, 3), 200, np.uint8),
                              mpp=None, levels=1)
    with open_slide(path, fallback_mpp=0.25) as slide:
        assert slide.mpp == 0.25 and slide.mpp_source == "user"


def _expect_slide_error(path, *, read=False) -> SlideError:
    """Open (and if it opens, read every level of) `path`; return the SlideError raised."""
    with pytest.raises(SlideError) as info:
        with open_slide(path) as slide:
            for level in range(slide.level_count):
                slide.read_level(level)
    assert str(path) in str(info.value)
    return info.value


def test_missing_file(tmp_path):
    assert "no such file" in str(_expect_slide_error(tmp_path / "absent.svs"))


def test_directory(tmp_path):
    assert "directory" in str(_expect_slide_error(tmp_path))


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.tif").write_bytes(b"")
    assert "empty file" in str(_expect_slide_error(tmp_path / "empty.tif"))


def test_text_file_named_tif(tmp_path):
    (tmp_path / "notes.tif").write_text("this is not a slide\n" * 50)
    assert "not a slide format" in str(_expect_slide_error(tmp_path / "notes.tif"))


def test_real_broken_svs():
    assert "not a slide format" in str(_expect_slide_error(BROKEN_SVS))


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.9, 0.995])
def test_truncated_tiff(tmp_path, he_tiff, keep):
    data = he_tiff.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: int(len(data) * keep)])
    _expect_slide_error(cut)


def _corrupt_tile(src, dst, tile_index: int, keep_bytes: int) -> None:
    """Copy `src` with one level-0 tile's JPEG data cut after `keep_bytes` (rest zeroed)."""
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        offset = tif.pages[0].dataoffsets[tile_index]
        count = tif.pages[0].databytecounts[tile_index]
    data[offset + keep_bytes: offset + count] = bytes(count - keep_bytes)
    dst.write_bytes(bytes(data))


def test_corrupt_tile_data_is_a_slide_error_at_read_time(tmp_path, he_tiff):
    bad = tmp_path / "bad_tile.tif"
    _corrupt_tile(he_tiff, bad, tile_index=20, keep_bytes=0)
    with open_slide(bad) as slide:   # the header is fine: it opens
        assert slide.read_region(0, 0, 256, 256).shape == (256, 256, 3)   # tile 0 is intact
        x, y = (20 % 16) * 256, (20 // 16) * 256
        with pytest.raises(SlideError, match="bad_tile.tif.*read of 256x256 px"):
            slide.read_region(x, y, 256, 256)


def test_bad_parameters(lossless_tiff):
    path, _ = lossless_tiff
    with open_slide(path) as slide:
        with pytest.raises(MilroiError, match="level 5"):
            slide.read_region(0, 0, 10, 10, level=5)
        with pytest.raises(MilroiError, match="positive"):
            slide.read_region(0, 0, 0, 10)


def test_concurrent_reads_match_serial_reads(he_tiff):
    """Eight threads reading 64 regions at once get exactly what serial reads get."""
    rng = np.random.default_rng(1)
    spots = rng.integers(0, 3800, (64, 2))
    with open_slide(he_tiff) as slide:
        serial = [slide.read_region(x, y % 2800, 256, 256) for x, y in spots]
        seen_threads = set()
        def read(spot):
            seen_threads.add(threading.get_ident())
            return slide.read_region(spot[0], spot[1] % 2800, 256, 256)
        with ThreadPoolExecutor(8) as pool:
            parallel = list(pool.map(read, spots))
    assert len(seen_threads) > 1
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("props,expected", [
    ({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25", "tiff.XResolution": "1"}, 0.25),
    ({"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000", "tiff.YResolution": "40000"}, 0.25),
    ({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "101600", "tiff.YResolution": "101600"}, 0.25),
    ({"tiff.ResolutionUnit": "none", "tiff.XResolution": "40000", "tiff.YResolution": "40000"}, None),
    # 353 um/px: a placeholder
    ({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "72", "tiff.YResolution": "72"}, None),
    ({"tiff.ResolutionUnit": "inch"}, None),                      # TCGA-CR-7395: unit, no value
    ({"openslide.mpp-x": "0", "openslide.mpp-y": "0"}, None),
])
def test_pixel_size_from_properties(props, expected):
    from wsi.slide import _mpp_from_properties
    assert _mpp_from_properties(props) == (pytest.approx(expected) if expected else None)
