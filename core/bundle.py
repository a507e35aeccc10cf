"""The model bundle contract: what `milroi-train export` writes and every server reads.

A bundle is a folder with three ONNX graphs and `manifest.json` (docs/INTERFACES.md). The
manifest is one typed object, `BundleManifest`: export builds and writes it, the engine, the
pipeline, the model source and the gRPC server read it through `BundleManifest.read`, which
checks it once; nobody indexes the JSON by hand, so each default (thresholds, tiling, tissue
parameters) is stated once, here or in `core.tiling`.

The JSON keeps the flat layout of format `milroi-bundle/1`: `tile_size`, `target_mpp` and
`min_tissue` at the top level (the `TilingParams`: the model's input in um/px, wsi.scale),
`tissue` as the `TissueParams` dict. Keys this version does not know are kept (`extra`) and
written back, so a newer exporter's manifest survives being read and rewritten.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.domain import DOMAIN_ROLE, DomainModel
from core.errors import BundleError, ConfigError
from core.tiling import DEFAULT_TILING, ArtefactParams, TilingParams, TissueParams

BUNDLE_FORMAT = "milroi-bundle/1"
MANIFEST_NAME = "manifest.json"
# The three graphs every bundle has (role -> file name); `backbone_int8` is optional.
GRAPH_FILES = {"backbone": "backbone.onnx", "head": "head.onnx", "aggregator": "aggregator.onnx"}
INT8_ROLE = "backbone_int8"
# The fp32 backbone's weights beside its graph (ONNX external data), for encoders over 1 GB
BACKBONE_DATA_ROLE = "backbone_data"
POOLING_KINDS = ("extremes", "attention")
# Where a registered version's bundle sits in what its source downloads to: inside the MLflow
# pyfunc model that `milroi-train export` logs (core.pyfunc: the artifact `bundle`), or, for
# versions registered before that, the folder itself or its `bundle/` subfolder.
BUNDLE_ARTIFACT_PATH = "bundle"
BUNDLE_LOCATIONS = (f"artifacts/{BUNDLE_ARTIFACT_PATH}", ".", BUNDLE_ARTIFACT_PATH)
# The model version tag holding the sha256 of the bundle's files (bundle_digest) at registration.
DIGEST_TAG = "bundle_digest"
DIGEST_LENGTH = 64

# A slide is called tumour when its probability reaches `slide_threshold`; tiles scored at or above
# `roi_threshold` form tumour ROIs. `milroi-train fit` chooses both from held-out slides; these
# are the values of a bundle made without a fit run (the tests' small bundles).
DEFAULT_SLIDE_THRESHOLD = 0.5
DEFAULT_ROI_THRESHOLD = 0.5
# The keys of both thresholds in manifests (and fit runs) written before each had one name
LEGACY_ROI_THRESHOLD_KEY = "patch_threshold"
LEGACY_SLIDE_THRESHOLD_KEY = "threshold"
LEGACY_KEYS = {LEGACY_ROI_THRESHOLD_KEY: "roi_threshold", LEGACY_SLIDE_THRESHOLD_KEY: "slide_threshold"}



def current_keys(values: dict[str, Any], where: str | os.PathLike = "manifest") -> dict[str, Any]:
    """`values` with the keys of manifests exported before the renames (LEGACY_KEYS) under
    their current names; BundleError when a manifest holds both names of one setting."""
    out = dict(values)
    for legacy, name in LEGACY_KEYS.items():
        if legacy in out:
            if name in out:
                raise BundleError(where, f"manifest.json holds both {legacy!r} (the old name) "
                                         f"and {name!r}")
            out[name] = out.pop(legacy)
    return out


# Keys a manifest must have; every other one has a default below.
REQUIRED_KEYS = ("format", "name", "tile_size", "feature_dim", "pooling", "slide_threshold", "files")
# Manifests written before the model's input was stated in um/px name a pyramid level instead:
# level 0 (the only one `features` could make) means target_mpp; any other is refused.
LEGACY_LEVEL_KEY = "level"
# Manifests (and feature files, runs) from before the encoder registry (training.encoders) name
# their ResNet-50 by its stage alone: `backbone_layer` -> the registry name.
LAYER_ENCODERS = {"pool": "resnet50", "layer3": "resnet50-trunc"}


@dataclass(frozen=True)
class BundleManifest:
    """manifest.json of a model bundle."""

    name: str
    feature_dim: int
    pooling: dict[str, Any]                # {"kind": "extremes", "k": K} | {"kind": "attention"}
    slide_threshold: float = DEFAULT_SLIDE_THRESHOLD
    roi_threshold: float = DEFAULT_ROI_THRESHOLD
    tiling: TilingParams = DEFAULT_TILING
    tissue: TissueParams = field(default_factory=TissueParams)
    artefacts: ArtefactParams = field(default_factory=ArtefactParams)   # tiles left out of scores
    files: dict[str, str] = field(default_factory=lambda: dict(GRAPH_FILES))
    head: str = ""
    head_config: dict[str, Any] = field(default_factory=dict)
    backbone_layer: str = ""
    # the encoder's registry entry (training.encoders.Encoder.describe: name, architecture,
    # input, normalisation, output, licence); {} in manifests from before the registry
    encoder: dict[str, Any] = field(default_factory=dict)
    weights: str = ""
    weights_seed: int | None = None
    fingerprint: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, float] = field(default_factory=dict)
    int8: dict[str, Any] | None = None
    # What the model was trained on (core.domain): summary here, arrays in files["domain"]
    domain: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)   # keys this version does not know

    # -- the JSON form ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("tiling", "tissue", "artefacts", "extra", "int8", "domain")}
        out.update(self.extra)
        out.update(format=BUNDLE_FORMAT, tissue=self.tissue.to_dict(),
                   artefacts=self.artefacts.to_dict(), **self.tiling.to_dict())
        if self.int8 is not None:
            out["int8"] = self.int8
        if self.domain is not None:
            out["domain"] = self.domain
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str | os.PathLike = "manifest") -> BundleManifest:
        """Parse and check a manifest's JSON object; BundleError naming `where` otherwise."""
        if not isinstance(values, dict):
            raise BundleError(where, f"manifest.json holds a {type(values).__name__}, not an object")
        values = current_keys(values, where)
        level = values.pop(LEGACY_LEVEL_KEY, 0)
        if level != 0:
            raise BundleError(where, f"manifest.json names pyramid level {level!r}: bundles state "
                                     f"their input's pixel size (target_mpp, um/px) instead; "
                                     f"export it again")
        missing = [k for k in REQUIRED_KEYS if k not in values]
        if missing:
            raise BundleError(where, f"manifest.json lacks {missing}")
        if values["format"] != BUNDLE_FORMAT:
            raise BundleError(where, f"format {values['format']!r}, expected {BUNDLE_FORMAT!r}")
        pooling = values["pooling"]
        if not isinstance(pooling, dict) or pooling.get("kind") not in POOLING_KINDS:
            raise BundleError(where, f"unknown pooling {pooling!r}")
        known = {f.name for f in dataclasses.fields(cls)} | set(DEFAULT_TILING.to_dict())
        known |= {"format"}
        fields = {k: v for k, v in values.items()
                  if k in known and k not in ("format", "tissue", "artefacts", *DEFAULT_TILING.to_dict())}
        try:
            tiling = DEFAULT_TILING.replace(**{k: values.get(k) for k in DEFAULT_TILING.to_dict()})
            tissue = TissueParams.from_dict(values.get("tissue") or {})
            artefacts = ArtefactParams.from_dict(values.get("artefacts") or {})
            return cls(**fields, tiling=tiling, tissue=tissue, artefacts=artefacts,
                       extra={k: v for k, v in values.items() if k not in known})
        except (ConfigError, TypeError) as exc:
            raise BundleError(where, f"bad manifest.json: {exc}") from None

    @property
    def encoder_name(self) -> str:
        """The encoder's registry name (older manifests: from their ResNet-50 stage)."""
        return encoder_name(self.encoder, self.backbone_layer)

    def replace(self, **changes) -> BundleManifest:
        return dataclasses.replace(self, **changes)

    # -- the folder ------------------------------------------------------------------------
    @classmethod
    def read(cls, bundle_dir: str | os.PathLike) -> BundleManifest:
        """The manifest of a bundle folder, checked for the graphs it lists."""
        bundle_dir = Path(bundle_dir)
        if not bundle_dir.is_dir():
            raise BundleError(bundle_dir, "not a folder")
        try:
            values = json.loads((bundle_dir / MANIFEST_NAME).read_text())
        except FileNotFoundError:
            raise BundleError(bundle_dir, f"no {MANIFEST_NAME}") from None
        except (OSError, ValueError) as exc:
            raise BundleError(bundle_dir, f"unreadable {MANIFEST_NAME}: {exc}") from None
        manifest = cls.from_dict(values, bundle_dir)
        for role in GRAPH_FILES:
            name = manifest.files.get(role)
            if not name or not (bundle_dir / name).is_file():
                raise BundleError(bundle_dir, f"{role} graph {name!r} is missing")
        for role in (INT8_ROLE, BACKBONE_DATA_ROLE):
            name = manifest.files.get(role)
            if name is not None and not (bundle_dir / name).is_file():
                raise BundleError(bundle_dir, f"{role} file {name!r} is missing")
        domain = manifest.files.get(DOMAIN_ROLE)
        if (domain is None) != (manifest.domain is None):
            raise BundleError(bundle_dir, "manifest.json has a domain entry without its file, "
                                          "or the file without the entry")
        if domain is not None and not (bundle_dir / domain).is_file():
            raise BundleError(bundle_dir, f"domain description {domain!r} is missing")
        return manifest

    def domain_model(self, bundle_dir: str | os.PathLike) -> DomainModel | None:
        """The description of the training data this bundle carries (None: it has none)."""
        return DomainModel.load(bundle_dir, self.domain, self.files.get(DOMAIN_ROLE))

    def write(self, bundle_dir: str | os.PathLike) -> Path:
        path = Path(bundle_dir) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path


def encoder_name(encoder: dict[str, Any], backbone_layer: str) -> str:
    """The registry name in a manifest's `encoder` entry, else (manifests from before the
    registry) the ResNet-50 entry of its `backbone_layer`; "" when neither says."""
    return str(encoder.get("name") or LAYER_ENCODERS.get(backbone_layer, ""))


def bundle_digest(bundle_dir: str | os.PathLike, length: int = 12) -> str:
    """Short sha256 of the manifest and the graphs: the version of an unregistered bundle."""
    bundle_dir = Path(bundle_dir)
    manifest = BundleManifest.read(bundle_dir)
    digest = hashlib.sha256()
    for name in [MANIFEST_NAME, *sorted(manifest.files.values())]:
        digest.update(name.encode())
        with open(bundle_dir / name, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()[:length]


def find_bundle(folder: str | os.PathLike) -> Path:
    """The bundle folder inside a downloaded model version (BUNDLE_LOCATIONS)."""
    folder = Path(folder)
    for where in BUNDLE_LOCATIONS:
        if (folder / where / MANIFEST_NAME).is_file():
            return (folder / where).resolve()
    raise BundleError(folder, f"no {MANIFEST_NAME} at any of {', '.join(BUNDLE_LOCATIONS)} in it")
