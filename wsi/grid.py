"""The grid of tissue tiles of a slide, and the `milroi-train tiles` command.

Tiles are `tile_size` px squares at pyramid `level`, laid out from the level-0 origin every
`stride` px (at that level), kept whole inside the slide, and kept when the tissue mask covers at
least `min_tissue` of them. Coordinates are always level-0 top-left corners (int64), in row-major
order (y, then x): the order of the patch CSV, of the h5 feature files and of the scores streamed
by the server.

The tissue fraction of every tile comes from a summed-area table (integral image) of the mask:
four lookups per tile, all tiles at once, so a Camelyon16 slide (~400k grid positions) costs a
few milliseconds and no Python loop.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core.cli import (
    add_fallback_mpp_argument,
    add_tiling_arguments,
    add_tissue_arguments,
    tiling_from_args,
    tissue_from_args,
)
from core.errors import ConfigError
from core.files import atomic_write
from core.tiling import DEFAULT_TILING, TilingParams
from wsi.scale import ReadScale, plan_read
from wsi.tissue import TissueMask, TissueParams, compute_tissue_mask

log = logging.getLogger(__name__)


@dataclass
class TileGrid:
    coords: np.ndarray            # int64 [N, 2] level-0 (x, y) top-left, row-major order
    tissue_fraction: np.ndarray   # float32 [N] share of the tile covered by the tissue mask
    tile_size: int                # px at `level`
    stride: int                   # px at `level`
    level: int
    slide_dimensions: tuple[int, int]
    level_downsample: float = 1.0
    scale: ReadScale | None = None   # how its tiles reach the model's input (tiles_for_slide)

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def tile_size_level0(self) -> int:
        """Side of a tile in level-0 px."""
        return int(round(self.tile_size * self.level_downsample))


def integral_image(mask: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row and column: sum of mask[r0:r1, c0:c1] is
    S[r1, c1] - S[r0, c1] - S[r1, c0] + S[r0, c0]."""
    # int32 holds any mask up to 2**31 px (a 46k x 46k mask), far above a 3k x 6k one.
    dtype = np.int32 if mask.size < 2**31 else np.int64
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=dtype)
    np.cumsum(mask, axis=0, dtype=dtype, out=table[1:, 1:])
    np.cumsum(table[1:, 1:], axis=1, out=table[1:, 1:])
    return table


def make_tile_grid(tissue: TissueMask, slide_dimensions,
                   tile_size: int = DEFAULT_TILING.tile_size, stride: int | None = None,
                   level: int = 0, level_downsample: float = 1.0,
                   min_tissue: float = DEFAULT_TILING.min_tissue) -> TileGrid:
    """Every tile of the level-0 grid whose tissue fraction is >= `min_tissue`.

    `stride` defaults to `tile_size` (no overlap); both are in px at `level`, whose downsample
    from level 0 is `level_downsample`.
    """
    stride = tile_size if stride is None else stride
    if tile_size <= 0 or stride <= 0:
        raise ConfigError(f"tile size and stride must be positive, got {tile_size} and {stride}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ConfigError(f"min_tissue must be in [0, 1], got {min_tissue}")
    width, height = (int(v) for v in slide_dimensions)
    footprint = tile_size * level_downsample     # tile side in level-0 px
    step = stride * level_downsample             # grid step in level-0 px
    n_cols = int((width - footprint) // step) + 1 if width >= footprint else 0
    n_rows = int((height - footprint) // step) + 1 if height >= footprint else 0
    xs = np.round(np.arange(n_cols) * step).astype(np.int64)
    ys = np.round(np.arange(n_rows) * step).astype(np.int64)

    # Tile edges in mask px, rounded to the nearest mask pixel boundary; a tile always spans at
    # least one mask pixel (tiles smaller than a mask pixel take the pixel they start in).
    mask = tissue.mask
    ds = tissue.downsample
    def mask_span(starts, limit):
        lo = np.clip(np.floor(starts / ds + 0.5), 0, limit - 1).astype(np.int64)
        hi = np.clip(np.floor((starts + footprint) / ds + 0.5), 0, limit).astype(np.int64)
        return lo, np.maximum(hi, lo + 1)
    c0, c1 = mask_span(xs, mask.shape[1])
    r0, r1 = mask_span(ys, mask.shape[0])
    table = integral_image(mask)
    # Broadcast rows (column vector) against columns (row vector): one sum per grid cell.
    sums = (table[r1[:, None], c1[None, :]] - table[r0[:, None], c1[None, :]]
            - table[r1[:, None], c0[None, :]] + table[r0[:, None], c0[None, :]])
    areas = (r1 - r0)[:, None] * (c1 - c0)[None, :]
    fraction = (sums / areas).astype(np.float32)
    keep_r, keep_c = np.nonzero(fraction >= min_tissue)   # row-major: y first, then x
    coords = np.stack([xs[keep_c], ys[keep_r]], axis=1).astype(np.int64).reshape(-1, 2)
    return TileGrid(coords=coords, tissue_fraction=fraction[keep_r, keep_c],
                    tile_size=int(tile_size), stride=int(stride), level=int(level),
                    slide_dimensions=(width, height), level_downsample=float(level_downsample))


def tiles_for_slide(slide, tiling: TilingParams = DEFAULT_TILING,
                    params: TissueParams | None = None, stride: int | None = None
                    ) -> tuple[TissueMask, TileGrid]:
    """Tissue mask and tile grid of an open slide at the model's scale (the first step of
    features and scoring): the grid's tiles are the regions wsi.scale reads, `grid.scale` says
    how. `stride` is in model px (default: the tile size, no overlap). SlideError for a slide
    whose pixel size is unknown."""
    scale = plan_read(slide, tiling)
    tissue = compute_tissue_mask(slide, params or TissueParams())
    step = None if stride is None else max(1, round(stride * scale.read_size / scale.tile_size))
    grid = make_tile_grid(tissue, slide.dimensions, tile_size=scale.read_size, stride=step,
                          level=scale.level, level_downsample=scale.level_downsample,
                          min_tissue=tiling.min_tissue)
    grid.scale = scale
    return tissue, grid


def write_grid_csv(path, grid: TileGrid) -> None:
    """CSV with header x,y,size,level,tissue_fraction; x, y level-0 top-left, size px at level."""
    n = len(grid)
    table = np.column_stack([grid.coords.astype(np.float64), np.full(n, grid.tile_size),
                             np.full(n, grid.level), grid.tissue_fraction])
    with atomic_write(path, "w") as f:
        # float64 holds every level-0 coordinate exactly (< 2**53), so %d prints it unchanged.
        np.savetxt(f, table.reshape(-1, 5), fmt="%d,%d,%d,%d,%.4f", comments="",
                   header="x,y,size,level,tissue_fraction")


def write_mask_png(path, tissue: TissueMask) -> None:
    """The tissue mask as a black-and-white PNG (white = tissue), one px per mask px."""
    image = Image.fromarray(tissue.mask.astype(np.uint8) * 255)
    with atomic_write(path, "wb") as f:
        image.save(f, format="PNG")


def grid_overlay(thumb: np.ndarray, grid: TileGrid) -> np.ndarray:
    """The thumbnail with kept tiles tinted green and outlined (vectorised, no loop per tile).

    Every thumbnail pixel is mapped to the grid cell it falls in and to whether it lies inside
    that cell's tile; a pixel of a kept tile is on its outline when a 4-neighbour (or the image
    border) belongs to no tile or to another one.
    """
    height, width = thumb.shape[:2]
    step = grid.stride * grid.level_downsample
    footprint = grid.tile_size * grid.level_downsample
    n_cols = int(grid.slide_dimensions[0] // step) + 1
    n_rows = int(grid.slide_dimensions[1] // step) + 1
    kept = np.zeros((n_rows, n_cols), dtype=bool)
    kept[np.round(grid.coords[:, 1] / step).astype(np.int64),
         np.round(grid.coords[:, 0] / step).astype(np.int64)] = True
    # Level-0 centre of every thumbnail column and row, its grid cell, and whether it lies in
    # that cell's tile (with stride > tile size there are gaps between tiles).
    x0 = (np.arange(width) + 0.5) * grid.slide_dimensions[0] / width
    y0 = (np.arange(height) + 0.5) * grid.slide_dimensions[1] / height
    col = np.minimum((x0 // step).astype(np.int64), n_cols - 1)
    row = np.minimum((y0 // step).astype(np.int64), n_rows - 1)
    inside = (kept[row[:, None], col[None, :]]
              & ((y0 - row * step) < footprint)[:, None] & ((x0 - col * step) < footprint)[None, :])
    cell = np.where(inside, row[:, None] * n_cols + col[None, :], -1)
    padded = np.pad(cell, 1, constant_values=-1)
    same_as_neighbours = ((padded[:-2, 1:-1] == cell) & (padded[2:, 1:-1] == cell)
                          & (padded[1:-1, :-2] == cell) & (padded[1:-1, 2:] == cell))
    outline = inside & ~same_as_neighbours
    out = thumb.astype(np.float32)
    out[inside] = 0.7 * out[inside] + 0.3 * np.array([0, 200, 0], np.float32)
    out[outline] = (0, 120, 0)
    return out.astype(np.uint8)


def write_grid_png(path, slide, tissue: TissueMask, grid: TileGrid, max_size: int = 2048) -> None:
    """Thumbnail of the slide with the kept tiles outlined: the look before a long run."""
    # At least ~3 thumbnail px per tile so outlines do not merge, within max_size.
    tile_px = grid.tile_size_level0
    size = min(max_size, max(512, int(3 * max(slide.dimensions) / max(tile_px, 1))))
    image = Image.fromarray(grid_overlay(slide.thumbnail(size), grid))
    with atomic_write(path, "wb") as f:
        image.save(f, format="PNG")


# -- milroi-train tiles ------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slide", type=Path, help="slide file (anything OpenSlide reads)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    add_tiling_arguments(parser)
    parser.add_argument("--stride", type=int, default=None,
                        help="grid step in px at --mpp (default: the tile size)")
    parser.add_argument("--target-downsample", type=float, default=None,
                        help=f"level-0 px per tissue-mask px (default "
                             f"{TissueParams.target_downsample:g})")
    add_tissue_arguments(parser)   # the same --tissue NAME=VALUE as `features`
    add_fallback_mpp_argument(parser)


def run(args: argparse.Namespace) -> int:
    from wsi.slide import open_slide

    started = time.perf_counter()
    params = tissue_from_args(args)
    if args.target_downsample is not None:
        params = params.with_overrides([f"target_downsample={args.target_downsample}"])
    with open_slide(args.slide, fallback_mpp=args.fallback_mpp) as slide:
        tissue, grid = tiles_for_slide(slide, tiling_from_args(args), params=params,
                                       stride=args.stride)
        paths = {kind: args.out / f"{slide.name}_{kind}" for kind in ("tiles.csv", "mask.png", "grid.png")}
        write_grid_csv(paths["tiles.csv"], grid)
        write_mask_png(paths["mask.png"], tissue)
        write_grid_png(paths["grid.png"], slide, tissue, grid)
        print(f"{slide.name}: {slide.dimensions[0]}x{slide.dimensions[1]} px, "
              f"{slide.mpp:.3f} um/px ({slide.mpp_source}), tissue {100 * tissue.tissue_fraction:.1f}% "
              f"of a {tissue.mask.shape[1]}x{tissue.mask.shape[0]} mask, {len(grid)} tiles of "
              f"{grid.tile_size_level0} level-0 px ({grid.scale.describe()}), "
              f"{time.perf_counter() - started:.2f} s")
        for path in paths.values():
            print(f"  {path}")
    return 0
