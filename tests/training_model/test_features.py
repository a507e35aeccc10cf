"""Feature extraction: CLAM h5 layout, coords == the server's grid, resumable, atomic, CLI."""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
from slide_testing import write_blank_slide

from core.errors import MilroiError
from training.cli import main as train_main
from training.extraction import ExtractionOptions, extract_features
from training.feature_file import feature_path

from .conftest import DATA

pytest.importorskip("wsi.grid")  # the slide core's grid and tile reader
pytest.importorskip("wsi.tiles")

ATTRS = ("patch_size", "patch_level", "level0_width", "level0_height", "mpp", "mpp_source",
         "backbone_layer", "weights", "weights_seed", "feature_engine", "slide", "min_tissue")


@pytest.fixture(scope="module")
def layer3_onnx(layer3_backbone):
    from training.onnx_backbone import OnnxBackbone

    # The exactness tests below need the exact runtime; the measured choice is tested apart.
    return OnnxBackbone(layer3_backbone, backend="onnxruntime", precision="fp32")


@pytest.fixture(scope="module")
def grid(synthetic_slide):
    from wsi.grid import tiles_for_slide
    from wsi.slide import open_slide

    with open_slide(synthetic_slide) as slide:
        return tiles_for_slide(slide)[1]


def test_h5_layout_attrs_and_grid(tmp_path, synthetic_slide, layer3_backbone, grid):
    out = tmp_path / "h5_files" / "synth_001.h5"
    summary = extract_features(synthetic_slide, out, layer3_backbone,
                               ExtractionOptions(batch_size=8, workers=2), progress=False)
    assert summary["tiles"] == len(grid.coords) > 4 and not summary["skipped"]
    with h5py.File(out) as f:
        feats, coords = f["features"][:], f["coords"][:]
        assert feats.dtype == np.float32 and feats.shape == (len(grid.coords), 1024)
        assert coords.dtype == np.int64
        np.testing.assert_array_equal(coords, grid.coords)  # the server's grid, grid order
        np.testing.assert_array_equal(f["tissue_fraction"][:], grid.tissue_fraction)
        for where in (f.attrs, f["coords"].attrs):
            assert set(ATTRS) <= set(where)
        assert f.attrs["level0_width"] == 1792 and f.attrs["level0_height"] == 1344
        assert f.attrs["mpp"] == pytest.approx(0.243) and f.attrs["mpp_source"] == "metadata"
        assert f.attrs["backbone_layer"] == "layer3" and f.attrs["weights"] == "none"
        assert f.attrs["feature_engine"] == "torch"
        assert f.attrs["slide"] == "synth_001" and f.attrs["patch_size"] == 224
    # the stored features are the model's features of those exact tiles
    from wsi.slide import open_slide

    with open_slide(synthetic_slide) as slide:
        picks = [0, len(coords) - 1]
        tiles = np.stack([slide.read_region(int(x), int(y), 224, 224) for x, y in coords[picks]])
    with torch.inference_mode():
        ref = layer3_backbone(torch.from_numpy(tiles)).numpy()
    np.testing.assert_allclose(feats[picks], ref, rtol=1e-5, atol=1e-5)


def test_onnxruntime_engine_writes_the_torch_features(tmp_path, synthetic_slide, layer3_backbone,
                                                      layer3_onnx, grid):
    """The CPU default: the exported graph in onnxruntime gives torch's features of the very
    same tiles to the export's parity tolerance, in the same layout."""
    from training.export import FEATURE_ATOL

    assert layer3_onnx.parity <= FEATURE_ATOL
    by_engine = {}
    for name, model in (("onnxruntime", layer3_onnx), ("torch", layer3_backbone)):
        out = tmp_path / name / "h5_files" / "synth_001.h5"
        extract_features(synthetic_slide, out, model, ExtractionOptions(batch_size=8, workers=2),
                         progress=False)
        with h5py.File(out) as f:
            assert f.attrs["feature_engine"] == f["coords"].attrs["feature_engine"] == name
            by_engine[name] = (f["features"][:], f["coords"][:])
    (ort_feats, ort_coords), (torch_feats, torch_coords) = (by_engine["onnxruntime"],
                                                            by_engine["torch"])
    np.testing.assert_array_equal(ort_coords, grid.coords)
    np.testing.assert_array_equal(ort_coords, torch_coords)
    assert ort_feats.shape == torch_feats.shape == (len(grid.coords), 1024)
    assert np.abs(ort_feats - torch_feats).max() <= FEATURE_ATOL
    assert np.abs(torch_feats).max() > 100 * FEATURE_ATOL  # not a comparison of zeros


def test_features_run_on_the_measured_backend(tmp_path, synthetic_slide, layer3_backbone,
                                              monkeypatch):
    """Default --backend auto --precision auto: the features come from the backend the server
    would choose (timed, gated), and the h5 says which one made them."""
    from core.inference_backends import MIN_COSINE
    from training.onnx_backbone import OnnxBackbone

    monkeypatch.setenv("MILROI_CACHE_DIR", str(tmp_path / "cache"))
    model = OnnxBackbone(layer3_backbone)
    assert (tmp_path / "cache" / "backend_choice.json").exists()   # it was measured
    out = tmp_path / "h5_files" / "synth_001.h5"
    extract_features(synthetic_slide, out, model, ExtractionOptions(batch_size=8, workers=2,
                                                                    limit_tiles=8), progress=False)
    with h5py.File(out) as f:
        engine, feats, coords = f.attrs["feature_engine"], f["features"][:], f["coords"][:]
    assert engine == (model.backend if model.precision == "fp32"
                      else f"{model.backend} {model.precision}")
    from wsi.slide import open_slide

    with open_slide(synthetic_slide) as slide:
        tiles = np.stack([slide.read_region(int(x), int(y), 224, 224) for x, y in coords])
    with torch.inference_mode():
        ref = layer3_backbone(torch.from_numpy(tiles)).numpy()
    cosine = (feats * ref).sum(1) / (np.linalg.norm(feats, axis=1) * np.linalg.norm(ref, axis=1))
    assert cosine.min() >= MIN_COSINE


def test_build_feature_model_engines(layer3_backbone):
    from training.extraction import build_feature_model

    model = build_feature_model("none", "resnet50-trunc", 0, torch.device("cpu"), "torch")
    assert model.describe()["feature_engine"] == "torch"
    for a, b in zip(model.state_dict().values(), layer3_backbone.state_dict().values()):
        assert torch.equal(a, b)  # the same seeded network whichever engine runs it
    with pytest.raises(MilroiError, match="unknown feature engine 'tensorrt'"):
        build_feature_model("none", "resnet50-trunc", 0, torch.device("cpu"), "tensorrt")
    with pytest.raises(MilroiError, match="--threads must be at least 1"):
        build_feature_model("none", "resnet50-trunc", 0, torch.device("cpu"), "onnxruntime", threads=0)
    with pytest.raises(MilroiError, match="onnxruntime runs on the CPU"):
        build_feature_model("none", "resnet50-trunc", 0, torch.device("cuda"), "onnxruntime")


class _Exploding(torch.nn.Module):
    """The real backbone, killed (KeyboardInterrupt) on its second batch."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.calls = backbone, 0
        self.feature_dim, self.spec = backbone.feature_dim, backbone.spec
        self.describe = backbone.describe

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return self.backbone(x)


def test_interrupted_write_leaves_no_h5_and_rerun_resumes(tmp_path, synthetic_slide,
                                                          layer3_backbone):
    out = tmp_path / "h5_files" / "synth_001.h5"
    with pytest.raises(KeyboardInterrupt):
        extract_features(synthetic_slide, out, _Exploding(layer3_backbone),
                         ExtractionOptions(batch_size=4, workers=1, limit_tiles=12), progress=False)
    assert list(out.parent.iterdir()) == []  # neither the .h5 nor its partial file
    first = extract_features(synthetic_slide, out, layer3_backbone,
                             ExtractionOptions(batch_size=4, workers=1, limit_tiles=12),
                             progress=False)
    assert first["tiles"] == 12 and out.is_file()
    stamp = out.stat().st_mtime_ns
    second = extract_features(synthetic_slide, out, layer3_backbone, progress=False)
    assert second["skipped"] and out.stat().st_mtime_ns == stamp


def test_cli_walks_folder_skips_non_slides_reports_corrupt(tmp_path, synthetic_slide, caplog):
    slides = tmp_path / "slides"
    (slides / "sub").mkdir(parents=True)
    shutil.copy(synthetic_slide, slides / "sub" / "a_slide.tif")
    shutil.copy(DATA / "broken.svs", slides / "broken.svs")
    (slides / "notes.txt").write_text("not a slide")
    out = tmp_path / "features"
    argv = ["features", str(slides), "--out", str(out), "--weights", "none", "--layer",
            "layer3", "--limit-tiles", "3", "--batch-size", "3", "--workers", "1",
            "--no-progress"]
    with caplog.at_level("INFO"):
        code = train_main(argv)
    assert code == 1  # broken.svs failed, reported, the others done
    assert "notes.txt" in caplog.text and "broken.svs" in caplog.text
    done = feature_path(out, "a_slide")
    assert done.is_file() and sorted(p.name for p in (out / "h5_files").iterdir()) == ["a_slide.h5"]
    with h5py.File(done) as f:
        assert f["features"].shape == (3, 1024)
        # The default on a CPU: the ONNX graph on the measured backend (onnxruntime or OpenVINO).
        assert f.attrs["feature_engine"].split()[0] in ("onnxruntime", "openvino")
    caplog.clear()
    with caplog.at_level("INFO"):
        assert train_main(argv) == 1
    assert "already" in caplog.text


def test_a_slide_without_tissue_is_recorded_and_the_folder_goes_on(tmp_path, synthetic_slide,
                                                                   caplog):
    """A 0-tile slide once crashed the run in h5py ("Chunk shape must not be greater than data
    shape") and the slides after it were never done. Now it is a features file of 0 tiles, a
    warning names it no_tissue, and the next slide is extracted."""
    slides = tmp_path / "slides"
    slides.mkdir()
    write_blank_slide(slides / "a_glass.tif")           # sorted first: the others come after
    shutil.copy(synthetic_slide, slides / "b_slide.tif")
    out = tmp_path / "features"
    with caplog.at_level("INFO"):
        assert train_main(["features", str(slides), "--out", str(out), "--weights", "none",
                           "--layer", "layer3", "--limit-tiles", "3", "--workers", "1",
                           "--no-progress"]) == 0
    assert "a_glass: no tissue tile" in caplog.text and "no_tissue" in caplog.text
    with h5py.File(feature_path(out, "a_glass")) as f:
        assert f["features"].shape == (0, 1024) and f["coords"].shape == (0, 2)
        assert f.attrs["slide"] == "a_glass"
    with h5py.File(feature_path(out, "b_slide")) as f:
        assert f["features"].shape == (3, 1024)
    from training.feature_file import load_bag

    assert load_bag(feature_path(out, "a_glass")).no_tissue


def test_artefact_measures_are_recorded_and_flagged_tiles_left_out_of_the_bag(tmp_path,
                                                                              layer3_onnx):
    """A slide with pen, marker and blur across its tissue: the h5 holds the measures and flags
    of every tile; the bag training reads has the clean tiles only, and counts the others."""
    from training.feature_file import load_bag
    from wsi.synth import write_synthetic_slide
    from wsi.tile_quality import artefact_flags, measure_tiles

    truth = write_synthetic_slide(tmp_path / "inked.tif", 3072, 3072, seed=21, tissue_artefacts=True)
    out = feature_path(tmp_path, "inked")
    summary = extract_features(truth.path, out, layer3_onnx, ExtractionOptions(batch_size=16),
                               progress=False)
    with h5py.File(out) as f:
        coords, flags = f["coords"][:], f["artefact_flags"][:]
        quality = {k: f[k][:] for k in ("ink_fraction", "background_fraction", "focus")}
        assert f.attrs["max_ink"] == 0.05 and f.attrs["min_focus"] == 15.0
    assert all(len(v) == len(coords) for v in quality.values())
    assert summary["artefacts"] == np.count_nonzero(flags) >= 2
    from wsi.slide import open_slide

    with open_slide(truth.path) as slide:
        tiles = np.stack([slide.read_region(int(x), int(y), 224, 224) for x, y in coords])
    expected = measure_tiles(tiles)
    np.testing.assert_allclose(quality["ink_fraction"], expected.ink)
    np.testing.assert_array_equal(flags, artefact_flags(expected))
    bag = load_bag(out)
    assert bag.artefacts == np.count_nonzero(flags)
    np.testing.assert_array_equal(bag.coords, coords[flags == 0])
    assert len(bag.features) == len(bag.coords)
