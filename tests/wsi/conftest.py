"""Fixtures of the slide-core tests; the slide writers live in wsi_slides.py."""
from __future__ import annotations

import numpy as np
import pytest
from wsi_slides import synthetic_he, write_pyramid_tiff


@pytest.fixture(scope="session")
def he_image():
    """A 3072 x 4096 synthetic H&E image and its true tissue mask (level 0)."""
    return synthetic_he(3072, 4096, seed=7)


@pytest.fixture(scope="session")
def he_tiff(tmp_path_factory, he_image):
    """The synthetic H&E image as a 4-level JPEG generic TIFF at 0.243 um/px."""
    return write_pyramid_tiff(tmp_path_factory.mktemp("he") / "he_slide.tif", he_image[0], levels=4)


@pytest.fixture(scope="session")
def lossless_tiff(tmp_path_factory):
    """A 1000 x 1300 random-pattern slide, zlib tiles (pixels read back exactly), 3 levels."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (1000, 1300, 3), dtype=np.uint8)
    path = write_pyramid_tiff(tmp_path_factory.mktemp("lossless") / "lossless.tif", rgb,
                              levels=3, compression="zlib")
    return path, rgb
