"""Evaluation metrics on constructed inputs with known answers."""
from __future__ import annotations

import numpy as np
import pytest

from core.errors import MilroiError
from training.evaluate import (
    SlideHits,
    detections,
    evaluation_mask,
    froc,
    itc_labels,
    lesion_hits,
    patch_auc,
    patch_targets,
    slide_metrics,
)


def test_slide_metrics_known_auc_and_intervals():
    y = np.array([0] * 10 + [1] * 10)
    p = np.r_[np.linspace(0.0, 0.45, 10), np.linspace(0.55, 1.0, 10)]
    m = slide_metrics(y, p, threshold=0.5, n_bootstrap=200)
    assert m["auc"] == 1.0 and m["accuracy"] == 1.0
    assert m["auc_ci_low"] == m["auc_ci_high"] == 1.0  # perfect separation in every resample
    # one tumour slide scored below every normal one: AUC 0.9 exactly
    p2 = p.copy()
    p2[10] = -1.0
    m2 = slide_metrics(y, p2, 0.5, n_bootstrap=300)
    assert m2["auc"] == pytest.approx(0.9) and m2["accuracy"] == pytest.approx(0.95)
    assert m2["auc_ci_low"] < 0.9 <= m2["auc_ci_high"] <= 1.0
    assert m2["accuracy_ci_low"] < 0.95 <= m2["accuracy_ci_high"]
    with pytest.raises(MilroiError, match="tumour and normal"):
        slide_metrics([1, 1], [0.2, 0.3])


def test_patch_targets_leave_out_ambiguous_and_excluded():
    frac = np.array([0.0, 0.1, 0.5, 1.0, 0.0, 0.9])
    excluded = np.array([False, False, False, False, True, False])
    t = patch_targets(frac, excluded)
    assert t.tolist() == [0, -1, 1, 1, -1, 1]
    scores = np.array([0.1, 0.99, 0.8, 0.7, 0.99, 0.05])
    # kept: normal 0.1 vs tumour 0.8, 0.7, 0.05 -> 2 of 3 pairs ordered
    assert patch_auc(scores, t) == pytest.approx(2 / 3)


def test_evaluation_mask_grows_lesions_and_flags_itc():
    mask = np.zeros((200, 200), bool)
    mask[20:60, 20:60] = True          # 40 px at 32x, 0.243 um: ~311 um wide -> counted
    mask[100:102, 100:102] = True      # ~16 um -> isolated tumour cells
    mask[103:105, 100:102] = True      # 1 px gap: merged by the 37.5 um growth (~4.8 px)
    lesions = evaluation_mask(mask, mpp=0.243)
    assert lesions.max() == 2
    assert lesions[18, 40] == lesions[40, 40] != 0  # grown by a few pixels
    assert lesions[101, 101] == lesions[104, 101]
    assert itc_labels(lesions, 0.243) == {int(lesions[101, 101])}


def test_detections_are_local_maxima_of_the_tile_map():
    ys, xs = np.mgrid[0:6, 0:8]
    coords = np.stack([xs.ravel(), ys.ravel()], 1) * 224 + 1000
    scores = np.zeros(len(coords))
    scores[(ys.ravel() == 1) & (xs.ravel() == 1)] = 0.9
    scores[(ys.ravel() == 4) & (xs.ravel() == 6)] = 0.6
    centres, probs = detections(coords, scores, 224)
    order = np.argsort(-probs)
    assert probs[order][:2].tolist() == [0.9, 0.6]
    assert centres[order][0].tolist() == [1000 + 224 + 112, 1000 + 224 + 112]
    assert centres[order][1].tolist() == [1000 + 6 * 224 + 112, 1000 + 4 * 224 + 112]


def test_froc_known_curve():
    # slide A: 2 lesions; lesion 1 hit at 0.9, lesion 2 at 0.4, one FP at 0.8, one on an ITC
    lesions = np.zeros((100, 100), int)
    lesions[10:30, 10:30] = 1
    lesions[60:80, 60:80] = 2
    lesions[90:92, 5:7] = 3
    ds = 32
    centres = np.array([[20, 20], [70, 70], [50, 50], [6, 91], [12, 12]], float) * ds
    probs = np.array([0.9, 0.4, 0.8, 0.95, 0.3])
    a = lesion_hits(centres, probs, lesions, itc={3}, downsample=ds)
    assert a.n_lesions == 2 and sorted(a.tp_probs) == [0.4, 0.9]
    assert a.fp_probs.tolist() == [0.8]
    # slide B: normal, two FPs
    b = lesion_hits(np.array([[5.0, 5.0], [9.0, 9.0]]), np.array([0.7, 0.2]), None)
    assert b.n_lesions == 0 and b.fp_probs.tolist() == [0.7, 0.2]
    f = froc([a, b])
    # at 0.9 -> 0 FP, sens 0.5; at 0.8 -> 0.5 FP/slide; at 0.2 -> 1.5 FP/slide, sens 1.0
    # at 0.7 -> 1 FP/slide; at 0.4 -> sens 1.0, 1 FP/slide
    at = f["sensitivity_at"]
    assert at[0.25] == pytest.approx(0.5) and at[0.5] == pytest.approx(0.5)
    assert at[1.0] == pytest.approx(1.0) and at[8.0] == pytest.approx(1.0)
    assert f["score"] == pytest.approx((0.5 + 0.5 + 1 + 1 + 1 + 1) / 6)
    with pytest.raises(MilroiError, match="at least one annotated lesion"):
        froc([b])


def test_froc_missed_lesions_lower_the_score():
    lesions = np.zeros((50, 50), int)
    lesions[5:15, 5:15] = 1
    lesions[30:40, 30:40] = 2
    hit_one = lesion_hits(np.array([[10.0, 10.0]]) * 32, np.array([0.9]), lesions)
    assert froc([hit_one])["score"] == pytest.approx(0.5)
    perfect = lesion_hits(np.array([[10.0, 10.0], [35.0, 35.0]]) * 32, np.array([0.9, 0.8]),
                          lesions)
    assert froc([perfect])["score"] == pytest.approx(1.0)
    assert isinstance(perfect, SlideHits)


def test_evaluate_command_scores_a_fit_run(bag_dataset, tmp_path, capsys):
    import mlflow

    from training.cli import main as train_main

    features_dir, labels = bag_dataset
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert train_main(["fit", str(features_dir), "--labels", str(labels), "--head", "abmil",
                       "--folds", "1", "--epochs", "8", "--lr", "3e-3", "--tracking-uri", uri,
                       "--head-config", '{"hidden": [32], "attn_dim": 16}']) == 0
    run_id = capsys.readouterr().out.strip().splitlines()[-1].split("=", 1)[1]
    assert train_main(["evaluate", run_id, "--features", str(features_dir), "--labels",
                       str(labels), "--tracking-uri", uri, "--bootstrap", "100"]) == 0
    out = capsys.readouterr().out
    assert "slide AUC" in out and "20 slides" in out
    run = mlflow.MlflowClient(uri).get_run(run_id)
    # ROIs at the run's own roi_threshold, which fit chose and logged
    assert f"ROIs at {float(run.data.params['roi_threshold']):.6g}: " in out
    assert "of 10 normal slides" in out and "of 10 tumour slides" in out
    metrics = run.data.metrics
    assert 0 <= metrics["test_roi_normal_slides_with_roi"] <= 10
    assert metrics["test_n_slides"] == 20 and metrics["test_auc"] > 0.9
    assert metrics["test_auc_ci_low"] <= metrics["test_auc"] <= metrics["test_auc_ci_high"]
    assert train_main(["evaluate", "0123456789abcdef", "--features", str(features_dir),
                       "--labels", str(labels), "--tracking-uri", uri]) == 1
    assert "no MLflow run" in capsys.readouterr().err


def test_roi_metrics_count_false_rois_and_hit_lesions():
    from training.evaluate import patch_precision_recall, roi_metrics, slide_rois

    tile = 224
    coords = np.array([[x * tile, 0] for x in range(6)])
    # a normal slide: two separate tiles above 0.9 -> two false ROIs; nothing above 0.99
    normal = np.array([0.95, 0.1, 0.1, 0.92, 0.1, 0.1])
    # a tumour slide with two lesions (level-5 labels 1 and 2) under tiles 0-1 and 4-5; only
    # the first is covered by a tile above the threshold
    lesions = np.zeros((8, 8 * 6), np.int32)
    lesions[:, 0:14] = 1
    lesions[:, 28:42] = 2
    tumour = np.array([0.995, 0.98, 0.2, 0.2, 0.6, 0.6])
    slides = [slide_rois(coords, normal, tile, 0.9, 0),
              slide_rois(coords, tumour, tile, 0.9, 1, lesions)]
    r = roi_metrics(slides, 0.9)
    assert r["normal_slides_with_roi"] == 1 and r["false_rois_per_normal_slide"] == 2.0
    assert r["tumor_slides_with_roi"] == 1 and r["lesions"] == 2
    assert r["lesion_sensitivity"] == 0.5
    r = roi_metrics([slide_rois(coords, normal, tile, 0.99, 0),
                     slide_rois(coords, tumour, tile, 0.99, 1, lesions)], 0.99)
    assert r["normal_slides_with_roi"] == 0 and r["false_rois_per_normal_slide"] == 0.0
    assert r["lesion_sensitivity"] == 0.5  # the 0.995 tile still hits lesion 1
    # tiles at 0.9: 2 of 4 hot tiles are tumour (target 1), 2 of 4 tumour tiles are hot
    pr = patch_precision_recall(np.r_[normal, tumour], np.r_[np.zeros(6), [1, 1, -1, -1, 1, 1]], 0.9)
    assert pr == {"patch_precision": 0.5, "patch_recall": 0.5}
