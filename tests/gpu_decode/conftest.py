"""Slides of the GPU-decode tests: Camelyon16's layout (512-px YCbCr JPEG tiles, one shared
JPEGTables tag), the same with 256-px tiles, and a slide with odd edges and an absent tile."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
from gpu_slides import ABSENT_TILE
from slide_testing import write_camelyon_layout_slide


@pytest.fixture(scope="session")
def camelyon_512(tmp_path_factory):
    return write_camelyon_layout_slide(tmp_path_factory.mktemp("c512"), 512)


@pytest.fixture(scope="session")
def camelyon_256(tmp_path_factory):
    return write_camelyon_layout_slide(tmp_path_factory.mktemp("c256"), 256)


@pytest.fixture(scope="session")
def edges_absent(tmp_path_factory, camelyon_256):
    """1000 x 900 px (edge tiles cut by the image border), 256-px JPEG tiles, each with its own
    tables (tifffile), tile 5 absent (byte count 0, as scanners leave empty glass)."""
    path = tmp_path_factory.mktemp("edges") / "edges_absent.tif"
    rgb = tifffile.imread(camelyon_256, key=0)[600:1500, 500:1500]
    with tifffile.TiffWriter(path) as tw:
        for level, image in enumerate((rgb, rgb[::2, ::2])):
            tw.write(np.ascontiguousarray(image), tile=(256, 256), compression="jpeg",
                     photometric="rgb", subfiletype=int(level > 0),
                     resolution=(1e4 / (0.243 * 2**level),) * 2, resolutionunit="CENTIMETER")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        counts = list(page.databytecounts)
        counts[ABSENT_TILE] = 0
        page.tags["TileByteCounts"].overwrite(counts)
    return path

