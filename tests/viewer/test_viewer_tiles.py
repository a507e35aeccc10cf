"""viewer without a browser: deep-zoom tiles line up with level 0, the tile cache is
bounded, unreadable slides give error tiles, the heatmap image has one pixel per tile."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from results.outputs import TileScores
from viewer.results import heatmap_rgba
from viewer.tiles import OVERLAP, TILE_SIZE, TileSource
from wsi.slide import open_slide


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    from wsi.synth import write_synthetic_slide

    path = tmp_path_factory.mktemp("tiles") / "slide.tif"
    write_synthetic_slide(path, 1536, 1024, seed=7, tumor=True)
    return path


def jpeg(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def test_full_resolution_tiles_are_level0_pixels(slide_path):
    """limit_bounds=False: tile (c, r) of the top level starts at level-0 (c*254 - 1, r*254 - 1)."""
    source = TileSource()
    info = source.info(slide_path)
    top = info.levels - 1
    with open_slide(slide_path) as slide:
        assert (info.width, info.height) == slide.dimensions
        for col, row in [(0, 0), (2, 1), (5, 3)]:
            x0 = col * TILE_SIZE - (OVERLAP if col else 0)
            y0 = row * TILE_SIZE - (OVERLAP if row else 0)
            tile = source.tile(slide_path, top, col, row)
            assert not tile.error and tile.media_type == "image/jpeg"
            image = jpeg(tile.data)
            h, w = image.shape[:2]
            expected = slide.read_region(x0, y0, w, h).astype(np.int16)
            assert np.abs(image - expected).mean() < 4   # JPEG at quality 80


def test_tile_cache_is_bounded_and_hit(slide_path):
    source = TileSource(cache_bytes=60_000)
    top = source.info(slide_path).levels - 1
    tiles = [(c, r) for c in range(6) for r in range(4)]
    for col, row in tiles:
        source.tile(slide_path, top, col, row)
    assert source.misses == len(tiles) and 0 < source._held <= 60_000
    assert len(source._tiles) < len(tiles)   # the oldest were dropped
    last = tiles[-1]
    source.tile(slide_path, top, *last)
    assert source.hits == 1


def test_unreadable_slide_and_bad_tile_give_error_tiles(tmp_path, slide_path):
    broken = tmp_path / "broken.tif"
    broken.write_bytes(slide_path.read_bytes()[:5000])   # a truncated TIFF
    source = TileSource()
    tile = source.tile(broken, 0, 0, 0)
    assert tile.media_type == "image/png" and "broken.tif" in tile.error
    assert source.probe(broken)
    assert source.probe(slide_path) == ""
    outside = source.tile(slide_path, 99, 0, 0)
    assert "no deep-zoom level 99" in outside.error


def test_heatmap_has_one_pixel_per_tile_and_hides_artefacts_and_low_scores():
    table = TileScores(coords=np.array([[0, 0], [224, 0], [448, 224]]),
                       scores=np.array([0.9, 0.2, 0.7], np.float32),
                       flags=np.array([0, 0, 1], np.uint8), tile_size=224)
    rgba = heatmap_rgba(table, (700, 500), threshold=0.5)
    assert rgba.shape == (3, 4, 4)    # ceil(500 / 224) rows, ceil(700 / 224) cols
    assert rgba[0, 0, 3] == 255       # 0.9: shown
    assert rgba[0, 1, 3] == 0         # 0.2: below the threshold
    assert rgba[1, 2, 3] == 0         # flagged ink: never shown
    assert (rgba[..., 3] > 0).sum() == 1
    assert (heatmap_rgba(table, (700, 500), threshold=0.0)[..., 3] > 0).sum() == 2
