"""The engine of one model bundle: its sessions, inference on them, and the dynamic batcher that
feeds them, three parts each in its own module (as Triton and KServe split a model server):

    serving.sessions   open the graphs; choose provider, backend, precision and layout (CPU and
                       GPU alike) -> `Sessions`
    serving.inference  `infer(tiles)` on those sessions: `CpuInference` or `GpuInference`
    serving.batcher    `DynamicBatcher`: requests of concurrent slides packed into full runs

`Engine(bundle_dir)` puts them together for the pipeline, the server and the batch job:
`submit(tiles)` (batched, a Future), `score(tiles)` (submit and wait), `infer(tiles)` (now, no
batching), `slide_logit(pooled)` (the aggregator), `describe()` (what runs it).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from core.bundle import BundleManifest, bundle_digest
from core.errors import BundleError, ConfigError, RequestError
from core.inference_backends import DEFAULT_BACKEND, DEFAULT_PRECISION, OPENVINO, check_choice
from core.runtime import available_cores
from results.scored import ModelRef
from serving.batcher import BatcherStats, DynamicBatcher
from serving.inference import on_device
from serving.sessions import (
    CPU,
    DEFAULT_PROVIDER,
    PROVIDER_CHOICES,
    PROVIDER_NAMES,
    open_sessions,
)

__all__ = ["CPU", "DEFAULT_BATCH_SIZE", "DEFAULT_MAX_WAIT_S", "DEFAULT_PROVIDER",
           "PROVIDER_CHOICES", "PROVIDER_NAMES", "BundleError", "Engine", "on_device"]

DEFAULT_BATCH_SIZE = 64      # tiles per model run
DEFAULT_MAX_WAIT_S = 0.005   # how long the batcher waits to fill a batch

log = logging.getLogger(__name__)


class Engine:
    """Backbone + head (+ aggregator) sessions of one bundle, and the batcher that feeds them."""

    def __init__(self, bundle_dir: str | os.PathLike, *, provider: str = DEFAULT_PROVIDER,
                 backend: str = DEFAULT_BACKEND, precision: str = DEFAULT_PRECISION,
                 batch_size: int = DEFAULT_BATCH_SIZE, max_wait_s: float = DEFAULT_MAX_WAIT_S,
                 threads: int | None = None, model: ModelRef | None = None,
                 on_batch: Callable[[int, int, float], None] | None = None):
        if provider not in PROVIDER_CHOICES:
            raise ConfigError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDER_CHOICES)}")
        check_choice(backend, precision)
        if backend == OPENVINO and provider in ("cuda", "tensorrt"):
            raise ConfigError(f"backend openvino runs on the CPU; provider {provider} needs "
                              "backend onnxruntime (or auto)")
        if batch_size < 1 or max_wait_s < 0:
            raise ConfigError(f"batch_size must be >= 1 and max_wait_s >= 0, got {batch_size}, {max_wait_s}")
        self.bundle_dir = Path(bundle_dir)
        self.manifest = BundleManifest.read(self.bundle_dir)
        self.model = model or ModelRef(self.manifest.name, bundle_digest(self.bundle_dir),
                                       run_id=self.manifest.run_id or "")
        self.batch_size = int(batch_size)
        self.threads = int(threads or available_cores())
        self.tile_size = self.manifest.tiling.tile_size
        self.pooling = dict(self.manifest.pooling)
        what = f"model {self.model.name} {self.model.version}"
        self.sessions = open_sessions(self.bundle_dir, self.manifest, provider=provider,
                                      backend=backend, precision=precision,
                                      batch_size=self.batch_size, threads=self.threads, what=what)
        s = self.sessions
        log.info("%s: backbone on %s %s (provider %s, session providers %s), batch %d, "
                 "%d CPU threads", what, s.backend, s.precision, PROVIDER_NAMES[s.provider],
                 s.providers, self.batch_size, self.threads)
        self.inference = s.inference
        # What the model was trained on (core.domain); None for a bundle without a description
        self.domain = self.manifest.domain_model(self.bundle_dir)
        self.batcher = DynamicBatcher(self.inference.infer, self.batch_size, max_wait_s,
                                      name=f"engine of {what}",
                                      mergeable=lambda tiles: not on_device(tiles),
                                      on_batch=on_batch)

    # What runs the model (serving.sessions.Sessions), for the server's ModelInfo and the logs.
    @property
    def on_gpu(self) -> bool:
        return self.sessions.on_gpu

    @property
    def backend(self) -> str:
        return self.sessions.backend

    @property
    def precision(self) -> str:
        return self.sessions.precision

    @property
    def provider(self) -> str:
        return self.sessions.provider

    @property
    def providers(self) -> list[str]:
        return self.sessions.providers

    @property
    def choice_table(self) -> list[dict]:
        return self.sessions.choice_table

    @property
    def backbone(self):
        """The backbone's onnxruntime session (None when OpenVINO runs it)."""
        return self.sessions.backbone

    @property
    def stats(self) -> BatcherStats:
        return self.batcher.stats

    @property
    def max_wait_s(self) -> float:
        return self.batcher.max_wait_s

    # -- inference -----------------------------------------------------------------------------
    def infer(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """Run backbone + head now on uint8 tiles [n, s, s, 3] (no batching): output name ->
        array, the head's outputs and the backbone's `features` [n, D] (for the domain check)."""
        return self.inference.infer(tiles)

    def slide_logit(self, pooled: np.ndarray) -> float:
        """aggregator.onnx on the pooled state [1, P] -> the slide logit."""
        pooled = np.ascontiguousarray(pooled, dtype=np.float32).reshape(1, -1)
        return float(self.sessions.aggregator.run(["slide_logit"], {"pooled": pooled})[0].reshape(-1)[0])

    def check_tiles(self, tiles: np.ndarray) -> np.ndarray:
        if not on_device(tiles):
            tiles = np.asarray(tiles)
        expected = (self.tile_size, self.tile_size, 3)
        if tiles.dtype != np.uint8 or len(tiles.shape) != 4 or tuple(tiles.shape[1:]) != expected:
            raise RequestError(f"tiles must be uint8 [n, {self.tile_size}, {self.tile_size}, 3], "
                               f"got {tiles.dtype} {list(tiles.shape)}")
        return tiles

    # -- batching ------------------------------------------------------------------------------
    def submit(self, tiles: np.ndarray) -> Future:
        """Queue tiles for the batcher; the Future gives {output name: array} for them, in order."""
        return self.batcher.submit(self.check_tiles(tiles))

    def score(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """submit() and wait."""
        return self.submit(tiles).result()

    def queue_depth(self) -> int:
        """Tiles waiting for the batcher."""
        return self.batcher.queue_depth()

    def close(self, wait: bool = True) -> None:
        """Stop accepting requests; queued ones still run; the runner thread ends."""
        self.batcher.close(wait)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        s = self.sessions
        return {"provider": PROVIDER_NAMES[s.provider], "providers": list(s.providers),
                "backend": s.backend, "precision": s.precision, "layout": s.layout,
                "batch_size": self.batch_size, "threads": self.threads,
                "backend_choice": s.choice_table}
