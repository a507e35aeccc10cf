"""The parameters that decide which pixels are scored: tissue mask and tile grid.

Features at training time and scores at serving time must come from the same tiles, so these
two objects travel in the model bundle's manifest (`core.bundle.BundleManifest`) and in the
feature files' attributes (`training.feature_file.FeatureAttrs`). Their defaults are stated here
and nowhere else: Camelyon16 level-0 tiles of 224 px (ResNet-50's input) with at least a quarter
of tissue, and a mask at ~1.25x. The model's input is stated in physical units (`target_mpp`):
wsi.scale reads each slide at that scale.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from core.errors import ConfigError

# Camelyon16 slides are scanned at 40x, 0.243 um/px at level 0 (Litjens et al. 2018): the
# pixel size assumed for a slide that carries none, and the one the models are trained at.
CAMELYON16_MPP = 0.243
# A table beside the slides giving the pixel size of those whose metadata has none (wsi.slide):
# rows `slide,mpp`, the slide named by its file name or its name without extension.
MPP_CSV = "mpp.csv"


@dataclass(frozen=True)
class TissueParams:
    """Parameters of the tissue mask (wsi.tissue); saved in the model bundle manifest."""

    target_downsample: float = 32.0   # level-0 px per mask px (32 ~ 1.25x for a 40x slide)
    min_mask_side: int = 512           # small slides: use a finer mask so it has this many px
    black_value_max: int = 50          # V (0..255) at or below this is black ink / debris
    pen_min_saturation: int = 40       # S (0..255) from which green >= red means pen ink
    pen_green_minus_red: int = 0       # G - R (>= 0) at or above this, with enough S, is pen ink
    min_saturation: int = 20           # floor of the Otsu thresholds (empty slides stay empty)
    optical_density: bool = True       # second cue for pale / faded stains (wsi.tissue step 5)
    min_optical_density: float = 0.05  # floor of the OD threshold (glass is ~0.02)
    min_chroma: int = 6                # max - min of R, G, B below this is grey, not pale stain
    od_closing_um: float = 20.0        # OD cue: closing radius joining nuclei of faded tissue
    min_object_um2: float = 10_000.0   # objects smaller than this are dropped (~ 100 um square)
    min_hole_um2: float = 10_000.0     # holes smaller than this are filled
    min_fragment_um2: float = 750.0    # pieces left once ink is cut out: ~ 1/4 of a 224 px tile

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TissueParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown tissue parameters: {sorted(unknown)}")
        return cls(**values)

    def with_overrides(self, overrides: list[str]) -> TissueParams:
        """A copy with `NAME=VALUE` settings applied (`--tissue`), each value read as its
        field's type: `min_saturation=30`, `optical_density=false`."""
        defaults = self.to_dict()
        changes = {}
        for item in overrides:
            name, sep, text = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in defaults:
                raise ConfigError(f"--tissue {item!r}: give NAME=VALUE with NAME one of "
                                  f"{', '.join(defaults)}")
            kind = type(defaults[name])
            try:
                if kind is bool:
                    if text.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(text)
                    value = text.strip().lower() in ("true", "1", "yes")
                else:
                    value = kind(text)
            except ValueError:
                raise ConfigError(f"--tissue {item!r}: {name} takes a {kind.__name__}") from None
            changes[name] = value
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ArtefactParams:
    """Limits past which a tile is an artefact (wsi.tile_quality): scored and reported, but kept
    out of the slide score, the ROIs and training. Saved in the model bundle manifest and in
    the feature files, so that training and serving exclude the same tiles. The measures are
    per micron, on the scale of Camelyon16's 0.243 um/px whatever the tiles' pixel size
    (wsi.tile_quality.measure_tiles(mpp=)), so the same limits hold for a 20x model."""

    max_ink: float = 0.05         # share of a tile that is pen / marker / black ink
    max_background: float = 0.90  # share of a tile that is glass at the model's pixel size
    min_focus: float = 15.0       # variance of the Laplacian (as at 0.243 um/px) below this: out of focus

    def __post_init__(self) -> None:
        for name in ("max_ink", "max_background"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.min_focus < 0:
            raise ConfigError(f"min_focus must be >= 0, got {self.min_focus}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ArtefactParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown artefact parameters: {sorted(unknown)}")
        return cls(**values)


# A slide within this share of the model's pixel size is read as it is (wsi.scale): Camelyon16's
# Utrecht scans (~0.226 um/px) under a 0.243 um/px model, as they always were.
MPP_TOLERANCE = 0.10


@dataclass(frozen=True)
class TilingParams:
    """The model's input in physical units and the tile grid (wsi.grid, wsi.scale): tiles of
    `tile_size` px at `target_mpp` um/px, so each covers `tile_size * target_mpp` um whatever
    the scanner, kept when the tissue mask covers at least `min_tissue` of them. The pyramid
    level they are read from follows from each slide's own pixel size (wsi.scale.plan_read)."""

    tile_size: int = 224                  # model input px; ResNet-50's input size
    target_mpp: float = CAMELYON16_MPP    # um per input px: Camelyon16's tumour cells at 40x
    min_tissue: float = 0.25              # share of a tile the tissue mask must cover

    def __post_init__(self) -> None:
        if self.tile_size <= 0:
            raise ConfigError(f"tile size must be positive, got {self.tile_size}")
        if not 0.01 <= self.target_mpp <= 100:
            raise ConfigError(f"target_mpp must be a pixel size in um (0.01..100), got "
                              f"{self.target_mpp}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"min_tissue must be in [0, 1], got {self.min_tissue}")

    def replace(self, **changes) -> TilingParams:
        """A copy with the given fields changed; `None` values keep the current one."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DEFAULT_TILING = TilingParams()
