"""One slide, three scans, one model: the outputs follow the tissue, not the scanner.

A colour-matched synthetic tumour slide (wsi.synth: tumour told from lymph node by nuclear size
and shape only) is written three times, as Camelyon16's Radboud (0.243 um/px) and Utrecht
(0.226 um/px) scanners and a 20x scanner (0.486 um/px) would show it, each with its own pyramid.
A model whose input is 224 px at 0.486 um/px (a 20x model, like the pathology encoders) scores
all three: from pyramid level 1 of the 40x scans, from level 0 of the 20x one (wsi.scale).

The model is a tile-level probe: the seeded random ResNet-50 (layer3) of the test bundles and a
CHOWDER head whose patch scorer is a logistic regression (scikit-learn) fitted on the 0.243
scan's tiles, read at 0.486 um/px, against the synthetic truth (tile centre in a lesion). What
is tested is that the outputs do not depend on the scanner: the ROIs (cut at 0.5) and the
patch scores at the same tissue of the other two scans against the 0.243 one's.
"""
from __future__ import annotations

import numpy as np
import pytest
import shapely
from shapely import affinity

from serving.engine import Engine
from serving.pipeline import SlideScorer
from wsi.synth import write_synthetic_scans

pytestmark = pytest.mark.slow

SCANS = (0.243, 0.226, 0.486)
MODEL_MPP = 0.486
EXTENT_UM = 1800.0


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    """{mpp: (path, truth)} of the three scans."""
    folder = tmp_path_factory.mktemp("scans")
    paths = {mpp: folder / f"scan_{mpp}.tif" for mpp in SCANS}
    truths = write_synthetic_scans(paths, EXTENT_UM, EXTENT_UM, seed=5, colour_matched=True)
    return {mpp: (paths[mpp], truths[mpp]) for mpp in SCANS}


@pytest.fixture(scope="module")
def scans(scanned):
    return {mpp: path for mpp, (path, _) in scanned.items()}


@pytest.fixture(scope="module")
def truths(scanned):
    return {mpp: truth for mpp, (_, truth) in scanned.items()}


@pytest.fixture(scope="module")
def probe(scans, truths, tmp_path_factory):
    """The 20x bundle: a tile-level logistic probe on random-init ResNet-50 features."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from core.tiling import TilingParams
    from training.backbone import build_backbone
    from training.export import export_bundle
    from training.heads import build_head
    from wsi.decode_once import make_tile_reader
    from wsi.grid import tiles_for_slide
    from wsi.slide import open_slide

    torch.manual_seed(0)
    backbone = build_backbone("none", layer="layer3", seed=0)
    with open_slide(scans[0.243]) as slide:
        _, grid = tiles_for_slide(slide, TilingParams(224, MODEL_MPP))
        s = grid.scale
        with make_tile_reader(slide, grid.coords, tile_size=s.read_size, level=s.level,
                              out_size=s.tile_size) as reader, torch.inference_mode():
            features = np.concatenate([backbone(torch.from_numpy(b.tiles)).numpy() for b in reader])
    centres = shapely.points(grid.coords + grid.tile_size_level0 / 2)
    labels = shapely.contains(shapely.union_all(truths[0.243].tumor_polygons), centres)
    assert 5 <= labels.sum() <= len(labels) - 5
    mean, std = features.mean(0), features.std(0) + 1e-6
    fitted = LogisticRegression(max_iter=2000).fit((features - mean) / std, labels)
    head = build_head({"kind": "chowder", "in_dim": 1024, "k": 3}).eval()
    norm, scorer = head._patches.norm, head._patches.scorer[-1]
    with torch.no_grad():
        norm.mean.copy_(torch.from_numpy(mean))
        norm.std.copy_(torch.from_numpy(std))
        scorer.weight.copy_(torch.from_numpy(fitted.coef_.astype(np.float32)))
        scorer.bias.copy_(torch.tensor(fitted.intercept_, dtype=torch.float32))
    return export_bundle(tmp_path_factory.mktemp("probe") / "bundle", backbone=backbone, head=head,
                         manifest_extra={"name": "probe-20x", "target_mpp": MODEL_MPP,
                                         "roi_threshold": 0.5})


@pytest.fixture(scope="module")
def scored(probe, scans):
    with Engine(probe, provider="cpu", batch_size=16) as engine:
        scorer = SlideScorer(engine)
        return {mpp: scorer.score_slide(scans[mpp]) for mpp in SCANS}


def _centres_um(result) -> np.ndarray:
    return (result.coords + result.tile_size / 2) * result.mpp


def _scores_at(result, points_um: np.ndarray) -> np.ndarray:
    """The score of the tile of `result` under each point (um), NaN where there is none."""
    lookup = {tuple(c): s for c, s in zip(result.coords.tolist(), result.scores.tolist())}
    step = result.tile_size
    cells = np.floor(points_um / result.mpp / step).astype(np.int64) * step
    return np.array([lookup.get((int(x), int(y)), np.nan) for x, y in cells])


def _rois_um(result):
    return shapely.union_all([affinity.scale(p, result.mpp, result.mpp, origin=(0, 0))
                              for p in result.summary.polygons])


def test_every_scan_is_read_at_the_models_pixel_size(scored):
    levels = {mpp: (r.header.tile_level, r.header.upsampled) for mpp, r in scored.items()}
    assert levels == {0.243: (1, False), 0.226: (1, False), 0.486: (0, False)}
    for mpp, result in scored.items():
        assert result.header.model_mpp == MODEL_MPP
        assert result.header.scale_factor == pytest.approx(MODEL_MPP / mpp, rel=2e-3)
        # the tile side covers the model's 109 um (but for rounding to whole pixels)
        assert result.tile_size * mpp == pytest.approx(224 * MODEL_MPP, rel=0.005)


def test_tile_counts_agree_within_15_percent(scored):
    counts = {mpp: r.tile_count for mpp, r in scored.items()}
    assert counts[0.243] > 60
    print(f"\ntile counts by scan (um/px): {counts}")
    for mpp in (0.226, 0.486):
        assert abs(counts[mpp] / counts[0.243] - 1) <= 0.15, counts


def test_patch_scores_at_the_same_tissue_correlate(scored):
    reference = scored[0.243]
    points = _centres_um(reference)
    for mpp in (0.226, 0.486):
        other = _scores_at(scored[mpp], points)
        both = ~np.isnan(other)
        assert both.sum() > 0.8 * len(points)
        r = np.corrcoef(reference.scores[both], other[both])[0, 1]
        print(f"\npatch scores, 0.243 vs {mpp} um/px: r = {r:.4f} over {both.sum()} tiles")
        assert r >= 0.9, (mpp, r)


def test_rois_overlap(scored):
    reference = _rois_um(scored[0.243])
    assert reference.area > 0
    for mpp in (0.226, 0.486):
        other = _rois_um(scored[mpp])
        iou = reference.intersection(other).area / reference.union(other).area
        print(f"\nROIs, 0.243 vs {mpp} um/px: IoU {iou:.4f} ({reference.area:.0f} um2)")
        assert iou >= 0.8, (mpp, iou)
