"""`milroi-train features --ray`: the local run's h5 files, failures, resumability and a worker
killed mid-slide, on a real local Ray cluster."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from ray_test_helpers import crashing

from core.ray_cluster import RayOptions
from training.cli import main as train_main
from training.extraction import ExtractionOptions, FeatureModelOptions
from training.features import configure_parser
from training.ray_features import FeatureActor, extract_on_ray
from wsi.discovery import find_slides

pytestmark = pytest.mark.slow

OK_SLIDES = ["synth_normal", "synth_tumor"]


def features(slides_dir, out, *extra) -> int:
    return train_main(["features", str(slides_dir), "--out", str(out), "--weights", "none",
                       "--layer", "layer3", "--workers", "2", "--no-progress", *map(str, extra)])


def read_h5(path) -> tuple[dict, dict]:
    with h5py.File(path) as f:
        return ({k: f[k][()] for k in f},
                {**dict(f.attrs), **{f"coords.{k}": v for k, v in f["coords"].attrs.items()}})


def assert_same_h5(a, b) -> None:
    (data_a, attrs_a), (data_b, attrs_b) = read_h5(a), read_h5(b)
    assert attrs_a == attrs_b
    assert data_a.keys() == data_b.keys() == {"coords", "features", "tissue_fraction", "ink_fraction",
                                              "background_fraction", "focus", "artefact_flags"}
    for name in data_a:   # NaN focus (a tile with no tissue pixel to measure) equals NaN
        np.testing.assert_array_equal(data_a[name], data_b[name], err_msg=name)


@pytest.fixture(scope="module")
def local_features(tmp_path_factory, slides_dir):
    """The plain run, with one onnxruntime thread as each 1-CPU actor has: the float sums of a
    convolution may depend on how the work is split over threads."""
    out = tmp_path_factory.mktemp("flocal")
    assert features(slides_dir, out, "--threads", "1") == 1  # broken.svs failed
    return out


@pytest.fixture(scope="module")
def ray_features(tmp_path_factory, ray_cluster, slides_dir):
    out = tmp_path_factory.mktemp("fray")
    assert features(slides_dir, out, "--ray", "auto", "--ray-actors", "2") == 1
    return out


def test_ray_features_equal_the_local_run(local_features, ray_features):
    names = sorted(p.stem for p in (ray_features / "h5_files").iterdir())
    assert names == OK_SLIDES  # no h5, no leftover partial file for broken.svs
    for name in OK_SLIDES:
        assert_same_h5(ray_features / "h5_files" / f"{name}.h5",
                       local_features / "h5_files" / f"{name}.h5")
        with h5py.File(ray_features / "h5_files" / f"{name}.h5") as f:
            assert f["features"].shape[0] > 0 and np.isfinite(f["features"][()]).all()


def test_rerun_skips_finished_slides(ray_cluster, slides_dir, ray_features, caplog):
    before = {p: p.stat().st_mtime_ns for p in ray_features.rglob("*")}
    with caplog.at_level("INFO", logger="training.ray_features"):
        assert features(slides_dir, ray_features, "--ray", "auto") == 1  # broken again
    assert {p: p.stat().st_mtime_ns for p in ray_features.rglob("*")} == before
    assert "0 slides written, 2 already done, 1 failed" in caplog.text


def _run_on_ray(slides_dir, out, actor_class, **ray) -> int:
    """extract_on_ray with the options the command line would give (`--ray auto`, `ray`)."""
    import argparse

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    argv = [str(slides_dir), "--out", str(out), "--weights", "none", "--layer", "layer3",
            "--workers", "2", "--no-progress", "--ray", "auto"]
    for key, value in ray.items():
        argv += [f"--ray-{key.replace('_', '-')}", str(value)]
    args = parser.parse_args(argv)
    return extract_on_ray(find_slides(slides_dir).slides, out, FeatureModelOptions.from_args(args),
                          ExtractionOptions.from_args(args), RayOptions.from_args(args),
                          actor_class=actor_class)


def test_worker_killed_mid_slide_is_restarted_and_the_slide_completes(
        ray_cluster, slides_dir, local_features, tmp_path, caplog):
    marker = tmp_path / "crashed"
    actor = crashing(FeatureActor, "extract", "synth_tumor", marker)
    with caplog.at_level("INFO", logger="training.ray_features"):
        code = _run_on_ray(slides_dir, tmp_path / "out", actor, actors=1, max_restarts=1)
    assert code == 1 and marker.exists()
    assert "2 slides written, 0 already done, 1 failed" in caplog.text
    for name in OK_SLIDES:
        assert_same_h5(tmp_path / "out" / "h5_files" / f"{name}.h5",
                       local_features / "h5_files" / f"{name}.h5")


def test_worker_dying_past_its_restarts_fails_only_that_slide(
        ray_cluster, slides_dir, tmp_path, caplog):
    # Slides go in order broken, sub/synth_tumor, synth_normal: the crash is not the last one.
    actor = crashing(FeatureActor, "extract", "synth_tumor", None)
    with caplog.at_level("INFO", logger="training.ray_features"):
        code = _run_on_ray(slides_dir, tmp_path / "out", actor, actors=1, max_restarts=0)
    assert code == 1
    assert "synth_tumor.tif: the Ray worker extracting it died (0 restarts)" in caplog.text
    # broken and synth_tumor failed; the replacement actor still did the slide after them.
    assert "1 slides written, 0 already done, 2 failed" in caplog.text
    assert sorted(p.name for p in (tmp_path / "out" / "h5_files").iterdir()) == [
        "synth_normal.h5"]
