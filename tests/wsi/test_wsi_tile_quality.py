"""wsi.tile_quality: ink, glass and focus of real and synthetic tiles, and the flags."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from shapely.geometry import box
from wsi_slides import CMU_SMALL, TCGA_JP2K

from core.tiling import ArtefactParams
from wsi.grid import tiles_for_slide
from wsi.slide import open_slide
from wsi.synth import write_synthetic_slide
from wsi.tile_quality import BACKGROUND, BLUR, INK, artefact_flags, flag_names, measure_tiles
from wsi.tiles import TileReader


def _tiles(path, fallback_mpp=None):
    with open_slide(path, fallback_mpp=fallback_mpp) as slide:
        _, grid = tiles_for_slide(slide)
        tiles = np.concatenate([b.tiles.copy() for b in TileReader(slide, grid.coords)])
    return grid.coords, tiles


@pytest.fixture(scope="module")
def hard_slide(tmp_path_factory):
    """A 4096 px synthetic slide with pen strokes, a marker blot and a blurred region across its
    tissue, and its tiles."""
    truth = write_synthetic_slide(tmp_path_factory.mktemp("artefacts") / "hard.tif", 4096, 4096,
                                  seed=21, tissue_artefacts=True)
    coords, tiles = _tiles(truth.path)
    return truth, coords, tiles


def _truth_ink_share(truth, coords, size=224):
    ds = int(truth.mask_downsample)
    return np.array([truth.ink_mask[y // ds:(y + size) // ds, x // ds:(x + size) // ds].mean()
                     for x, y in coords])


def test_tiles_under_pen_and_marker_are_flagged_ink(hard_slide):
    truth, coords, tiles = hard_slide
    flags = artefact_flags(measure_tiles(tiles))
    share = _truth_ink_share(truth, coords)
    inked, clean = share >= 0.2, share == 0
    assert inked.sum() >= 2
    assert (flags[inked] & INK).all()
    assert not (flags[clean] & INK).any()


def test_tiles_inside_the_blurred_region_are_flagged_blur(hard_slide):
    truth, coords, tiles = hard_slide
    quality = measure_tiles(tiles)
    flags = artefact_flags(quality)
    region = truth.blur_polygons[0]
    inside = np.array([region.contains(box(x, y, x + 224, y + 224)) for x, y in coords])
    away = np.array([region.distance(box(x, y, x + 224, y + 224)) > 32 for x, y in coords])
    sharp = away & (_truth_ink_share(truth, coords) == 0)
    assert inside.sum() >= 1
    assert (flags[inside] & BLUR).all()
    assert not (flags[sharp] & BLUR).any()
    # the measure itself: an order of magnitude apart
    assert np.nanmax(quality.focus[inside]) * 10 < np.nanmin(quality.focus[sharp])


@pytest.mark.parametrize("path", [CMU_SMALL, TCGA_JP2K], ids=["CMU-1-Small-Region", "TCGA-CR-7395"])
def test_real_tissue_tiles_are_not_flagged(path):
    """Two real H&E slides without pen, in focus: no tile is ink or blur. Their dark nuclei pass
    the per-pixel ink rule (up to 10 % of CMU-1's pixels), which is why ink is counted in solid
    blocks."""
    _, tiles = _tiles(path, fallback_mpp=0.25)
    quality = measure_tiles(tiles)
    flags = artefact_flags(quality)
    assert len(tiles) > 40
    assert not (flags & (INK | BLUR)).any()
    assert np.nanmin(quality.focus) > 5 * ArtefactParams().min_focus


def test_measures_on_constructed_tiles():
    rng = np.random.default_rng(0)
    tissue = rng.integers(120, 230, (224, 224, 3)).astype(np.uint8)
    tissue[..., 1] = tissue[..., 0] - 40                          # red > green: stained
    half_pen = tissue.copy()
    half_pen[:, :112] = (40, 70, 170)                             # blue pen over the left half
    glass = np.full((224, 224, 3), 242, np.uint8)
    blurred = ndimage.gaussian_filter(tissue.astype(np.float32), (5, 5, 0)).astype(np.uint8)
    q = measure_tiles(np.stack([tissue, half_pen, glass, blurred]))
    assert q.ink[0] == 0 and q.ink[1] == pytest.approx(0.5, abs=0.03)
    assert q.background[2] == 1.0 and q.background[0] == 0.0
    assert np.isnan(q.focus[2])                                   # no tissue pixel to measure
    assert q.focus[3] * 50 < q.focus[0]
    flags = artefact_flags(q)
    assert flags.tolist() == [0, INK, BACKGROUND, BLUR]
    assert [flag_names(f) for f in (0, INK | BLUR)] == ["", "ink+blur"]
    assert len(measure_tiles(np.zeros((0, 224, 224, 3), np.uint8))) == 0
