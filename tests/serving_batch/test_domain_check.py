"""The domain check (core.domain, issue 38 part 3), on real parts end to end.

A model's training data is described from real feature files (training.extraction on synthetic
slides of the standard stain at 0.243 um/px, training.domain.describe), exported into a real
bundle (training.export), and slides are scored through the real pipeline (serving.pipeline):

- held-out slides of the training kind are in domain (score <= 1, their tiles within reach);
- a pale slide is out of domain on its stain, a 2x coarser scan on its scale, a slide whose pixel
  size the user gave on its pixel size, each with its reason;
- the verdict reaches summary.csv, the patch CSV, the GeoJSON, the Spatiopath JSON and the gRPC
  messages (and back through the client), and a bundle without a description says "not known";
- the feature distance is Ledoit-Wolf's Mahalanobis distance on the PCA projection (sklearn's own
  figures), and the description survives the bundle's manifest round trip.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.bundle import BundleManifest
from core.domain import (
    CRITERIA,
    DOMAIN_FILE,
    MAX_OUT_SHARE,
    UNKNOWN,
    DomainCheck,
    DomainModel,
    TileDistribution,
)
from core.errors import BundleError
from results.layout import OUTPUT_SUFFIXES, SUMMARY_NAME
from serving.engine import Engine
from serving.pipeline import SlideScorer
from wsi.synth import write_synthetic_slide

DATA = Path(__file__).resolve().parents[1] / "data"
SIZE = (1344, 1120)
TRAIN_SEEDS = {"normal_a": (11, False), "normal_b": (12, False), "normal_c": (13, False),
               "tumor_a": (21, True), "tumor_b": (22, True), "tumor_c": (23, True)}


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    """(DomainModel, bags) of six standard-stain training slides (layer3 features, seed 0: the
    test bundle's backbone)."""
    from training.extraction import ExtractionOptions, build_feature_model, extract_features
    from training.feature_file import load_bags

    root = tmp_path_factory.mktemp("domain_train")
    model = build_feature_model("none", "resnet50-trunc", 0, torch.device("cpu"), "torch")
    for name, (seed, tumour) in TRAIN_SEEDS.items():
        write_synthetic_slide(root / f"{name}.tif", *SIZE, seed=seed, tumor=tumour)
        extract_features(root / f"{name}.tif", root / "features" / "h5_files" / f"{name}.h5",
                         model, ExtractionOptions(batch_size=16, workers=2), progress=False)
    from training.domain import describe

    bags = load_bags(root / "features", sorted(TRAIN_SEEDS))
    return describe(bags, seed=0), bags


@pytest.fixture(scope="module")
def domain_bundle(described, tmp_path_factory) -> Path:
    from bundle_testing import export_test_bundle

    return export_test_bundle(tmp_path_factory.mktemp("domain_bundle") / "b", "domain-test",
                              domain=described[0])


@pytest.fixture(scope="module")
def scorer(domain_bundle):
    engine = Engine(domain_bundle, backend="onnxruntime", precision="fp32")
    yield SlideScorer(engine)
    engine.close()


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """Slides no test trained on: held-out standard ones, a pale one, a 2x coarser scan."""
    root = tmp_path_factory.mktemp("domain_slides")
    write_synthetic_slide(root / "heldout_normal.tif", *SIZE, seed=31, tumor=False)
    write_synthetic_slide(root / "heldout_tumor.tif", *SIZE, seed=32, tumor=True)
    write_synthetic_slide(root / "pale.tif", *SIZE, seed=31, tumor=False, stain="pale")
    write_synthetic_slide(root / "coarse.tif", *SIZE, seed=31, tumor=False, mpp=0.486)
    return root


def test_the_description_holds_what_the_training_slides_were(described):
    model, bags = described
    assert model.slides == len(TRAIN_SEEDS) and model.tiles == sum(len(b.features) for b in bags)
    assert model.mpp_range == pytest.approx((0.243, 0.243), abs=1e-3)
    assert model.features.components.shape == (16, 1024)
    assert model.stain is not None and len(model.stain.names) == 6
    assert all(b.stain is not None for b in bags)   # extraction recorded each slide's stain
    # the training tiles themselves lie within their own description, nearly all of them
    distance = np.concatenate([model.tile_distance(b.features.numpy()) for b in bags])
    assert np.mean(distance <= 1) >= 0.95


def test_the_feature_distance_is_ledoit_wolf_mahalanobis_on_the_projection(described):
    """TileDistribution's T^2 is sklearn's LedoitWolf.mahalanobis on the same projection."""
    from sklearn.covariance import LedoitWolf

    model, bags = described
    f = model.features
    x = np.concatenate([b.features.numpy() for b in bags]).astype(np.float64)
    z = (x - f.mean) @ f.components.T
    lw = LedoitWolf().fit(z)
    t2, q = f.statistics(x)
    assert np.allclose(t2, lw.mahalanobis(z), rtol=1e-4)
    residual = (x - f.mean) - z @ f.components
    assert np.allclose(q, (residual ** 2).sum(axis=1), rtol=1e-3, atol=1e-3)


def test_held_out_slides_of_the_training_kind_are_in_domain(scorer, shifted):
    for name in ("heldout_normal", "heldout_tumor"):
        scored = scorer.score_slide(shifted / f"{name}.tif")
        check = scored.domain
        assert check.in_domain is True and check.reasons == (), (name, check)
        assert 0 <= check.score <= 1
        assert set(check.criteria) == {"features", "stain", "scale"}
        assert np.isfinite(scored.domain_distance).all()
        assert np.mean(scored.domain_distance[scored.clean] > 1) <= MAX_OUT_SHARE


@pytest.mark.parametrize("slide, criterion", [("pale", "stain"), ("coarse", "scale")])
def test_a_shifted_slide_is_out_of_domain_with_its_reason(scorer, shifted, slide, criterion):
    check = scorer.score_slide(shifted / f"{slide}.tif").domain
    assert check.in_domain is False and check.score > 1
    assert check.criteria[criterion] > 1
    assert any(r.startswith(f"{criterion}: ") for r in check.reasons), check.reasons


def test_a_slide_without_a_pixel_size_is_out_of_domain(domain_bundle, tmp_path):
    """The real TCGA frozen section has no pixel size; scored with --fallback-mpp, its scale is a
    guess: out of domain whatever it looks like."""
    engine = Engine(domain_bundle, backend="onnxruntime", precision="fp32")
    try:
        scored = SlideScorer(engine, fallback_mpp=0.25).score_slide(
            DATA / "TCGA-CR-7395-01A-01-TS1.svs")
    finally:
        engine.close()
    check = scored.domain
    assert check.in_domain is False
    assert any(r.startswith("pixel_size: ") and "given by the user" in r for r in check.reasons)


def test_every_output_carries_the_verdict(domain_bundle, shifted, tmp_path):
    """summary.csv, the patch CSV, the binary scores, the GeoJSON and the Spatiopath JSON of a
    batch run (serving.batch, in process)."""
    from results.outputs import read_tile_scores
    from serving.backends import LocalBackend
    from serving.batch import score_folder
    from serving.options import EngineOptions

    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("heldout_normal", "pale"):
        shutil.copy(shifted / f"{name}.tif", slides)
    backend = LocalBackend(str(domain_bundle), EngineOptions(backend="onnxruntime",
                                                             precision="fp32"))
    try:
        score_folder(slides, tmp_path / "out", backend, progress=False)
    finally:
        backend.close()
    with open(tmp_path / "out" / SUMMARY_NAME) as f:
        rows = {r["slide"]: r for r in csv.DictReader(f)}
    assert rows["heldout_normal"]["in_domain"] == "1" and rows["heldout_normal"]["domain_reasons"] == ""
    assert rows["pale"]["in_domain"] == "0" and "stain: " in rows["pale"]["domain_reasons"]
    assert float(rows["pale"]["domain_score"]) > 1 >= float(rows["heldout_normal"]["domain_score"])

    folder = tmp_path / "out" / "pale"
    with open(folder / f"pale{OUTPUT_SUFFIXES['csv']}") as f:
        table = list(csv.DictReader(f))
    scores = read_tile_scores(folder / f"pale{OUTPUT_SUFFIXES['scores']}")
    assert len(table) == len(scores) and np.isfinite(scores.domain_distance).all()
    for row, d in zip(table, scores.domain_distance):
        assert float(row["domain_distance"]) == pytest.approx(d, abs=1e-4)
        assert row["in_domain"] == str(int(d <= 1))
    geojson = json.loads((folder / f"pale{OUTPUT_SUFFIXES['geojson']}").read_text())
    assert geojson["properties"]["domain"]["in_domain"] is False
    tiles = [f for f in geojson["features"] if f["properties"]["objectType"] == "detection"]
    assert all("domain_distance" in t["properties"]["measurements"] for t in tiles)
    spatiopath = json.loads((folder / f"pale{OUTPUT_SUFFIXES['spatiopath']}").read_text())
    assert spatiopath["domain"]["in_domain"] is False and spatiopath["domain"]["reasons"]


def test_the_verdict_crosses_the_wire(scorer, shifted):
    """The server's messages (serving.server.event_pb) read back by the client give the same
    verdict and tile distances; a summary from a server that predates it reads as not known."""
    from proto.milroi.v1 import scoring_pb2
    from results.scored import PatchChunk, SlideSummary
    from serving.client import summary_from_proto
    from serving.server import event_pb

    events = list(scorer.score(shifted / "pale.tif"))
    summary = events[-1]
    assert isinstance(summary, SlideSummary) and summary.domain.in_domain is False
    back = summary_from_proto(event_pb(summary).summary, summary.slide_path)
    assert back.domain.in_domain is False and back.domain.reasons == summary.domain.reasons
    assert back.domain.score == pytest.approx(summary.domain.score)
    assert back.domain.criteria == pytest.approx(summary.domain.criteria)
    chunk = next(e for e in events if isinstance(e, PatchChunk))
    wire = event_pb(chunk).patches
    assert np.allclose(np.asarray(wire.domain_distance), chunk.domain_distance)
    old = scoring_pb2.SlideSummary(slide_score=0.2, label="normal")
    assert summary_from_proto(old, "x").domain.in_domain is None


def test_a_bundle_without_a_description_says_not_known(domain_bundle, shifted, tmp_path):
    """The same bundle as exported before the domain check: no `domain` entry, no file."""
    bundle = tmp_path / "plain"
    shutil.copytree(domain_bundle, bundle)
    manifest = BundleManifest.read(bundle)
    (bundle / DOMAIN_FILE).unlink()
    manifest.replace(files={k: v for k, v in manifest.files.items() if k != "domain"},
                     domain=None).write(bundle)
    assert BundleManifest.read(bundle).domain is None
    engine = Engine(bundle, backend="onnxruntime", precision="fp32")
    try:
        scored = SlideScorer(engine).score_slide(shifted / "pale.tif")
    finally:
        engine.close()
    assert scored.domain == UNKNOWN and np.isnan(scored.domain_distance).all()
    assert scored.summary.to_dict()["domain"]["in_domain"] is None


def test_the_description_survives_the_manifest_and_a_damaged_one_is_refused(domain_bundle,
                                                                            described, tmp_path):
    manifest = BundleManifest.read(domain_bundle)
    assert manifest.files["domain"] == DOMAIN_FILE and manifest.domain["slides"] == 6
    loaded = manifest.domain_model(domain_bundle)
    original = described[0]
    x = np.random.default_rng(0).normal(size=(5, 1024)).astype(np.float32)
    assert np.allclose(loaded.tile_distance(x), original.tile_distance(x), rtol=1e-4)
    stain = dict(zip(original.stain.names, original.stain.mean))
    assert loaded.check(np.zeros(10), stain, 0.243).in_domain is True
    # the manifest names the file but the file is gone: a clear error, not a silent "in domain"
    broken = tmp_path / "broken"
    shutil.copytree(domain_bundle, broken)
    (broken / DOMAIN_FILE).unlink()
    with pytest.raises(BundleError, match="domain description"):
        BundleManifest.read(broken)


def test_the_rule_on_made_up_figures():
    """The slide verdict from its tiles' distances, stain statistics and pixel size."""
    from core.domain import StainDomain

    cloud = TileDistribution(np.zeros(2), np.eye(2), np.eye(2), np.zeros(2), 1.0, 1.0)
    stain = StainDomain(("eosin_p50",), np.array([0.0]), np.array([math.log(1.1)]))
    model = DomainModel(cloud, stain, (0.24, 0.25))
    at_mean = {"eosin_p50": 0.0}   # the slide statistic at the training mean
    inside = model.check(np.full(100, 0.5), at_mean, 0.243)
    assert inside == DomainCheck(True, inside.score, (), inside.criteria) and inside.score == 0
    many = model.check(np.r_[np.full(70, 0.5), np.full(30, 2.0)], at_mean, 0.243)
    assert not many.in_domain and many.criteria["features"] == pytest.approx(0.3 / MAX_OUT_SHARE)
    pale = model.check(np.full(100, 0.5), {"eosin_p50": math.log(0.5)}, 0.243)
    assert pale.reasons == ("stain: eosin 50th percentile 0.50x the training slides' mean "
                            "(limit 0.91x-1.10x)",)
    coarse = model.check(np.full(100, 0.5), at_mean, 0.5)
    assert coarse.criteria["scale"] > 1 and coarse.reasons[0].startswith("scale: 0.5 um/px")
    guessed = model.check(np.full(100, 0.5), at_mean, 0.243, mpp_source="user")
    assert guessed.in_domain is False and guessed.score == 0   # in reach, but its scale a guess
    # every reason names its criterion first, from the one list of them
    for check in (many, pale, coarse, guessed):
        assert all(r.split(":", 1)[0] in CRITERIA for r in check.reasons)
        assert set(check.criteria) <= set(CRITERIA)
