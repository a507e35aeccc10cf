"""wsi.synth: the colour-matched mode (tumour told from lymph node by its nuclei alone) and one
slide written at several pixel sizes (0.243, 0.226 and 0.486 um/px): the same tissue, each copy
in its own level-0 pixels (resolution tags, annotations, truth)."""
from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest
import shapely
import tifffile
from scipy import ndimage

from core.errors import MilroiError
from wsi.annotations import rasterize, read_asap_xml
from wsi.slide import open_slide
from wsi.synth import MPP, synthetic_cells, write_synthetic_slide, write_synthetic_slide_at

SIDE_UM = 750.0     # ~3090 px at 0.243 um/px: ~130 tumour nuclei, a few seconds a slide
SEED = 1
MPPS = (0.243, 0.226, 0.486)    # Radboud, Utrecht, a 20x scanner


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict:
    """One seed: the default slide at 0.243 um/px, the colour-matched one at each of MPPS."""
    out = tmp_path_factory.mktemp("synth_scales")
    truths = {"default": write_synthetic_slide_at(out / "default.tif", MPP, SIDE_UM, SIDE_UM, seed=SEED)}
    for mpp in MPPS:
        truths[mpp] = write_synthetic_slide_at(out / f"matched_{mpp}.tif", mpp, SIDE_UM, SIDE_UM,
                                               seed=SEED, colour_matched=True)
    return truths


def _level0(truth) -> np.ndarray:
    return tifffile.imread(truth.path, level=0)


def _tumour_and_lymph_node(truth) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 masks from the truth: tumour (minus islands, 2 um in from its edge) and lymph-node
    tissue (the tissue mask 2 cells in from the glass, 8 um away from any tumour nest)."""
    h, w = _level0(truth).shape[:2]
    um = 1 / truth.mpp
    tumour = rasterize(truth.region.buffer(-2 * um), (h, w), 1.0)
    tissue = ndimage.binary_erosion(truth.tissue_mask, iterations=2)
    # Each level-0 px takes its mask cell (mask_downsample px a side, not an integer when resampled).
    rows, cols = (np.minimum((np.arange(n) + 0.5) / truth.mask_downsample, m - 1).astype(int)
                  for n, m in zip((h, w), tissue.shape))
    tissue = tissue[rows[:, None], cols[None, :]]
    nests = rasterize(shapely.union_all(truth.tumor_polygons).buffer(8 * um), (h, w), 1.0)
    return tumour, tissue & ~nests


def _colour_difference(truth) -> np.ndarray:
    """Mean RGB of the tumour minus that of the lymph-node tissue."""
    image = _level0(truth)
    tumour, lymph_node = _tumour_and_lymph_node(truth)
    return image[tumour].mean(0, dtype=np.float64) - image[lymph_node].mean(0, dtype=np.float64)


def _nucleus_areas(truth) -> tuple[np.ndarray, np.ndarray]:
    """Areas (um^2) of the dark connected components (nuclei: green below the midpoint between
    nucleus and stroma) whose centroid lies in the tumour, and in lymph-node tissue."""
    image = _level0(truth)
    dark = image[..., 1] < 98
    labels, n = ndimage.label(dark)
    areas = np.bincount(labels.ravel())[1:] * truth.mpp ** 2
    cy, cx = np.round(ndimage.center_of_mass(dark, labels, np.arange(1, n + 1))).astype(int).T
    tumour, lymph_node = _tumour_and_lymph_node(truth)
    return areas[tumour[cy, cx]], areas[lymph_node[cy, cx]]


def test_colour_matched_tumour_has_the_mean_colour_of_lymph_node(slides):
    """Measured over 12 seeds at this size: matched within 2.8 (red; noise of ~130 big nuclei),
    default tumour 15-19 darker in red."""
    matched = _colour_difference(slides[MPP])
    default = _colour_difference(slides["default"])
    assert np.abs(matched).max() < 4, matched
    assert abs(default[0]) > 12 and np.abs(default).max() >= np.abs(matched).max(), default


def test_colour_matched_tumour_has_bigger_nuclei(slides):
    """Lymphocyte nuclei ~14 um^2 (~4.3 um across), tumour nuclei ~47 um^2 (~7.7 um across)."""
    tumour, lymph_node = _nucleus_areas(slides[MPP])
    assert len(tumour) > 50 and len(lymph_node) > 200
    assert 10 < np.median(lymph_node) < 20
    assert np.median(tumour) > 2.5 * np.median(lymph_node)
    assert np.percentile(tumour, 10) > np.percentile(lymph_node, 90)    # the distributions apart


def test_copies_carry_their_pixel_size(slides):
    base = slides[MPP].dimensions
    for mpp in MPPS:
        truth = slides[mpp]
        with open_slide(truth.path) as slide:
            assert slide.mpp == pytest.approx(mpp, abs=1e-3) and slide.mpp_source == "metadata"
            assert slide.dimensions == truth.dimensions
            assert slide.level_count == truth.level_count
        for side, side0 in zip(truth.dimensions, base):
            assert abs(side - side0 * MPP / mpp) <= 1, (mpp, truth.dimensions)
        assert truth.mpp == mpp


def test_copies_annotations_cover_the_same_area(slides):
    """The XML beside each copy, in its level-0 px, covers the same um^2 (and is its truth)."""
    base = slides[MPP].region.area * MPP ** 2
    for mpp in MPPS:
        truth = slides[mpp]
        annotations = read_asap_xml(truth.path.with_suffix(".xml"))
        assert annotations.region.area * mpp ** 2 == pytest.approx(base, rel=0.02)
        assert annotations.region.symmetric_difference(truth.region).area < 1e-3 * truth.region.area
        assert len(annotations.exclusion_polygons) == len(truth.exclusion_polygons)


def test_copies_hold_the_same_tissue_and_nuclei(slides):
    """Same colour in the tumour and the lymph node, nuclei of the same size in um^2, and
    synthetic_cells' nuclei at the same places in um."""
    base = slides[MPP]
    base_colour = [_level0(base)[m].mean(0) for m in _tumour_and_lymph_node(base)]
    base_tumour, base_lymph = (np.median(a) for a in _nucleus_areas(base))
    base_cells, base_classes = synthetic_cells(base)
    for mpp in MPPS[1:]:
        truth = slides[mpp]
        colour = [_level0(truth)[m].mean(0) for m in _tumour_and_lymph_node(truth)]
        np.testing.assert_allclose(colour, base_colour, atol=2.0)
        tumour, lymph = (np.median(a) for a in _nucleus_areas(truth))
        assert tumour == pytest.approx(base_tumour, rel=0.1) and lymph == pytest.approx(base_lymph, rel=0.15)
        cells, classes = synthetic_cells(truth)
        assert classes == base_classes
        np.testing.assert_allclose(cells * mpp, base_cells * MPP, atol=1e-6)


def test_default_mode_is_unchanged(tmp_path):
    """colour_matched=False and mpp=0.243 are the old slide; a matched normal slide (no tumour)
    is the default one: the lymph node is drawn alike."""
    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    plain = write_synthetic_slide(tmp_path / "plain.tif", 768, 512, seed=9)
    explicit = write_synthetic_slide(tmp_path / "explicit.tif", 768, 512, seed=9, colour_matched=False,
                                     mpp=MPP)
    assert digest(plain.path) == digest(explicit.path)
    assert plain.drawn_dimensions is None and not plain.colour_matched
    normal = write_synthetic_slide(tmp_path / "normal.tif", 768, 512, seed=9, tumor=False)
    matched = write_synthetic_slide(tmp_path / "matched.tif", 768, 512, seed=9, tumor=False,
                                    colour_matched=True)
    assert digest(normal.path) == digest(matched.path)


def test_cli_colour_matched_at_20x(tmp_path):
    from training.cli import main

    out = tmp_path / "ds"
    assert main(["synth", str(out), "--tumor", "1", "--normal", "0", "--size", "1024x1024", "--seed", "2",
                 "--colour-matched", "--mpp", "0.486"]) == 0
    with open_slide(out / "tumor_001.tif") as slide:
        assert slide.mpp == pytest.approx(0.486, abs=1e-3) and slide.dimensions == (512, 512)
    with (out / "synth.csv").open() as f:
        (row,) = csv.DictReader(f)
    assert (row["colour_matched"], row["mpp"]) == ("1", "0.486")
    assert not read_asap_xml(out / "tumor_001.xml").region.is_empty


def test_rejects_pixel_sizes_it_cannot_write(tmp_path):
    with pytest.raises(MilroiError, match="um/px"):
        write_synthetic_slide(tmp_path / "x.tif", 1024, 1024, mpp=0.0)
    with pytest.raises(MilroiError, match="um/px"):
        write_synthetic_slide_at(tmp_path / "y.tif", 2.0, 200, 200)   # 100 px a side
