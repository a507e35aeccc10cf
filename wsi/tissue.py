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
5. optical density, for stains saturation misses: a faded, pale or greyish (lilac-grey)
   slide's tissue can be as unsaturated as glass, but it still absorbs light. OD =
   -log10(I / 255) of the darkest channel is thresholded over the non-ink pixels (floor
   `min_optical_density`), as HistoQC's and tiatoolbox's brightness/OD maskers do. Glass is a
   tall narrow peak near OD 0.02 and tissue a long tail above it, so the threshold is the
   triangle method's (Zack 1977: the foot of the dominant peak), not Otsu's: with two thirds of
   the pixels in the peak, Otsu splits the tissue tail instead; a closing over
   `od_closing_um` joins the dense nuclei of faded tissue across its nearly clear stroma. A
   pixel dark enough but with no colour
   at all (max - min of R, G, B below `min_chroma`) is grey scanner background or shadow, not
   stain, and is not taken; nor is a pixel greener than red (both haematoxylin and eosin
   absorb green more than red, pen ink and its pale fringe do not). Tissue = saturation cue
   OR OD cue, ink removed;
6. clean-up with scikit-image: small objects (dust, specks) removed, with the ink counted as
   tissue meanwhile (a pen stroke across tissue must not cut it into small pieces), then small
   holes (lumen, fat) of the tissue filled and the ink cut out.

Grey scanner-stitching background (flat grey tiles, R = G = B) has no saturation and no chroma
and so never passes step 2, 4 or 5, however dark it is.

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
from skimage.filters import threshold_otsu, threshold_triangle

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


def saturation_value_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HSV saturation and value, and chroma (max - min of R, G, B), as uint8 (0..255), without
    floating point.

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
    return _SATURATION[index], value, chroma


def saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value as uint8 (see saturation_value_chroma)."""
    sat, value, _ = saturation_value_chroma(rgb)
    return sat, value


# Optical density of a uint8 intensity, quantised to 256 codes over [0, OD_RANGE]: a 256-entry
# lookup instead of a float log over the image. OD 0.05 (the default floor) is code 13.
OD_RANGE = 1.0
_OD_CODE = np.round(np.clip(-np.log10(np.maximum(np.arange(256), 1) / 255.0), 0, OD_RANGE)
                    * 255 / OD_RANGE).astype(np.uint8)


def optical_density_code(darkest: np.ndarray) -> np.ndarray:
    """OD code (0..255 over OD 0..OD_RANGE) of the darkest channel's intensity (uint8)."""
    return _OD_CODE[darkest]


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


def optical_density_tissue(rgb: np.ndarray, darkest: np.ndarray, chroma: np.ndarray,
                           ink: np.ndarray, params: TissueParams, um_per_px: float) -> np.ndarray:
    """Step 5: pixels whose optical density is above the triangle threshold of the non-ink
    pixels' (at least `min_optical_density`), that carry some colour (chroma >= `min_chroma`)
    and whose colour is a stain's (red > green); then a morphological closing over
    `od_closing_um`, because in faded tissue the nuclei carry the density and the stroma
    between them is nearly glass: the closing joins nuclei a few cells apart into one region
    without moving the tissue's outer edge (as a mean filter would)."""
    od = optical_density_code(darkest)
    floor = params.min_optical_density * 255 / OD_RANGE
    values = od[~ink]
    threshold = threshold_triangle(values) if values.size and values.min() < values.max() else 255
    coloured = (chroma >= params.min_chroma) & (rgb[..., 0] > rgb[..., 1])
    dense = (od > max(threshold, floor)) & coloured
    radius = int(np.ceil(params.od_closing_um / um_per_px))
    if radius >= 1:
        # The closing relaxes only the density: what it adds must still be coloured like a stain
        # (grey scanner background next to tissue stays out).
        # A disk decomposed into a sequence of small footprints: the same closing, 20x faster
        # at the radius a small slide's fine mask needs (32 px: 0.15 s instead of 2.7 s).
        dense = morphology.closing(dense, morphology.disk(radius, decomposition="sequence")) & coloured
    return dense


def tissue_mask_from_rgb(rgb: np.ndarray, params: TissueParams = TissueParams(),
                         um_per_px: float | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 image (steps 1-5 of the module docstring).

    `um_per_px` is the size of one pixel of `rgb` in microns, used to turn the clean-up areas
    (um^2) into pixels; without it the image is taken to be a Camelyon16 slide at the mask's
    `params.target_downsample`.
    """
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise RequestError(f"tissue mask needs an RGB uint8 image [h, w, 3], got {rgb.dtype} {rgb.shape}")
    um_per_px_mask = um_per_px if um_per_px else params.target_downsample * CAMELYON16_MPP
    sat, value, chroma = saturation_value_chroma(rgb)
    hist = histogram_uint8(sat)
    foreground = sat > otsu_uint8(hist=hist, floor=params.min_saturation)
    ink = ink_mask(rgb, sat, value, foreground, params)
    # Second Otsu on what is left once the ink is gone (see step 4): the histogram of all
    # pixels minus that of the (few) ink pixels.
    hist_without_ink = hist - np.bincount(sat[ink], minlength=256)
    threshold = otsu_uint8(hist=hist_without_ink, floor=params.min_saturation)
    tissue = sat > threshold
    if params.optical_density:
        tissue |= optical_density_tissue(rgb, value - chroma, chroma, ink, params, um_per_px_mask)
    tissue &= ~ink
    # Stained tissue is redder than green (see step 5); the pale fringe of a pen stroke is not.
    tissue &= rgb[..., 0] > rgb[..., 1]
    px_area = um_per_px_mask ** 2
    min_object = max(int(params.min_object_um2 / px_area), 1)
    min_hole = max(int(params.min_hole_um2 / px_area), 1)
    # Ink counts as tissue while small objects are removed: a pen stroke across a tissue piece
    # must not split it into "small objects" (a strip of tissue between two strokes stays).
    # remove_small_objects/holes take `max_size` (remove sizes <= max_size) since skimage 0.26.
    # The ink is widened by 2 px for this: its anti-aliased fringe is neither ink nor tissue
    # and would otherwise cut the stroke off the tissue it crosses.
    joined = tissue | morphology.dilation(ink, morphology.disk(2)) if ink.any() else tissue.copy()
    morphology.remove_small_objects(joined, max_size=min_object, out=joined)
    tissue &= joined
    # Holes are filled in the tissue alone, not in tissue | ink: glass enclosed by a pen loop, or
    # the pale fringe between a stroke and the tissue edge, is not a hole of the tissue.
    cleaned = morphology.remove_small_holes(tissue, max_size=min_hole)
    cleaned &= ~ink
    # Once the ink is cut out, what survived above by touching a stroke (its anti-aliased
    # fringe) is a line one pixel wide, alone or along the tissue edge: an opening removes
    # the lines, then fragments too small to make a tile go; strips of tissue stay.
    if ink.any():
        cleaned = morphology.opening(cleaned, morphology.disk(1))
    min_fragment = max(int(params.min_fragment_um2 / px_area), 1)
    morphology.remove_small_objects(cleaned, max_size=min_fragment, out=cleaned)
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
