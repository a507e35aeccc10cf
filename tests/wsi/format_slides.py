"""Slides in the formats that trip readers up, made by the tests with tifffile.

OME-TIFF pyramids as QuPath and bfconvert write them: the reduced levels are SubIFDs of the
full-resolution image (OpenSlide sees one level) and the pixel size is in the OME-XML
(`PhysicalSizeX/Y` with a unit), not in the resolution tags. `write_sparse_camelyon_ome` writes
a Camelyon16-size one (98304 x 196608 px) in a second or two and about 12 MB: every glass tile
is the same zstd-compressed constant tile, written as pre-encoded bytes; only the tiles of one
small tissue block are encoded.

Sparse TIFFs (`write_sparse_tiff`): tiles left out, which OpenSlide turns into bounds.
"""
from __future__ import annotations

from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from PIL import Image

GLASS = (243, 241, 245)


def stained_tissue(side: int, seed: int = 0) -> np.ndarray:
    """A `side` x `side` RGB block that is tissue everywhere: eosin pink to haematoxylin purple
    in smooth patches (no grain, which would not compress: the file stays small)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((side // 64 + 2, side // 64 + 2)).astype(np.float32)
    mix = np.asarray(Image.fromarray(coarse).resize((coarse.shape[1] * 64, coarse.shape[0] * 64),
                                                    Image.Resampling.BILINEAR))[:side, :side, None]
    eosin, haematoxylin = np.array([232, 150, 190], np.float32), np.array([125, 80, 160], np.float32)
    return np.clip(eosin * (1 - mix) + haematoxylin * mix, 0, 255).astype(np.uint8)


def _ome_metadata(mpp: float | None, unit: str | None) -> dict:
    metadata = {"axes": "YXS"}
    if mpp is not None:
        metadata.update(PhysicalSizeX=mpp, PhysicalSizeY=mpp)
        if unit is not None:
            metadata.update(PhysicalSizeXUnit=unit, PhysicalSizeYUnit=unit)
    return metadata


def _reduce(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).reduce(2))


def write_ome_pyramid(path, rgb: np.ndarray, mpp: float | None = 0.25, unit: str | None = "µm",
                      levels: int = 4, tile: int = 256, compression: str = "zlib") -> Path:
    """An OME-TIFF of `rgb` with `levels` levels (the reduced ones in SubIFDs); `mpp` in `unit`
    (None: no PhysicalSize at all; unit None: the attribute left out, OME's default µm)."""
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(rgb, subifds=levels - 1, tile=(tile, tile), photometric="rgb",
                  compression=compression, metadata=_ome_metadata(mpp, unit))
        image = rgb
        for _ in range(1, levels):
            image = _reduce(image)
            tif.write(image, subfiletype=1, tile=(tile, tile), photometric="rgb",
                      compression=compression)
    return Path(path)


def write_sparse_camelyon_ome(path, tissue_rgb: np.ndarray, origin: tuple[int, int],
                              width: int = 98_304, height: int = 196_608, mpp: float = 0.243,
                              tile: int = 512, min_side: int = 1000) -> Path:
    """A `width` x `height` OME-TIFF pyramid (zstd tiles, SubIFDs) of glass with `tissue_rgb`
    pasted at level-0 `origin` (x, y); levels halve until the shorter side is under `min_side`."""
    n_levels = 1
    while min(width, height) >> n_levels >= min_side:
        n_levels += 1
    glass_tile = np.empty((tile, tile, 3), np.uint8)
    glass_tile[:] = GLASS
    glass_bytes = imagecodecs.zstd_encode(glass_tile.tobytes())
    block, ox, oy = tissue_rgb, origin[0], origin[1]
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        for level in range(n_levels):
            lw, lh = width >> level, height >> level
            rows, cols = -(-lh // tile), -(-lw // tile)
            bx, by = ox >> level, oy >> level
            bh, bw = block.shape[:2]

            def tiles(rows=rows, cols=cols, bx=bx, by=by, bh=bh, bw=bw, block=block):
                for r in range(rows):
                    for c in range(cols):
                        x0, y0 = c * tile, r * tile
                        if x0 >= bx + bw or x0 + tile <= bx or y0 >= by + bh or y0 + tile <= by:
                            yield glass_bytes
                            continue
                        out = glass_tile.copy()
                        sx0, sy0 = max(bx, x0), max(by, y0)
                        sx1, sy1 = min(bx + bw, x0 + tile), min(by + bh, y0 + tile)
                        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = block[sy0 - by:sy1 - by,
                                                                          sx0 - bx:sx1 - bx]
                        yield imagecodecs.zstd_encode(out.tobytes())

            extra = ({"subifds": n_levels - 1, "metadata": _ome_metadata(mpp, "µm")} if level == 0
                     else {"subfiletype": 1})
            tif.write(tiles(), shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile),
                      photometric="rgb", compression="zstd", **extra)
            block = _reduce(block)
    return Path(path)


def write_sparse_tiff(path, tissue_rgb: np.ndarray, origin: tuple[int, int], width: int,
                      height: int, mpp: float = 0.243, tile: int = 256) -> Path:
    """A one-level JPEG-tiled generic TIFF where only the tiles under `tissue_rgb` (pasted at
    level-0 `origin`, tile-aligned) are stored; every other tile has byte count 0. OpenSlide
    (>= 4.0.1) reports the stored tiles' extent as the slide's bounds (`openslide.bounds-*`),
    as for the sparse slides scanners write, and QuPath crops the slide to them."""
    ox, oy = origin
    bh, bw = tissue_rgb.shape[:2]
    if ox % tile or oy % tile or bw % tile or bh % tile:
        raise ValueError("the tissue block must be tile-aligned")

    def tiles():
        for y0 in range(0, height, tile):
            for x0 in range(0, width, tile):
                inside = ox <= x0 < ox + bw and oy <= y0 < oy + bh
                yield (imagecodecs.jpeg_encode(tissue_rgb[y0 - oy:y0 - oy + tile, x0 - ox:x0 - ox + tile],
                                               level=90) if inside else b"")

    px_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path) as tif:
        tif.write(tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile),
                  photometric="rgb", compression="jpeg", resolution=(px_per_cm, px_per_cm),
                  resolutionunit="CENTIMETER")
    return Path(path)
