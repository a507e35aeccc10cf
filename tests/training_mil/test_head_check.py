"""The head's patch ranking (training.head_check): fit measures it on its out-of-fold tiles and
tags the run; export refuses a run that failed it unless --force."""
from __future__ import annotations

import mlflow
import numpy as np
import pytest

from core.errors import ConfigError, ExportError
from training.fit import FitOptions, fit
from training.head_check import PASSED, ranking_figures, verdict
from training.runs import RANKING_TAG

FAST = dict(epochs=25, lr=3e-3, weight_decay=1e-4, patience=25, val_fraction=0.3)


def test_ranking_figures_and_verdict():
    rng = np.random.default_rng(0)
    normal = [rng.normal(0, 1, 50) for _ in range(5)]
    tumour = [np.r_[rng.normal(0, 1, 46), rng.normal(6, 0.5, 4)] for _ in range(5)]
    labels = [0] * 5 + [1] * 5
    held = ranking_figures(normal + tumour, labels, [None] * 10)
    assert held["ranking_top_tile_auc"] > 0.99 and "ranking_lesion_tile_auc" not in held
    assert verdict(held) == PASSED
    # a head that fires on some normal tissue (a few hot tiles on every normal slide) and
    # scores the tumour tiles low: its top tiles on tumour slides rank below the normal ones'
    fires_on_normal = [np.r_[x[:46], rng.normal(6, 0.5, 4)] for x in normal]
    tumour_low = [np.r_[x[:46], rng.normal(-6, 0.5, 4)] for x in tumour]
    wrong_way = ranking_figures(fires_on_normal + tumour_low, labels, [None] * 10)
    assert wrong_way["ranking_top_tile_auc"] < 0.1
    assert "ranking_top_tile_auc 0.0" in verdict(wrong_way) and "below normal" in verdict(wrong_way)
    # the top tiles of a random head: no better than chance, so not passed either
    noise = ranking_figures([rng.normal(0, 1, 50) for _ in range(10)], labels, [None] * 10)
    assert abs(noise["ranking_top_tile_auc"] - 0.5) < 0.25
    # with lesion outlines: the lesion tiles against the rest
    targets = [None] * 5 + [np.r_[np.zeros(46, np.int8), np.ones(4, np.int8)]] * 5
    assert ranking_figures(normal + tumour, labels, targets)["ranking_lesion_tile_auc"] > 0.99
    # outlines around the tiles the head scores lowest: it ranks the lesions below the rest
    low = [np.r_[x[:46], rng.normal(-6, 0.5, 4)] for x in tumour]
    wrong = ranking_figures(normal + low, labels, targets)
    assert wrong["ranking_lesion_tile_auc"] < 0.1 and verdict(wrong) != PASSED
    # per fold: two models on different logit scales are each judged on their own
    scaled = normal[:3] + [10 * x for x in normal[3:]] + tumour[:3] + [10 * x for x in tumour[3:]]
    folds = [0, 0, 0, 1, 1, 0, 0, 0, 1, 1]
    assert ranking_figures(scaled, labels, [None] * 10, folds)["ranking_top_tile_auc"] > 0.99


def test_fit_tags_the_check_and_export_enforces_it(bag_dataset, tmp_path):
    from training.export import export_run

    features_dir, labels = bag_dataset
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # test_fit's localisation schedule: chowder finds the tumour block and ranks it first.
    # (Its 2-fold, 25-epoch runs stop at epochs where the folds' tiny logits separate the slides
    # by their lowest tiles, the block at the bottom: the check rightly fails those.)
    options = FitOptions(head="chowder", folds=1, seed=0, **{**FAST, "epochs": 40, "patience": 40})
    result = fit(features_dir, labels, options, tracking_uri=uri, experiment="h")
    assert result.ranking_check == PASSED and result.metrics["ranking_top_tile_auc"] > 0.9
    client = mlflow.MlflowClient(uri)
    assert client.get_run(result.run_id).data.tags[RANKING_TAG] == PASSED
    # a run whose check failed (the tag fit writes then) is refused, naming the figure
    failed = "the head ranks tumour tiles below normal ones on its out-of-fold tiles: " \
             "ranking_top_tile_auc 0.220 <= 0.5"
    client.set_tag(result.run_id, RANKING_TAG, failed)
    with pytest.raises(ExportError, match="ranking_top_tile_auc 0.220.*--force"):
        export_run(result.run_id, "refused", tracking_uri=uri, out_dir=tmp_path / "b")
    assert not (tmp_path / "b").exists()
    # --force passes the gate: the export goes on to build the bundle, which for these 16-d toy
    # features stops at the backbone (2048-d), the next check
    with pytest.raises(ConfigError, match="16-d features"):
        export_run(result.run_id, "forced", tracking_uri=uri, out_dir=tmp_path / "b", force=True)
