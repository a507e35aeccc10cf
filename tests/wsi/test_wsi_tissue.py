"""wsi.tissue: the mask against known truth (synthetic) and known regions of real slides.

How the real-slide checks were set up: the masks of CMU-1-Small-Region and TCGA-CR-7395 were
looked at overlaid on their thumbnails; the tests pin what was verified by eye there and can be
recomputed from the pixels alone: the corners are glass, known points in the tissue are tissue,
the tissue share is in the range seen, nearly every strongly stained pixel is covered, and the
grey stitching tiles of the TCGA slide (large flat grey areas, V 225-248, S < 12) stay out of
the mask (overlay checked: 0 of their ~40k mask pixels are tissue).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import rgb2hsv
from skimage.morphology import remove_small_objects
from wsi_slides import CMU_SMALL, TCGA_JP2K, dice, synthetic_he

from core.errors import MilroiError
from wsi.slide import open_slide
from wsi.tissue import TissueParams, compute_tissue_mask, otsu_uint8, saturation_value, tissue_mask_from_rgb


def _resize_bool(mask: np.ndarray, shape) -> np.ndarray:
    """Majority vote of the pixels each target pixel covers."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BOX)) > 127


def _level0_like(slide, mask_shape) -> np.ndarray:
    return np.asarray(Image.fromarray(slide.read_level(0)).resize(
        (mask_shape[1], mask_shape[0]), Image.Resampling.BOX))


def test_integer_saturation_value_match_skimage():
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rgb[0, 0] = 0   # black: saturation 0, no division by zero
    sat, value = saturation_value(rgb)
    hsv = rgb2hsv(rgb)
    assert np.abs(sat.astype(float) - hsv[..., 1] * 255).max() <= 1.0
    np.testing.assert_array_equal(value, np.round(hsv[..., 2] * 255).astype(np.uint8))
    assert sat[0, 0] == 0


def test_otsu_on_histogram_separates_two_populations():
    values = np.concatenate([np.full(1000, 10), np.full(300, 120)]).astype(np.uint8)
    assert 10 <= otsu_uint8(values) < 120
    assert otsu_uint8(np.full(50, 7, np.uint8), floor=20) == 20   # one level: the floor


def test_synthetic_slide_matches_truth_without_ink_grey_or_glass(he_tiff, he_image):
    _, truth = he_image
    with open_slide(he_tiff) as slide:
        tissue = compute_tissue_mask(slide)
    assert tissue.mask.dtype == bool
    assert tissue.mask.shape[1] == round(4096 / tissue.downsample)
    assert tissue.level == 2   # the 4x level, resized to the ~6x mask (min_mask_side 512)
    expected = _resize_bool(truth, tissue.mask.shape)
    assert dice(tissue.mask, expected) >= 0.95
    # Artefacts individually: top-left grey block, green pen, black dot are not tissue.
    h, w = tissue.mask.shape
    assert not tissue.mask[: h // 5 - 2, : w // 6 - 2].any()
    assert not tissue.mask[int(0.3 * h): int(0.7 * h), int(0.93 * w) - 2: int(0.93 * w) + 2].any()
    assert not tissue.mask[h // 2 - 3: h // 2 + 3, w // 2 - 3: w // 2 + 3].any()


def test_second_otsu_recovers_pale_tissue_under_heavy_pen():
    """With a lot of ink, one Otsu pass puts the threshold between ink and everything else."""
    rgb, truth = synthetic_he(768, 1024, seed=11, grey=False, black=False)
    heavy = rgb.copy()
    ink = np.zeros(truth.shape, bool)
    ink[:, :260] = True                       # a wide band of blue ink on the left quarter
    heavy[ink] = (30, 60, 200)
    truth = truth & ~ink
    params = TissueParams(min_object_um2=2_000, min_hole_um2=2_000)
    mask = tissue_mask_from_rgb(heavy, params, um_per_px=1.0)
    assert dice(mask, truth) >= 0.95
    sat, _ = saturation_value(heavy)
    single_pass = sat > otsu_uint8(sat)       # what one Otsu over everything would keep
    assert dice(single_pass & ~ink, truth) < dice(mask, truth) - 0.05


def test_blank_glass_gives_an_empty_mask():
    rng = np.random.default_rng(5)
    glass = np.clip(rng.normal(242, 3, (400, 500, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask_from_rgb(glass, TissueParams()).any()


def test_bad_input_and_params():
    with pytest.raises(MilroiError, match="RGB uint8"):
        tissue_mask_from_rgb(np.zeros((10, 10), np.uint8))
    with pytest.raises(MilroiError, match="unknown tissue parameters"):
        TissueParams.from_dict({"target_downsample": 16, "bogus": 1})
    params = TissueParams(target_downsample=16)
    assert TissueParams.from_dict(params.to_dict()) == params


def test_real_aperio_jpeg_slide():
    with open_slide(CMU_SMALL) as slide:
        tissue = compute_tissue_mask(slide)
        rgb = _level0_like(slide, tissue.mask.shape)
    mask, ds = tissue.mask, tissue.downsample
    assert 0.20 <= mask.mean() <= 0.45
    for corner in (mask[:40, :40], mask[:40, -40:], mask[-40:, :40], mask[-40:, -40:]):
        assert not corner.any()
    assert mask[int(2000 / ds), int(1000 / ds)]          # the epidermis, lower centre
    sat, _ = saturation_value(rgb)
    strongly_stained = sat > 80
    assert (mask & strongly_stained).sum() / strongly_stained.sum() > 0.90


def test_real_jpeg2000_slide_excludes_grey_stitching_background():
    with open_slide(TCGA_JP2K) as slide:
        tissue = compute_tissue_mask(slide)
        assert tissue.level == 1
        rgb = _level0_like(slide, tissue.mask.shape)
    mask, ds = tissue.mask, tissue.downsample
    assert 0.50 <= mask.mean() <= 0.75
    assert not mask[:40, :40].any() and not mask[:40, -40:].any()
    assert mask[int(1800 / ds), int(2200 / ds)]           # centre of the tumour section
    sat, value = saturation_value(rgb)
    grey = (sat < 12) & (value >= 225) & (value <= 248)
    # The stitching tiles are the large flat grey areas; smaller grey spots are lumina inside
    # the tissue (the triangle in the centre), which the hole filling rightly keeps.
    stitching = remove_small_objects(ndi.binary_erosion(grey, np.ones((5, 5))), max_size=2000)
    assert stitching.sum() > 20_000                       # the stitching tiles are there ...
    assert (stitching & mask).sum() / stitching.sum() < 0.01   # ... and stay out of the mask
    strongly_stained = sat > 80
    assert (mask & strongly_stained).sum() / strongly_stained.sum() > 0.98


def test_a_level_too_big_for_one_read_is_read_in_strips(tmp_path, he_image):
    """A slide without a pyramid: the mask comes from level 0 in strips, same as in one read."""
    from wsi_slides import write_pyramid_tiff

    from wsi.tissue import mask_level_and_size

    rgb, truth = he_image
    path = write_pyramid_tiff(tmp_path / "flat.tif", rgb[:1536, :2048], levels=1)
    with open_slide(path) as slide:
        level, size = mask_level_and_size(slide, TissueParams())
        assert level == 0 and slide.level_count == 1
        whole = slide.read_level_resized(level, size, max_read_pixels=2**40)
        strips = slide.read_level_resized(level, size, max_read_pixels=300_000)   # ~11 strips
        assert strips.shape == whole.shape == (size[1], size[0], 3)
        assert np.abs(strips.astype(int) - whole).mean() < 1.0
        mask = compute_tissue_mask(slide).mask
    assert dice(tissue_mask_from_rgb(strips, um_per_px=0.243 * 3), mask) > 0.99


@pytest.fixture(scope="module")
def synth_slide(tmp_path_factory):
    synth = pytest.importorskip("wsi.synth")   # written by another module's owner
    return synth.write_synthetic_slide(tmp_path_factory.mktemp("synth") / "synth.tif",
                                       width=4096, height=4096, seed=0, tumor=True)


def test_wsi_synth_slide_matches_its_tissue_truth(synth_slide):
    """wsi.synth draws black marker dots, blue and green pen strokes and grey stitching tiles
    on the glass; the mask must match the drawn tissue (Dice >= 0.95) and leave all of them out."""
    truth = synth_slide
    with open_slide(truth.path) as slide:
        tissue = compute_tissue_mask(slide)
        rgb = slide.read_level_resized(0, (tissue.mask.shape[1], tissue.mask.shape[0]))
    expected = _resize_bool(truth.tissue_mask, tissue.mask.shape)
    assert dice(tissue.mask, expected) >= 0.95
    # The artefacts, found from the pixels: away from the tissue, not glass-coloured.
    sat, value = saturation_value(rgb)
    away = ~ndi.binary_dilation(expected, iterations=4)
    artefacts = away & ((value < 100) | (sat > 40) | ((value < 225) & (sat < 12)))
    assert artefacts.sum() > 500                  # dots, strokes and grey tiles are there
    assert (artefacts & tissue.mask).sum() == 0   # and none of them is tissue
