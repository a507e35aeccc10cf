"""wsi.synth: the synthetic slides open as real slides, carry their truth, and are learnable."""
from __future__ import annotations

import csv
import hashlib

import numpy as np
import openslide
import pytest
from scipy import ndimage

from core.errors import MilroiError
from wsi.annotations import rasterize, read_asap_xml
from wsi.synth import make_dataset, write_synthetic_slide


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_openslide_reads_levels_and_mpp(tumor_slide):
    slide = openslide.OpenSlide(tumor_slide.path)
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.243)
    assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.243)
    assert slide.level_dimensions == ((2048, 2048), (1024, 1024), (512, 512))
    assert tumor_slide.level_count == 3
    region = np.asarray(slide.read_region((0, 0), 0, (256, 256)).convert("RGB"))
    assert region.shape == (256, 256, 3)


def test_tissue_truth_agrees_with_the_tissue_mask(tumor_slide, normal_slide):
    """The slide core's tissue mask finds the drawn tissue and rejects the marker, pen and
    stitching artefacts on the glass."""
    from wsi.slide import open_slide
    from wsi.tissue import compute_tissue_mask

    for truth in (tumor_slide, normal_slide):
        with open_slide(truth.path) as slide:
            assert slide.mpp == pytest.approx(0.243) and slide.mpp_source == "metadata"
            tissue = compute_tissue_mask(slide)
        # Truth resampled to the mask's grid (nearest cell centre).
        h, w = tissue.mask.shape
        rows = np.minimum(((np.arange(h) + 0.5) * tissue.downsample / truth.mask_downsample).astype(int),
                          truth.tissue_mask.shape[0] - 1)
        cols = np.minimum(((np.arange(w) + 0.5) * tissue.downsample / truth.mask_downsample).astype(int),
                          truth.tissue_mask.shape[1] - 1)
        expected = truth.tissue_mask[rows[:, None], cols[None, :]]
        assert _dice(tissue.mask, expected) > 0.9
        assert 0.1 < expected.mean() < 0.7


def test_tumour_layout(tumor_slide, normal_slide):
    assert not normal_slide.is_tumor and normal_slide.region.is_empty
    assert tumor_slide.is_tumor and len(tumor_slide.exclusion_polygons) == 1
    region = tumor_slide.region
    assert region.area < sum(p.area for p in tumor_slide.tumor_polygons)  # island cut out
    tumor_mask = rasterize(region, tumor_slide.tissue_mask.shape, tumor_slide.mask_downsample)
    assert (tumor_mask & ~tumor_slide.tissue_mask).sum() == 0  # tumour lies on tissue
    areas = sorted(p.area for p in tumor_slide.tumor_polygons)
    assert areas[-1] > 4 * areas[0]  # nests of several sizes


def _nucleus_stats(rgb: np.ndarray) -> tuple[float, int, np.ndarray]:
    """Mean area (px) and count of purple blobs (nuclei), and the mean colour."""
    purple = (rgb[..., 1].astype(int) < 115) & (rgb[..., 2] > rgb[..., 1] + 40)
    # Closing + hole filling: a tumour nucleus's pale speckled chromatin is one blob, not many.
    purple = ndimage.binary_fill_holes(ndimage.binary_closing(purple, iterations=2))
    labels, n = ndimage.label(purple)
    sizes = np.bincount(labels.ravel())[1:]
    sizes = sizes[sizes > 20]
    return float(sizes.mean()), len(sizes), rgb.reshape(-1, 3).mean(0)


def test_tumour_tiles_differ_from_normal_by_texture_not_mean_colour(tumor_slide, normal_slide):
    region = tumor_slide.region.buffer(-130)  # a whole 224 px tile fits around any point
    normal = ndimage.binary_erosion(normal_slide.tissue_mask, iterations=9)
    assert not region.is_empty and normal.any()
    p = region.representative_point()
    tumor_tile = np.asarray(openslide.OpenSlide(tumor_slide.path).read_region(
        (int(p.x) - 112, int(p.y) - 112), 0, (224, 224)).convert("RGB"))
    r, c = np.argwhere(normal)[len(np.argwhere(normal)) // 2]
    normal_tile = np.asarray(openslide.OpenSlide(normal_slide.path).read_region(
        (int(c * 16) - 112, int(r * 16) - 112), 0, (224, 224)).convert("RGB"))
    tumor_size, tumor_count, tumor_mean = _nucleus_stats(tumor_tile)
    normal_size, normal_count, normal_mean = _nucleus_stats(normal_tile)
    assert tumor_size > 2 * normal_size  # larger nuclei
    assert normal_count > 1.8 * tumor_count  # fewer of them than lymphocytes
    assert np.abs(tumor_mean - normal_mean).max() < 30  # but similar mean colour


def test_dataset_layout_xml_round_trip_and_cli(tmp_path):
    from training.cli import main

    out = tmp_path / "ds"
    assert main(["synth", str(out), "--tumor", "1", "--normal", "2", "--size", "1024x768",
                 "--seed", "4"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["normal_001.tif", "normal_002.tif", "reference.csv", "synth.csv", "tumor_001.tif",
                     "tumor_001.xml"]
    with (out / "synth.csv").open() as f:
        drawn = list(csv.DictReader(f))
    assert [(d["slide"], d["stain"], d["tissue_artefacts"]) for d in drawn] == [
        ("tumor_001", "standard", "0"), ("normal_001", "standard", "0"), ("normal_002", "standard", "0")]
    with (out / "reference.csv").open() as f:
        assert list(csv.DictReader(f)) == [{"slide": "tumor_001", "label": "tumor"},
                                           {"slide": "normal_001", "label": "normal"},
                                           {"slide": "normal_002", "label": "normal"}]
    slide = openslide.OpenSlide(out / "tumor_001.tif")
    assert slide.dimensions == (1024, 768)
    # The XML written beside the slide reads back as the truth of the same seed.
    truth = make_dataset(tmp_path / "again", 1, 0, (1024, 768), seed=4)["tumor_001"]
    ann = read_asap_xml(out / "tumor_001.xml")
    assert ann.region.symmetric_difference(truth.region).area < 1e-3 * truth.region.area
    assert len(ann.exclusion_polygons) == len(truth.exclusion_polygons)


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    from training.cli import main

    with pytest.raises(SystemExit):
        main(["synth", str(tmp_path), "--size", "big"])
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
    assert main(["synth", str(tmp_path), "--tumor", "0", "--normal", "0"]) == 1
    with pytest.raises(MilroiError, match="too small"):
        write_synthetic_slide(tmp_path / "x.tif", 100, 100, seed=0)


def test_deterministic_per_seed(tmp_path):
    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    a = write_synthetic_slide(tmp_path / "a.tif", 1024, 1024, seed=9)
    b = write_synthetic_slide(tmp_path / "b.tif", 1024, 1024, seed=9)
    c = write_synthetic_slide(tmp_path / "c.tif", 1024, 1024, seed=10)
    assert digest(a.path) == digest(b.path) != digest(c.path)
    assert a.region.equals(b.region) and not a.region.equals(c.region)


def test_camelyon_layout_slide(camelyon_layout_slide):
    """write_camelyon_size_slide at 4096 x 8192: a real pyramid, tissue where the plan says, tumour
    tiles that are tumour texture. (Full size, 98304 x 196608, is measured in the report.)"""
    from wsi.slide import open_slide
    from wsi.tissue import compute_tissue_mask

    truth = camelyon_layout_slide
    slide = openslide.OpenSlide(truth.path)
    assert slide.dimensions == (4096, 8192) and slide.level_count == truth.level_count == 5
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.243)
    for level, (w, h) in enumerate(slide.level_dimensions):  # every level readable, same layout
        thumb = np.asarray(slide.read_region((0, 0), level, (w, h)).convert("RGB"))
        assert thumb.shape == (h, w, 3)
    with open_slide(truth.path) as s:
        tissue = compute_tissue_mask(s)
    rows = np.minimum((np.arange(tissue.mask.shape[0]) + 0.5) * tissue.downsample // 256,
                      truth.tissue_mask.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(tissue.mask.shape[1]) + 0.5) * tissue.downsample // 256,
                      truth.tissue_mask.shape[1] - 1).astype(int)
    assert _dice(tissue.mask, truth.tissue_mask[rows[:, None], cols[None, :]]) > 0.9
    inside = truth.region.buffer(-64)
    assert not inside.is_empty
    p = inside.representative_point()
    tile = np.asarray(slide.read_region((int(p.x) - 64, int(p.y) - 64), 0, (128, 128)).convert("RGB"))
    glass = np.asarray(slide.read_region((0, 0), 0, (128, 128)).convert("RGB"))
    assert glass.min() > 220 and tile.mean() < 200


def test_camelyon_layout_rejects_odd_sizes(tmp_path):
    from wsi.synth import write_camelyon_size_slide

    with pytest.raises(MilroiError, match="multiples of 256"):
        write_camelyon_size_slide(tmp_path / "x.tif", 5000, 8192)


def test_hard_dataset_stains_artefacts_and_micro_metastases(tmp_path):
    """`synth --hard`: each slide its own stain, ink and blur across the tissue, micro-metastases
    only on every other tumour slide; the tissue mask still finds every slide's tissue."""
    from training.cli import main
    from wsi.slide import open_slide
    from wsi.tissue import compute_tissue_mask

    out = tmp_path / "hard"
    assert main(["synth", str(out), "--tumor", "2", "--normal", "2", "--size", "2048x2048",
                 "--seed", "5", "--hard"]) == 0
    with (out / "synth.csv").open() as f:
        drawn = {d["slide"]: d for d in csv.DictReader(f)}
    assert {d["tissue_artefacts"] for d in drawn.values()} == {"1"}
    assert len({d["eosin"] for d in drawn.values()}) == 4           # a stain per slide
    assert drawn["tumor_001"]["lesions"] == "micro" and drawn["tumor_002"]["lesions"] == "mixed"
    micro = read_asap_xml(out / "tumor_001.xml").region.area
    tile_area = 224 * 224
    assert 0 < micro <= 2 * 5 * tile_area        # one or two lesions of 1-5 tiles each
    assert read_asap_xml(out / "tumor_002.xml").region.area > 6 * tile_area
    for name in drawn:
        with open_slide(out / f"{name}.tif") as slide:
            tissue = compute_tissue_mask(slide)
        assert tissue.tissue_fraction > 0.1, name   # never an empty mask
