"""wsi.grid: tile positions, tissue fractions against brute force, and `milroi-train tiles`."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image
from wsi_slides import BROKEN_SVS, CMU_SMALL

from core.errors import MilroiError
from core.tiling import TilingParams
from training.cli import main as milroi_train
from wsi.grid import TileGrid, grid_overlay, make_tile_grid, tiles_for_slide, write_grid_csv
from wsi.slide import open_slide
from wsi.tissue import TissueMask


def _random_mask(shape, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.random((shape[0] // 3 + 1, shape[1] // 3 + 1)) > 0.5   # blobs, not salt
    return np.kron(coarse, np.ones((3, 3), bool))[: shape[0], : shape[1]]


def _brute_force_fractions(mask, ds: int, width, height, tile, stride):
    """Tissue fraction of every grid position from the mask enlarged to level 0, pixel by pixel."""
    level0 = np.repeat(np.repeat(mask, ds, axis=0), ds, axis=1)[:height, :width]
    out = {}
    for y in range(0, height - tile + 1, stride):
        for x in range(0, width - tile + 1, stride):
            out[(x, y)] = level0[y:y + tile, x:x + tile].mean()
    return out


@pytest.mark.parametrize("tile,stride,min_tissue", [(32, 32, 0.0), (32, 16, 0.3), (48, 40, 0.5)])
def test_fractions_match_brute_force(tile, stride, min_tissue):
    ds, width, height = 8, 500, 371          # tile edges fall on mask-pixel edges (multiples of 8)
    mask = _random_mask((-(-height // ds), -(-width // ds)), seed=tile + stride)
    grid = make_tile_grid(TissueMask(mask, float(ds), 0), (width, height), tile_size=tile,
                          stride=stride, min_tissue=min_tissue)
    expected = _brute_force_fractions(mask, ds, width, height, tile, stride)
    kept = {k: v for k, v in expected.items() if v >= min_tissue - 1e-6}
    assert [tuple(c) for c in grid.coords.tolist()] == sorted(kept, key=lambda xy: (xy[1], xy[0]))
    np.testing.assert_allclose(grid.tissue_fraction, [kept[tuple(c)] for c in grid.coords.tolist()],
                               atol=1e-6)


def test_grid_invariants_on_a_real_slide():
    with open_slide(CMU_SMALL) as slide:   # a model at the slide's own 0.499 um/px: level 0 as is
        tissue, grid = tiles_for_slide(slide, TilingParams(224, 0.499, 0.25), stride=112)
    assert (grid.scale.level, grid.scale.read_size, grid.scale.resized) == (0, 224, False)
    width, height = slide.dimensions
    assert grid.coords.dtype == np.int64 and grid.tissue_fraction.dtype == np.float32
    assert len(grid) > 50
    assert (grid.coords % 112 == 0).all()
    assert (grid.coords >= 0).all()
    assert (grid.coords[:, 0] + 224 <= width).all() and (grid.coords[:, 1] + 224 <= height).all()
    assert (grid.tissue_fraction >= 0.25).all() and (grid.tissue_fraction <= 1).all()
    order = np.lexsort((grid.coords[:, 0], grid.coords[:, 1]))   # y, then x
    np.testing.assert_array_equal(order, np.arange(len(grid)))
    assert len(np.unique(grid.coords, axis=0)) == len(grid)


def test_all_positions_with_min_tissue_zero_and_level_downsample():
    mask = np.ones((100, 100), bool)
    grid = make_tile_grid(TissueMask(mask, 10.0, 0), (1000, 1000), tile_size=100, stride=100,
                          level=1, level_downsample=2.0, min_tissue=0.0)
    # 200 level-0 px per tile and per step: 5 x 5 positions fit in 1000 x 1000.
    assert len(grid) == 25 and grid.tile_size_level0 == 200
    assert set(np.unique(grid.coords[:, 0])) == {0, 200, 400, 600, 800}
    assert (grid.tissue_fraction == 1).all()


def test_slide_smaller_than_a_tile_has_no_tiles():
    grid = make_tile_grid(TissueMask(np.ones((4, 4), bool), 32.0, 0), (100, 100), tile_size=224)
    assert grid.coords.shape == (0, 2) and grid.tissue_fraction.shape == (0,)


def test_bad_grid_parameters():
    tissue = TissueMask(np.ones((4, 4), bool), 32.0, 0)
    with pytest.raises(MilroiError, match="positive"):
        make_tile_grid(tissue, (128, 128), tile_size=0)
    with pytest.raises(MilroiError, match="min_tissue"):
        make_tile_grid(tissue, (128, 128), min_tissue=1.5)


def test_overlay_outlines_exactly_the_kept_tiles():
    coords = np.array([[0, 0], [100, 100]], np.int64)
    grid = TileGrid(coords, np.ones(2, np.float32), 100, 100, 0, (400, 300))
    thumb = np.full((300, 400, 3), 255, np.uint8)       # one thumbnail px per level-0 px
    out = grid_overlay(thumb, grid)
    changed = (out != 255).any(axis=2)
    expected = np.zeros((300, 400), bool)
    expected[0:100, 0:100] = expected[100:200, 100:200] = True
    np.testing.assert_array_equal(changed, expected)
    assert (out[0, 50] == (0, 120, 0)).all() and (out[50, 99] == (0, 120, 0)).all()   # outline
    assert (out[50, 50] != (0, 120, 0)).any()                                          # tint inside


def test_csv_round_trip(tmp_path):
    grid = TileGrid(np.array([[0, 224], [200_000, 99_904]], np.int64),
                    np.array([0.5, 0.12345], np.float32), 224, 224, 0, (200_224, 100_128))
    write_grid_csv(tmp_path / "g.csv", grid)
    with open(tmp_path / "g.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["x", "y", "size", "level", "tissue_fraction"]
    assert [(int(r["x"]), int(r["y"]), int(r["size"]), int(r["level"])) for r in rows] == \
        [(0, 224, 224, 0), (200_000, 99_904, 224, 0)]
    assert float(rows[1]["tissue_fraction"]) == pytest.approx(0.1235, abs=1e-4)


def test_tiles_command_writes_csv_mask_and_grid(tmp_path, he_tiff, capsys):
    assert milroi_train(["tiles", str(he_tiff), "--out", str(tmp_path), "--min-tissue", "0.5",
                         "--stride", "112"]) == 0
    assert "tiles of 224 level-0 px" in capsys.readouterr().out
    with open_slide(he_tiff) as slide:
        _, grid = tiles_for_slide(slide, TilingParams(min_tissue=0.5), stride=112)
    with open(tmp_path / "he_slide_tiles.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(grid) > 100
    np.testing.assert_array_equal([[int(r["x"]), int(r["y"])] for r in rows], grid.coords)
    mask = np.asarray(Image.open(tmp_path / "he_slide_mask.png"))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    overview = np.asarray(Image.open(tmp_path / "he_slide_grid.png"))
    assert overview.ndim == 3 and ((overview == (0, 120, 0)).all(axis=2)).sum() > 1000


def test_tiles_command_on_a_broken_slide_is_one_clear_error(tmp_path, capsys):
    assert milroi_train(["tiles", str(BROKEN_SVS), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "broken.svs" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_overlay_with_gaps_between_tiles_outlines_each_tile():
    grid = TileGrid(np.array([[100, 0]], np.int64), np.ones(1, np.float32), 50, 100, 0, (300, 200))
    out = grid_overlay(np.full((200, 300, 3), 255, np.uint8), grid)
    outline = (out == (0, 120, 0)).all(axis=2)
    expected = np.zeros((200, 300), bool)
    expected[0:50, 100:150] = True
    expected[1:49, 101:149] = False        # a one-pixel frame around the 50 x 50 tile
    np.testing.assert_array_equal(outline, expected)
