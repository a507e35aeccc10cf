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

Per micron, at any tile pixel size (`mpp`: the model's `target_mpp`). The measures were defined
in pixels at Camelyon16's 0.243 um/px, which stays the reference (`REFERENCE_MPP`): there and
within `MPP_TOLERANCE` of it every number is what it always was, bit for bit, so the flags, the
feature files and the `min_focus` saved in bundles keep their meaning. Elsewhere:
- `ink`: blocks keep their 1.944 um side (8 px at 0.243, 4 at 0.486); the opening stays 3 x 3;
- `background`: a share of pixels, free of the scale already;
- `focus`: the variance of the Laplacian falls with coarser sampling, so it is divided by
  (mpp / 0.243)^FOCUS_EXPONENT. 3.1 was measured where the flag is decided: 205 TCGA-CR-7395
  tiles blurred at 10 strengths (2050 tiles) against the same tiles reduced 2x by Lanczos keep
  99.5 % of their blur flags (97.3 % at 3x, 95.7 % at 4x); the synthetic hard slides keep 99.7 %
  of all flags at 0.486 (951 tiles). Away from the threshold it agrees only in order: sharp
  tissue reads ~0.4x its 0.243 value at 0.486 and ~9 at 4x, so the blur flag is not meant for
  models coarser than ~3x the reference. Tiles finer than the reference are first reduced
  towards it by whole-pixel means. The other way round (a 0.486 reference with `min_focus`
  recalibrated) was not taken: it would change every focus value and saved limit so far.

`artefact_flags` turns the measures into a bit mask with `ArtefactParams`' limits. A flagged tile
is still scored and reported (the patch CSV, the GeoJSON and the stream carry the flags) but it
is kept out of the slide score, the ROIs and training.

Cost: a batch of 64 tiles of 224 px (3.2 M px) takes ~40 ms of numpy on 2 shared AMD EPYC cores
(70 ms before the tiles were measured a few at a time), at any `mpp`, against ~2.7 s of ResNet-50
on the same CPU (benchmarks/bench_tile_quality.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from core.tiling import CAMELYON16_MPP, MPP_TOLERANCE, ArtefactParams, TissueParams

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


REFERENCE_MPP = CAMELYON16_MPP   # um/px the measures and ArtefactParams' limits are defined at
INK_BLOCK = 8          # px at REFERENCE_MPP: side of the blocks the ink share counts
INK_BLOCK_UM = INK_BLOCK * REFERENCE_MPP   # 1.944 um
INK_BLOCK_SHARE = 0.75  # a block is ink when this share of its pixels is
FOCUS_EXPONENT = 3.1   # var of the Laplacian ~ (pixel size)^3.1 near min_focus (module docstring)
MIN_FOCUS_PIXELS = 64  # tissue px at REFERENCE_MPP (3.8 um^2) below which focus is not measured
CHUNK = 8              # tiles measured at once (measure_tiles)


def relative_scale(mpp: float) -> float:
    """Pixel size of tiles at `mpp` um/px over REFERENCE_MPP; exactly 1.0 within MPP_TOLERANCE
    of it (measured as at the reference, as wsi.scale reads them)."""
    mpp = float(mpp)
    if not (np.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of um per px, got {mpp}")
    scale = mpp / REFERENCE_MPP
    return 1.0 if abs(scale - 1) <= MPP_TOLERANCE else scale


def ink_block(mpp: float = REFERENCE_MPP) -> int:
    """Side in px of the INK_BLOCK_UM blocks at `mpp` um/px: 8 at 0.243, 4 at 0.486 or 0.5."""
    scale = relative_scale(mpp)
    return INK_BLOCK if scale == 1.0 else max(1, round(INK_BLOCK / scale))


def solid_share(pixels: np.ndarray, block: int = INK_BLOCK) -> np.ndarray:
    """Per tile [n, h, w], the share of its area in `block` px blocks that are >= INK_BLOCK_SHARE
    set and part of a 3 x 3 group of such blocks (scattered pixels do not count)."""
    n, h, w = pixels.shape
    k = block
    rows, cols = h // k, w // k
    if rows < 3 or cols < 3:   # tiles too small for blocks: the plain pixel share
        return pixels.reshape(n, -1).mean(axis=1)
    pixels = pixels.astype(bool, copy=False)
    # The pixels of each block, summed as k slices (integers: 5-10x faster than a sum over the
    # two short axes of a [n, rows, k, cols, k] view, the same counts).
    cells = pixels[:, :rows * k, :cols * k].view(np.uint8).reshape(n, rows * k, cols, k)
    across = cells[..., 0].astype(np.uint16)   # <= k per block row
    for j in range(1, k):
        across += cells[..., j]
    across = across.reshape(n, rows, k, cols)
    counts = across[:, :, 0].astype(np.int64)
    for j in range(1, k):
        counts += across[:, :, j]
    solid = counts >= INK_BLOCK_SHARE * k * k
    solid = ndimage.binary_opening(solid, structure=np.ones((1, 3, 3), bool))
    return solid.reshape(n, -1).sum(axis=1) * (k * k) / (h * w)


def measure_tiles(tiles: np.ndarray, params: TissueParams = TissueParams(),
                  mpp: float = CAMELYON16_MPP) -> TileQuality:
    """Ink and background shares and focus of RGB uint8 tiles [n, h, w, 3] at `mpp` um/px (the
    pixel size of the tiles given), on the scale of REFERENCE_MPP (module docstring)."""
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be uint8 [n, h, w, 3], got {tiles.dtype} {tiles.shape}")
    relative_scale(mpp)   # a bad mpp fails here, whatever n
    if len(tiles) <= CHUNK:
        return _measure(tiles, params, mpp) if len(tiles) else TileQuality.empty()
    # A few tiles at a time: the temporaries stay in cache (1.8x faster for 64 tiles of 224 px),
    # and each tile's numbers are its own, whatever the batch.
    return TileQuality.concatenate([_measure(tiles[i:i + CHUNK], params, mpp)
                                    for i in range(0, len(tiles), CHUNK)])


def _measure(tiles: np.ndarray, params: TissueParams, mpp: float) -> TileQuality:
    scale = relative_scale(mpp)
    n = len(tiles)
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
    ink_share = solid_share(ink, ink_block(mpp))
    glass_share = glass.reshape(n, -1).sum(axis=1) / area

    # Laplacian (4-neighbour) of the luma, on interior pixels whose 3x3 neighbourhood is tissue
    # (no glass, no ink): glass is flat and would make any tile look blurred; an ink edge would
    # make any tile look sharp.
    grey = (0.299 * red + 0.587 * green + 0.114 * blue).astype(np.float32)
    other = glass | ink
    if scale < 1.0:   # finer than the reference: whole-pixel means towards it
        step = round(1 / scale)
        if step > 1:
            grey, other = _block_mean(grey, step), _block_any(other, step)
            scale = relative_scale(mpp * step)
    lap = (grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1] + grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:]
           - 4 * grey[:, 1:-1, 1:-1])
    near_other = (other[:, :-2, 1:-1] | other[:, 2:, 1:-1] | other[:, 1:-1, :-2] | other[:, 1:-1, 2:]
                  | other[:, 1:-1, 1:-1])
    use = ~near_other
    count = use.reshape(n, -1).sum(axis=1)
    lap = np.where(use, lap, 0.0).reshape(n, -1)
    total = lap.sum(axis=1, dtype=np.float64)
    squares = np.einsum("ij,ij->i", lap, lap, dtype=np.float64)
    min_count = MIN_FOCUS_PIXELS if scale == 1.0 else max(16, round(MIN_FOCUS_PIXELS / scale**2))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        focus = np.where(count >= min_count, squares / count - mean * mean, np.nan)
    if scale != 1.0:
        focus = focus / scale**FOCUS_EXPONENT
    return TileQuality(ink_share.astype(np.float32), glass_share.astype(np.float32), focus.astype(np.float32))


def _block_mean(images: np.ndarray, step: int) -> np.ndarray:
    """Float [n, h, w] as the means of its step x step blocks (the last partial ones dropped)."""
    rows, cols = images.shape[1] // step, images.shape[2] // step
    total = np.zeros((images.shape[0], rows, cols), np.float32)
    for i in range(step):
        for j in range(step):
            total += images[:, i:rows * step:step, j:cols * step:step]
    return total / (step * step)


def _block_any(images: np.ndarray, step: int) -> np.ndarray:
    """Bool [n, h, w] as whether any pixel of each step x step block is set."""
    rows, cols = images.shape[1] // step, images.shape[2] // step
    out = np.zeros((images.shape[0], rows, cols), bool)
    for i in range(step):
        for j in range(step):
            out |= images[:, i:rows * step:step, j:cols * step:step]
    return out


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
