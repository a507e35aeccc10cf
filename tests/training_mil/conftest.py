"""Fixtures of the MIL training tests: synthetic CLAM-layout feature files and label CSVs."""
from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest

FEATURE_DIM = 16
TILE = 224


def write_feature_h5(path: Path, features: np.ndarray, coords: np.ndarray, slide: str,
                     width: int, height: int) -> None:
    """One h5 file in the layout training.features writes (CLAM/TRIDENT), see docs/INTERFACES.md."""
    with h5py.File(path, "w") as f:
        f["features"] = features.astype(np.float32)
        f["coords"] = coords.astype(np.int64)
        f["tissue_fraction"] = np.ones(len(coords), np.float32)
        f.attrs.update(patch_size=TILE, patch_level=0, level0_width=width, level0_height=height,
                       mpp=0.243, mpp_source="metadata", backbone_layer="pool", weights="none",
                       weights_seed=0, feature_engine="onnxruntime", slide=slide, min_tissue=0.25)


def make_bag_dataset(root: Path, n_pos: int = 10, n_neg: int = 10, seed: int = 0,
                     dim: int = FEATURE_DIM, grid: int = 6) -> tuple[Path, Path]:
    """A separable MIL problem: tumour slides hold a 2x2 block of tiles shifted along feature 0.

    Returns (features_dir, labels_csv). Labels CSV is in the Camelyon16 reference format.
    """
    rng = np.random.default_rng(seed)
    features_dir = root / "features"
    (features_dir / "h5_files").mkdir(parents=True)
    ys, xs = np.mgrid[0:grid, 0:grid]
    coords = np.stack([xs.ravel(), ys.ravel()], 1) * TILE
    rows = []
    for i in range(n_pos + n_neg):
        tumour = i < n_pos
        name = f"{'tumor' if tumour else 'normal'}_{i:03d}"
        feats = rng.normal(0, 1, (len(coords), dim))
        if tumour:
            block = (xs.ravel() // 2 == 1) & (ys.ravel() // 2 == 1)  # tiles (2..3, 2..3)
            feats[block, 0] += 8.0
        write_feature_h5(features_dir / "h5_files" / f"{name}.h5", feats, coords, name,
                         grid * TILE, grid * TILE)
        rows.append((name, "Tumor" if tumour else "Normal"))
    labels = root / "reference.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return features_dir, labels


@pytest.fixture
def bag_dataset(tmp_path):
    return make_bag_dataset(tmp_path)


@pytest.fixture
def tiny_bag_dataset(tmp_path):
    """Two tumour and two normal slides: the smallest set fit's class checks accept."""
    return make_bag_dataset(tmp_path, n_pos=2, n_neg=2)
