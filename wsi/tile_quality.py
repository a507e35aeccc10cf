"""Per-tile artefact measures, computed on the level-0 tiles that are read for scoring anyway.

The tissue mask (wsi.tissue) works at ~1.25x: it drops pen *pixels* there, but a 224 px tile
crossed by a pen stroke, half glass, or out of focus still passes the grid's tissue-fraction
test and gets scored, and such tiles are what a MIL head latches onto (a blue stroke across
tissue scored 1.000 on a normal slide). So each tile is measured at full resolution:

- `ink`: share of the tile under solid ink. A pixel is ink when it is black (V <=
  black_value_max) or blue/green pen (green >= red with saturation >= pen_min_saturation:
  haematoxylin and eosin both absorb green more than red, so stained tissue is not greener
  than red, pen is), the rules of the mask. Dark nuclei and their JPEG fringes pass those rules
  too, scattered (up to 10 % of the pixels of CMU-1's tiles, which carry no ink); a pen stroke
  or a marker blot is solid over hundreds of px. So the share counts 8 x 8 px blocks that are
  at least 3/4 ink and that belong to a 3 x 3 group of such blocks (a morphological opening:
  solid over >= 24 px): 0 on every tile of CMU-1 and TCGA-CR-7395, ~0.25 on a tile half
  crossed by a stroke;
- `background`: share of pixels that are glass: optical density of the darkest channel under
  `min_optical_density` and no colour (chroma under `min_chroma`), the same rules as the mask's
  optical-density cue, so pale tissue is not called glass;
- `focus`: variance of the Laplacian of the grey image (Pech-Pacheco et al. 2000, the usual
  blur measure, as in HistoQC's BlurDetectionModule), computed on the tissue pixels only.

`artefact_flags` turns the measures into a bit mask with `ArtefactParams`' limits. A flagged tile
is still scored and reported (the patch CSV, the GeoJSON and the stream carry the flags) but it
is kept out of the slide score, the ROIs and training.

Cost: a batch of 64 tiles (3.2 M px) takes a few ms of numpy against ~2 s of ResNet-50 on CPU
(benchmarks/bench_tile_quality.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from core.tiling import ArtefactParams, TissueParams

INK, BACKGROUND, BLUR = 1, 2, 4   # bits of the `flags` column
FLAG_NAMES = {INK: "ink", BACKGROUND: "background", BLUR: "blur"}


@dataclass
class TileQuality:
    """Measures of n tiles, in the order of the tiles given."""

    ink: np.ndarray          # float32 [n] share of ink pixels
    background: np.ndarray   # float32 [n] share of glass pixels
    focus: np.ndarray        # float32 [n] variance of the Laplacian on tissue pixels (grey 0..255)

    def __len__(self) -> int:
        return len(self.ink)

    @classmethod
    def empty(cls, n: int = 0) -> TileQuality:
        return cls(np.zeros(n, np.float32), np.zeros(n, np.float32), np.full(n, np.nan, np.float32))

    @classmethod
    def concatenate(cls, parts: list[TileQuality]) -> TileQuality:
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, name) for p in parts])
                     for name in ("ink", "background", "focus")))


# OD 0.05 of the darkest channel is an intensity of 255 * 10**-0.05 = 227.
def _glass_min_intensity(params: TissueParams) -> int:
    return int(np.floor(255 * 10 ** (-params.min_optical_density)))


INK_BLOCK = 8          # px: side of the blocks the ink share counts
INK_BLOCK_SHARE = 0.75  # a block is ink when this share of its pixels is


def solid_share(pixels: np.ndarray) -> np.ndarray:
    """Per tile [n, h, w], the share of its area in INK_BLOCK px blocks that are >= INK_BLOCK_SHARE
    set and part of a 3 x 3 group of such blocks (scattered pixels do not count)."""
    n, h, w = pixels.shape
    k = INK_BLOCK
    rows, cols = h // k, w // k
    if rows < 3 or cols < 3:   # tiles too small for blocks: the plain pixel share
        return pixels.reshape(n, -1).mean(axis=1)
    counts = pixels[:, :rows * k, :cols * k].reshape(n, rows, k, cols, k).sum(axis=(2, 4))
    solid = counts >= INK_BLOCK_SHARE * k * k
    solid = ndimage.binary_opening(solid, structure=np.ones((1, 3, 3), bool))
    return solid.reshape(n, -1).sum(axis=1) * (k * k) / (h * w)


def measure_tiles(tiles: np.ndarray, params: TissueParams = TissueParams()) -> TileQuality:
    """Ink and background shares and focus of RGB uint8 tiles [n, h, w, 3]."""
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be uint8 [n, h, w, 3], got {tiles.dtype} {tiles.shape}")
    n = len(tiles)
    if n == 0:
        return TileQuality.empty()
    red, green, blue = (tiles[..., i] for i in range(3))
    value = np.maximum(np.maximum(red, green), blue)
    darkest = np.minimum(np.minimum(red, green), blue)
    chroma = value - darkest
    # Pen: green >= red and saturation (chroma / value) >= pen_min_saturation / 255, in integers.
    pen = green >= red
    pen &= chroma.astype(np.uint16) * 255 >= value.astype(np.uint16) * params.pen_min_saturation
    pen &= chroma > 0
    if params.pen_green_minus_red > 0:
        pen &= (green - red) >= params.pen_green_minus_red
    ink = pen | (value <= params.black_value_max)
    glass = (darkest >= _glass_min_intensity(params)) & (chroma < params.min_chroma)
    area = tiles.shape[1] * tiles.shape[2]
    ink_share = solid_share(ink)
    glass_share = glass.reshape(n, -1).sum(axis=1) / area

    # Laplacian (4-neighbour) of the luma, on interior pixels whose 3x3 neighbourhood is tissue
    # (no glass, no ink): glass is flat and would make any tile look blurred; an ink edge would
    # make any tile look sharp.
    grey = (0.299 * red + 0.587 * green + 0.114 * blue).astype(np.float32)
    lap = (grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1] + grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:]
           - 4 * grey[:, 1:-1, 1:-1])
    other = glass | ink
    near_other = (other[:, :-2, 1:-1] | other[:, 2:, 1:-1] | other[:, 1:-1, :-2] | other[:, 1:-1, 2:]
                  | other[:, 1:-1, 1:-1])
    use = ~near_other
    count = use.reshape(n, -1).sum(axis=1)
    lap = np.where(use, lap, 0.0).reshape(n, -1)
    total = lap.sum(axis=1, dtype=np.float64)
    squares = np.einsum("ij,ij->i", lap, lap, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        focus = np.where(count >= 64, squares / count - mean * mean, np.nan)
    return TileQuality(ink_share.astype(np.float32), glass_share.astype(np.float32), focus.astype(np.float32))


def artefact_flags(quality: TileQuality, params: ArtefactParams = ArtefactParams()) -> np.ndarray:
    """uint8 [n] bit mask: INK where ink > max_ink, BACKGROUND where background > max_background,
    BLUR where focus < min_focus (a tile with too few tissue pixels to measure is not BLUR: it is
    BACKGROUND or INK already)."""
    flags = np.zeros(len(quality), np.uint8)
    flags[quality.ink > params.max_ink] |= INK
    flags[quality.background > params.max_background] |= BACKGROUND
    with np.errstate(invalid="ignore"):
        flags[quality.focus < params.min_focus] |= BLUR
    return flags


def flags_from_names(names: str) -> int:
    """The bits of a `flag_names` text ("ink+blur" -> 5; "" -> 0)."""
    bits = {name: bit for bit, name in FLAG_NAMES.items()}
    return sum(bits[name] for name in names.split("+") if name)


def flag_names(flags: int) -> str:
    """'ink+blur' for a flags value ('' when 0): the text of the CSV and GeoJSON columns."""
    return "+".join(name for bit, name in FLAG_NAMES.items() if flags & bit)
