"""The feature extractor in onnxruntime: the backbone graph a bundle serves, for `features`.

`OnnxBackbone(backbone)` exports a `training.backbone.Backbone` to ONNX exactly as
`training.export.export_bundle` writes `backbone.onnx` (uint8 NHWC tiles in, normalisation in the
graph, dynamic batch), checks it against torch on H&E-like tiles (max abs feature difference
<= `training.export.FEATURE_ATOL`, else `ParityError`), and runs it on the CPU with the server's
session options (`core.runtime.session_options`).

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

from core.runtime import available_cores, session_options
from training.backbone import Backbone

log = logging.getLogger(__name__)

PARITY_TILES = 4   # synthetic H&E-like tiles the export is checked on


class OnnxBackbone:
    """uint8 tiles [N, H, W, 3] RGB (numpy) -> float32 features [N, D] (numpy), in onnxruntime."""

    def __init__(self, backbone: Backbone, threads: int | None = None):
        import onnxruntime as ort

        from training.export import export_backbone

        self.feature_dim = backbone.feature_dim
        self.layer = backbone.layer
        self._facts = backbone.describe()
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="milroi-backbone-") as tmp:
            path = Path(tmp) / "backbone.onnx"
            export_backbone(backbone, path)
            self.session = ort.InferenceSession(
                str(path), sess_options=session_options(ort, threads or available_cores()),
                providers=["CPUExecutionProvider"])
        self.parity = self._check_parity(backbone)
        log.info("ResNet-50 %s exported to ONNX for onnxruntime (CPU) in %.1f s; max abs "
                 "feature difference to torch %.2g", self.layer, time.perf_counter() - start,
                 self.parity)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        tiles = np.ascontiguousarray(tiles, dtype=np.uint8)
        return self.session.run(["features"], {"tiles": tiles})[0]

    def describe(self) -> dict:
        """The Backbone's facts (layer, weights, seed, dimension) and the engine that ran it."""
        return {**self._facts, "feature_engine": "onnxruntime"}

    def _check_parity(self, backbone: Backbone) -> float:
        from training.export import FEATURE_ATOL, ParityError, synthetic_parity_tiles

        tiles = synthetic_parity_tiles(PARITY_TILES)
        with torch.inference_mode():
            reference = backbone.cpu().eval()(torch.from_numpy(tiles)).numpy()
        diff = float(np.abs(self(tiles) - reference).max())
        if not diff <= FEATURE_ATOL:  # NaN fails too
            raise ParityError(f"onnxruntime backbone differs from torch by {diff:.3g} "
                              f"(> {FEATURE_ATOL:g}) on {PARITY_TILES} tiles")
        return diff
