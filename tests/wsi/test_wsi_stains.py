"""wsi.tissue on every synthetic stain (wsi.synth.STAIN_PRESETS), pale and lilac-grey included.

The synthetic slides' tissue is known exactly; the truth the mask must find is the drawn tissue
minus the ink drawn over it (the mask cuts ink out). Slides are drawn with pen, marker and blur
across the tissue, the hard profile's artefacts.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from wsi_slides import dice

from core.tiling import TissueParams
from wsi.slide import open_slide
from wsi.synth import STAIN_PRESETS, write_synthetic_slide
from wsi.tissue import compute_tissue_mask


def _truth_on_mask_grid(truth, tissue) -> np.ndarray:
    """The truth's tissue minus its ink, sampled at the mask pixels' centres."""
    expected = truth.tissue_mask & ~truth.ink_mask
    h, w = tissue.mask.shape
    rows = np.minimum(((np.arange(h) + 0.5) * tissue.downsample / truth.mask_downsample).astype(int),
                      expected.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * tissue.downsample / truth.mask_downsample).astype(int),
                      expected.shape[1] - 1)
    return expected[rows[:, None], cols[None, :]]


@pytest.fixture(scope="module")
def stained(tmp_path_factory):
    """One 3072 px slide per stain preset, same layout (seed), artefacts across the tissue."""
    out = tmp_path_factory.mktemp("stains")
    return {name: write_synthetic_slide(out / f"{name}.tif", 3072, 3072, seed=31, stain=name,
                                        tissue_artefacts=True)
            for name in STAIN_PRESETS}


@pytest.mark.parametrize("stain", sorted(STAIN_PRESETS))
def test_tissue_dice_on_every_stain(stained, stain):
    truth = stained[stain]
    with open_slide(truth.path) as slide:
        tissue = compute_tissue_mask(slide)
    expected = _truth_on_mask_grid(truth, tissue)
    assert 0.15 < expected.mean() < 0.6
    assert dice(tissue.mask, expected) >= 0.95, stain


def test_lilac_grey_is_found_by_optical_density_not_saturation(stained):
    """The faded slide's tissue is as unsaturated as glass: saturation alone (the seed's mask)
    finds none of it; the optical-density cue finds all of it."""
    truth = stained["lilac-grey"]
    with open_slide(truth.path) as slide:
        saturation_only = compute_tissue_mask(slide, TissueParams(optical_density=False))
        both = compute_tissue_mask(slide)
    expected = _truth_on_mask_grid(truth, both)
    assert dice(saturation_only.mask, expected) < 0.5
    assert dice(both.mask, expected) >= 0.95


def test_pen_and_marker_over_tissue_are_cut_out_of_the_mask(stained):
    truth = stained["standard"]
    with open_slide(truth.path) as slide:
        tissue = compute_tissue_mask(slide)
    ink = truth.ink_mask
    h, w = tissue.mask.shape
    rows = np.minimum(((np.arange(h) + 0.5) * tissue.downsample / truth.mask_downsample).astype(int),
                      ink.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * tissue.downsample / truth.mask_downsample).astype(int),
                      ink.shape[1] - 1)
    # Inner ink only: the truth is on a 16 px grid, the mask on a 6 px one, so their edges differ.
    inner = ndimage.binary_erosion(ink)[rows[:, None], cols[None, :]]
    ink_on_tissue = inner & truth.tissue_mask[rows[:, None], cols[None, :]]
    assert ink_on_tissue.sum() > 100                                # the strokes do cross tissue
    assert (tissue.mask & ink_on_tissue).sum() <= 0.01 * ink_on_tissue.sum()
