"""The feature files: one h5 per slide in the CLAM/TRIDENT layout, and their typed attributes.

FEATURES_DIR/h5_files/<slide>.h5 holds `features` float32 [N, D], `coords` int64 [N, 2] (level-0
top-left x, y, grid order) and `tissue_fraction` float32 [N], and the artefact measures of
wsi.tile_quality: `ink_fraction`, `background_fraction`, `focus` float32 [N] and
`artefact_flags` uint8 [N] (bits 1 ink, 2 background, 4 blur, under the file's `max_ink`,
`max_background` and `min_focus` attributes), and the slide's stain statistics (wsi.stain, the
attribute `stain`), which `fit` folds into the model's training stain (core.domain).
Flagged tiles are left out of the bags training and evaluation read (`load_bag`), as the server
leaves them out of the slide score and the ROIs. Files written before the measures existed read
as having no flagged tile. The slide and extraction facts (`FeatureAttrs`) are attributes of the
file and of `coords` (where CLAM reads them), under CLAM's names (`patch_size`, `patch_level`).
`training.extraction` writes them; `fit`, `evaluate` and `camelyon16` read them back as `Bag`s.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from core.bundle import LAYER_ENCODERS
from core.errors import ConfigError
from core.tiling import CAMELYON16_MPP, ArtefactParams, TilingParams, TissueParams

log = logging.getLogger(__name__)

H5_SUBDIR = "h5_files"
# The file attribute holding the slide's stain statistics (wsi.stain, JSON name -> value);
# files written before it have none, and their slides do not count in the training stain.
STAIN_ATTR = "stain"


def feature_path(features_dir: str | os.PathLike, slide_name: str) -> Path:
    """Where the features of slide `slide_name` live."""
    return Path(features_dir) / H5_SUBDIR / f"{slide_name}.h5"


@dataclass(frozen=True)
class FeatureAttrs:
    """What a feature file says about its slide and how its features were made."""

    slide: str
    level0_width: int
    level0_height: int
    mpp: float
    mpp_source: str
    tiling: TilingParams
    backbone_layer: str
    weights: str
    weights_seed: int
    feature_engine: str
    artefacts: ArtefactParams = ArtefactParams()
    tissue: TissueParams = TissueParams()   # the tissue mask the tiles were chosen with
    read_level: int = 0                     # the pyramid level the tiles were read from
    encoder: str = ""                       # the registry name (training.encoders)

    def __post_init__(self) -> None:
        if not self.encoder:   # attributes of a ResNet-50 named by its stage alone
            object.__setattr__(self, "encoder", LAYER_ENCODERS.get(self.backbone_layer, ""))

    def to_h5(self) -> dict[str, Any]:
        """The attributes as written (CLAM's names for the tile size and level)."""
        return {"patch_size": self.tiling.tile_size, "patch_level": self.read_level,
                "target_mpp": float(self.tiling.target_mpp),
                "level0_width": self.level0_width, "level0_height": self.level0_height,
                "mpp": float(self.mpp), "mpp_source": self.mpp_source, "slide": self.slide,
                "min_tissue": float(self.tiling.min_tissue), "backbone_layer": self.backbone_layer,
                "encoder": self.encoder, "weights": self.weights, "weights_seed": self.weights_seed,
                "feature_engine": self.feature_engine, **self.artefacts.to_dict(),
                "tissue_params": json.dumps(self.tissue.to_dict(), sort_keys=True)}

    @classmethod
    def from_h5(cls, attrs: Mapping[str, Any], where: str | os.PathLike) -> FeatureAttrs:
        values = {k: (v.item() if hasattr(v, "item") else v) for k, v in attrs.items()}
        values = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in values.items()}
        try:
            return cls(slide=str(values["slide"]), level0_width=int(values["level0_width"]),
                       level0_height=int(values["level0_height"]), mpp=float(values["mpp"]),
                       mpp_source=str(values["mpp_source"]),
                       # files from before target_mpp: level-0 tiles for Camelyon16's 0.243
                       tiling=TilingParams(int(values["patch_size"]),
                                           float(values.get("target_mpp", CAMELYON16_MPP)),
                                           float(values["min_tissue"])),
                       read_level=int(values.get("patch_level", 0)),
                       backbone_layer=str(values["backbone_layer"]), weights=str(values["weights"]),
                       # files from before the registry: __post_init__ names their ResNet-50
                       encoder=str(values.get("encoder", "")),
                       weights_seed=int(values["weights_seed"]),
                       feature_engine=str(values.get("feature_engine", "torch")),
                       artefacts=ArtefactParams.from_dict(
                           {k: float(values[k]) for k in ArtefactParams().to_dict() if k in values}),
                       # files from before the attribute: the defaults they were made with
                       tissue=TissueParams.from_dict(json.loads(values.get("tissue_params", "{}"))))
        except (KeyError, ValueError, ConfigError) as exc:
            raise ConfigError(f"feature file {where} lacks or garbles attribute {exc} "
                              f"(was it written by `milroi-train features`?)") from None


@dataclass
class Bag:
    """One slide's features in memory (a MIL bag)."""

    name: str
    features: torch.Tensor              # [N, D] float32
    coords: np.ndarray                  # [N, 2] int64, level-0 top-left
    attrs: FeatureAttrs | None = None   # None for bags that come from no slide (MUSK)
    digest: str = ""                    # sha256 of the h5 file
    artefacts: int = 0                  # flagged tiles left out of `features` and `coords`
    # the slide's stain statistics (wsi.stain.STATISTICS -> value); None: files from before them
    stain: dict[str, float] | None = None

    @property
    def no_tissue(self) -> bool:
        """A slide without a usable tissue tile: features recorded it with 0 tiles, or every
        tile it has is an artefact (ink, glass, blur)."""
        return len(self.features) == 0


def load_bag(path: str | os.PathLike) -> Bag:
    """Read one features h5 file into memory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"feature file {path} does not exist (run `milroi-train features` first)")
    try:
        with h5py.File(path, "r") as f:
            features = np.asarray(f["features"], dtype=np.float32)
            coords = np.asarray(f["coords"], dtype=np.int64)
            flags = (np.asarray(f["artefact_flags"], dtype=np.uint8) if "artefact_flags" in f
                     else np.zeros(len(coords), np.uint8))
            raw_attrs = dict(f.attrs)
    except (OSError, KeyError) as exc:
        raise ConfigError(f"feature file {path} is not a readable features h5: {exc}") from exc
    # 0 tiles is a slide without tissue (no_tissue), which callers skip; a mismatch is damage
    if features.ndim != 2 or coords.shape != (len(features), 2):
        raise ConfigError(f"feature file {path} holds mismatched features {features.shape} and "
                          f"coords {coords.shape}")
    if flags.shape != (len(coords),):
        raise ConfigError(f"feature file {path} holds {flags.shape} artefact flags for "
                          f"{len(coords)} tiles")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    keep = flags == 0
    stain = raw_attrs.pop(STAIN_ATTR, None)
    try:
        stain = None if stain is None else {str(k): float(v) for k, v in json.loads(stain).items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"feature file {path}: unreadable {STAIN_ATTR} attribute: {exc}") from None
    return Bag(path.stem, torch.from_numpy(features[keep]), coords[keep],
               FeatureAttrs.from_h5(raw_attrs, path), digest, artefacts=int((~keep).sum()),
               stain=stain)


def load_bags(features_dir: str | os.PathLike, names: Sequence[str],
              skip_no_tissue: bool = False) -> list[Bag]:
    """The bags of `names`; with `skip_no_tissue`, slides without a tissue tile are left out
    with a warning (there is nothing to learn from or score in them)."""
    bags = [load_bag(feature_path(features_dir, n)) for n in names]
    if skip_no_tissue:
        empty = [b.name for b in bags if b.no_tissue]
        if empty:
            log.warning("%d slide(s) without a usable tissue tile left out (no_tissue): %s",
                        len(empty), ", ".join(f"{b.name} ({b.artefacts} artefact tiles)" if b.artefacts
                                              else b.name for b in bags if b.no_tissue))
        bags = [b for b in bags if not b.no_tissue]
    dims = {b.features.shape[1] for b in bags}
    if len(dims) > 1:
        encoders = [(b.name, b.attrs.encoder) for b in bags if b.attrs is not None]
        if len({e for _, e in encoders}) > 1:
            raise ConfigError(f"feature files disagree on encoder{MIXED_ENCODERS}: "
                              f"{group_listing(encoders)}")
        raise ConfigError(f"feature files in {features_dir} have different dimensions {sorted(dims)}")
    return bags


# Why files of two encoders never train one head (load_bags, training.runs.provenance_params)
MIXED_ENCODERS = (" (one head learns one encoder's features: extract them all again with one "
                  "--encoder)")


def group_listing(named_values: Sequence[tuple[str, str]]) -> str:
    """`value: name, name; value: ...` for (name, value) pairs, five names per value at most:
    which files to extract again when they disagree."""
    groups: dict[str, list[str]] = {}
    for name, value in named_values:
        groups.setdefault(str(value), []).append(name)
    return "; ".join(f"{v}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                     for v, names in sorted(groups.items()))


def data_fingerprint(bags: Sequence[Bag], labels: dict[str, int]) -> str:
    """sha256 over (slide name, label, feature file digest), in name order."""
    h = hashlib.sha256()
    for bag in sorted(bags, key=lambda b: b.name):
        h.update(f"{bag.name}\t{labels[bag.name]}\t{bag.digest}\n".encode())
    return h.hexdigest()
