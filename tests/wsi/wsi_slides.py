"""Small slides for the slide-core tests, written with tifffile (imported by conftest and tests).

`write_pyramid_tiff` writes what OpenSlide opens as "generic-tiff" (the Camelyon16 format):
256 x 256 tiles, JPEG (or lossless zlib when a test compares pixels exactly), each pyramid
level a successive top-level IFD at half the size of the previous one, resolution tags for the
pixel size. `synthetic_he` paints an H&E-like picture whose true tissue mask is known, with the
artefacts the mask must ignore: grey scanner-stitching tiles, blue and green pen, black marker.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

DATA = Path(__file__).resolve().parents[1] / "data"
CMU_SMALL = DATA / "CMU-1-Small-Region.svs"
TCGA_JP2K = DATA / "TCGA-CR-7395-01A-01-TS1.svs"
BROKEN_SVS = DATA / "broken.svs"


def write_pyramid_tiff(path, rgb: np.ndarray, mpp: float | None = 0.243, levels: int = 3,
                       tile: int = 256, compression: str = "jpeg") -> Path:
    """Pyramidal tiled TIFF of `rgb`; `mpp=None` writes no physical resolution unit."""
    with tifffile.TiffWriter(path) as tw:
        image = rgb
        for level in range(levels):
            if mpp is None:
                resolution = {"resolution": (1, 1), "resolutionunit": "NONE"}
            else:
                px_per_cm = 1e4 / (mpp * 2**level)
                resolution = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(image, tile=(tile, tile), compression=compression, photometric="rgb",
                     subfiletype=0 if level == 0 else 1, **resolution)
            image = np.asarray(Image.fromarray(image).reduce(2))
    return Path(path)


def _smooth_noise(rng, shape, cell):
    """Low-frequency noise in [0, 1]: random values on a coarse grid, bilinearly enlarged."""
    coarse = rng.random((shape[0] // cell + 2, shape[1] // cell + 2)).astype(np.float32)
    big = Image.fromarray(coarse).resize((coarse.shape[1] * cell, coarse.shape[0] * cell),
                                         Image.Resampling.BILINEAR)
    return np.asarray(big)[: shape[0], : shape[1]]


def synthetic_he(height: int, width: int, seed: int = 0, pen: bool = True, grey: bool = True,
                 black: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(rgb uint8 [h, w, 3], true tissue mask bool [h, w]) of an H&E-like level-0 image.

    Tissue: a few ellipses textured between eosin pink and haematoxylin purple, some of it pale.
    The truth is the tissue minus the ink painted over it; glass, grey stitching tiles, pen and
    marker are not tissue.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    tissue = np.zeros((height, width), dtype=bool)
    for _ in range(3):
        cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(0.12, 0.22) * height, rng.uniform(0.1, 0.2) * width
        tissue |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    glass = np.array([243, 241, 245], np.float32)
    eosin = np.array([232, 150, 190], np.float32)
    haematoxylin = np.array([125, 80, 160], np.float32)
    pale = np.array([238, 205, 225], np.float32)
    mix = _smooth_noise(rng, (height, width), 24)[..., None]
    paleness = (_smooth_noise(rng, (height, width), 64) > 0.75)[..., None]
    stain = np.where(paleness, pale, eosin * (1 - mix) + haematoxylin * mix)
    rgb = np.where(tissue[..., None], stain, glass)
    if grey:   # scanner stitching: flat grey rectangles on the glass, darker than it
        for x0, y0 in ((0, 0), (width - width // 6, height - height // 5)):
            block = np.zeros((height, width), dtype=bool)
            block[y0:y0 + height // 5, x0:x0 + width // 6] = True
            rgb[block & ~tissue] = (196, 196, 196)
    ink = np.zeros((height, width), dtype=bool)
    if pen:    # a blue stroke across tissue and glass, a green one on glass
        ink_blue = np.abs((yy - 0.35 * height) - 0.3 * (xx - 0.1 * width)) < 0.012 * height
        ink_blue &= (xx > 0.1 * width) & (xx < 0.9 * width)
        ink_green = (np.abs(xx - 0.93 * width) < 0.01 * width) & (yy > 0.2 * height) & (yy < 0.8 * height)
        rgb[ink_blue] = (40, 70, 170)
        rgb[ink_green] = (60, 150, 80)
        ink |= ink_blue | ink_green
    if black:  # a marker dot at the edge of the tissue
        dot = (yy - 0.5 * height) ** 2 + (xx - 0.5 * width) ** 2 <= (0.03 * min(height, width)) ** 2
        rgb[dot] = (22, 20, 24)
        ink |= dot
    rgb = rgb + rng.normal(0, 3, rgb.shape).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8), tissue & ~ink


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)
