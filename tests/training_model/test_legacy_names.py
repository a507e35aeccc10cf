"""Bundles and fit runs written before the ROI threshold had one name (`patch_threshold` in the
manifest and the run) still load, as `roi_threshold`; what milroi writes now uses the new name."""
from __future__ import annotations

import json
import shutil

import pytest
from mlflow_testing import log_fit_run

from core.bundle import BundleManifest
from training.runs import FitRun


def test_a_manifest_with_the_old_key_loads(chowder_bundle, tmp_path):
    bundle, _ = chowder_bundle
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest.pop("roi_threshold", None)
    manifest["patch_threshold"] = 0.83
    (old / "manifest.json").write_text(json.dumps(manifest))
    loaded = BundleManifest.read(old)
    assert loaded.roi_threshold == pytest.approx(0.83)
    written = loaded.to_dict()
    assert written["roi_threshold"] == pytest.approx(0.83) and "patch_threshold" not in written
    assert "patch_threshold" not in loaded.extra


def test_a_fit_run_with_the_old_key_loads(trained_head, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = log_fit_run(uri, trained_head, val_auc=0.7)
    client = MlflowClient(tracking_uri=uri)
    client.log_param(run_id, "patch_threshold", "0.91")   # as fit logged it before the rename
    client.log_metric(run_id, "patch_threshold", 0.91)
    assert FitRun.load(run_id, uri).roi_threshold == pytest.approx(0.91)
    fresh = log_fit_run(uri, trained_head, val_auc=0.7, roi_threshold=0.66)
    assert FitRun.load(fresh, uri).roi_threshold == pytest.approx(0.66)


def test_a_manifest_from_before_target_mpp_names_a_level(chowder_bundle, tmp_path):
    """Bundles from before the input was stated in um/px say `level` 0 (the only level
    `features` could make): they load as Camelyon16's 0.243 um/px input. Any other level is
    refused with the fix, never guessed."""
    from core.errors import BundleError

    bundle, _ = chowder_bundle
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest.pop("target_mpp")
    manifest["level"] = 0
    (old / "manifest.json").write_text(json.dumps(manifest))
    loaded = BundleManifest.read(old)
    assert loaded.tiling.target_mpp == 0.243 and "level" not in loaded.to_dict()
    manifest["level"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="level 1.*target_mpp"):
        BundleManifest.read(old)
