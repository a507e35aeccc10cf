"""Feature extraction: CLAM h5 layout, coords == the server's grid, resumable, atomic, CLI."""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch

from training.cli import main as train_main
from training.features import extract_features, feature_path

from .conftest import DATA

pytest.importorskip("wsi.grid")  # the slide core's grid and tile reader
pytest.importorskip("wsi.tiles")

ATTRS = ("patch_size", "patch_level", "level0_width", "level0_height", "mpp", "mpp_source",
         "backbone_layer", "weights", "weights_seed", "slide", "min_tissue")


@pytest.fixture(scope="module")
def grid(synthetic_slide):
    from wsi.grid import tiles_for_slide
    from wsi.slide import open_slide

    with open_slide(synthetic_slide) as slide:
        return tiles_for_slide(slide, tile_size=224, min_tissue=0.25)[1]


def test_h5_layout_attrs_and_grid(tmp_path, synthetic_slide, layer3_backbone, grid):
    out = tmp_path / "h5_files" / "synth_001.h5"
    summary = extract_features(synthetic_slide, out, layer3_backbone, batch_size=8, workers=2,
                               progress=False)
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
        assert f.attrs["slide"] == "synth_001" and f.attrs["patch_size"] == 224
    # the stored features are the model's features of those exact tiles
    from wsi.slide import open_slide

    with open_slide(synthetic_slide) as slide:
        picks = [0, len(coords) - 1]
        tiles = np.stack([slide.read_region(int(x), int(y), 224, 224) for x, y in coords[picks]])
    with torch.inference_mode():
        ref = layer3_backbone(torch.from_numpy(tiles)).numpy()
    np.testing.assert_allclose(feats[picks], ref, rtol=1e-5, atol=1e-5)


class _Exploding(torch.nn.Module):
    """The real backbone, killed (KeyboardInterrupt) on its second batch."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.calls = backbone, 0
        self.feature_dim = backbone.feature_dim
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
        extract_features(synthetic_slide, out, _Exploding(layer3_backbone), batch_size=4,
                         workers=1, progress=False, limit_tiles=12)
    assert list(out.parent.iterdir()) == []  # neither the .h5 nor its partial file
    first = extract_features(synthetic_slide, out, layer3_backbone, batch_size=4, workers=1,
                             progress=False, limit_tiles=12)
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
    caplog.clear()
    with caplog.at_level("INFO"):
        assert train_main(argv) == 1
    assert "already" in caplog.text
