"""Tissue-mask settings travel: set at `features`, they are in the feature files, the fit run, the
bundle's manifest, the mask the server scores with, and the Spatiopath windows.

The setting is a real, visible one: the optical-density cue off and a higher saturation floor
(`--tissue optical_density=false --tissue min_saturation=60`), which drops a few tiles of the
synthetic slides (their pale edges). Every command runs as a user runs it (the CLI mains).
"""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from core.tiling import DEFAULT_TILING, TissueParams
from serving.cli import main as serve_main
from training.cli import main as train_main

pytestmark = pytest.mark.slow   # synth -> features -> fit -> export -> score (a few minutes)

SETTINGS = ["optical_density=false", "min_saturation=60"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("tissue_travel")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    assert train_main(["synth", str(work / "ds"), "--tumor", "4", "--normal", "4",
                       "--size", "1024x1024", "--seed", "1"]) == 0
    tissue = [arg for setting in SETTINGS for arg in ("--tissue", setting)]
    assert train_main(["features", str(work / "ds"), "--out", str(work / "feat"), "--weights",
                       "none", "--layer", "layer3", "--device", "cpu", "--no-progress",
                       *tissue]) == 0
    assert train_main(["fit", str(work / "feat"), "--labels", str(work / "ds" / "reference.csv"),
                       "--folds", "2", "--epochs", "3", "--seed", "0", "--tracking-uri", uri]) == 0
    from core.tracking import mlflow_client

    client = mlflow_client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    [run] = client.search_runs(experiments, filter_string="attributes.status = 'FINISHED'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    run_id = run.info.run_id
    assert train_main(["export", run_id, "--name", "tissue-travel", "--tracking-uri", uri,
                       "--out", str(work / "bundle")]) == 0
    return {"work": work, "uri": uri, "run_id": run_id, "bundle": work / "bundle",
            "expected": TissueParams().with_overrides(SETTINGS)}


def test_features_record_the_setting(trained):
    for h5 in sorted((trained["work"] / "feat" / "h5_files").glob("*.h5")):
        with h5py.File(h5) as f:
            assert TissueParams.from_dict(json.loads(f.attrs["tissue_params"])) == trained["expected"]


def test_the_run_and_the_manifest_carry_it(trained):
    from core.bundle import BundleManifest
    from training.runs import FitRun

    assert FitRun.load(trained["run_id"], trained["uri"]).tissue == trained["expected"]
    assert BundleManifest.read(trained["bundle"]).tissue == trained["expected"]


def test_the_served_mask_is_the_training_mask(trained, tmp_path):
    """The server's pipeline scores exactly the tiles `features` chose, which differ from the
    default mask's; and the Spatiopath windows are cut from that same mask."""
    from results.outputs import read_scored_rois
    from serving.engine import Engine
    from serving.pipeline import SlideScorer
    from wsi.grid import tiles_for_slide
    from wsi.slide import open_slide

    slides = sorted((trained["work"] / "ds").rglob("*.tif"))
    differs = 0
    with Engine(trained["bundle"], provider="cpu", backend="onnxruntime", precision="fp32") as engine:
        scorer = SlideScorer(engine)
        for slide_path in slides:
            served = scorer.score_slide(slide_path)
            with h5py.File(trained["work"] / "feat" / "h5_files" / f"{slide_path.stem}.h5") as f:
                np.testing.assert_array_equal(served.coords, f["coords"][:])
            with open_slide(slide_path) as slide:
                _, default_grid = tiles_for_slide(slide, DEFAULT_TILING)
            differs += len(default_grid) != len(served.coords)
    assert differs >= 2, "the setting changed no slide's tiles: the test would prove nothing"
    out = tmp_path / "scores"
    tumour = next(p for p in slides if "tumor" in p.name)
    serve_main(["score", str(tumour.parent), "--model", str(trained["bundle"]), "--out", str(out),
                "--no-progress", "--backend", "onnxruntime", "--precision", "fp32"])
    scored = read_scored_rois(out / tumour.stem / f"{tumour.stem}_spatiopath.json")
    assert scored.tissue == trained["expected"]


def test_a_bad_setting_is_a_clear_error(capsys):
    assert train_main(["tiles", "x.tif", "--out", "o", "--tissue", "min_saturation"]) == 1
    assert "NAME=VALUE" in capsys.readouterr().err
    with pytest.raises(Exception, match="optical_density takes a bool"):
        TissueParams().with_overrides(["optical_density=maybe"])
    assert train_main(["tiles", "x.tif", "--out", "o", "--tissue", "colour=5"]) == 1
    assert "min_saturation" in capsys.readouterr().err


def test_the_scale_travels_and_feature_files_of_two_scales_never_mix(trained, tmp_path, capsys):
    """`features --mpp 0.486` (a 20x model on these 0.243 um/px slides) reads pyramid level 1 and
    records it; `fit` refuses a folder whose files were tiled at two scales, naming them."""
    import shutil

    from training.feature_file import FeatureAttrs

    feat20 = tmp_path / "feat20"
    assert train_main(["features", str(trained["work"] / "ds"), "--out", str(feat20), "--weights",
                       "none", "--layer", "layer3", "--device", "cpu", "--no-progress",
                       "--mpp", "0.486", "--limit-tiles", "4"]) == 0
    files20 = sorted((feat20 / "h5_files").glob("*.h5"))
    with h5py.File(files20[0]) as f:
        attrs = FeatureAttrs.from_h5(f.attrs, files20[0])
        assert (attrs.tiling.target_mpp, attrs.read_level, attrs.tiling.tile_size) == (0.486, 1, 224)
        assert f["coords"][:].size and (f["coords"][:] % 448 == 0).all()   # 224 px at 2x
    mixed = tmp_path / "mixed" / "h5_files"
    shutil.copytree(trained["work"] / "feat" / "h5_files", mixed)
    shutil.copy(files20[0], mixed / files20[0].name)
    capsys.readouterr()
    assert train_main(["fit", str(mixed.parent), "--labels", str(trained["work"] / "ds" / "reference.csv"),
                       "--folds", "2", "--epochs", "1", "--tracking-uri", trained["uri"]]) == 1
    err = capsys.readouterr().err
    assert "target_mpp" in err and "pixel sizes" in err and files20[0].stem in err
