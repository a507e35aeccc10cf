"""Fixtures of the Ray scale-out tests.

Real parts only: a real local Ray cluster (2 CPUs, no dashboard) shared by the session and
shut down at its end, a real model bundle (seeded random ResNet-50 layer3 + CHOWDER exported by
training.export.export_bundle), small synthetic pyramidal slides from wsi.synth and the real
corrupt tests/data/broken.svs.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
# A few dozen tiles per slide: a folder scores in seconds on two shared cores.
SLIDE_SIZE = (1120, 896)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for the whole session; always shut down."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 1024 * 1024)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    from bundle_testing import export_test_bundle

    return export_test_bundle(tmp_path_factory.mktemp("bundle") / "chowder", "ray-test")


@pytest.fixture(scope="session")
def slides_dir(tmp_path_factory) -> Path:
    """synth_normal.tif, sub/synth_tumor.tif (wsi.synth) and broken.svs (corrupt tile data)."""
    from wsi.synth import write_synthetic_slide

    root = tmp_path_factory.mktemp("slides")
    (root / "sub").mkdir()
    write_synthetic_slide(root / "synth_normal.tif", *SLIDE_SIZE, seed=1, tumor=False)
    write_synthetic_slide(root / "sub" / "synth_tumor.tif", *SLIDE_SIZE, seed=2, tumor=True)
    shutil.copy(DATA / "broken.svs", root / "broken.svs")
    return root
