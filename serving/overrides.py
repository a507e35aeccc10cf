"""The per-slide scoring overrides (`score`, `client score`), declared once. A module of its own
so that the gRPC client imports no engine (no onnxruntime, no OpenVINO)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from core.cli import add_fallback_mpp_argument


@dataclass(frozen=True)
class ScoringOverrides:
    """Per-slide overrides of the model's own tiling and ROI threshold (None: the model's)."""

    min_tissue: float | None = None
    roi_threshold: float | None = None
    fallback_mpp: float | None = None   # um/px of the slides whose metadata has none

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ScoringOverrides:
        return cls(args.min_tissue, args.roi_threshold, args.fallback_mpp)


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-tissue", type=float, default=None,
                        help="minimum tissue fraction of a tile (default: the model's)")
    parser.add_argument("--roi-threshold", type=float, default=None,
                        help="patch score that makes a tile part of a tumour ROI "
                             "(default: the model's)")
    add_fallback_mpp_argument(parser)
