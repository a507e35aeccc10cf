"""wsi.tile_quality: ink, glass and focus of real and synthetic tiles, and the flags."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from shapely.geometry import box
from wsi_slides import CMU_SMALL, TCGA_JP2K

from core.tiling import CAMELYON16_MPP, ArtefactParams
from wsi.grid import tiles_for_slide
from wsi.scale import resize_tile
from wsi.slide import open_slide
from wsi.synth import write_synthetic_slide
from wsi.tile_quality import (
    BACKGROUND,
    BLUR,
    INK,
    TileQuality,
    artefact_flags,
    flag_names,
    ink_block,
    measure_tiles,
)
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


# --- Per micron: the same content at 0.243 and 0.486 um/px ------------------------------------

HALF = 112   # a 224 px tile at 0.243 um/px is 112 px at 0.486


def _at_0486(tiles):
    """The tiles as a 20x scanner or wsi.scale would give them to a 0.486 um/px model: 2x
    smaller with the readers' antialiasing filter."""
    return np.stack([resize_tile(tile, HALF) for tile in tiles])


def test_default_is_the_reference_and_its_tolerance_reads_as_before(hard_slide):
    """mpp=0.243 (the default) and the pixel sizes wsi.scale reads as they are (Utrecht's 0.226)
    give exactly the numbers of the pixel definition; the ink blocks keep 1.944 um."""
    _, _, tiles = hard_slide
    default = measure_tiles(tiles[:40])
    for mpp in (CAMELYON16_MPP, 0.226, 0.25):
        q = measure_tiles(tiles[:40], mpp=mpp)
        for name in ("ink", "background", "focus"):
            np.testing.assert_array_equal(getattr(q, name), getattr(default, name), err_msg=f"{name} {mpp}")
    # one batch or tile by tile: each tile's numbers are its own
    one_by_one = TileQuality.concatenate([measure_tiles(tiles[i:i + 1]) for i in range(40)])
    np.testing.assert_array_equal(one_by_one.focus, default.focus)
    assert [ink_block(m) for m in (0.243, 0.226, 0.486, 0.5, 0.1215, 2.0)] == [8, 8, 4, 4, 16, 1]
    for bad in (0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="mpp"):
            measure_tiles(tiles[:1], mpp=bad)


def test_ink_glass_and_blur_are_flagged_alike_at_0243_and_0486(hard_slide):
    """Clean tissue tiles, the same tiles crossed by a pen stroke, half or nearly all glass, and
    blurred (Gaussian sigma 1-5 px at 0.243, 0.24-1.2 um): measured at 0.243 and after a 2x
    antialiased reduction at 0.486 um/px, the flags agree on >= 95 % of the tiles (on all but
    those whose focus is near min_focus) and the measures correlate."""
    truth, coords, tiles = hard_slide
    quality = measure_tiles(tiles)
    clean = tiles[artefact_flags(quality) == 0][::4][:24]
    assert len(clean) == 24
    yy, xx = np.mgrid[0:224, 0:224]
    glass = np.array([242, 241, 239], np.float32)

    def pen(tile, offset):   # translucent blue ink multiplies the light, as wsi.synth draws it
        stroke = np.abs(yy - 0.5 * xx - offset) < 28
        out = tile.copy()
        out[stroke] = (out[stroke] * (np.array((40, 70, 170)) / 255)).astype(np.uint8)
        return out

    def on_glass(tile, share):
        out = tile.copy()
        cut = round(224 * share)
        noise = np.random.default_rng(0).normal(0, 1.5, (224, cut, 1))
        out[:, :cut] = np.clip(glass + noise, 0, 255).astype(np.uint8)
        return out

    def blurred(tile, sigma):
        return (ndimage.gaussian_filter(tile.astype(np.float32), (sigma, sigma, 0)) + 0.5).astype(np.uint8)

    groups = {"clean": (clean, 0),
              "pen": (np.stack([pen(t, o) for t, o in zip(clean, np.linspace(-60, 60, 24))]), INK),
              "half glass": (np.stack([on_glass(t, 0.5) for t in clean]), 0),
              "glass": (np.stack([on_glass(t, 0.95) for t in clean]), BACKGROUND),
              "blur 3": (np.stack([blurred(t, 3) for t in clean]), BLUR),
              "blur 5": (np.stack([blurred(t, 5) for t in clean]), BLUR)}
    for sigma in (1, 1.5, 2):   # from sharp to the threshold: flags may differ on a few
        groups[f"blur {sigma}"] = (np.stack([blurred(t, sigma) for t in clean]), None)
    fine, coarse = [], []
    for name, (group, expected) in groups.items():
        a, b = measure_tiles(group), measure_tiles(_at_0486(group), mpp=0.486)
        if expected is not None:
            assert (artefact_flags(a) == expected).all(), name
            assert (artefact_flags(b) == expected).all(), name
        fine.append(a)
        coarse.append(b)
    fine, coarse = TileQuality.concatenate(fine), TileQuality.concatenate(coarse)
    assert (artefact_flags(fine) == artefact_flags(coarse)).mean() >= 0.95
    for name in ("ink", "background"):
        a, b = getattr(fine, name), getattr(coarse, name)
        assert np.abs(a - b).max() < 0.03, name
        assert np.corrcoef(a, b)[0, 1] > 0.99, name
    measured = np.isfinite(fine.focus)   # NaN: too little tissue to measure (one glass tile)
    np.testing.assert_array_equal(np.isfinite(coarse.focus), measured)
    assert measured.mean() > 0.9
    assert np.corrcoef(np.log(fine.focus[measured]), np.log(coarse.focus[measured]))[0, 1] > 0.9
    blur_at = {name: np.nanmedian(q.focus[-72:]) for name, q in (("0.243", fine), ("0.486", coarse))}
    assert 0.5 < blur_at["0.486"] / blur_at["0.243"] < 2   # near the threshold: the same order


def test_the_synthetic_slide_written_at_0486_is_flagged_as_at_0243(hard_slide, tmp_path):
    """The hard slide's seed written by wsi.synth at 0.486 um/px (2x2 means, its own JPEG): tile
    by tile over the same tissue, the flags agree on >= 95 % of the tiles; the inked tiles are
    INK and the blurred region BLUR at both pixel sizes, the sharp clean tissue at neither."""
    truth, coords, tiles = hard_slide
    coarse_truth = write_synthetic_slide(tmp_path / "hard_0486.tif", 4096, 4096, seed=21,
                                         tissue_artefacts=True, mpp=0.486)
    assert coarse_truth.mpp == 0.486
    with open_slide(coarse_truth.path) as slide:
        coarse_tiles = np.stack([slide.read_region(int(x) // 2, int(y) // 2, HALF, HALF) for x, y in coords])
    fine = artefact_flags(measure_tiles(tiles))
    coarse_quality = measure_tiles(coarse_tiles, mpp=0.486)
    coarse = artefact_flags(coarse_quality)
    assert (fine == coarse).mean() >= 0.95
    share = _truth_ink_share(truth, coords)
    region = truth.blur_polygons[0]
    inside = np.array([region.contains(box(x, y, x + 224, y + 224)) for x, y in coords])
    away = np.array([region.distance(box(x, y, x + 224, y + 224)) > 32 for x, y in coords])
    sharp = away & (share == 0)
    assert inside.sum() >= 1 and (share >= 0.2).sum() >= 2
    for flags in (fine, coarse):
        assert (flags[share >= 0.2] & INK).all()
        assert not (flags[share == 0] & INK).any()
        assert (flags[inside] & BLUR).all()
        assert not (flags[sharp] & BLUR).any()
    assert np.nanmax(coarse_quality.focus[inside]) * 5 < np.nanmin(coarse_quality.focus[sharp])


def test_real_tissue_at_its_native_20x_is_not_flagged():
    """CMU-1-Small-Region's own 0.499 um/px tiles (a 20x scan), measured at that pixel size:
    in focus, no ink."""
    with open_slide(CMU_SMALL) as slide:
        _, grid = tiles_for_slide(slide)
        width, height = slide.dimensions
        tiles = np.stack([slide.read_region(int(x), int(y), 224, 224) for x, y in grid.coords
                          if x + 224 <= width and y + 224 <= height])
        mpp = slide.mpp
    assert mpp == pytest.approx(0.499, abs=0.01) and len(tiles) > 40
    quality = measure_tiles(tiles, mpp=mpp)
    assert not (artefact_flags(quality) & (INK | BLUR)).any()
    assert np.nanmin(quality.focus) > 2 * ArtefactParams().min_focus


def test_tiles_finer_than_the_reference_are_reduced_to_it(hard_slide):
    """Tiles at 0.1215 um/px (each 0.243 px repeated 2 x 2) measure as the 0.243 tiles."""
    _, _, tiles = hard_slide
    tiles = tiles[:16]
    finer = np.repeat(np.repeat(tiles, 2, axis=1), 2, axis=2)
    a, b = measure_tiles(tiles), measure_tiles(finer, mpp=CAMELYON16_MPP / 2)
    np.testing.assert_array_equal(b.ink, a.ink)
    np.testing.assert_array_equal(b.background, a.background)
    np.testing.assert_allclose(b.focus, a.focus, rtol=1e-5)
