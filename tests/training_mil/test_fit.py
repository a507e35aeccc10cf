"""fit: learns a separable bag problem, is reproducible, and logs a complete MLflow run."""
from __future__ import annotations

import csv
import dataclasses
import json

import mlflow
import numpy as np
import pytest
import torch

from core.errors import MilroiError
from training.cli import main as train_main
from training.feature_file import load_bag
from training.fit import FitOptions, fit
from training.labels import read_labels
from training.runs import load_run_domain, load_run_head

# early stopping on 3 validation slides is noise: patience = epochs keeps the best of all epochs
FAST = dict(epochs=25, lr=3e-3, weight_decay=1e-4, patience=25, val_fraction=0.3)
# slide separation alone: chowder without its max-instance calibration term (tested below)
SMALL = {"chowder": {"instance_weight": 0.0}, "abmil": {"hidden": [32], "attn_dim": 16}}


CHOWDER_7 = FitOptions(head="chowder", head_config=SMALL["chowder"], folds=2, seed=7, **FAST)


def _uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.mark.parametrize("head", ["chowder", "abmil"])
def test_fit_separates_tumour_bags_and_logs_run(bag_dataset, tmp_path, head):
    features_dir, labels = bag_dataset
    options = FitOptions(head=head, head_config=SMALL[head], folds=2, seed=0, **FAST)
    result = fit(features_dir, labels, options, tracking_uri=_uri(tmp_path), experiment="t")
    assert result.metrics["val_auc"] == 1.0
    assert result.metrics["cv_auc_mean"] == 1.0
    # out-of-fold predictions cover every slide once
    assert sorted(r["slide"] for r in result.predictions) == sorted(read_labels(labels))

    client = mlflow.MlflowClient(_uri(tmp_path))
    run = client.get_run(result.run_id)
    p = run.data.params
    assert p["head"] == head and p["backbone_layer"] == "pool" and p["weights"] == "none"
    assert p["tile_size"] == "224" and p["target_mpp"] == "0.243" and p["min_tissue"] == "0.25"
    assert p["weights_seed"] == "0" and p["folds"] == "2"
    assert float(p["slide_threshold"]) == pytest.approx(run.data.metrics["slide_threshold"])
    # the ROI threshold splits the out-of-fold slides by their highest patch score as well as
    # any cut can (Youden's J), at least as well as the old fixed 0.5, and says how well
    t = result.roi_threshold
    assert float(p["roi_threshold"]) == pytest.approx(t)
    assert run.data.metrics["roi_threshold"] == pytest.approx(t)
    y = np.array([r["label"] for r in result.predictions])
    top = np.array([r["max_patch_score"] for r in result.predictions])

    def youden(cut):
        return np.mean(top[y == 1] >= cut) - np.mean(top[y == 0] >= cut)

    assert youden(t) >= max(youden(c) for c in [0.5, *top])
    assert run.data.metrics["val_normal_slides_with_roi"] == np.sum((top >= t) & (y == 0))
    assert run.data.metrics["val_tumor_slides_without_roi"] == np.sum((top < t) & (y == 1))
    if head == "abmil":  # its instance classifier separates the slides' top patches here
        assert top[y == 0].max() < t <= top[y == 1].min()
    assert run.data.metrics["val_auc"] == 1.0
    assert len(run.data.tags["data_fingerprint"]) == 64
    epochs = client.get_metric_history(result.run_id, "fold0_train_loss")
    assert len(epochs) >= 2 and [m.step for m in epochs] == list(range(1, len(epochs) + 1))
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"head", "predictions.csv", "roc_curve.png", "domain"} <= artifacts
    assert {a.path for a in client.list_artifacts(result.run_id, "head")} == {
        "head/head.pt", "head/head_config.json"}
    # the description of its training data (core.domain), for export to put in the bundle:
    # these files have features and pixel sizes but no stain statistics (written before them)
    domain = load_run_domain(result.run_id, _uri(tmp_path))
    assert domain.slides == 20 and domain.tiles == 20 * 36 and domain.stain is None
    assert domain.mpp_range == (0.243, 0.243) and domain.features.components.shape[1] == 16
    tumour = load_bag(features_dir / "h5_files" / "tumor_000.h5").features.numpy()
    assert np.mean(domain.tile_distance(tumour) <= 1) > 0.9   # a training slide: within reach
    assert np.all(domain.tile_distance(tumour + 10.0) > 1)    # the same tiles shifted: beyond

    # the logged head is the returned final model, and it localises the tumour block
    loaded = load_run_head(result.run_id, _uri(tmp_path))
    assert loaded.config == result.head.config
    bag = load_bag(features_dir / "h5_files" / "tumor_000.h5")
    with torch.no_grad():
        scores = loaded(bag.features).patch_scores.numpy()
    block = (bag.coords[:, 0] // 448 == 1) & (bag.coords[:, 1] // 448 == 1)
    assert scores[block].mean() > scores[~block].mean()


def test_fit_is_reproducible(bag_dataset, tmp_path):
    features_dir, labels = bag_dataset
    a = fit(features_dir, labels, CHOWDER_7,
            tracking_uri=_uri(tmp_path), experiment="r")
    b = fit(features_dir, labels, CHOWDER_7,
            tracking_uri=_uri(tmp_path), experiment="r")
    assert a.run_id != b.run_id
    assert [r["score"] for r in a.predictions] == [r["score"] for r in b.predictions]
    assert a.metrics == b.metrics
    for k, v in a.head.state_dict().items():
        assert torch.equal(v, b.head.state_dict()[k])
    c = fit(features_dir, labels, dataclasses.replace(CHOWDER_7, seed=8),
            tracking_uri=_uri(tmp_path), experiment="r")
    assert [r["score"] for r in c.predictions] != [r["score"] for r in a.predictions]


def test_cli_prints_run_id_last_and_holds_out_test_slides(bag_dataset, tmp_path, capsys):
    features_dir, labels = bag_dataset
    test_list = tmp_path / "test.txt"
    test_list.write_text("tumor_000\nnormal_019\n")
    rc = train_main(["fit", str(features_dir), "--labels", str(labels), "--head", "abmil",
                     "--folds", "1", "--seed", "3", "--epochs", "10", "--lr", "5e-3",
                     "--tracking-uri", _uri(tmp_path), "--experiment", "cli",
                     "--test-slides", str(test_list), "--head-config", '{"hidden": [32]}'])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("run_id=")
    run_id = lines[-1].split("=", 1)[1]
    run = mlflow.MlflowClient(_uri(tmp_path)).get_run(run_id)
    assert run.data.params["n_slides"] == "18" and run.data.params["n_test_slides"] == "2"
    assert "test_auc" in run.data.metrics
    assert json.loads(run.data.params["head_config"])["hidden"] == [32]
    local = mlflow.MlflowClient(_uri(tmp_path)).download_artifacts(run_id, "predictions.csv",
                                                                   str(tmp_path))
    rows = list(csv.DictReader(open(local)))
    assert {r["slide"] for r in rows if r["fold"] == "test"} == {"tumor_000", "normal_019"}


def test_training_commands_take_the_tracking_uri_from_the_environment(bag_dataset, tmp_path,
                                                                      monkeypatch, capsys):
    """No --tracking-uri: fit, evaluate and export all use $MLFLOW_TRACKING_URI (one resolution,
    core.tracking), never the ./mlflow.db default."""
    features_dir, labels = bag_dataset
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    assert train_main(["fit", str(features_dir), "--labels", str(labels), "--folds", "1",
                       "--epochs", "2", "--experiment", "env"]) == 0
    run_id = capsys.readouterr().out.strip().splitlines()[-1].split("=", 1)[1]
    assert mlflow.MlflowClient(f"sqlite:///{tmp_path / 'env.db'}").get_run(run_id)
    assert train_main(["evaluate", run_id, "--features", str(features_dir), "--labels",
                       str(labels), "--bootstrap", "10"]) == 0
    assert not (tmp_path / "mlflow.db").exists()   # the default store was never touched
    # the flag still wins over the environment
    assert train_main(["evaluate", run_id, "--features", str(features_dir), "--labels",
                       str(labels), "--tracking-uri", f"sqlite:///{tmp_path / 'other.db'}"]) == 1
    assert "no MLflow run" in capsys.readouterr().err


def test_fingerprint_changes_with_labels_and_features(bag_dataset, tmp_path):
    from training.feature_file import data_fingerprint, load_bags

    features_dir, labels_path = bag_dataset
    labels = read_labels(labels_path)
    bags = load_bags(features_dir, sorted(labels))
    base = data_fingerprint(bags, labels)
    flipped = dict(labels, tumor_000=0)
    assert data_fingerprint(bags, flipped) != base
    bags[0].digest = "0" * 64
    assert data_fingerprint(bags, labels) != base


def test_bad_inputs_are_clear_errors(bag_dataset, tmp_path):
    features_dir, labels = bag_dataset
    bad = tmp_path / "bad.csv"
    bad.write_text("tumor_000,Tumor\nnormal_001,Maybe\n")
    with pytest.raises(MilroiError, match=r"bad.csv, line 2"):
        read_labels(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text("ghost_slide,Tumor\n")
    with pytest.raises(MilroiError, match=r"ghost_slide.h5 does not exist"):
        fit(features_dir, missing, tracking_uri=_uri(tmp_path))
    corrupt = features_dir / "h5_files" / "normal_012.h5"
    corrupt.write_bytes(b"not an h5 file")
    with pytest.raises(MilroiError, match="normal_012.h5 is not a readable features h5"):
        fit(features_dir, labels, tracking_uri=_uri(tmp_path))


def test_chowder_patch_scores_are_calibrated_probabilities(bag_dataset, tmp_path):
    """With the default max-instance term, chowder's patch scores are usable probabilities:
    the tumour block ranks above everything else and normal slides stay below 0.5."""
    import h5py
    import torch
    from sklearn.metrics import roc_auc_score

    features_dir, labels = bag_dataset
    options = FitOptions(head="chowder", folds=1, seed=0, **{**FAST, "epochs": 40, "patience": 40})
    result = fit(features_dir, labels, options, tracking_uri=_uri(tmp_path), experiment="t")
    scores, targets, normal_scores = [], [], []
    for name, label in read_labels(labels).items():
        with h5py.File(features_dir / "h5_files" / f"{name}.h5") as f:
            feats, coords = torch.from_numpy(f["features"][:]), f["coords"][:]
        with torch.no_grad():
            s = result.head(feats).patch_scores.numpy()
        if label:
            block = ((coords[:, 0] // 224) // 2 == 1) & ((coords[:, 1] // 224) // 2 == 1)
            scores.append(s), targets.append(block)
        else:
            normal_scores.append(s)
    assert roc_auc_score(np.concatenate(targets), np.concatenate(scores)) > 0.95
    assert np.median(np.concatenate(normal_scores)) < 0.5


def test_youden_threshold_sits_between_the_classes():
    from training.thresholds import youden_threshold

    # perfectly separated: any threshold in (0.2, 0.8] is optimal; the midpoint keeps both margins
    assert youden_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 1.0])) == pytest.approx(0.5)
    # saturated tumour scores must still be classified as tumour after float32 rounding
    t = youden_threshold(np.array([0, 1, 1]), np.array([1e-6, 1.0, 1.0]))
    assert t < np.float32(1.0 - 1e-6)
    assert youden_threshold(np.array([1, 1]), np.array([0.3, 0.9])) == 0.5  # one class: default


def test_roi_threshold_is_the_youden_cut_on_slide_maxima_in_logit_space():
    from scipy.special import expit, logit

    from training.thresholds import ROI_THRESHOLD_RANGE, choose_roi_threshold

    y = np.array([0, 0, 0, 1, 1])
    # separated: halfway between the highest normal (2) and the lowest tumour maximum (10) in
    # logits, so a normal slide scoring a little higher than in validation still gets no ROI
    assert choose_roi_threshold(np.array([-1.0, 0.5, 2.0, 10.0, 30.0]), y) == pytest.approx(expit(6.0))
    # overlap: the best sensitivity + specificity (one normal slide above, none missed) wins
    # over cuts that miss a tumour slide
    t = choose_roi_threshold(np.array([-1.0, 0.0, 8.0, 4.0, 12.0]), y)
    assert logit(t) == pytest.approx(2.0)
    # equally good cuts (J = 0.5 each): the widest gap, between 8 and 20, not -3 and -2.5
    t = choose_roi_threshold(np.array([-3.0, -2.5, 8.0, 20.0]), np.array([0, 1, 0, 1]))
    assert t > 0.5 and logit(t) == pytest.approx(14.0, abs=0.2)  # clipped at 1 - 1e-6: 13.8
    # saturated heads: the threshold stays below 1.0 in float32, where tumour scores land
    t = choose_roi_threshold(np.array([0.0, 1.0, 2.0, 60.0, 80.0]), y)
    assert t == pytest.approx(ROI_THRESHOLD_RANGE[1]) and np.float32(t) < np.float32(1.0)
    assert choose_roi_threshold(np.array([0.0, 3.0]), np.array([1, 1])) == 0.5  # one class: default


def test_fit_and_evaluate_leave_out_slides_without_tissue(bag_dataset, tmp_path, caplog):
    """A slide `features` recorded with 0 tiles (no_tissue) is left out with a warning and
    counted, not a crash of the whole fit."""
    import h5py

    from training.evaluate import evaluate_run

    features_dir, labels = bag_dataset
    h5 = features_dir / "h5_files"
    with h5py.File(h5 / "normal_010.h5") as src, h5py.File(h5 / "glass_001.h5", "w") as f:
        f["features"] = np.zeros((0, src["features"].shape[1]), np.float32)
        f["coords"] = np.zeros((0, 2), np.int64)
        f["tissue_fraction"] = np.zeros(0, np.float32)
        f.attrs.update({**src.attrs, "slide": "glass_001"})
    with open(labels, "a") as f:
        f.write("glass_001,Normal\n")
    with caplog.at_level("WARNING"):
        result = fit(features_dir, labels, FitOptions(folds=2, epochs=3, seed=0),
                     tracking_uri=_uri(tmp_path), experiment="glass")
    assert "without a usable tissue tile left out (no_tissue): glass_001" in caplog.text
    params = mlflow.MlflowClient(_uri(tmp_path)).get_run(result.run_id).data.params
    assert params["n_no_tissue"] == "1" and params["n_slides"] == "20"
    assert "glass_001" not in {r["slide"] for r in result.predictions}
    evaluation = evaluate_run(result.run_id, features_dir, labels, tracking_uri=_uri(tmp_path),
                              n_bootstrap=10, log_to_run=False)
    assert evaluation["no_tissue"] == ["glass_001"]
    assert len(evaluation["predictions"]) == 20


def test_too_few_slides_for_the_inner_split_is_a_clear_error(tiny_bag_dataset, tmp_path):
    """4 slides in 2 folds leave 2 to train on per fold, which cannot give up 2 for early
    stopping: one clear line, not sklearn's ValueError."""
    features_dir, labels = tiny_bag_dataset
    with pytest.raises(MilroiError, match="cannot be split into a training part"):
        fit(features_dir, labels, FitOptions(folds=2, epochs=2), tracking_uri=_uri(tmp_path))
