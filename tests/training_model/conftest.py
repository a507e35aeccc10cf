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
def real_domain(layer3_backbone, real_tiles):
    """A description of training data (core.domain) made of the real tiles' layer3 features."""
    import torch

    from training.domain import describe
    from training.feature_file import Bag

    with torch.inference_mode():
        features = layer3_backbone(torch.from_numpy(real_tiles)).float()
    return describe([Bag("cmu", features, np.zeros((len(features), 2), np.int64))])


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
                  manifest_extra={"name": "test-chowder", "slide_threshold": 0.4},
                  parity_tiles=real_tiles)
    return out, head


# ---------------------------------------------------------------------------------------------
# MLflow: a real tracking server (subprocess) and runs in the layout `milroi-train fit` logs


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port, sqlite backend, proxied local artifacts."""
    from mlflow_testing import running_mlflow_server

    with running_mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as uri:
        yield uri


@pytest.fixture(scope="session")
def trained_head():
    import torch

    from training.heads import build_head

    torch.manual_seed(1)
    return build_head({"kind": "chowder", "in_dim": 1024, "k": 2, "mlp_hidden": [8]}).eval()


@pytest.fixture(scope="session")
def exported(mlflow_server, trained_head, real_domain, tmp_path_factory):
    """One fit run exported and registered as `milroi-test` on the server, with alias champion
    (val_auc 0.80), parity checked on real tissue tiles; (run id, training.export.Registered)."""
    from mlflow_testing import log_fit_run

    from training.export import export_run

    rid = log_fit_run(mlflow_server, trained_head, val_auc=0.80, roi_threshold=0.97,
                      domain=real_domain)
    out = tmp_path_factory.mktemp("export") / "bundle"
    registered = export_run(rid, "milroi-test", alias="champion", tracking_uri=mlflow_server,
                            out_dir=out, parity_slide=CMU_SMALL)
    return rid, registered




# ---------------------------------------------------------------------------------------------
# A small synthetic pyramidal slide (JPEG-tiled generic TIFF, as Camelyon16 ships them)


def write_tissue_tiff(path: Path, width: int = 1792, height: int = 1344, seed: int = 0) -> Path:
    """White glass with an elliptical H&E-coloured tissue piece; 3 levels, 0.243 um/px."""
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    inside = ((xx - width / 2) / (0.38 * width)) ** 2 + ((yy - height / 2) / (0.35 * height)) ** 2 < 1
    pink = np.array([225, 160, 195], np.float32)
    rgb = np.full((height, width, 3), 242, np.float32)
    rgb[inside] = pink + rng.normal(0, 18, (int(inside.sum()), 3))
    image = np.clip(rgb, 0, 255).astype(np.uint8)
    res = 1e4 / 0.243  # pixels per cm
    with tifffile.TiffWriter(path) as tif:
        level = image
        for _ in range(3):
            tif.write(level, tile=(256, 256), compression="jpeg", photometric="rgb",
                      subfiletype=0 if level is image else 1,
                      resolution=(res, res), resolutionunit="CENTIMETER")
            level = level[::2, ::2]
            res /= 2
    return path


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory) -> Path:
    return write_tissue_tiff(tmp_path_factory.mktemp("slides") / "synth_001.tif")
