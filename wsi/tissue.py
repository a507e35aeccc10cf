"""Tissue mask of a slide, computed on a low-resolution level.

The method (HSV saturation, as in CLAM and most Camelyon pipelines, with the artefacts of real
lymph-node slides removed):

1. saturation S and value V of every pixel;
2. Otsu threshold on S over the whole image: the foreground (stained tissue, but also ink);
3. ink removed from it: black marker and dark debris (V <= black_value_max, anywhere) and
   blue/green pen in the foreground (hue between 60 and 240 degrees, i.e. green >= red, with
   enough saturation: eosin and haematoxylin are both redder than green, so H&E never is);
4. a second Otsu on S of the pixels left after removing the ink: pen strokes are the most
   saturated thing on a slide, and on a slide with heavy ink the first threshold falls between
   ink and everything else and loses pale tissue; without the ink the second threshold separates
   tissue from glass again. It never goes below `min_saturation`, so an empty slide (glass only,
   where Otsu would split noise) gives an empty mask;
5. clean-up with scikit-image: small objects (dust, specks) removed, small holes (lumen, fat)
   filled, with the ink counted as tissue meanwhile (a pen stroke across tissue must not cut it
   into small pieces) and cut out again at the end.

Grey scanner-stitching background (flat grey tiles, R = G = B) has no saturation and so never
passes step 2 or 4, however dark it is.

Speed: a Camelyon16 slide gives a ~3k x 6k mask (18 M pixels). S and V are computed in uint8
integer arithmetic from max/min of R, G, B (2 bytes per pixel for the intermediate), and Otsu runs
on a 256-bin histogram (chunked np.bincount) instead of the float64 image: skimage's rgb2hsv would
allocate 8 x 3 x 18 M bytes and compute a hue we only need as "green >= red"; S is a table
lookup instead of a division, and the second histogram subtracts the ink from the first. See
benchmarks/bench_wsi.py for the measured time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from skimage import morphology
from skimage.filters import threshold_otsu

from core.errors import RequestError
from core.tiling import CAMELYON16_MPP, TissueParams

log = logging.getLogger(__name__)


@dataclass
class TissueMask:
    """Boolean tissue mask; mask pixel (r, c) covers level-0 px [c*ds, (c+1)*ds) x [r*ds, ...)."""

    mask: np.ndarray      # bool [h, w]
    downsample: float     # level-0 px per mask px
    level: int            # pyramid level that was read to compute it

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def _saturation_table() -> np.ndarray:
    """S for every (V, chroma) pair: table[v << 8 | c] = c * 255 // v (0 where V = 0)."""
    v = np.arange(256, dtype=np.uint32)[:, None]
    c = np.arange(256, dtype=np.uint32)[None, :]
    table = np.where((v > 0) & (c <= v), c * 255 // np.maximum(v, 1), 0)
    return table.astype(np.uint8).ravel()


_SATURATION = _saturation_table()


def saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value as uint8 (0..255), without floating point.

    S = (max - min) / max, scaled to 0..255 and rounded down; V = max. Equal to skimage's
    rgb2hsv(...)[..., 1:] * 255 within one grey level. Max and min are taken channel by channel
    (a reduction over the last, 3-wide axis is several times slower) and the division is a
    lookup in a 64 KiB table indexed by (V, max - min).
    """
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = np.maximum(np.maximum(red, green), blue)
    chroma = value - np.minimum(np.minimum(red, green), blue)   # uint8, max >= min
    index = value.astype(np.uint16)
    index <<= 8
    index |= chroma
    return _SATURATION[index], value


def histogram_uint8(values: np.ndarray) -> np.ndarray:
    """256-bin histogram of uint8 values.

    np.bincount casts its input to int64 first; on an 18 M pixel image that temporary (144 MB)
    costs ~0.3 s, in 1 M pixel chunks that stay in cache ~0.03 s.
    """
    flat = values.ravel()
    hist = np.zeros(256, dtype=np.int64)
    for start in range(0, flat.size, 1 << 20):
        hist += np.bincount(flat[start:start + (1 << 20)], minlength=256)
    return hist


def otsu_uint8(values: np.ndarray | None = None, floor: int = 0, hist: np.ndarray | None = None) -> int:
    """Otsu threshold of uint8 values (or of their 256-bin histogram `hist`), at least `floor`.

    Pixels strictly above the threshold are foreground (skimage's convention).
    """
    if hist is None:
        hist = histogram_uint8(values)
    if np.count_nonzero(hist) < 2:      # zero or one grey level: nothing to separate
        return max(int(np.argmax(hist)) if hist.any() else 255, floor)
    return max(int(threshold_otsu(hist=(hist, np.arange(256)))), floor)


def ink_mask(rgb: np.ndarray, sat: np.ndarray, value: np.ndarray, foreground: np.ndarray,
             params: TissueParams) -> np.ndarray:
    """Black marker / debris (anywhere: dark pixels can have any saturation) and blue-green pen
    (searched in the first-pass foreground only: ink is saturated, glass noise is not)."""
    black = value <= params.black_value_max
    red, green = rgb[..., 0], rgb[..., 1]
    pen = green >= red                  # hue in [60, 240] degrees
    if params.pen_green_minus_red > 0:  # uint8 difference is exact where green >= red
        pen &= (green - red) >= params.pen_green_minus_red
    pen &= sat >= params.pen_min_saturation
    pen &= foreground
    return black | pen


def tissue_mask_from_rgb(rgb: np.ndarray, params: TissueParams = TissueParams(),
                         um_per_px: float | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 image (steps 1-5 of the module docstring).

    `um_per_px` is the size of one pixel of `rgb` in microns, used to turn the clean-up areas
    (um^2) into pixels; without it the image is taken to be a Camelyon16 slide at the mask's
    `params.target_downsample`.
    """
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise RequestError(f"tissue mask needs an RGB uint8 image [h, w, 3], got {rgb.dtype} {rgb.shape}")
    sat, value = saturation_value(rgb)
    hist = histogram_uint8(sat)
    foreground = sat > otsu_uint8(hist=hist, floor=params.min_saturation)
    ink = ink_mask(rgb, sat, value, foreground, params)
    # Second Otsu on what is left once the ink is gone (see step 4): the histogram of all
    # pixels minus that of the (few) ink pixels.
    hist_without_ink = hist - np.bincount(sat[ink], minlength=256)
    threshold = otsu_uint8(hist=hist_without_ink, floor=params.min_saturation)
    tissue = (sat > threshold) & ~ink
    px_area = (um_per_px if um_per_px else params.target_downsample * CAMELYON16_MPP) ** 2
    min_object = max(int(params.min_object_um2 / px_area), 1)
    min_hole = max(int(params.min_hole_um2 / px_area), 1)
    # Ink counts as tissue during the clean-up, then is cut out again: a pen stroke across a
    # tissue piece must neither split it into "small objects" nor leave a "hole" to fill.
    # remove_small_objects/holes take `max_size` (remove sizes <= max_size) since skimage 0.26.
    cleaned = tissue | ink
    morphology.remove_small_objects(cleaned, max_size=min_object, out=cleaned)
    morphology.remove_small_holes(cleaned, max_size=min_hole, out=cleaned)
    cleaned &= ~ink
    # The anti-aliased fringe of a pen stroke on glass is pale and saturated enough to pass the
    # thresholds without being ink; it survived above by touching the stroke. Once the ink is cut
    # out it stands alone, small: drop it like any other small object.
    morphology.remove_small_objects(cleaned, max_size=min_object, out=cleaned)
    return cleaned


def mask_level_and_size(slide, params: TissueParams) -> tuple[int, tuple[int, int]]:
    """Which level to read and the mask size (w, h) for `params.target_downsample`.

    The downsample is lowered for small slides so that the shorter side of the mask has
    `min_mask_side` px; the level read is the coarsest one still at least that fine, resized
    down to the mask size when the pyramid has no exact match.
    """
    width, height = slide.dimensions
    downsample = max(1.0, min(params.target_downsample, min(width, height) / params.min_mask_side))
    level = slide.get_best_level_for_downsample(downsample + 1e-6)
    size = (max(1, round(width / downsample)), max(1, round(height / downsample)))
    return level, size


def compute_tissue_mask(slide, params: TissueParams = TissueParams()) -> TissueMask:
    """Tissue mask of an open `wsi.slide.Slide`, on a low-resolution level (see module doc)."""
    level, (mask_w, mask_h) = mask_level_and_size(slide, params)
    rgb = slide.read_level_resized(level, (mask_w, mask_h))   # in strips when the level is big
    downsample = slide.dimensions[0] / mask_w
    mask = tissue_mask_from_rgb(rgb, params, um_per_px=slide.mpp * downsample)
    log.debug("%s: tissue mask %dx%d from level %d, downsample %.2f, %.1f%% tissue",
              slide.name, mask_w, mask_h, level, downsample, 100 * mask.mean())
    return TissueMask(mask=mask, downsample=downsample, level=level)
