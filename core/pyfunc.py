"""The MLflow face of a model bundle: a pyfunc `PythonModel` that turns tiles into patch scores.

`milroi-train export` logs every bundle as an MLflow model (python_function flavour, this class,
the bundle folder as its artifact `bundle`), so MLflow's own tools can use it:
`mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(tiles)`, `mlflow models serve`, and
runtimes built on MLflow models (KServe's MLflow runtime).

- input: uint8 tiles [n, T, T, 3] (RGB, T = the manifest's tile_size, 224), the tiles of the
  bundle's tile grid at its level, as the server reads them from a slide;
- output: float32 patch scores [n] (tumour probability of each tile); with
  `params={"domain": True}` a dict of arrays instead: `patch_scores`, `domain_distance` (each
  tile's distance to the training tiles, core.domain: 1 at the edge of 99 % of them; NaN where
  the bundle has no description) and `in_domain` (bool, distance <= 1).

The numbers are the milroi server's (serving.engine on the CPU): backbone.onnx then head.onnx in
onnxruntime with the same session options (core.runtime). Slide scores and ROIs need the whole
slide and stay with the milroi server, which reads the same bundle files (serving.model_source).

Why in core: export (train install, no serving/) pickles an instance and loading (serve install,
no torch, no training/) unpickles it, so the class must live in a package both installs have and
must not import torch. It is the one core module that imports a third-party package other than
numpy at module level, because a PythonModel has to subclass mlflow's class
(tests/architecture/test_import_contract.py names this exception).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from mlflow.pyfunc import PythonModel

from core.bundle import BUNDLE_ARTIFACT_PATH, BundleManifest
from core.errors import RequestError
from core.runtime import available_cores, session_options

log = logging.getLogger(__name__)

DOMAIN_PARAM = "domain"             # predict(..., params={"domain": True}): add the domain check
BATCH_SIZE = 64                     # tiles per onnxruntime run (the server's default batch)
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def tile_signature(tile_size: int):
    """The MLflow signature: uint8 tiles (-1, T, T, 3) -> float32 patch scores (-1,); the
    parameter `domain` (default false) adds the domain check of each tile."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, tile_size, tile_size, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,), "patch_scores")]),
        params=ParamSchema([ParamSpec(DOMAIN_PARAM, "boolean", False)]))


class BundleModel(PythonModel):
    """Backbone + head of one bundle in onnxruntime; `predict(tiles)` -> patch scores.

    `model_config={"providers": [...]}` at load time picks onnxruntime execution providers
    (default the CPU, where the scores match the server's to float precision).
    """

    def load_context(self, context) -> None:
        import onnxruntime as ort

        bundle = Path(context.artifacts[BUNDLE_ARTIFACT_PATH])
        self.manifest = BundleManifest.read(bundle)
        providers = list((context.model_config or {}).get("providers") or DEFAULT_PROVIDERS)
        options = session_options(ort, available_cores())
        files = self.manifest.files
        self.backbone = ort.InferenceSession(str(bundle / files["backbone"]), options,
                                             providers=providers)
        self.head = ort.InferenceSession(str(bundle / files["head"]), options,
                                         providers=providers)
        self.domain = self.manifest.domain_model(bundle)   # None: the bundle has no description
        log.info("milroi bundle %s loaded on %s", self.manifest.name, self.backbone.get_providers())

    def predict(self, context, model_input: np.ndarray, params=None):
        size = self.manifest.tiling.tile_size
        tiles = np.asarray(model_input)
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[1:] != (size, size, 3):
            raise RequestError(f"tiles must be uint8 [n, {size}, {size}, 3], "
                               f"got {tiles.dtype} {list(tiles.shape)}")
        with_domain = bool((params or {}).get(DOMAIN_PARAM))
        scores, distances = [np.zeros(0, np.float32)], [np.zeros(0, np.float32)]
        for start in range(0, len(tiles), BATCH_SIZE):
            batch = np.ascontiguousarray(tiles[start:start + BATCH_SIZE])
            features = self.backbone.run(["features"], {"tiles": batch})[0]
            scores.append(self.head.run(["patch_scores"], {"features": features})[0])
            if with_domain:
                distances.append(np.full(len(batch), np.nan, np.float32) if self.domain is None
                                 else self.domain.tile_distance(features))
        scores = np.concatenate(scores).astype(np.float32, copy=False)
        if not with_domain:
            return scores
        distance = np.concatenate(distances)
        return {"patch_scores": scores, "domain_distance": distance, "in_domain": distance <= 1.0}

