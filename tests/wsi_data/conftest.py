"""Fixtures of the annotation / output / synthetic-slide tests: small synthetic slides written
once per session by wsi.synth (fixed seeds), and the real Camelyon16 XML of tests/data."""
from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="session")
def real_xml() -> Path:
    return DATA / "tumor_001.xml"


@pytest.fixture(scope="session")
def tumor_slide(tmp_path_factory):
    """A 2048 x 2048 tumour slide and its SyntheticTruth."""
    from wsi.synth import write_synthetic_slide

    path = tmp_path_factory.mktemp("synth_tumor") / "tumor_slide.tif"
    return write_synthetic_slide(path, 2048, 2048, seed=5, tumor=True)


@pytest.fixture(scope="session")
def normal_slide(tmp_path_factory):
    from wsi.synth import write_synthetic_slide

    path = tmp_path_factory.mktemp("synth_normal") / "normal_slide.tif"
    return write_synthetic_slide(path, 2048, 1536, seed=6, tumor=False)


@pytest.fixture(scope="session")
def camelyon_layout_slide(tmp_path_factory):
    """write_camelyon_size_slide at a test size (4096 x 8192) instead of 98304 x 196608."""
    from wsi.synth import write_camelyon_size_slide

    path = tmp_path_factory.mktemp("camelyon_size") / "big.tif"
    return write_camelyon_size_slide(path, 4096, 8192, seed=1)
