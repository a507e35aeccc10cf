"""SlideScorer: event order and content, equality with a direct engine run, cancel, bad slides."""
import threading
import time

import numpy as np
import pytest

from core.errors import MilroiError, SlideError
from results.scored import PatchChunk, SlideHeader, SlideSummary
from serving.aggregate import make_state, slide_score
from serving.engine import Engine
from serving.pipeline import SlideScorer
from wsi.grid import tiles_for_slide
from wsi.slide import open_slide


@pytest.fixture(scope="module")
def engine(chowder_bundle):
    with Engine(chowder_bundle, provider="cpu", batch_size=8) as engine:
        yield engine


def _direct(engine, path):
    """Grid and scores computed without the pipeline: read every tile, one engine.infer."""
    manifest = engine.manifest
    with open_slide(path) as slide:
        _, grid = tiles_for_slide(slide, manifest.tiling, params=manifest.tissue)
        tiles = np.stack([slide.read_region(x, y, 224, 224) for x, y in grid.coords])
    outputs = engine.infer(tiles)
    state = make_state(engine.pooling)
    state.update(outputs)
    return grid.coords, outputs["patch_scores"], slide_score(engine, state)


def test_stream_order_and_content(engine, slide_root):
    path = slide_root / "slide.tiff"
    events = list(SlideScorer(engine).score(path, chunk_size=7))
    header, chunks, summary = events[0], events[1:-1], events[-1]
    assert isinstance(header, SlideHeader) and isinstance(summary, SlideSummary)
    assert all(isinstance(c, PatchChunk) for c in chunks)
    coords, scores, (logit, probability) = _direct(engine, path)
    n = len(coords)
    assert n >= 10 and header.tile_count == n == summary.tile_count
    assert (header.width, header.height, header.mpp_source) == (1792, 1344, "metadata")
    assert header.mpp == pytest.approx(0.25, rel=1e-3)
    # chunks of 7 in grid order, contiguous offsets, the last one partial
    assert [c.offset for c in chunks] == list(range(0, n, 7))
    assert [len(c.scores) for c in chunks] == [min(7, n - o) for o in range(0, n, 7)]
    np.testing.assert_array_equal(np.concatenate([c.coords for c in chunks]), coords)
    np.testing.assert_allclose(np.concatenate([c.scores for c in chunks]), scores, atol=1e-5)
    assert summary.slide_logit == pytest.approx(logit, abs=1e-4)
    assert summary.slide_score == pytest.approx(probability, abs=1e-5)
    assert summary.label == ("tumor" if probability >= summary.slide_threshold else "normal")
    assert summary.timings.first_score_s > 0 and summary.timings.tiles_per_second > 0
    assert summary.model == engine.model


def test_roi_polygons_follow_the_threshold(engine, slide_root):
    scorer = SlideScorer(engine)
    scores = scorer.score_slide(slide_root / "slide.tiff").scores
    threshold = float(np.median(scores))   # about half the tiles are "tumour"
    summary = scorer.score_slide(slide_root / "slide.tiff", roi_threshold=threshold)
    tile, hot = summary.tile_size, summary.scores >= threshold
    assert summary.summary.roi_threshold == pytest.approx(threshold)
    assert [r.tiles for r in summary.rois] and sum(r.tiles for r in summary.rois) == hot.sum()
    # tiles do not overlap: the ROIs' area is exactly the hot tiles' area
    total = sum(r.polygon.area for r in summary.rois)
    assert total == pytest.approx(hot.sum() * tile * tile, rel=1e-6)
    assert sum(r.area_um2 for r in summary.rois) == pytest.approx(total * summary.mpp ** 2)
    assert max(r.max_score for r in summary.rois) == pytest.approx(scores.max(), abs=1e-6)
    assert min(r.mean_score for r in summary.rois) >= threshold - 1e-6
    above_all = scorer.score_slide(slide_root / "slide.tiff",
                                   roi_threshold=min(0.99, float(scores.max()) * 1.01 + 1e-9))
    assert above_all.rois == []
    # One decision per slide (results.decision): the same slide label with and without ROIs,
    # so exactly one of the two agrees with its ROIs and the other says "review", and why.
    label = summary.label
    with_rois, without = summary.summary.decision, above_all.summary.decision
    if label == "tumor":
        assert with_rois.decision == "tumor" and with_rois.reason == ""
        assert without.decision == "review" and "tumour slide without an ROI" in without.reason
    else:
        assert without.decision == "normal" and without.reason == ""
        assert with_rois.decision == "review" and "normal slide with ROIs" in with_rois.reason
        assert f"{len(summary.rois)} ROI(s)" in with_rois.reason


def test_slide_without_tissue(engine, slide_root):
    events = list(SlideScorer(engine).score(slide_root / "blank.tiff"))
    assert [type(e) for e in events] == [SlideHeader, SlideSummary]
    summary = events[-1]
    assert summary.tile_count == 0 and summary.label == "no_tissue" and np.isnan(summary.slide_score)
    assert summary.decision.decision == "no_tissue"


def test_bad_slides_and_parameters(engine, slide_root):
    scorer = SlideScorer(engine)
    with pytest.raises(SlideError, match="broken.svs"):
        list(scorer.score(slide_root / "broken.svs"))
    with pytest.raises(SlideError, match="notes.txt"):
        list(scorer.score(slide_root / "notes.txt"))
    with pytest.raises(SlideError, match="no such file"):
        list(scorer.score(slide_root / "missing.tiff"))
    with pytest.raises(MilroiError, match="min_tissue"):
        list(scorer.score(slide_root / "slide.tiff", min_tissue=0.0))
    with pytest.raises(MilroiError, match="roi_threshold"):
        list(scorer.score(slide_root / "slide.tiff", roi_threshold=1.5))


def test_cancel_stops_within_a_second(engine, slide_root):
    cancel = threading.Event()
    scorer = SlideScorer(engine, in_flight=1)
    stream = scorer.score(slide_root / "slide.tiff", chunk_size=8, cancel=cancel)
    header = next(stream)
    first = next(stream)
    assert isinstance(first, PatchChunk)
    tiles_before = engine.stats.tiles
    cancel.set()
    started = time.perf_counter()
    rest = list(stream)
    assert time.perf_counter() - started < 1.0
    assert not any(isinstance(e, SlideSummary) for e in rest)
    time.sleep(0.5)   # nothing keeps running for this slide afterwards (at most the running batch)
    assert engine.stats.tiles - tiles_before <= 2 * engine.batch_size
    assert engine.stats.tiles < tiles_before + header.tile_count - first.scores.size


@pytest.fixture(scope="module")
def inked_slide(tmp_path_factory):
    """A synthetic slide with pen strokes, a marker blot and a blurred region across its tissue."""
    from wsi.synth import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("inked") / "inked.tif", 3072, 3072,
                                 seed=21, tissue_artefacts=True)


def test_artefact_tiles_are_streamed_flagged_and_left_out_of_score_and_rois(engine, inked_slide):
    """Tiles under ink or out of focus are scored and sent with their flags; the slide score is
    the aggregator on the clean tiles alone, and no ROI covers a flagged tile."""
    from shapely.geometry import box

    from wsi.tile_quality import artefact_flags, measure_tiles

    path = inked_slide.path
    events = list(SlideScorer(engine).score(path, chunk_size=16))
    chunks, summary = events[1:-1], events[-1]
    flags = np.concatenate([c.flags for c in chunks])
    scores = np.concatenate([c.scores for c in chunks])
    coords = np.concatenate([c.coords for c in chunks])
    assert summary.artefact_count == np.count_nonzero(flags) >= 2
    # the same flags from the tiles read directly
    manifest = engine.manifest
    with open_slide(path) as slide:
        _, grid = tiles_for_slide(slide, manifest.tiling, params=manifest.tissue)
        tiles = np.stack([slide.read_region(x, y, 224, 224) for x, y in grid.coords])
    np.testing.assert_array_equal(artefact_flags(measure_tiles(tiles, manifest.tissue),
                                                 manifest.artefacts), flags)
    # slide score: pooling of the clean tiles only
    clean = flags == 0
    state = make_state(engine.pooling)
    state.update(engine.infer(tiles[clean]))
    logit, _ = slide_score(engine, state)
    assert summary.slide_logit == pytest.approx(logit, abs=1e-4)
    # ROIs at the median score: exactly the clean tiles at or above it, no flagged one
    threshold = float(np.median(scores))
    scored = SlideScorer(engine).score_slide(path, roi_threshold=threshold)
    np.testing.assert_array_equal(scored.flags, flags)
    rois = scored.rois
    covered = sum(r.polygon.area for r in rois)
    hot_clean = clean & (scores >= threshold)
    assert covered == pytest.approx(hot_clean.sum() * 224 * 224, rel=1e-6)
    for x, y in coords[~clean]:
        assert all(r.polygon.intersection(box(x, y, x + 224, y + 224)).area == 0 for r in rois)


def test_first_scores_come_from_a_small_first_run(chowder_bundle, slide_root):
    """The first engine run of a slide scores FIRST_BATCH_TILES tiles alone (not merged with the
    next batch by the batcher), so the first chunk leaves after a few tiles of model time."""
    from serving.pipeline import FIRST_BATCH_TILES

    with Engine(chowder_bundle, provider="cpu", batch_size=32) as big_batches:
        events = SlideScorer(big_batches).score(slide_root / "slide.tiff",
                                                chunk_size=FIRST_BATCH_TILES)
        header = next(events)
        first = next(events)
        assert header.tile_count > FIRST_BATCH_TILES
        assert isinstance(first, PatchChunk) and len(first.scores) == FIRST_BATCH_TILES
        assert (big_batches.stats.runs, big_batches.stats.tiles) == (1, FIRST_BATCH_TILES)
        rest = list(events)
    chunks = [first, *rest[:-1]]
    coords, scores, _ = _direct(big_batches, slide_root / "slide.tiff")
    np.testing.assert_allclose(np.concatenate([c.scores for c in chunks]), scores, atol=1e-5)
