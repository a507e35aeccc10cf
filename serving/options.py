"""The engine option group the serving commands share, declared once (`serve`, `score`); the
per-slide scoring overrides are `serving.overrides` (the client needs them, not the engine)."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError
from core.inference_backends import (
    DEFAULT_BACKEND,
    DEFAULT_PRECISION,
    add_backend_arguments,
    check_choice,
)
from results.scored import ModelRef
from serving.engine import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_WAIT_S,
    DEFAULT_PROVIDER,
    PROVIDER_CHOICES,
    Engine,
)


@dataclass(frozen=True)
class EngineOptions:
    """How a bundle runs (serving.engine.Engine): provider, CPU backend, precision, batching."""

    provider: str = DEFAULT_PROVIDER
    precision: str = DEFAULT_PRECISION
    batch_size: int = DEFAULT_BATCH_SIZE
    threads: int | None = None          # backbone intra-op threads (default: usable cores)
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    backend: str = DEFAULT_BACKEND

    def __post_init__(self) -> None:
        check_choice(self.backend, self.precision)
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineOptions:
        max_wait_ms = getattr(args, "max_wait_ms", None)
        return cls(args.provider, args.precision, args.batch_size, args.threads,
                   DEFAULT_MAX_WAIT_S if max_wait_ms is None else max_wait_ms / 1000, args.backend)

    def engine(self, bundle_dir: Path, model: ModelRef | None = None,
               on_batch: Callable[[int, int, float], None] | None = None, **kwargs) -> Engine:
        return Engine(bundle_dir, provider=self.provider, backend=self.backend,
                      precision=self.precision,
                      batch_size=self.batch_size, max_wait_s=self.max_wait_s,
                      threads=self.threads, model=model, on_batch=on_batch, **kwargs)


def add_engine_arguments(parser: argparse.ArgumentParser, batching: bool = False) -> None:
    """--provider, --backend, --precision, --batch-size, --threads (and --max-wait-ms for a
    server)."""
    parser.add_argument("--provider", choices=sorted(PROVIDER_CHOICES), default=DEFAULT_PROVIDER,
                        help="onnxruntime execution provider (default auto: TensorRT, CUDA, CPU, "
                             "the first that works)")
    add_backend_arguments(parser, gpu=True)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"tiles per model run (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--threads", type=int, default=None,
                        help="backbone threads on CPU (default: all usable cores)")
    if batching:
        parser.add_argument("--max-wait-ms", type=float, default=DEFAULT_MAX_WAIT_S * 1000,
                            help="how long the batcher waits to fill a batch (default "
                                 f"{DEFAULT_MAX_WAIT_S * 1000:g} ms)")
