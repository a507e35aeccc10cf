"""Small slides the test folders share (a module of its own name: test modules cannot import
`conftest` reliably when several test folders have one)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

MPP = 0.243   # um/px written into the resolution tags (Camelyon16 at 40x)


def write_blank_slide(path: Path, width: int = 768, height: int = 640) -> Path:
    """A two-level JPEG-tiled TIFF of empty glass: a slide without a tissue tile."""
    import tifffile

    image = np.full((height, width, 3), 243, np.uint8)
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate((image, image[::2, ::2])):
            tif.write(level, tile=(256, 256), compression="jpeg", photometric="rgb",
                      subfiletype=int(i > 0), resolution=(1e4 / MPP / 2**i,) * 2,
                      resolutionunit="CENTIMETER")
    return path
