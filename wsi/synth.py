"""Synthetic Camelyon16-like slides: pyramidal JPEG-tiled TIFFs with ground truth.

A slide is white glass with irregular tissue blobs of lymph-node-like texture: pink eosin stroma
packed with small round dark-purple lymphocyte nuclei. Tumour nests (a macro-metastasis, smaller
nests and micro-metastases) replace it with larger, paler, pleomorphic nuclei in more
pink-purple cytoplasm; their mean colour is close to the lymph texture on purpose, so that a
model must look at texture (nucleus size, spacing, chromatin) rather than mean colour. The
macro-metastasis holds a normal island, annotated as a `_2` exclusion as in Camelyon16. The
glass carries what the tissue mask must reject: black marker dots, blue/green pen strokes and
flat grey scanner-stitching tiles.

The hard profile (`--hard`, `make_dataset(hard=True)`) adds what real slides have and the
plain one lacks, each drawn per slide from its seed:
- stain variation (`StainStyle`): haematoxylin and eosin amounts scaled in optical-density
  space (Beer-Lambert, Ruifrok-Johnston stain vectors), from pale lilac-grey to dark, as two
  Camelyon16 centres or a faded slide differ;
- artefacts across tissue (`draw_tissue_artefacts`): translucent blue/green pen strokes and a
  black marker blot over the tissue (ink multiplies the light, so the tissue stays visible
  beneath), and an out-of-focus region (Gaussian blur); the truth records where they are;
- micro-metastases only (1-5 tiles of tumour) on half of the tumour slides.

The colour-matched mode (`--colour-matched`, `colour_matched=True`) leaves a single cue: tumour
nuclei are lymphocyte nuclei made bigger (~8-11 um long instead of ~4.4-6 um) and irregular
(elliptic, with a lobed outline), drawn in exactly the lymph texture's nucleus and stroma colours
under the same stain. Their grid spacing and share of cells with a nucleus are chosen so that the
expected nuclear area fraction is the lymph texture's (`_matched_tumour_grid`), so a tumour
tile's mean colour is that of a lymph-node tile and a model must use morphology. The lymph node
and the layout are drawn as in the default mode: normal slides are the same files.

Sizes are real: 0.243 um/px at level 0, a lymphocyte nucleus ~6 um (~24 px), a tumour nucleus
~10 um. Everything is vectorised numpy, cells on a jittered grid (each pixel only looks at the
nucleus of its own grid cell), deterministic per seed. `write_camelyon_size_slide` writes a
~100k x 200k px slide in about a minute by JPEG-encoding a small set of tiles once and writing
their bytes directly, the tissue layout chosen per tile from a low-resolution plan.

Other pixel sizes (`--mpp`, `write_synthetic_slide(mpp=...)`, `write_synthetic_slide_at`): the
tissue is always drawn at 0.243 um/px and level 0 resampled to `mpp` (2x: 2x2 means; otherwise
Lanczos), so the same seed and extent give the same tissue, nuclei and lesions at 0.243 (Radboud),
0.226 (Utrecht) or 0.486 um/px (a 20x scanner). The TIFF's resolution tags, the annotations and
the returned SyntheticTruth are in the resampled slide's own level-0 pixels; `--size` and
`width`/`height` stay the extent in 0.243 um/px pixels (`width * 0.243` um).

    milroi-train synth OUT --tumor 2 --normal 2 --size 4096x4096 --seed 0 [--hard]
        [--colour-matched] [--mpp 0.243]
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from scipy import ndimage
from shapely.geometry import Polygon

from core.errors import ConfigError
from core.tiling import CAMELYON16_MPP
from wsi.annotations import rasterize, write_asap_xml

log = logging.getLogger(__name__)

MPP = CAMELYON16_MPP        # um per level-0 px (Camelyon16, 40x)
TILE = 256                  # TIFF tile side
PLAN_DOWNSAMPLE = 16        # level-0 px per cell of the tissue plan (and of SyntheticTruth.tissue)
STRIP = 512                 # rows rendered at once (bounds the float temporaries)
GLASS = np.array([242, 241, 239], np.float32)
INK_BLUE, INK_GREEN, INK_BLACK = 3, 4, 5  # plan classes after glass 0, lymph node 1, tumour 2
INK_COLOURS = {INK_BLUE: (40, 70, 170), INK_GREEN: (40, 140, 80), INK_BLACK: (22, 22, 22)}
LYMPH_STROMA = np.array([232, 162, 198], np.float32)    # eosin stroma of the lymph texture
LYMPH_NUCLEUS = np.array([58, 34, 112], np.float32)     # haematoxylin of a lymphocyte nucleus

# Colour-matched tumour nuclei, in microns (converted with the pixel size textures are drawn at).
MATCHED_SEMI_AXIS_UM = (4.0, 5.4)       # semi-major axis: nuclei 8-11 um long (lymphocytes 4.4-6)
MATCHED_ELONGATION = 0.6                # semi-minor / semi-major, uniform in [0.6, 1]
MATCHED_LOBES = (0.07, 0.05, 0.03)      # sd of the outline's 2nd, 3rd, 4th radial harmonics
MATCHED_EDGE_UM = 0.65                  # soft edge: a lymphocyte's (a quarter of its ~2.6 um radius)
MATCHED_NUCLEUS_SHARE = 0.95            # target share of tumour cells with a nucleus


@dataclass
class SyntheticTruth:
    """What was drawn: tissue mask at `mask_downsample`, tumour and exclusion polygons (level-0 px)."""

    path: Path
    dimensions: tuple[int, int]
    tissue_mask: np.ndarray
    mask_downsample: float
    tumor_polygons: list = field(default_factory=list)
    exclusion_polygons: list = field(default_factory=list)
    mpp: float = MPP
    level_count: int = 1
    ink_mask: np.ndarray | None = None      # bool, same grid as tissue_mask: ink over the slide
    blur_polygons: list = field(default_factory=list)   # out-of-focus regions (level-0 px)
    stain: str = "standard"
    seed: int | None = None     # the texture's seed (synthetic_cells redraws its nuclei from it)
    colour_matched: bool = False
    # (width, height) of the 0.243 um/px frame the tissue was drawn in, where `mpp` differs
    # (the slide was resampled from it); None: level 0 is that frame.
    drawn_dimensions: tuple[int, int] | None = None

    @property
    def region(self):
        """Tumour minus exclusions (what `wsi.annotations.Annotations.region` reads back)."""
        tumor = shapely.union_all(self.tumor_polygons) if self.tumor_polygons else Polygon()
        if self.exclusion_polygons:
            return tumor.difference(shapely.union_all(self.exclusion_polygons))
        return tumor

    @property
    def is_tumor(self) -> bool:
        return bool(self.tumor_polygons)


# ---------------------------------------------------------------------------------------------
# Textures


def _cells(rng: np.random.Generator, rows: int, cols: int, spacing: float, r_min: float, r_max: float,
           elongation: float, p_nucleus: float) -> dict:
    """Per grid cell: nucleus centre offset, semi-axes, orientation, presence, shade."""
    a = rng.uniform(r_min, r_max, (rows, cols)).astype(np.float32)
    b = a * rng.uniform(elongation, 1.0, (rows, cols)).astype(np.float32)
    slack = np.maximum(spacing / 2 - a, 0)
    return {"dy": rng.uniform(-1, 1, (rows, cols)).astype(np.float32) * slack,
            "dx": rng.uniform(-1, 1, (rows, cols)).astype(np.float32) * slack,
            "a": a, "b": b, "theta": rng.uniform(0, np.pi, (rows, cols)).astype(np.float32),
            "on": rng.random((rows, cols)) < p_nucleus,
            "shade": rng.normal(0, 1, (rows, cols)).astype(np.float32)}


def _cell_frame(cells: dict, spacing: int, y: np.ndarray, x: np.ndarray):
    """Each pixel's cell (rows r, columns c; R, C broadcast) and its coordinates (u, v) in the
    frame of that cell's nucleus: centred, rotated by theta, scaled by the semi-axes a and b."""
    r, c = y // spacing, x // spacing
    R, C = r[:, None], c[None, :]
    ly = (y - r * spacing - spacing / 2)[:, None] - cells["dy"][R, C]
    lx = (x - c * spacing - spacing / 2)[None, :] - cells["dx"][R, C]
    cos, sin = np.cos(cells["theta"][R, C]), np.sin(cells["theta"][R, C])
    u, v = (lx * cos + ly * sin) / cells["a"][R, C], (ly * cos - lx * sin) / cells["b"][R, C]
    return r, c, R, C, u, v


def _nucleus_distance(cells: dict, spacing: int, y: np.ndarray, x: np.ndarray, with_edge: bool = False):
    """Normalised elliptic distance of each pixel to the nucleus of its own cell (1 = edge),
    inf where the cell has no nucleus; the cell's shade; and (with_edge) the distance in px to
    the cell's border."""
    r, c, R, C, u, v = _cell_frame(cells, spacing, y, x)
    d = np.sqrt(u * u + v * v)
    d[~cells["on"][R, C]] = np.inf
    edge = None
    if with_edge:  # separable: distance to the nearest horizontal and vertical cell border
        ey, ex = y - r * spacing, x - c * spacing
        edge = np.minimum(np.minimum(ey, spacing - 1 - ey)[:, None],
                          np.minimum(ex, spacing - 1 - ex)[None, :])
    return d, cells["shade"][R, C], edge


def _soft_area(edge: np.ndarray | float) -> np.ndarray | float:
    """Integral of a nucleus's weight w = clip((1 - d) / edge, 0, 1) over its area, as a share of
    the area inside d = 1 (the soft edge is `edge` of the normalised radius wide)."""
    return 1 - edge + edge * edge / 3


def _matched_tumour_grid(mpp: float) -> tuple[int, float, tuple[float, float], float]:
    """Grid spacing (px), share of cells with a nucleus, semi-major axis range (px) and soft edge
    (px) of the colour-matched tumour nuclei at `mpp`, such that their expected weighted area per
    px (soft edges included: the mean share of nucleus colour) equals the lymph texture's.

    An irregular nucleus (`_lobed_distance`) has the area of its ellipse, so the expectation is
    over the ellipses: pi * a * b * _soft_area(edge / a)."""
    r_min, r_max, elongation, share = TextureRenderer.LYMPH_CELLS
    a = np.linspace(r_min, r_max, 1001)
    lymph = (share * np.pi * np.mean(a * a) * (1 + elongation) / 2 * _soft_area(0.25)
             / TextureRenderer.LYMPH_SPACING ** 2)
    edge = MATCHED_EDGE_UM / mpp
    a_range = (MATCHED_SEMI_AXIS_UM[0] / mpp, MATCHED_SEMI_AXIS_UM[1] / mpp)
    a = np.linspace(*a_range, 1001)
    area = np.pi * np.mean(a * a * _soft_area(edge / a)) * (1 + MATCHED_ELONGATION) / 2
    spacing = int(round(np.sqrt(MATCHED_NUCLEUS_SHARE * area / lymph)))
    return spacing, float(lymph * spacing ** 2 / area), a_range, edge


def _lobed_cells(rng: np.random.Generator, rows: int, cols: int, spacing: int, share: float,
                 a_range: tuple[float, float], edge: float) -> dict:
    """`_cells` with irregular outlines: per cell, complex coefficients of the outline's radial
    harmonics 2-4 (`lobes`), their normalisation, and each nucleus's `sharpness` (semi-major
    axis / soft-edge width: the edge is `edge` px wide whatever the nucleus's size)."""
    a = rng.uniform(*a_range, (rows, cols)).astype(np.float32)
    b = a * rng.uniform(MATCHED_ELONGATION, 1.0, (rows, cols)).astype(np.float32)
    sd = np.asarray(MATCHED_LOBES, np.float32)
    amplitude = np.clip(rng.normal(0, 1, (rows, cols, len(sd))), -2, 2) * sd   # no wild lobes
    lobes = (amplitude * np.exp(1j * rng.uniform(0, 2 * np.pi, amplitude.shape))).astype(np.complex64)
    # Radius rho(phi) = (1 + Re sum c_k e^{ik phi}) / norm; norm = sqrt(mean rho^2) keeps the
    # ellipse's area, which _matched_tumour_grid counts on.
    norm = np.sqrt(1 + (np.abs(lobes) ** 2).sum(-1) / 2).astype(np.float32)
    phi = np.linspace(0, 2 * np.pi, 32, endpoint=False, dtype=np.float32)
    z = np.exp(1j * phi)
    rho = (1 + sum((lobes[..., k, None] * z ** (k + 2)).real for k in range(len(sd)))) / norm[..., None]
    extent = (rho * np.hypot(a[..., None] * np.cos(phi), b[..., None] * np.sin(phi))).max(-1)
    slack = np.maximum(spacing / 2 - 1 - extent, 0)   # the whole outline stays in its cell
    return {"dy": rng.uniform(-1, 1, (rows, cols)).astype(np.float32) * slack,
            "dx": rng.uniform(-1, 1, (rows, cols)).astype(np.float32) * slack,
            "a": a, "b": b, "theta": rng.uniform(0, np.pi, (rows, cols)).astype(np.float32),
            "on": rng.random((rows, cols)) < share,
            "shade": rng.normal(0, 1, (rows, cols)).astype(np.float32),
            "lobes": lobes, "norm": norm, "sharpness": (a / edge).astype(np.float32)}


def _lobed_distance(cells: dict, spacing: int, y: np.ndarray, x: np.ndarray):
    """`_nucleus_distance` for `_lobed_cells`: distance normalised by the lobed radius at the
    pixel's angle, the shade and the sharpness (1 / soft-edge width in normalised units)."""
    _, _, R, C, u, v = _cell_frame(cells, spacing, y, x)
    radius = np.sqrt(u * u + v * v)
    z = (u + 1j * v) / np.maximum(radius, 1e-6)      # e^{i phi}
    rho = 1.0 + sum((cells["lobes"][R, C, k] * z ** (k + 2)).real for k in range(cells["lobes"].shape[-1]))
    d = (radius * cells["norm"][R, C] / rho).astype(np.float32)
    d[~cells["on"][R, C]] = np.inf
    return d, cells["shade"][R, C], cells["sharpness"][R, C]


class TextureRenderer:
    """Lymph-node and tumour textures for any window of a slide (global pixel coordinates),
    drawn at MPP. `colour_matched`: tumour in the lymph texture's colours, lobed nuclei."""

    LYMPH_SPACING, TUMOR_SPACING = 28, 52
    LYMPH_CELLS = (9.0, 12.5, 0.8, 0.8)     # semi-axis px (2.2-3.0 um), elongation, share of cells
    mpp = MPP

    def __init__(self, seed: int, height: int, width: int, colour_matched: bool = False):
        rng = np.random.default_rng([seed, 7])
        rows, cols = height // self.LYMPH_SPACING + 2, width // self.LYMPH_SPACING + 2
        self.lymph = _cells(rng, rows, cols, self.LYMPH_SPACING, *self.LYMPH_CELLS)
        rows, cols = height // self.TUMOR_SPACING + 2, width // self.TUMOR_SPACING + 2
        self.tumor = _cells(rng, rows, cols, self.TUMOR_SPACING, 14.0, 24.0, 0.55, 0.95)
        self.tumor_spacing = self.TUMOR_SPACING
        # Low-frequency stain variation (one value per 64 px, interpolated).
        self.stain = rng.normal(0, 1, (height // 64 + 3, width // 64 + 3, 3)).astype(np.float32)
        self.speckle_rng = np.random.default_rng([seed, 11])
        self.colour_matched = colour_matched
        if colour_matched:  # own generator: lymph node and stain field as in the default mode
            spacing, share, a_range, edge = _matched_tumour_grid(self.mpp)
            rows, cols = height // spacing + 2, width // spacing + 2
            self.tumor = _lobed_cells(np.random.default_rng([seed, 17]), rows, cols, spacing, share,
                                      a_range, edge)
            self.tumor_spacing = spacing

    def _stain(self, y, x):
        return ndimage.map_coordinates(self.stain[..., 0], np.meshgrid(y / 64, x / 64, indexing="ij"),
                                       order=1, mode="nearest")

    def lymph_rgb(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        d, shade, _ = _nucleus_distance(self.lymph, self.LYMPH_SPACING, y, x)
        stroma = LYMPH_STROMA + 6 * self._stain(y, x)[..., None]
        nucleus = LYMPH_NUCLEUS + 10 * shade[..., None]
        w = np.clip((1.0 - d) * 4.0, 0, 1)[..., None]  # soft edge over ~1/4 radius
        return stroma * (1 - w) + nucleus * w

    def tumor_rgb(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        if self.colour_matched:   # the lymph texture's colours and edges; only the nuclei differ
            d, shade, sharpness = _lobed_distance(self.tumor, self.tumor_spacing, y, x)
            stroma = LYMPH_STROMA + 6 * self._stain(y, x)[..., None]
            nucleus = LYMPH_NUCLEUS + 10 * shade[..., None]
            w = np.clip((1.0 - d) * sharpness, 0, 1)[..., None]
            return stroma * (1 - w) + nucleus * w
        d, shade, edge = _nucleus_distance(self.tumor, self.TUMOR_SPACING, y, x, with_edge=True)
        cytoplasm = np.array([178, 118, 168], np.float32) + 6 * self._stain(y, x)[..., None]
        cytoplasm = np.where((edge < 2)[..., None], np.array([212, 168, 200], np.float32), cytoplasm)
        speckle = self.speckle_rng.normal(0, 14, d.shape).astype(np.float32)[..., None]  # chromatin
        nucleus = np.array([138, 96, 180], np.float32) + 14 * shade[..., None] + speckle
        nucleus = np.where(((d > 0.8) & (d <= 1.0))[..., None], nucleus - 45, nucleus)  # membrane
        nucleus = np.where((d < 0.22)[..., None], np.array([88, 48, 128], np.float32), nucleus)  # nucleolus
        w = np.clip((1.0 - d) * 6.0, 0, 1)[..., None]
        return cytoplasm * (1 - w) + nucleus * w


# ---------------------------------------------------------------------------------------------
# Stain variation

# Ruifrok & Johnston (2001) optical-density vectors of haematoxylin and eosin (as skimage's
# rgb2hed); the third row completes the basis. Concentrations c = OD @ inv(STAINS).
_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_STAINS /= np.linalg.norm(_STAINS, axis=1, keepdims=True)


@dataclass(frozen=True)
class StainStyle:
    """How strongly a slide took up each stain, relative to the texture's standard H&E, and how
    far its colour faded towards grey (`greying` 0..1: each pixel's optical density moved
    towards its mean over the three channels, as bleached or poorly fixed slides look)."""

    name: str = "standard"
    haematoxylin: float = 1.0
    eosin: float = 1.0
    greying: float = 0.0

    def od_transform(self) -> np.ndarray:
        """3x3 matrix T with OD' = OD @ T: the two stains scaled, the residual (what the texture
        holds outside the H and E vectors) by their mean, then the greying."""
        scale = np.diag([self.haematoxylin, self.eosin, (self.haematoxylin + self.eosin) / 2])
        grey = (1 - self.greying) * np.eye(3) + self.greying * np.full((3, 3), 1 / 3)
        return (np.linalg.inv(_STAINS) @ scale @ _STAINS @ grey).astype(np.float32)

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """RGB float (0..255) through the stain change; white glass (OD ~ 0) stays white."""
        if self == StainStyle(self.name):
            return rgb
        od = -np.log(np.clip(rgb, 1.0, 255.0) / 255.0)
        return 255.0 * np.exp(-np.maximum(od @ self.od_transform(), 0.0))


STAIN_PRESETS = {
    "standard": StainStyle(),
    "pale": StainStyle("pale", 0.45, 0.30),          # lightly stained
    "lilac-grey": StainStyle("lilac-grey", 0.40, 0.20, 0.6),   # faded: pale, blue-shifted, grey
    "faded-eosin": StainStyle("faded-eosin", 0.95, 0.35),
    "blue": StainStyle("blue", 1.30, 0.55),          # haematoxylin-heavy centre: blue-shifted
    "dark": StainStyle("dark", 1.35, 1.30),
}


def random_stain(rng: np.random.Generator) -> StainStyle:
    """A per-slide stain: one slide in five faded (pale, some of it grey), the others
    log-uniform around standard."""
    if rng.random() < 0.2:
        return StainStyle("pale", float(rng.uniform(0.3, 0.5)), float(rng.uniform(0.15, 0.35)),
                          float(rng.uniform(0.0, 0.7)))
    h, e = np.exp(rng.uniform(np.log(0.6), np.log(1.4), 2))
    return StainStyle("random", float(h), float(e))


# ---------------------------------------------------------------------------------------------
# Layout


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.normal(0, 1, shape), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-9)


def _tissue_plan(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Float field over the plan grid, > 0 where tissue: a few irregular blobs (lymph nodes cut
    through), ~30-45% of the slide, away from the border."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    envelope = np.full(shape, -np.inf, np.float32)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        ry, rx = rng.uniform(0.18, 0.32) * h, rng.uniform(0.18, 0.32) * w
        envelope = np.maximum(envelope, 1 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2)
    return envelope + 0.35 * _smooth_field(rng, shape, max(min(h, w) / 14, 1.0))


def _blob_polygon(rng: np.random.Generator, cy: float, cx: float, radius: float, n: int = 40) -> Polygon:
    """An irregular star-shaped outline (smooth radial noise), valid by construction."""
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    harmonics = sum(rng.normal(0, 0.12 / k) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
                    for k in range(1, 6))
    r = radius * np.clip(1 + harmonics, 0.5, 1.5)
    return Polygon(np.column_stack([cx + r * np.cos(angles), cy + r * np.sin(angles)]))


LESIONS = ("mixed", "micro")


def _tumor_layout(rng, tissue: np.ndarray, width: int, height: int, lesions: str = "mixed"):
    """Tumour nests centred on tissue. "mixed": a macro-metastasis (with one `_2` island), a
    medium nest and two micro-metastases; "micro": one or two micro-metastases of 1-5 tiles
    (radius 110-250 px, a 224 px tile is ~50k px^2) and nothing else."""
    ds = PLAN_DOWNSAMPLE
    depth = ndimage.distance_transform_edt(tissue) * ds  # level-0 px to the tissue edge
    side = min(width, height)
    if lesions == "micro":
        radii = [rng.uniform(110, 250) for _ in range(rng.integers(1, 3))]
    else:
        radii = [max(0.11 * side, 360.0), max(0.05 * side, 220.0)] + [rng.uniform(110, 170) for _ in range(2)]
    tumors, exclusions = [], []
    for i, radius in enumerate(radii):
        candidates = np.argwhere(depth > min(radius, depth.max() * 0.8))
        if not len(candidates):
            continue
        for _ in range(30):  # a few tries to find room apart from the nests already placed
            r, c = candidates[rng.integers(len(candidates))]
            blob = _blob_polygon(rng, (r + 0.5) * ds, (c + 0.5) * ds, radius)
            if not any(blob.distance(t) < 2 * ds for t in tumors):
                break
        else:
            continue
        tumors.append(blob)
        if i == 0 and lesions != "micro":  # a normal island inside the macro-metastasis, annotated `_2`
            island = _blob_polygon(rng, blob.centroid.y + 0.25 * radius, blob.centroid.x, 0.28 * radius, 24)
            if blob.buffer(-0.05 * radius).contains(island):
                exclusions.append(island)
    bounds = shapely.box(0, 0, width, height)
    tumors = [t.intersection(bounds) for t in tumors]
    return [t for t in tumors if t.geom_type == "Polygon" and not t.is_empty], exclusions


def _tissue_point(rng, tissue0: np.ndarray, avoid: np.ndarray, margin: int) -> tuple[float, float]:
    """A random level-0 (y, x) on tissue, `margin` px inside it, off `avoid`, sampled on a
    coarse grid (no full-resolution distance transform)."""
    step = 16
    coarse = tissue0[::step, ::step] & ~avoid[::step, ::step]
    coarse = ndimage.binary_erosion(coarse, iterations=max(margin // step, 1))
    candidates = np.argwhere(coarse)
    if not len(candidates):
        candidates = np.argwhere(tissue0[::step, ::step])
    if not len(candidates):
        return tissue0.shape[0] / 2, tissue0.shape[1] / 2
    r, c = candidates[rng.integers(len(candidates))]
    return float(r * step), float(c * step)


def draw_tissue_artefacts(rng, image: np.ndarray, tissue0: np.ndarray, tumor0: np.ndarray
                          ) -> tuple[np.ndarray, list]:
    """Pen strokes and a marker blot across the tissue, and an out-of-focus region on it.

    Ink is translucent: it multiplies the light through the tissue (the tissue shows beneath,
    darker and tinted), as a pen mark on the coverslip does. Ink and blur are placed off the
    tumour, where pathologists' marks next to a lesion usually are; strokes may still cross it.
    Returns the level-0 ink mask and the blurred regions (shapely polygons).
    """
    from shapely.geometry import LineString, Point

    h, w = image.shape[:2]
    ink = np.zeros((h, w), bool)
    for colour in ((40, 70, 170), (40, 140, 80)):   # a blue and a green stroke through tissue
        cy, cx = _tissue_point(rng, tissue0, tumor0, 64)
        length, amp, phase = rng.uniform(0.4, 0.7) * w, rng.uniform(30, 150), rng.uniform(0, 6)
        xs = cx + np.linspace(-length / 2, length / 2, 64)
        ys = cy + amp * np.sin(np.linspace(0, 3, 64) + phase) - amp * np.sin(1.5 + phase)
        stroke = rasterize(LineString(np.column_stack([xs, ys])).buffer(rng.uniform(35, 60)), (h, w), 1.0)
        image[stroke] = (image[stroke] * (np.asarray(colour, np.float32) / 255)).astype(np.uint8)
        ink |= stroke
    cy, cx = _tissue_point(rng, tissue0, tumor0, 128)
    blot = rasterize(Point(cx, cy).buffer(rng.uniform(50, 90)), (h, w), 1.0)   # black marker
    image[blot] = (image[blot] * 0.08).astype(np.uint8)
    ink |= blot
    cy, cx = _tissue_point(rng, tissue0, tumor0 | ink, 300)
    region = Point(cx, cy).buffer(rng.uniform(250, 400))
    inside = rasterize(region, (h, w), 1.0)
    r0, c0, r1, c1 = (max(int(region.bounds[1]) - 16, 0), max(int(region.bounds[0]) - 16, 0),
                      min(int(region.bounds[3]) + 17, h), min(int(region.bounds[2]) + 17, w))
    box = (slice(r0, r1), slice(c0, c1))
    blurred = ndimage.gaussian_filter(image[box].astype(np.float32), sigma=(5, 5, 0))
    image[box] = np.where(inside[box][..., None], blurred + 0.5, image[box]).astype(np.uint8)
    return ink, [region]


def _draw_artifacts(rng, image: np.ndarray, tissue: np.ndarray) -> None:
    """Marker dots, pen strokes and stitching tiles, on glass only (never over tissue)."""
    from skimage.draw import disk

    h, w = image.shape[:2]
    glass = ~tissue

    def paint(rr, cc, colour):
        keep = glass[rr, cc]
        image[rr[keep], cc[keep]] = colour

    for _ in range(rng.integers(2, 5)):  # black marker dots
        paint(*disk((rng.uniform(0, h), rng.uniform(0, w)), rng.uniform(25, 60), shape=(h, w)),
              (rng.integers(10, 35),) * 3)
    for colour in ((40, 70, 170), (40, 140, 80)):  # one blue and one green pen stroke
        y0, x0 = rng.uniform(0.05, 0.95) * h, rng.uniform(0, 0.3) * w
        length, amp, phase = rng.uniform(0.3, 0.6) * w, rng.uniform(20, 120), rng.uniform(0, 6)
        n = max(int(length / 6), 2)
        xs = x0 + np.linspace(0, length, n)
        ys = y0 + amp * np.sin(np.linspace(0, 3, n) + phase)
        discs = [disk((yy, xx), 7, shape=(h, w)) for yy, xx in zip(ys, xs)]
        paint(np.concatenate([d[0] for d in discs]), np.concatenate([d[1] for d in discs]), colour)
    for _ in range(rng.integers(1, 3)):  # flat grey scanner-stitching tiles on the glass
        ty, tx = rng.integers(0, max(h // TILE, 1)), rng.integers(0, max(w // TILE, 1))
        sl = (slice(ty * TILE, (ty + 1) * TILE), slice(tx * TILE, (tx + 1) * TILE))
        if not tissue[sl].any():
            image[sl] = rng.integers(185, 215)


# ---------------------------------------------------------------------------------------------
# TIFF writing


def _levels(width: int, height: int, min_side: int = 1000) -> int:
    """Pyramid depth: halve until the longest side is below ~min_side."""
    count = 1
    while max(width, height) >> (count - 1) >= min_side and min(width, height) >> count >= 1:
        count += 1
    return count


def _downsample2(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    pooled = image[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3), dtype=np.float32)
    return (pooled + 0.5).astype(np.uint8)


def _resolution(level_downsample: float, mpp: float = MPP) -> dict:
    px_per_cm = 1e4 / (mpp * level_downsample)
    return {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}


def _resample(image: np.ndarray, scale: float) -> np.ndarray:
    """`image` at `scale` times its pixel count per side (new px per old px), floor-rounded, so
    that a new pixel is exactly 1 / scale old pixels: 2x2 means for a half, else Lanczos (which
    widens its kernel when shrinking: antialiased)."""
    from PIL import Image

    if abs(scale - 0.5) < 1e-9:
        return _downsample2(image)
    h, w = image.shape[:2]
    size = (int(w * scale + 1e-6), int(h * scale + 1e-6))
    box = (0.0, 0.0, min(size[0] / scale, w), min(size[1] / scale, h))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS, box=box))


def _scaled_truth(truth: SyntheticTruth, mpp: float, dimensions: tuple[int, int]) -> SyntheticTruth:
    """`truth` of a slide drawn at MPP, in the level-0 pixels of its copy resampled to `mpp`:
    polygons scaled, the masks kept on their grid (whose cells are now fewer or more px)."""
    from shapely import affinity

    scale = MPP / mpp

    def scaled(polygons):
        return [affinity.scale(p, scale, scale, origin=(0, 0)) for p in polygons]

    return dataclasses.replace(
        truth, dimensions=dimensions, mask_downsample=truth.mask_downsample * scale,
        tumor_polygons=scaled(truth.tumor_polygons), exclusion_polygons=scaled(truth.exclusion_polygons),
        blur_polygons=scaled(truth.blur_polygons), mpp=mpp, level_count=_levels(*dimensions),
        drawn_dimensions=truth.dimensions)


def _write_pyramid(path: Path, level0: np.ndarray, levels: int, quality: int, mpp: float = MPP) -> None:
    import tifffile

    image = level0
    bigtiff = level0.nbytes > 2**31
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for level in range(levels):
            if level:
                image = _downsample2(image)
            tw.write(image, tile=(TILE, TILE), photometric="rgb", compression="jpeg",
                     compressionargs={"level": quality}, subfiletype=0 if level == 0 else 1,
                     maxworkers=2, **_resolution(2**level, mpp))


def write_synthetic_slide(path, width: int = 4096, height: int = 4096, seed: int = 0,
                          tumor: bool = True, quality: int = 88, stain: StainStyle | str = "standard",
                          tissue_artefacts: bool = False, lesions: str = "mixed",
                          colour_matched: bool = False, mpp: float = MPP) -> SyntheticTruth:
    """Write one slide (pyramidal JPEG-tiled TIFF, 0.243 um/px or `mpp`) and return what was drawn.

    `stain` is a StainStyle or a STAIN_PRESETS name; `tissue_artefacts` draws pen, marker and
    blur across the tissue (draw_tissue_artefacts); `lesions` is one of LESIONS;
    `colour_matched` draws tumour that differs from lymph node only in its nuclei's size and
    shape (TextureRenderer). `mpp`: level-0 pixel size of the file. The slide is drawn at
    0.243 um/px, `width` x `height` px (`width * 0.243` um wide, whatever `mpp`), then resampled
    (`_resample`): the same seed gives the same tissue at any `mpp`, and the truth is in the
    file's level-0 pixels.
    """
    image, truth = _draw_slide(Path(path), width, height, seed, tumor, stain, tissue_artefacts,
                               lesions, colour_matched, mpp)
    return _write_scan(Path(path), image, truth, mpp, quality)


def _draw_slide(path: Path, width: int, height: int, seed: int, tumor: bool,
                stain: StainStyle | str, tissue_artefacts: bool, lesions: str,
                colour_matched: bool, mpp: float) -> tuple[np.ndarray, SyntheticTruth]:
    """The level-0 image at 0.243 um/px and its truth (write_synthetic_slide's drawing)."""
    if width < 512 or height < 512:
        raise ConfigError(f"synthetic slide {path}: {width} x {height} px is too small (>= 512 x 512)")
    if not mpp > 0 or min(width, height) * MPP / mpp < TILE:
        raise ConfigError(f"synthetic slide {path}: {width} x {height} px at {MPP} um/px is less than "
                          f"{TILE} px a side at {mpp} um/px")
    if isinstance(stain, str):
        if stain not in STAIN_PRESETS:
            raise ConfigError(f"unknown stain {stain!r}; one of {sorted(STAIN_PRESETS)}")
        stain = STAIN_PRESETS[stain]
    if lesions not in LESIONS:
        raise ConfigError(f"unknown lesions {lesions!r}; one of {LESIONS}")
    rng = np.random.default_rng([seed, 1])
    ds = PLAN_DOWNSAMPLE
    plan_shape = (-(-height // ds), -(-width // ds))
    field = _tissue_plan(rng, plan_shape)
    tissue_plan = field > 0
    tumors, exclusions = _tumor_layout(rng, tissue_plan, width, height, lesions) if tumor else ([], [])
    region = shapely.union_all(tumors).difference(shapely.union_all(exclusions)) if tumors else Polygon()
    tumor_plan = rasterize(shapely.union_all(tumors) if tumors else Polygon(), plan_shape, ds)
    tissue_plan |= tumor_plan
    # Tumour (minus islands) at level-0/2 resolution: cheap, and sharp enough for cell texture.
    tumor_half = rasterize(region, (-(-height // 2), -(-width // 2)), 2.0)

    renderer = TextureRenderer(seed, height, width, colour_matched)
    image = np.empty((height, width, 3), np.uint8)
    tissue0 = np.empty((height, width), bool)
    xs = np.arange(width)
    px = (xs + 0.5) / ds - 0.5
    for y0 in range(0, height, STRIP):
        ys = np.arange(y0, min(y0 + STRIP, height))
        py = (ys + 0.5) / ds - 0.5
        # Bilinear field at level 0: smooth tissue edges instead of 16 px steps.
        f = ndimage.map_coordinates(field, np.meshgrid(py, px, indexing="ij"), order=1, mode="nearest")
        is_tumor = tumor_half[ys // 2][:, xs // 2]
        is_tissue = (f > 0) | is_tumor | tumor_plan[ys // ds][:, xs // ds]
        strip = np.broadcast_to(GLASS, (len(ys), width, 3)).copy()
        strip += rng.normal(0, 1.5, strip.shape[:2]).astype(np.float32)[..., None]
        strip = np.where(is_tissue[..., None], renderer.lymph_rgb(ys, xs), strip)
        if is_tumor.any():
            strip = np.where(is_tumor[..., None], renderer.tumor_rgb(ys, xs), strip)
        strip = np.where(is_tissue[..., None], stain.apply(strip), strip)
        image[y0:y0 + len(ys)] = np.clip(strip, 0, 255)
        tissue0[y0:y0 + len(ys)] = is_tissue
    ink_plan, blur_polygons = None, []
    if tissue_artefacts:   # own generator: the plain slides stay exactly as they were
        tumor0 = np.repeat(np.repeat(tumor_half, 2, 0), 2, 1)[:height, :width]
        ink0, blur_polygons = draw_tissue_artefacts(np.random.default_rng([seed, 5]), image,
                                                    tissue0, tumor0)
        ink_plan = _block_mean(ink0, ds) > 0.5
    _draw_artifacts(rng, image, tissue0)
    truth = SyntheticTruth(path, (width, height), tissue_plan, float(ds), tumors, exclusions,
                           MPP, _levels(width, height), ink_plan, blur_polygons, stain.name, seed,
                           colour_matched)
    return image, truth


def _write_scan(path: Path, image: np.ndarray, truth: SyntheticTruth, mpp: float,
                quality: int) -> SyntheticTruth:
    """Write the drawn `image` (0.243 um/px) as a slide of level-0 pixel size `mpp`; its truth."""
    if mpp != MPP:
        image = _resample(image, MPP / mpp)
        truth = _scaled_truth(dataclasses.replace(truth, path=path), mpp,
                              (image.shape[1], image.shape[0]))
    partial = path.with_name(f".{path.name}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write_pyramid(partial, image, truth.level_count, quality, mpp)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return truth


def write_synthetic_slide_at(path, mpp: float, width_um: float = 1000.0, height_um: float = 1000.0,
                             seed: int = 0, xml: bool = True, **options) -> SyntheticTruth:
    """The slide `write_synthetic_slide(path, seed=seed, **options)` draws over `width_um` x
    `height_um` um, written at `mpp` um/px at level 0, with its ASAP XML beside it (`path` with
    .xml, tumour slides only, `xml`) in the same level-0 pixels. Copies of one seed and extent at
    0.243, 0.226 or 0.486 um/px hold the same tissue, nuclei and lesions."""
    path = Path(path)
    truth = write_synthetic_slide(path, round(width_um / MPP), round(height_um / MPP), seed=seed,
                                  mpp=mpp, **options)
    if xml and truth.is_tumor:
        write_asap_xml(path.with_suffix(".xml"), truth.tumor_polygons, truth.exclusion_polygons)
    return truth


def write_synthetic_scans(paths: dict[float, Path], width_um: float = 1000.0,
                          height_um: float = 1000.0, seed: int = 0, quality: int = 88,
                          xml: bool = True, **options) -> dict[float, SyntheticTruth]:
    """One slide as several scanners show it: {mpp: path} written from one drawing (what
    write_synthetic_slide_at writes for each, at the cost of drawing once), each with its
    pyramid and ASAP XML; returns {mpp: truth}."""
    width, height = round(width_um / MPP), round(height_um / MPP)
    first = Path(next(iter(paths.values())))
    image, truth = _draw_slide(first, width, height, seed, options.pop("tumor", True),
                               options.pop("stain", "standard"),
                               options.pop("tissue_artefacts", False),
                               options.pop("lesions", "mixed"),
                               options.pop("colour_matched", False), max(paths))
    if options:
        raise ConfigError(f"unknown options {sorted(options)}")
    truths = {}
    for mpp, path in paths.items():
        path = Path(path)
        truths[mpp] = _write_scan(path, image, dataclasses.replace(truth, path=path), mpp, quality)
        if xml and truths[mpp].is_tumor:
            write_asap_xml(path.with_suffix(".xml"), truths[mpp].tumor_polygons,
                           truths[mpp].exclusion_polygons)
    return truths


def _block_mean(mask: np.ndarray, ds: int) -> np.ndarray:
    """Share of each ds x ds block that is set (the last row/column of blocks may be partial)."""
    h, w = mask.shape
    padded = np.zeros((-(-h // ds) * ds, -(-w // ds) * ds), np.float32)
    padded[:h, :w] = mask
    return padded.reshape(padded.shape[0] // ds, ds, padded.shape[1] // ds, ds).mean(axis=(1, 3))


# ---------------------------------------------------------------------------------------------
# Camelyon16-size slide from pre-encoded tiles


def _encode(tile: np.ndarray, quality: int) -> bytes:
    """JPEG bytes exactly as tifffile writes a tile with photometric="rgb", compression="jpeg":
    YCbCr, 2x2 chroma subsampling. Standard Huffman tables (no optimisation), so that every
    tile's tables are the same and can be shared (split_jpeg_tables)."""
    import imagecodecs

    return imagecodecs.jpeg_encode(np.ascontiguousarray(tile), level=quality, colorspace="RGB",
                                   outcolorspace="YCBCR", subsampling=(2, 2), optimize=False)


_DQT, _DHT, _SOS = 0xDB, 0xC4, 0xDA


def split_jpeg_tables(stream: bytes) -> tuple[bytes, bytes]:
    """(tables, abbreviated stream) of a JPEG: the quantisation and Huffman tables move to a
    tables-only stream (the TIFF JPEGTables tag, as libtiff writes Camelyon16's tiles), the
    tile keeps its frame and scan. APPn markers are dropped, as in libtiff's tiles."""
    if stream[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG stream")
    tables, rest, pos = [], [], 2
    while True:
        marker = stream[pos + 1]
        if marker == _SOS:   # the scan runs to the end of the stream
            rest.append(stream[pos:])
            break
        length = int.from_bytes(stream[pos + 2:pos + 4], "big")
        segment = stream[pos:pos + 2 + length]
        if marker in (_DQT, _DHT):
            tables.append(segment)
        elif marker >> 4 != 0xE:   # not an APPn marker
            rest.append(segment)
        pos += 2 + length
    return (b"\xff\xd8" + b"".join(tables) + b"\xff\xd9", b"\xff\xd8" + b"".join(rest))


def write_camelyon_size_slide(path, width: int = 98_304, height: int = 196_608, seed: int = 0,
                              quality: int = 75, variants: int = 2, tile: int = TILE,
                              jpeg_tables: bool = False) -> SyntheticTruth:
    """A Camelyon16-size slide (default 98304 x 196608 px, 0.243 um/px), written fast.

    The layout is a plan with one cell per level-0 tile (glass, lymph node, tumour). Each class
    has `variants` textures of 2048 x 2048 px rendered once; a tile of level L whose plan cells
    are all one class is a crop of that texture (downsampled by 2^L), JPEG-encoded once and its
    bytes reused; only tiles straddling a class boundary at levels >= 1 are assembled and encoded
    one by one. Tiles of neighbouring cells are neighbouring crops, so texture is continuous.
    `tile` is the TIFF tile side (Camelyon16's own files: 512, with `jpeg_tables`: one shared
    JPEGTables tag and abbreviated tile streams, as libtiff writes them).
    """
    import tifffile

    path = Path(path)
    if tile not in (256, 512):
        raise ConfigError(f"camelyon-size slide {path}: tile side {tile}, one of 256, 512")
    if width % tile or height % tile or width < 8 * tile or height < 8 * tile:
        raise ConfigError(f"camelyon-size slide {path}: {width} x {height} must be multiples of "
                          f"{tile} and at least {8 * tile}")
    rng = np.random.default_rng([seed, 2])
    rows, cols = height // tile, width // tile
    tissue = _tissue_plan(rng, (rows, cols)) > 0
    tissue = ndimage.binary_opening(tissue, iterations=2)
    # Tumour nests in tile units: one macro-metastasis, a few smaller ones and micro-metastases.
    depth = ndimage.distance_transform_edt(tissue)
    yy, xx = np.mgrid[0:rows, 0:cols]
    tumor = np.zeros_like(tissue)
    for radius in [max(min(rows, cols) * 0.06, 2.0), max(min(rows, cols) * 0.03, 1.5), 1.0, 0.6]:
        candidates = np.argwhere(depth > radius + 1)
        if len(candidates):
            cy, cx = candidates[rng.integers(len(candidates))]
            noise = rng.uniform(0.8, 1.2, tumor.shape)
            tumor |= ((yy - cy) ** 2 + (xx - cx) ** 2) * noise <= radius ** 2
    classes = np.where(tumor & tissue, 2, np.where(tissue, 1, 0)).astype(np.int64)
    # Glass artefacts at their real size (a pen line ~0.5 mm wide, marker dots ~1 mm): whole
    # tiles of ink on glass only, so the plan says exactly what the tissue mask must reject.
    ink = np.zeros_like(tissue, dtype=np.int64)
    for cls in (INK_BLUE, INK_GREEN):
        glass_rows = np.flatnonzero(tissue.mean(axis=1) < 0.1)  # pen marks are on the glass
        y0 = glass_rows[rng.integers(len(glass_rows))] if len(glass_rows) else rng.uniform(0, rows)
        amp = rng.uniform(1, 3)
        xs = np.arange(int(cols * rng.uniform(0.1, 0.3)), int(cols * rng.uniform(0.6, 0.9)))
        ys = np.clip((y0 + amp * np.sin(xs / max(cols / 6, 1))).astype(int), 0, rows - 2)
        ink[ys, xs] = ink[ys + 1, xs] = cls
    for _ in range(3):
        cy, cx = rng.integers(0, rows), rng.integers(0, cols)
        ink[(yy - cy) ** 2 + (xx - cx) ** 2 <= 4] = INK_BLACK
    classes = np.where((classes == 0) & (ink > 0), ink, classes)
    variant = (np.random.default_rng([seed, 3]).integers(0, variants, (rows // 8 + 1, cols // 8 + 1))
               .repeat(8, 0).repeat(8, 1)[:rows, :cols])

    block = 8 * TILE  # texture side: 2048 px (a multiple of every tile side)
    textures = np.empty((len(INK_COLOURS) + 3, variants, block, block, 3), np.uint8)
    axis = np.arange(block)
    for v in range(variants):
        renderer = TextureRenderer(seed * 100 + v, block, block)
        noise = np.random.default_rng([seed, v]).normal(0, 1.5, (block, block, 1))
        textures[0, v] = np.clip(GLASS + noise, 0, 255)
        textures[1, v] = np.clip(renderer.lymph_rgb(axis, axis), 0, 255)
        textures[2, v] = np.clip(renderer.tumor_rgb(axis, axis), 0, 255)
        for cls, colour in INK_COLOURS.items():
            noise = np.random.default_rng([seed, v, cls]).normal(0, 4, (block, block, 1))
            textures[cls, v] = np.clip(np.asarray(colour, np.float32) + noise, 0, 255)

    levels = _levels(width, height)
    encoded: dict = {}
    # Every tile has the same tables (one quality, standard Huffman tables): shared, or not.
    table_bytes = split_jpeg_tables(_encode(textures[0, 0, :tile, :tile], quality))[0] \
        if jpeg_tables else None

    def shared(stream: bytes) -> bytes:
        if table_bytes is None:
            return stream
        tables, abbreviated = split_jpeg_tables(stream)
        if tables != table_bytes:
            raise RuntimeError("JPEG tables differ between tiles")
        return abbreviated

    tex = textures
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for level in range(levels):
            scale = 2**level
            if level and tex.shape[2] >= 2:  # textures follow the pyramid: one 2x2 mean per level
                k, v, side = tex.shape[:3]
                tex = (tex.reshape(k, v, side // 2, 2, side // 2, 2, 3).mean(axis=(3, 5), dtype=np.float32)
                       + 0.5).astype(np.uint8)
            side = tex.shape[2]  # texture side at this level
            lh, lw = height // scale, width // scale
            trows, tcols = -(-lh // tile), -(-lw // tile)

            def tiles(level=level, scale=scale, tex=tex, side=side, lh=lh, lw=lw, trows=trows, tcols=tcols):
                span = scale  # plan cells per tile side at this level
                for ty in range(trows):
                    cy0 = ty * span
                    for tx in range(tcols):
                        cx0 = tx * span
                        cls = classes[cy0:cy0 + span, cx0:cx0 + span]
                        var = variant[cy0:cy0 + span, cx0:cx0 + span]
                        c0, v0 = cls.flat[0], var.flat[0]
                        if side >= tile and (cls == c0).all() and (var == v0).all():
                            oy, ox = (ty * tile) % side, (tx * tile) % side
                            key = (level, c0, v0, oy, ox)
                            if key not in encoded:
                                encoded[key] = shared(_encode(tex[c0, v0, oy:oy + tile, ox:ox + tile],
                                                              quality))
                            yield encoded[key]
                        else:  # mixed tile: gather each pixel from its cell's texture
                            py = ty * tile + np.arange(tile)
                            px = tx * tile + np.arange(tile)
                            cy = np.minimum(py * scale // tile, rows - 1)
                            cx = np.minimum(px * scale // tile, cols - 1)
                            pixels = tex[classes[cy[:, None], cx[None, :]], variant[cy[:, None], cx[None, :]],
                                         (py % side)[:, None], (px % side)[None, :]]
                            yield shared(_encode(pixels, quality))

            tw.write(tiles(), shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile),
                     photometric="rgb", compression="jpeg", compressionargs={"level": quality},
                     subfiletype=0 if level == 0 else 1, jpegtables=table_bytes,
                     **_resolution(scale))
            log.debug("level %d: %d x %d px, %d tiles encoded so far", level, lw, lh, len(encoded))
    truth_tumor = shapely.union_all(shapely.box(*(np.argwhere(classes == 2)[:, ::-1].T * tile),
                                                *((np.argwhere(classes == 2)[:, ::-1].T + 1) * tile)))
    return SyntheticTruth(path, (width, height), (classes == 1) | (classes == 2), float(tile),
                          [p for p in getattr(truth_tumor, "geoms", [truth_tumor]) if not p.is_empty],
                          [], MPP, levels)


# ---------------------------------------------------------------------------------------------
# Cells: the centroids of the nuclei a slide was drawn with, for Spatiopath (wsi.cells format)

CELL_MODES = ("uniform", "enriched", "excluded")
IMMUNE_CLASS = "Immune cells"   # QuPath's built-in class names
OTHER_CLASS, TUMOR_CELL_CLASS = "Other", "Tumor"
IMMUNE_SHARE = 0.3              # share of lymphocytes called immune where the mode is neutral
ENRICHED_OUTSIDE = 0.03         # "enriched": share called immune beyond the band


def _nucleus_centres(cells: dict, spacing: int, width: int, height: int) -> np.ndarray:
    r, c = np.nonzero(cells["on"])
    xy = np.column_stack([c * spacing + spacing / 2 + cells["dx"][r, c],
                          r * spacing + spacing / 2 + cells["dy"][r, c]]).astype(np.float64)
    return xy[(xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)]


def synthetic_cells(truth: SyntheticTruth, mode: str = "uniform", band_um: float = 50.0,
                    around=None, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Level-0 centroids and classes of the nuclei `write_synthetic_slide` drew: every
    lymphocyte nucleus on lymph tissue ("Immune cells" or "Other") and every tumour nucleus in
    the tumour ("Tumor"). Which lymphocytes are called immune follows `mode`, a known pattern
    relative to `around` (level-0 geometry, default the drawn tumour):

    - "uniform": a share IMMUNE_SHARE everywhere, whatever the distance;
    - "enriched": all those within `band_um` of the tumour, ENRICHED_OUTSIDE beyond;
    - "excluded": none within `band_um`, IMMUNE_SHARE beyond.
    """
    if mode not in CELL_MODES:
        raise ConfigError(f"unknown cell mode {mode!r}; one of {CELL_MODES}")
    if truth.seed is None:
        raise ConfigError(f"{truth.path}: synthetic cells need a slide of write_synthetic_slide "
                          "(its texture seed)")
    width, height = truth.drawn_dimensions or truth.dimensions   # the frame the nuclei were drawn in
    renderer = TextureRenderer(truth.seed, height, width, truth.colour_matched)
    ds = truth.mask_downsample
    mask = truth.tissue_mask
    region = truth.region
    lymph = _nucleus_centres(renderer.lymph, renderer.LYMPH_SPACING, width, height)
    tumor = _nucleus_centres(renderer.tumor, renderer.tumor_spacing, width, height)
    if truth.drawn_dimensions is not None:   # a resampled slide: into its level-0 px
        lymph, tumor = lymph * (MPP / truth.mpp), tumor * (MPP / truth.mpp)
    on_tissue = mask[np.minimum((lymph[:, 1] // ds).astype(int), mask.shape[0] - 1),
                     np.minimum((lymph[:, 0] // ds).astype(int), mask.shape[1] - 1)]
    if not region.is_empty:
        on_tissue &= ~shapely.contains_xy(region, lymph[:, 0], lymph[:, 1])
    lymph = lymph[on_tissue]
    tumor = tumor[shapely.contains_xy(region, tumor[:, 0], tumor[:, 1])] if not region.is_empty \
        else tumor[:0]
    around = region if around is None else around
    if around is None or around.is_empty:
        band = np.zeros(len(lymph), bool)
    else:
        points = shapely.points(lymph)
        band = (shapely.distance(around, points) <= band_um / truth.mpp) & ~shapely.contains(around, points)
    share = {"uniform": np.full(len(lymph), IMMUNE_SHARE),
             "enriched": np.where(band, 1.0, ENRICHED_OUTSIDE),
             "excluded": np.where(band, 0.0, IMMUNE_SHARE)}[mode]
    immune = np.random.default_rng([seed, 13]).random(len(lymph)) < share
    classes = [IMMUNE_CLASS if i else OTHER_CLASS for i in immune.tolist()] + [TUMOR_CELL_CLASS] * len(tumor)
    return np.concatenate([lymph, tumor]), classes


def write_synthetic_cells(path, truth: SyntheticTruth, mode: str = "uniform", band_um: float = 50.0,
                          around=None, seed: int = 0) -> Path:
    """`synthetic_cells` as a cells CSV (`x,y,class`, level-0 px: wsi.cells)."""
    from wsi.cells import write_cells_csv

    xy, classes = synthetic_cells(truth, mode, band_um, around, seed)
    return write_cells_csv(path, xy, classes)


# ---------------------------------------------------------------------------------------------
# Dataset and command


def make_dataset(out, n_tumor: int, n_normal: int, size: tuple[int, int] = (4096, 4096),
                 seed: int = 0, hard: bool = False, colour_matched: bool = False,
                 mpp: float = MPP, prefix: str = "") -> dict[str, SyntheticTruth]:
    """Camelyon16 layout in `out`: tumor_001.tif + tumor_001.xml, ..., normal_001.tif, ...,
    reference.csv (columns slide,label; label tumor|normal) and synth.csv (how each slide was
    drawn). Returns name -> SyntheticTruth.

    `hard`: every slide gets its own stain (random_stain, pale ones included) and pen, marker
    and blur across its tissue; every other tumour slide (tumor_001, _003, ...) has
    micro-metastases only. `colour_matched` and `mpp` as write_synthetic_slide (`size` is the
    extent in 0.243 um/px pixels); where either is not the default, synth.csv gains the columns
    colour_matched and mpp (the default dataset's files stay as they were). `prefix` goes before
    every slide name (hard_tumor_001): sets made apart can then share one training folder.
    """
    from core.files import atomic_write

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    width, height = size
    truths: dict[str, SyntheticTruth] = {}
    jobs = [(f"{prefix}tumor_{i:03d}", True, i) for i in range(1, n_tumor + 1)]
    jobs += [(f"{prefix}normal_{i:03d}", False, 1000 + i) for i in range(1, n_normal + 1)]
    drawn = []
    extra = [int(colour_matched), f"{mpp:g}"] if colour_matched or mpp != MPP else []
    for name, is_tumor, k in jobs:
        slide_seed = seed * 10_000 + k
        style = dict(stain="standard", tissue_artefacts=False, lesions="mixed")
        if hard:
            style = dict(stain=random_stain(np.random.default_rng([slide_seed, 9])),
                         tissue_artefacts=True, lesions="micro" if is_tumor and k % 2 else "mixed")
        truth = write_synthetic_slide(out / f"{name}.tif", width, height, seed=slide_seed,
                                      tumor=is_tumor, colour_matched=colour_matched, mpp=mpp, **style)
        if is_tumor:
            write_asap_xml(out / f"{name}.xml", truth.tumor_polygons, truth.exclusion_polygons)
        truths[name] = truth
        stain = style["stain"] if isinstance(style["stain"], StainStyle) else STAIN_PRESETS[style["stain"]]
        drawn.append([name, "tumor" if is_tumor else "normal", stain.name,
                      f"{stain.haematoxylin:.3f}", f"{stain.eosin:.3f}",
                      style["lesions"] if is_tumor else "", int(style["tissue_artefacts"])]
                     + extra)
        log.info("%s: %d tumour nest(s), %d exclusion(s), stain %s", name, len(truth.tumor_polygons),
                 len(truth.exclusion_polygons), stain.name)
    with atomic_write(out / "reference.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide", "label"])
        for name, is_tumor, _ in jobs:
            writer.writerow([name, "tumor" if is_tumor else "normal"])
    with atomic_write(out / "synth.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide", "label", "stain", "haematoxylin", "eosin", "lesions", "tissue_artefacts"]
                        + (["colour_matched", "mpp"] if extra else []))
        writer.writerows(drawn)
    return truths


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size must be WIDTHxHEIGHT, e.g. 4096x4096, not {text!r}") from None
    return w, h


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--tumor", type=int, default=2, help="tumour slides (default 2)")
    parser.add_argument("--normal", type=int, default=2, help="normal slides (default 2)")
    parser.add_argument("--size", type=_size, default=(4096, 4096),
                        help="WIDTHxHEIGHT level 0 (default 4096x4096)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hard", action="store_true",
                        help="per-slide stain variation (pale included), pen/marker/blur across "
                             "tissue, micro-metastases only on every other tumour slide")
    parser.add_argument("--colour-matched", action="store_true",
                        help="tumour differs from lymph node only in nuclear size and shape (same "
                             "colours and stain, same mean colour per tile): a model must use "
                             "morphology")
    parser.add_argument("--mpp", type=float, default=MPP,
                        help=f"level-0 pixel size, um/px (default {MPP}, Camelyon16 at 40x; e.g. 0.226, "
                             "or 0.486 for 20x). The tissue is drawn at 0.243 um/px and resampled: "
                             "--size stays its extent in 0.243 um/px pixels, and one --seed gives the "
                             "same tissue at any --mpp")
    parser.add_argument("--cells", choices=CELL_MODES, default=None,
                        help="also write OUT/cells/<slide>.csv: the drawn nuclei (x,y,class), "
                             "immune cells placed uniform, enriched in a 50 um band around "
                             "tumour, or excluded from it (for milroi-serve spatiopath)")
    parser.add_argument("--prefix", default="",
                        help="before every slide name (e.g. hard_: hard_tumor_001), so that sets "
                             "made apart can share one training folder")


def run(args) -> int:
    if args.tumor < 0 or args.normal < 0 or args.tumor + args.normal == 0:
        raise ConfigError("synth: --tumor and --normal must be >= 0, and at least one slide")
    truths = make_dataset(args.out, args.tumor, args.normal, args.size, args.seed, hard=args.hard,
                          colour_matched=args.colour_matched, mpp=args.mpp, prefix=args.prefix)
    if args.cells:
        for name, truth in truths.items():
            write_synthetic_cells(Path(args.out) / "cells" / f"{name}.csv", truth, args.cells,
                                  seed=truth.seed or 0)
    kind = ("hard " if args.hard else "") + ("colour-matched " if args.colour_matched else "")
    at = f" at {args.mpp:g} um/px" if args.mpp != MPP else ""
    print(f"wrote {len(truths)} {kind}slides{at} and reference.csv to {args.out}")
    return 0
