"""The feature extractor in onnxruntime: the backbone graph a bundle serves, for `features`.

`OnnxBackbone(backbone)` exports a `training.backbone.Backbone` to ONNX exactly as
`training.export.export_bundle` writes `backbone.onnx` (uint8 NHWC tiles in, normalisation in the
graph, dynamic batch), checks the graph in onnxruntime fp32 against torch on H&E-like tiles (max
abs feature difference <= `training.export.FEATURE_ATOL`, else `ParityError`), and runs it on the
CPU backend the server would choose (`core.inference_backends.choose`: onnxruntime or OpenVINO,
fp32 or bf16, by measurement unless `backend`/`precision` are given; the same agreement gate and
the same per-host cache as the server's engine).

Why: on the CPU onnxruntime runs ResNet-50 faster than torch eager (BatchNorm folded into the
convolutions, blocked-layout kernels: 1.6x end to end on 2 cores, `python -m
benchmarks.bench_features`), and the training features then come from the same graph and
runtime as the served ones. The export is done once per process (10-20 s on 2 cores), in a
temporary folder that is removed once the session holds the model.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core.inference_backends import (
    DEFAULT_BACKEND,
    DEFAULT_PRECISION,
    OnnxruntimeFeatures,
    choose,
    he_like_tiles,
)
from core.runtime import available_cores
from training.backbone import Backbone

log = logging.getLogger(__name__)

PARITY_TILES = 4   # synthetic H&E-like tiles the export is checked on


class OnnxBackbone:
    """uint8 tiles [N, H, W, 3] RGB (numpy) -> float32 features [N, D] (numpy), on the CPU
    backend chosen for the exported graph."""

    def __init__(self, backbone: Backbone, threads: int | None = None,
                 backend: str = DEFAULT_BACKEND, precision: str = DEFAULT_PRECISION):
        from training.export import export_backbone

        self.feature_dim = backbone.feature_dim
        self.layer = backbone.layer
        self.encoder = backbone.encoder
        self.spec = backbone.spec
        self.tile_size = backbone.tile_size
        self._facts = backbone.describe()
        threads = threads or available_cores()
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="milroi-backbone-") as tmp:
            path = Path(tmp) / "backbone.onnx"
            export_backbone(backbone, path)
            # The export is checked in onnxruntime fp32; the backend that runs it is then chosen
            # (both read the graph now: the folder can go).
            self.parity = self._check_parity(backbone, OnnxruntimeFeatures(path, threads))
            choice = choose({"fp32": path}, lambda n: he_like_tiles(n, self.tile_size), threads,
                            backend=backend, precision=precision, what=f"features {self.encoder}")
        self._run, self.backend, self.precision = choice.features, choice.backend, choice.precision
        log.info("%s exported to ONNX in %.1f s (max abs feature difference to torch "
                 "%.2g); features run on %s %s (CPU)", self.encoder, time.perf_counter() - start,
                 self.parity, self.backend, self.precision)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return self._run(np.ascontiguousarray(tiles, dtype=np.uint8))

    def describe(self) -> dict:
        """The Backbone's facts (layer, weights, seed, dimension) and the engine that ran it:
        `onnxruntime`, `openvino`, or with the precision when it is not fp32 (`openvino bf16`)."""
        engine = self.backend if self.precision == "fp32" else f"{self.backend} {self.precision}"
        return {**self._facts, "feature_engine": engine}

    @staticmethod
    def _check_parity(backbone: Backbone, exported) -> float:
        from training.export import FEATURE_ATOL, ParityError, synthetic_parity_tiles

        tiles = synthetic_parity_tiles(PARITY_TILES, size=backbone.tile_size)
        with torch.inference_mode():
            reference = backbone.cpu().eval()(torch.from_numpy(tiles)).numpy()
        diff = float(np.abs(exported(tiles) - reference).max())
        if not diff <= FEATURE_ATOL:  # NaN fails too
            raise ParityError(f"onnxruntime backbone differs from torch by {diff:.3g} "
                              f"(> {FEATURE_ATOL:g}) on {PARITY_TILES} tiles")
        return diff
