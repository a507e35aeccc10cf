"""The hard benchmark's variants (docs/hard_benchmark.md): DSMIL, TransMIL, per-slide
standardisation, instance sampling, CLAM clustering on CHOWDER, the tile-supervised probe and the
adoption rule. The figures themselves come from `python -m benchmarks.bench_hard_mil`."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.bench_hard_mil import adoption
from core.errors import ConfigError
from training.backbone import build_backbone
from training.export import export_bundle
from training.feature_file import Bag
from training.heads import BENCHMARK_HEAD_KINDS, build_head, clustering_loss
from training.probe import TileSet, fit_probe
from training.trainer import train_head

D = 12


def _head(kind, **extra):
    torch.manual_seed(0)
    return build_head({"kind": kind, "in_dim": D, **extra}).eval()


@pytest.mark.parametrize("kind", BENCHMARK_HEAD_KINDS)
@pytest.mark.parametrize("n", [1, 2, 5, 37])
def test_benchmark_heads_score_every_patch_and_learn(kind, n):
    head = _head(kind)
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(n)) * 20
    out = head(x)
    assert out.slide_logit.shape == () and torch.isfinite(out.slide_logit)
    assert out.patch_logits.shape == out.patch_scores.shape == (n,)
    assert torch.allclose(out.patch_scores, torch.sigmoid(out.patch_logits))
    head.train()
    loss = head.loss(head(x), 1.0)
    loss.backward()
    grads = [p.grad for p in head.parameters() if p.requires_grad]
    assert loss.item() > 0 and any(g is not None and g.abs().sum() > 0 for g in grads)
    clone = build_head(head.config)
    clone.load_state_dict(head.state_dict())   # strict: the config rebuilds the architecture
    with torch.no_grad():
        assert torch.equal(clone.eval()(x).slide_logit, head.eval()(x).slide_logit)


def test_dsmil_slide_logit_is_the_mean_of_its_two_streams():
    head = _head("dsmil")
    x = torch.randn(20, D)
    with torch.no_grad():
        out = head(x)
        scores, logits, queries, values = head.patch_module()(x)
        critical = int(logits.argmax())
        w = torch.softmax(queries @ queries[critical] / queries.shape[1] ** 0.5, 0)
        bag_logit = head.aggregator_module().bag(w @ values)
    expected = (bag_logit.squeeze() + logits.max()) / 2
    assert torch.allclose(out.slide_logit, expected, atol=1e-6)


def test_slide_standardize_removes_a_per_slide_stain_offset():
    """A slide whose every feature is shifted and scaled (a stain change acting on the features)
    scores exactly as the original with slide_standardize, and differently without it."""
    x = torch.randn(40, D)
    shifted = x * 1.7 + torch.linspace(-3, 3, D)
    plain, standardised = _head("chowder"), _head("chowder", slide_standardize=True)
    with torch.no_grad():
        assert torch.allclose(standardised(x).patch_logits, standardised(shifted).patch_logits,
                              atol=1e-4)
        assert not torch.allclose(plain(x).patch_logits, plain(shifted).patch_logits, atol=1e-2)
    assert plain.streamable and not standardised.streamable


@pytest.mark.parametrize("config", [{"kind": "dsmil"}, {"kind": "transmil"},
                                    {"kind": "chowder", "slide_standardize": True}])
def test_export_refuses_heads_the_server_cannot_stream(config, tmp_path):
    head = build_head({"in_dim": 2048, **config})
    with pytest.raises(ConfigError, match="cannot be served"):
        export_bundle(tmp_path / "bundle", build_backbone("none"), head)
    assert not (tmp_path / "bundle").exists() or not any((tmp_path / "bundle").iterdir())


def test_instance_sampling_shows_each_step_a_share_of_the_bag():
    rng = np.random.default_rng(0)
    bags = [Bag(f"s{i}", torch.tensor(rng.normal(size=(40, D)), dtype=torch.float32),
                np.zeros((40, 2), np.int64)) for i in range(4)]
    labels = {"s0": 1, "s1": 0, "s2": 1, "s3": 0}
    seen: list[int] = []

    def record_sizes(epoch, head):
        if epoch == 1:   # from epoch 2 on, record what every training step is given
            head.patch_module().register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))

    train_head({"kind": "chowder", "in_dim": D, "instance_sampling": 0.5}, bags, labels,
               epochs=2, lr=1e-3, weight_decay=0.0, seed=0, on_epoch=record_sizes)
    assert seen == [20] * 4
    with pytest.raises(ConfigError, match="instance_sampling"):
        build_head({"kind": "chowder", "in_dim": D, "instance_sampling": 0.0})


def test_clustering_loss_pseudo_labels():
    logits = torch.tensor([4.0, -1.0, 0.5, -3.0, 2.0, 0.0], requires_grad=True)
    # tumour slide, b = 2: the two highest (4, 2) are pushed up, the two lowest (-3, -1) down
    clustering_loss(logits.detach(), logits, 1.0, 2).backward()
    g = logits.grad
    assert g[0] < 0 and g[4] < 0 and g[3] > 0 and g[1] > 0 and g[2] == 0 and g[5] == 0
    logits.grad = None
    # normal slide: only the highest-scored are pushed down, never up
    clustering_loss(logits.detach(), logits, 0.0, 2).backward()
    assert logits.grad[0] > 0 and logits.grad[4] > 0 and (logits.grad[[1, 2, 3, 5]] == 0).all()
    one = torch.tensor([1.0], requires_grad=True)   # too few patches to split: no term
    assert clustering_loss(one.detach(), one, 1.0, 8).item() == 0.0


def _tile_set(rng, n_slides=16, tiles=30):
    """Slides whose tumour tiles are shifted along one feature direction; half the slides are
    tumour slides with 3 tumour tiles each."""
    feats, targets, index = [], [], []
    labels = np.array([i % 2 for i in range(n_slides)])
    for s in range(n_slides):
        f = rng.normal(size=(tiles, D))
        t = np.zeros(tiles, np.int8)
        if labels[s]:
            t[:3] = 1
            f[:3, 0] += 4.0
        feats.append(f)
        targets.append(t)
        index.append(np.full(tiles, s))
    return TileSet(np.concatenate(feats), np.concatenate(targets), np.concatenate(index),
                   [f"s{i}" for i in range(n_slides)], labels)


def test_probe_learns_tile_labels_and_scores_a_bag_by_its_top_tile():
    rng = np.random.default_rng(3)
    probe = fit_probe(_tile_set(rng))
    assert probe.extra["oof_tile_auc"] > 0.95 and probe.extra["oof_slide_auc"] > 0.9
    assert set(probe.cv_tile_auc) == {1e-4, 1e-3, 1e-2, 1e-1} and probe.c in probe.cv_tile_auc
    assert 0.0 < probe.roi_threshold < 1.0
    tumour = _tile_set(np.random.default_rng(4), n_slides=2)
    bag_feats = tumour.features[tumour.slide_index == 1]
    slide_p, scores = probe(Bag("t", torch.tensor(bag_feats, dtype=torch.float32),
                                np.zeros((len(bag_feats), 2), np.int64)))
    assert slide_p == pytest.approx(scores.max())
    assert scores[:3].min() > np.median(scores[3:])


def _row(patch_auc, slide_auc, ci, false_rois):
    return {"heldout": {"patch_auc": patch_auc, "slide_auc": slide_auc, "slide_auc_ci": ci,
                        "false_rois_per_normal_slide": false_rois}}


def test_adoption_rule_needs_all_three_conditions():
    results = {"baseline": _row(0.80, 0.85, [0.75, 0.93], 0.2),
               "probe": _row(0.99, 0.99, [0.97, 1.0], 0.0),     # the ceiling is never adopted
               "a": _row(0.81, 0.90, [0.8, 0.95], 0.0),          # patch AUC not 0.02 better
               "b": _row(0.90, 0.70, [0.6, 0.8], 0.0),           # slide AUC under the interval
               "c": _row(0.95, 0.88, [0.8, 0.95], 0.3),          # too many false ROIs
               "d": _row(0.86, 0.80, [0.7, 0.9], 0.05),          # qualifies
               "e": _row(0.92, 0.76, [0.6, 0.9], 0.1)}           # qualifies, higher patch AUC
    verdict = adoption(results)
    assert {n for n, v in verdict["verdicts"].items() if v["qualifies"]} == {"d", "e"}
    assert verdict["adopted"] == "e"
    assert adoption({"baseline": results["baseline"], "a": results["a"]})["adopted"] == "baseline"
