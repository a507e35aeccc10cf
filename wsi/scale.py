"""Tiles at the model's scale: which pyramid level to read, how big a region, and the resize.

A model states its input in physical units (`core.tiling.TilingParams`: `tile_size` px at
`target_mpp` um/px), so a tile covers `tile_size * target_mpp` um on any scanner. The grid stays
in level-0 coordinates; only its tile side, in level-0 px, depends on the slide:

    factor    = target_mpp / slide_mpp          (level-0 px per model px)
    footprint = tile_size * factor              (the tile side in level-0 px)

How a tile is read (`plan_read`):
- within `tolerance` of the model's pixel size (default 10 %: Camelyon16's Radboud 0.243 and
  Utrecht ~0.226 um/px both read as they are), `tile_size` px straight from level 0, as always;
- beyond it, from the coarsest pyramid level whose pixel size is at or below the model's, a
  region of `footprint / downsample` px resized to `tile_size` with an antialiasing filter
  (PIL's Lanczos, whose support widens with the reduction: a low-pass before the subsampling),
  so the tile covers the model's microns exactly (a 2^k pyramid level at the model's scale
  reads `tile_size` px and needs no resize);
- a slide coarser than the model (a 20x slide under a 40x model) is upsampled from level 0, and
  the plan says so (`upsampled`): the pixels it shows the model were never scanned.

A slide must state its pixel size (metadata, or the user's value: `wsi.slide`); one whose size
is only assumed is refused here, with the fix in the message, rather than scored at a guess.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from core.errors import ConfigError, SlideError
from core.tiling import MPP_TOLERANCE, TilingParams

# The resampling filter of every tile resize (CPU readers; wsi.gpu_decode falls back to them).
RESAMPLE = Image.Resampling.LANCZOS
LEVEL_SLACK = 0.01


@dataclass(frozen=True)
class ReadScale:
    """How one slide's tiles are read so that the model sees `tile_size` px at `target_mpp`."""

    slide_mpp: float      # um per level-0 px
    mpp_source: str       # where slide_mpp comes from: "metadata" or "user"
    target_mpp: float     # um per model-input px
    tile_size: int        # the model's input side, px
    level: int            # pyramid level read
    level_downsample: float
    read_size: int        # side of the region read at `level`, px (resized to tile_size)

    @property
    def factor(self) -> float:
        """Level-0 px per model px (> 1: the slide is finer than the model)."""
        return self.target_mpp / self.slide_mpp

    @property
    def footprint(self) -> int:
        """The tile side in level-0 px: the grid's step and the patch CSV's `size`."""
        return int(round(self.read_size * self.level_downsample))

    @property
    def resized(self) -> bool:
        return self.read_size != self.tile_size

    @property
    def upsampled(self) -> bool:
        """The slide is coarser than the model: its pixels were enlarged."""
        return self.read_size < self.tile_size

    @property
    def read_mpp(self) -> float:
        """The pixel size the model sees: target_mpp, or within the tolerance of it."""
        return self.slide_mpp * self.footprint / self.tile_size

    def read(self, slide, x: int, y: int) -> np.ndarray:
        """The model's input tile whose level-0 top-left is (x, y), read one at a time through
        OpenSlide (the readers of wsi.tiles / wsi.decode_once do the same for a grid)."""
        region = slide.read_region(x, y, self.read_size, self.read_size, self.level)
        return resize_tile(region, self.tile_size)

    def describe(self) -> str:
        how = (f"{self.read_size} px at level {self.level} resized to {self.tile_size}"
               if self.resized else f"{self.tile_size} px at level {self.level} as they are")
        warn = " (upsampled: the slide is coarser than the model)" if self.upsampled else ""
        return (f"slide {self.slide_mpp:.4g} um/px ({self.mpp_source}), model "
                f"{self.target_mpp:.4g} um/px: tiles of {self.footprint} level-0 px, {how}{warn}")


# What a slide without a pixel size is told (wsi.slide opens it for viewing all the same).
MISSING_MPP = ("no pixel size in its metadata: give the slide's um/px with --fallback-mpp UM, or a "
               "row 'slide,mpp' in mpp.csv beside the slides (scoring at a guessed scale would "
               "show the model tiles of the wrong size)")


def plan_read(slide, tiling: TilingParams, tolerance: float = MPP_TOLERANCE) -> ReadScale:
    """The ReadScale of `slide` (an open wsi.slide.Slide) for a model of `tiling`; SlideError
    when the slide's pixel size is unknown."""
    if getattr(slide, "mpp_source", "metadata") not in ("metadata", "user"):
        raise SlideError(slide.path, MISSING_MPP)
    if not 0 <= tolerance < 1:
        raise ConfigError(f"the pixel-size tolerance must be in [0, 1), got {tolerance}")
    slide_mpp, target = float(slide.mpp), float(tiling.target_mpp)
    tile = int(tiling.tile_size)
    factor = target / slide_mpp

    def plan(level: int, read_size: int) -> ReadScale:
        return ReadScale(slide_mpp, slide.mpp_source, target, tile, level,
                         float(slide.level_downsamples[level]), int(read_size))

    if abs(factor - 1) <= tolerance:
        return plan(0, tile)
    if factor < 1:   # coarser slide: enlarge level 0
        return plan(0, max(1, round(tile * factor)))
    # the coarsest level whose pixel size is at or below the model's, with 1 % of slack: a
    # pyramid's level sizes are rounded (7407 px over 2 is 3703, a downsample of 2.0003) and so
    # are stated pixel sizes; the resize below makes up the difference exactly
    level = max(i for i, ds in enumerate(slide.level_downsamples)
                if ds <= factor * (1 + LEVEL_SLACK))
    return plan(level, max(1, round(tile * factor / slide.level_downsamples[level])))


def resize_tile(region: np.ndarray, size: int) -> np.ndarray:
    """An RGB uint8 region resized to size x size (antialiased; a copy only when it changes)."""
    if region.shape[0] == region.shape[1] == size:
        return region
    return np.asarray(Image.fromarray(region).resize((size, size), RESAMPLE))
