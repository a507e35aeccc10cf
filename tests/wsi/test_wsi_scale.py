"""wsi.scale: which level and region a tile is read from so that the model sees its own pixel
size, and the readers (decode-once, OpenSlide) that read there and resize."""
from __future__ import annotations

import numpy as np
import pytest
from wsi_slides import CMU_SMALL, write_pyramid_tiff

from core.errors import ConfigError
from core.tiling import TilingParams
from wsi.decode_once import DecodeOnceReader, make_tile_reader
from wsi.grid import tiles_for_slide
from wsi.scale import plan_read, resize_tile
from wsi.slide import open_slide
from wsi.tiles import TileReader


@pytest.fixture(scope="module")
def slides(tmp_path_factory, he_image):
    """The same image as a 4-level JPEG pyramid stating 0.243, 0.226 and 0.486 um/px."""
    folder = tmp_path_factory.mktemp("scales")
    return {mpp: write_pyramid_tiff(folder / f"he_{mpp}.tif", he_image[0], mpp=mpp, levels=4)
            for mpp in (0.243, 0.226, 0.486)}


@pytest.mark.parametrize("slide_mpp,model_mpp,level,read_size,upsampled", [
    (0.243, 0.243, 0, 224, False),   # Camelyon16 Radboud under a Camelyon16 model: as always
    (0.226, 0.243, 0, 224, False),   # Utrecht: within the 10 % tolerance, read as it is
    (0.243, 0.486, 1, 224, False),   # a 20x model on a 40x slide: level 1 is its scale
    (0.243, 0.5, 1, 230, False),     # 0.486 < 0.5: level 1, resized 230 -> 224
    (0.243, 0.6, 1, 277, False),     # between levels: the finer one, resized 277 -> 224
    (0.243, 1.2, 2, 277, False),     # 4.9x: level 2 (4x), resized
    (0.486, 0.243, 0, 112, True),    # a 20x slide under a 40x model: enlarged, and flagged
])
def test_the_plan_reads_the_finest_level_at_or_below_the_model(slides, slide_mpp, model_mpp, level,
                                                                read_size, upsampled):
    with open_slide(slides[slide_mpp]) as slide:
        scale = plan_read(slide, TilingParams(224, model_mpp))
    assert (scale.level, scale.read_size, scale.upsampled) == (level, read_size, upsampled)
    assert scale.resized == (read_size != 224)
    # the tile covers the model's microns: footprint x slide px size ~ 224 x model px size
    covered = scale.footprint * slide_mpp
    if scale.level == 0 and not scale.resized:   # read as it is: within the 10 % tolerance
        assert covered == pytest.approx(224 * model_mpp, rel=0.10)
    else:                                        # exact but for rounding to whole pixels
        assert covered == pytest.approx(224 * model_mpp, abs=slide_mpp * scale.level_downsample)
    assert scale.target_mpp == model_mpp
    assert scale.factor == pytest.approx(model_mpp / slide_mpp, rel=1e-4)


def test_the_grid_covers_the_same_microns_at_every_scan(slides):
    """One image stated at 0.243 and 0.486 um/px: under a 0.486 model both tile the same
    microns; the level-0 footprint halves with the pixel size."""
    grids = {}
    for mpp in (0.243, 0.486):
        with open_slide(slides[mpp]) as slide:
            _, grids[mpp] = tiles_for_slide(slide, TilingParams(224, 0.486, 0.25))
    assert grids[0.243].tile_size_level0 == 448 and grids[0.486].tile_size_level0 == 224
    assert grids[0.243].scale.level == 1 and grids[0.486].scale.level == 0


def test_bad_tolerance_and_bad_target(slides):
    with open_slide(slides[0.243]) as slide, pytest.raises(ConfigError, match="tolerance"):
        plan_read(slide, TilingParams(), tolerance=1.5)
    with pytest.raises(ConfigError, match="target_mpp"):
        TilingParams(224, 0.0)


def _openslide_reference(slide, coords, scale) -> np.ndarray:
    """OpenSlide's read_region of each region at the plan's level, then the same resize."""
    return np.stack([resize_tile(slide.read_region(x, y, scale.read_size, scale.read_size,
                                                   scale.level), scale.tile_size)
                     for x, y in coords.tolist()])


@pytest.mark.parametrize("model_mpp", [0.6, 0.486], ids=["level1-resized", "level1-as-is"])
def test_decode_once_at_level_1_matches_openslide_plus_the_same_resize(slides, model_mpp):
    with open_slide(slides[0.243]) as slide:
        _, grid = tiles_for_slide(slide, TilingParams(224, model_mpp, 0.0))   # every position
        scale = grid.scale
        assert scale.level == 1 and len(grid) > 20
        coords = grid.coords[:40]
        reader = make_tile_reader(slide, coords, tile_size=scale.read_size, level=scale.level,
                                  out_size=scale.tile_size, batch_size=16)
        assert isinstance(reader, DecodeOnceReader)
        tiles = np.concatenate([b.tiles for b in reader])
        expected = _openslide_reference(slide, coords, scale)
    assert tiles.shape == (len(coords), 224, 224, 3)
    assert np.abs(tiles.astype(int) - expected.astype(int)).max() <= 2


def test_openslide_reader_resizes_too(slides):
    with open_slide(slides[0.243]) as slide:
        _, grid = tiles_for_slide(slide, TilingParams(224, 0.6, 0.25))
        coords = grid.coords[:8]
        reader = TileReader(slide, coords, tile_size=grid.scale.read_size, level=1, out_size=224)
        tiles = np.concatenate([b.tiles for b in reader])
        np.testing.assert_array_equal(tiles, _openslide_reference(slide, coords, grid.scale))


def test_a_real_20x_slide_under_a_40x_model_is_enlarged_and_says_so():
    """CMU-1-Small-Region is 0.499 um/px: 224 px of a 0.243 um/px model are 109 of its px."""
    with open_slide(CMU_SMALL) as slide:
        _, grid = tiles_for_slide(slide, TilingParams())
    scale = grid.scale
    assert scale.upsampled and scale.level == 0 and scale.read_size == grid.tile_size_level0 == 109
    assert "upsampled" in scale.describe() and "0.499 um/px (metadata)" in scale.describe()
