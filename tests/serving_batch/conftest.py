"""Fixtures of the client and batch-scoring tests.

Real parts only: a real model bundle (training.export.export_bundle: ResNet-50 layer3 under a
fixed seed, no weights download, and a CHOWDER head), small synthetic pyramidal slides written by
wsi.synth, the real broken.svs of tests/data, and `milroi-serve serve` as a real subprocess.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from serving_batch_helpers import ServerProcess
from slide_testing import write_blank_slide

DATA = Path(__file__).resolve().parents[1] / "data"
# Small slides: a few dozen tiles each, so a whole folder scores in seconds on two CPU cores.
SLIDE_SIZE = (1344, 1120)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    from bundle_testing import export_test_bundle

    return export_test_bundle(tmp_path_factory.mktemp("bundle") / "chowder", "batch-test")


@pytest.fixture(scope="session")
def slides_dir(tmp_path_factory) -> Path:
    """A folder as users have them: slides in subfolders, a broken slide, a file that is not one.

        synth_normal.tif    wsi.synth, no tumour
        sub/synth_tumor.tif wsi.synth, with tumour
        blank.tif           white glass only: no tissue tile
        broken.svs          tests/data: an SVS whose tile data is corrupt
        notes.txt           not a slide: skipped
    """
    from wsi.synth import write_synthetic_slide

    root = tmp_path_factory.mktemp("slides")
    (root / "sub").mkdir()
    write_synthetic_slide(root / "synth_normal.tif", *SLIDE_SIZE, seed=1, tumor=False)
    write_synthetic_slide(root / "sub" / "synth_tumor.tif", *SLIDE_SIZE, seed=2, tumor=True)
    write_blank_slide(root / "blank.tif", 1024, 768)
    shutil.copy(DATA / "broken.svs", root / "broken.svs")
    (root / "notes.txt").write_text("not a slide\n")
    return root


@pytest.fixture(scope="session")
def big_slide_root(tmp_path_factory) -> Path:
    """A second slide root holding big.tif, a slide of a few hundred tiles (seconds to score)."""
    from wsi.synth import write_synthetic_slide

    root = tmp_path_factory.mktemp("big")
    write_synthetic_slide(root / "big.tif", 4480, 4480, seed=3, tumor=True)
    return root


@pytest.fixture(scope="session")
def server(tmp_path_factory, bundle, slides_dir, big_slide_root):
    """A running server; slide roots: the test slide folder, then big_slide_root."""
    srv = ServerProcess(bundle, [slides_dir, big_slide_root],
                        tmp_path_factory.mktemp("server") / "server.log")
    srv.wait_serving()
    yield srv
    srv.stop()
