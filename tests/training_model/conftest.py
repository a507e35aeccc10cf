"""Fixtures of the backbone / features / export / registry tests.

Real parts only: torchvision ResNet-50 (random init under a fixed seed: no weights download
here), real tiles from tests/data/CMU-1-Small-Region.svs, a real `mlflow server` subprocess.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
CMU_SMALL = DATA / "CMU-1-Small-Region.svs"


def read_real_tiles(n: int = 8, path: Path = CMU_SMALL) -> np.ndarray:
    """n 224 x 224 level-0 tiles of a real H&E slide, from its tissue-rich middle band."""
    import openslide

    with openslide.OpenSlide(str(path)) as slide:
        w, h = slide.dimensions
        xs = np.linspace(0, w - 224, n).astype(int)
        tiles = [np.asarray(slide.read_region((int(x), h // 2 - 112), 0, (224, 224)).convert("RGB"))
                 for x in xs]
    return np.stack(tiles)


@pytest.fixture(scope="session")
def real_tiles() -> np.ndarray:
    return read_real_tiles(8)


@pytest.fixture(scope="session")
def layer3_backbone():
    from training.backbone import build_backbone

    return build_backbone("none", layer="layer3", seed=0)


@pytest.fixture(scope="session")
def chowder_bundle(tmp_path_factory, layer3_backbone, real_tiles):
    """One small real bundle (layer3 ResNet-50 + CHOWDER) shared by the export tests."""
    import torch

    from training.export import export_bundle
    from training.heads import build_head

    torch.manual_seed(0)
    head = build_head({"kind": "chowder", "in_dim": 1024, "k": 3}).eval()
    out = tmp_path_factory.mktemp("bundles") / "chowder"
    export_bundle(out, backbone=layer3_backbone, head=head,
                  manifest_extra={"name": "test-chowder", "threshold": 0.4},
                  parity_tiles=real_tiles)
    return out, head
