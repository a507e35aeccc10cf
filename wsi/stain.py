"""A slide's stain, measured: how much haematoxylin and eosin its tissue took up.

H&E colour is a mix of two dyes. By Beer-Lambert, a pixel's optical density OD = -log(I / I0) is
the dyes' OD vectors weighted by their amounts (concentrations), so colour deconvolution with
fixed dye vectors gives each pixel's amount of each dye. milroi uses Ruifrok and Johnston's H&E
vectors (Anal Quant Cytol Histol 2001; scikit-image's `hed_from_rgb`) as that fixed reference,
and describes a slide by the log of the 50th, 90th and 99th percentiles of its tissue pixels'
H and E amounts (`STATISTICS`): the median says how the bulk of the tissue took each dye, the
99th percentile how its darkest nuclei (H) or densest stroma (E) did. A pale, faded, dark or
haematoxylin-heavy slide moves them all; the training slides' spread of each says how far a
slide of the training stain can go (core.domain's stain criterion).

Why fixed vectors and not each slide's own (Macenko et al., ISBI 2009): on slides of a few
dozen tiles the Macenko vectors moved 16-22 degrees with tumour content alone (a slide's extreme
hues depend on what tissue it shows), so held-out slides of the training stain fell outside the
training slides' spread. Amounts along fixed vectors keep the slide's stain comparable.

`StainSample` collects the dye amounts of a bounded, spread-out sample of a slide's clean tiles
while they stream past (every k-th tile, every PIXEL_STRIDE-th pixel each way), so measuring a
slide costs about a millisecond per batch, whatever its size; feature extraction records each
training slide's statistics, the scorer measures every slide it scores.
"""
from __future__ import annotations

import math

import numpy as np

# Pixels whose OD is below this in any channel are glass or nearly so (Macenko's beta).
MIN_OD = 0.15
# The slide's statistics: log percentiles of the H and E amounts of its tissue pixels.
PERCENTILES = (50, 90, 99)
DYES = ("haematoxylin", "eosin")
STATISTICS = tuple(f"{dye}_p{p}" for dye in DYES for p in PERCENTILES)
# Tiles measured per slide (every k-th clean tile) and the pixel stride within each.
MAX_TILES = 512
PIXEL_STRIDE = 8
# Fewer tissue pixels than this give no statistics (a slide of a few tiles, mostly glass).
MIN_PIXELS = 500
# Amounts below this (OD units) count as none: deconvolution gives a faded or greyed slide's
# pixels small or negative amounts of a dye, whose log would swamp the training slides' spread.
MIN_AMOUNT = 0.01


def _hed_from_rgb() -> np.ndarray:
    from skimage.color import hed_from_rgb

    return np.asarray(hed_from_rgb, np.float32)


def pixel_od(rgb: np.ndarray) -> np.ndarray:
    """float32 OD of uint8 RGB pixels [..., 3] (I0 = 255; +1 keeps black finite)."""
    return -np.log((rgb.astype(np.float32) + 1.0) / 256.0)


def dye_amounts(rgb: np.ndarray) -> np.ndarray:
    """float32 [n, 2]: H and E amounts of the tissue pixels among uint8 RGB pixels [..., 3]
    (glass, OD below MIN_OD in a channel, left out)."""
    od = pixel_od(rgb).reshape(-1, 3)
    od = od[(od > MIN_OD).all(axis=1)]
    return (od @ _hed_from_rgb())[:, :2]


def stain_statistics(amounts: np.ndarray) -> dict[str, float] | None:
    """STATISTICS name -> value of dye amounts [n, 2]; None with fewer than MIN_PIXELS pixels.
    By name, so that a description and a slide measured by different versions still compare
    the same statistic."""
    if len(amounts) < MIN_PIXELS:
        return None
    q = np.percentile(np.asarray(amounts, np.float64), PERCENTILES, axis=0)   # [3, 2]
    values = np.log(np.maximum(q.T.reshape(-1), MIN_AMOUNT))                    # H then E
    return dict(zip(STATISTICS, values.tolist()))


class StainSample:
    """Collects the dye amounts of a slide's tiles as they stream past; `statistics()` at the
    end. `tile_count`: the slide's tiles, so that the sample (every k-th) spans the grid."""

    def __init__(self, tile_count: int, max_tiles: int = MAX_TILES, stride: int = PIXEL_STRIDE):
        self.every = max(1, math.ceil(tile_count / max_tiles))
        self.stride = stride
        self._parts: list[np.ndarray] = []

    def add(self, first_index: int, tiles: np.ndarray, keep: np.ndarray | None = None) -> None:
        """uint8 tiles [n, s, s, 3] of grid indices first_index...; `keep`: bool [n], the tiles
        that may be measured (no artefact: ink would pass for a dye)."""
        chosen = (first_index + np.arange(len(tiles))) % self.every == 0
        if keep is not None:
            chosen &= np.asarray(keep, bool)
        if chosen.any():
            s = self.stride
            self._parts.append(dye_amounts(np.asarray(tiles)[chosen][:, s // 2::s, s // 2::s]))

    def statistics(self) -> dict[str, float] | None:
        return stain_statistics(np.concatenate(self._parts)) if self._parts else None
