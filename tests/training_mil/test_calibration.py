"""Calibrated scores (training.calibration): Platt scaling recovers a known miscalibration, keeps
a finite slope on separable data, never reverses the ranking; `fit` calibrates both logits on
out-of-fold predictions (with lesion outlines where given), the calibrated maps travel inside
the head's graphs, and `evaluate` reports ECE, Brier and a reliability diagram."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from shapely.geometry import box

from training.calibration import (
    TOP_TILES,
    Platt,
    calibration_metrics,
    expected_calibration_error,
    fit_platt,
    patch_calibration_set,
)
from training.fit import FitOptions, fit
from training.heads import build_head

FAST = dict(epochs=25, lr=3e-3, weight_decay=1e-4, patience=25, val_fraction=0.3)


def test_platt_recovers_an_overconfident_model():
    """Outcomes drawn with P(tumour) = sigmoid(z / 4) while the model says sigmoid(z): the fit
    finds the slope 1/4, and the calibrated probabilities are close to the truth."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 6, 20000)
    y = (rng.random(len(z)) < 1 / (1 + np.exp(-z / 4))).astype(int)
    platt = fit_platt(z, y)
    assert platt.slope == pytest.approx(0.25, abs=0.02) and abs(platt.intercept) < 0.1
    before = expected_calibration_error(y, 1 / (1 + np.exp(-z)))
    after = expected_calibration_error(y, platt.probability(z))
    assert before > 0.1 and after < 0.02


def test_separable_logits_keep_a_finite_slope_and_their_order():
    """Held-out slides a MIL head separates completely (logits +-20, sigmoid 1.0 and 2e-9):
    plain logistic regression would saturate again; Platt's smoothed targets keep the
    probabilities near (N+1)/(N+2) and 1/(N+2), and the order of the slides."""
    logits = np.r_[np.linspace(-25, -15, 10), np.linspace(15, 25, 10)]
    y = np.r_[np.zeros(10, int), np.ones(10, int)]
    platt = fit_platt(logits, y)
    p = platt.probability(logits)
    assert 0 < platt.slope < 1
    assert np.all(np.diff(p) > 0)                        # the ranking is kept
    assert 0.01 < p[:10].max() < 0.2 and 0.8 < p[10:].min() < 0.99


def test_a_calibration_never_reverses_the_ranking():
    logits = np.r_[np.full(10, 3.0), np.full(10, -3.0)]
    assert fit_platt(logits, np.r_[np.zeros(10, int), np.ones(10, int)]) == Platt(
        n_positive=10, n_negative=10)                     # anti-correlated: the identity
    assert fit_platt(logits, np.zeros(20, int)).slope == 1.0   # one class: the identity


def test_patch_calibration_set_uses_what_is_known():
    normal = np.array([-3.0, -2.0, -1.0])
    tumour_annotated = np.array([-2.0, 4.0, 5.0, 0.0])
    target = np.array([0, 1, 1, -1], np.int8)             # -1: on the outline, left out
    tumour_plain = np.arange(10.0)
    x, y = patch_calibration_set([normal, tumour_annotated, tumour_plain], [0, 1, 1],
                                 [None, target, None])
    assert x.tolist() == [-3, -2, -1, -2, 4, 5, *np.arange(10.0)[-TOP_TILES:]]
    assert y.tolist() == [0, 0, 0, 0, 1, 1, *[1] * TOP_TILES]


def test_calibration_metrics_of_a_perfect_and_a_saturated_model():
    y = np.r_[np.zeros(50, int), np.ones(50, int)]
    honest = calibration_metrics(y, np.full(100, 0.5))
    assert honest["ece"] == 0.0 and honest["brier"] == pytest.approx(0.25)
    wrong = calibration_metrics(y, np.r_[np.ones(50), np.zeros(50)])   # sure and always wrong
    assert wrong["ece"] == 1.0 and wrong["brier"] == 1.0
    assert len(wrong["reliability"]["predicted"]) == len(wrong["reliability"]["observed"])


def test_calibrated_head_scores_are_its_platt_maps_and_export_keeps_them(tmp_path):
    """The maps sit in the head's patch and aggregator modules: torch forward, the streamed
    modules and the exported graphs all give sigmoid(a * logit + b)."""
    import onnxruntime as ort

    from training.backbone import build_backbone
    from training.export import FILES, export_bundle

    backbone = build_backbone("none", layer="pool", seed=0)
    torch.manual_seed(0)
    plain = build_head({"kind": "chowder", "in_dim": backbone.feature_dim, "k": 2}).eval()
    maps = {"slide": {"slope": 0.3, "intercept": -1.0}, "patch": {"slope": 0.5, "intercept": 2.0}}
    calibrated = build_head({**plain.config, "calibration": maps}).eval()
    calibrated.load_state_dict(plain.state_dict())        # no new weights: the maps are config
    x = torch.randn(7, backbone.feature_dim)
    with torch.no_grad():
        raw, cal = plain(x), calibrated(x)
    torch.testing.assert_close(cal.patch_logits, raw.patch_logits)
    torch.testing.assert_close(cal.patch_scores, torch.sigmoid(0.5 * raw.patch_logits + 2.0))
    torch.testing.assert_close(cal.slide_logit, 0.3 * raw.slide_logit - 1.0)

    bundle = export_bundle(tmp_path / "b", backbone, calibrated)   # parity checked inside
    head = ort.InferenceSession(str(bundle / FILES["head"]), providers=["CPUExecutionProvider"])
    scores = head.run(["patch_scores"], {"features": x.numpy()})[0]
    np.testing.assert_allclose(scores, cal.patch_scores.numpy(), atol=1e-6)


def test_calibration_is_not_a_training_option():
    with pytest.raises(Exception, match="calibration"):
        FitOptions(head_config={"calibration": {"slide": {"slope": 1, "intercept": 0}}})


def _outline_tumour_blocks(features_dir, root):
    """ASAP XML outlines of make_bag_dataset's tumour block (tiles 2..3 x 2..3, 224 px)."""
    from wsi.annotations import write_asap_xml

    annotations = root / "annotations"
    annotations.mkdir()
    for h5 in (features_dir / "h5_files").glob("tumor_*.h5"):
        write_asap_xml(annotations / f"{h5.stem}.xml", [box(448, 448, 896, 896)])
    return annotations


@pytest.mark.parametrize("annotated", [False, True])
def test_fit_calibrates_on_out_of_fold_predictions(bag_dataset, tmp_path, annotated):
    import mlflow

    from training.evaluate import evaluate_run
    from training.runs import load_run_head

    features_dir, labels = bag_dataset
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    annotations = _outline_tumour_blocks(features_dir, tmp_path) if annotated else None
    options = FitOptions(head="chowder", folds=2, seed=0, **FAST)
    result = fit(features_dir, labels, options, tracking_uri=uri, experiment="c",
                 annotations_dir=annotations)
    m = result.metrics
    cal = result.head.config["calibration"]
    assert cal["slide"]["slope"] > 0 and cal["patch"]["slope"] > 0
    assert m["calibration_annotated_slides"] == (10 if annotated else 0)
    # annotated: the 4 block tiles of each tumour slide are the positives and its 32 other
    # tiles negatives; else each tumour slide's top tiles are the positives
    n_pos = 40 if annotated else 10 * TOP_TILES
    assert cal["patch"]["n_positive"] == n_pos
    assert cal["patch"]["n_negative"] == 10 * 36 + (10 * 32 if annotated else 0)
    # the thresholds the run chooses land where a reader can tell them apart from 0 and 1
    assert 0.01 <= result.slide_threshold <= 0.99 and 0.01 <= result.roi_threshold <= 0.99
    # the logged head is the calibrated one: it gives the rows' calibrated scores
    loaded = load_run_head(result.run_id, uri)
    assert loaded.config["calibration"] == cal
    run = mlflow.MlflowClient(uri).get_run(result.run_id)
    for key in ("val_slide_ece", "val_slide_brier", "val_patch_ece", "calibration_slide_slope"):
        assert key in run.data.metrics
    # evaluate reports ECE and Brier for slides (and patches against the outlines)
    evaluation = evaluate_run(result.run_id, features_dir, labels, annotations, uri,
                              n_bootstrap=10)
    assert set(evaluation["calibration"]) == ({"slides", "patches"} if annotated else {"slides"})
    run = mlflow.MlflowClient(uri).get_run(result.run_id)
    assert "test_slide_ece" in run.data.metrics
    assert ("test_patch_ece" in run.data.metrics) == annotated
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(result.run_id,
                                                                         "evaluation")}
    assert "evaluation/reliability.png" in artifacts
