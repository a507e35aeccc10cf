"""Score one slide as a stream: header, per-patch score chunks as they are computed, summary.

`SlideScorer(engine).score(path, ...)` is a generator of plain dataclasses (no protobuf), used by
the gRPC server (which converts them to messages) and in process by the batch job:

    SlideHeader  once, after the tissue mask and the grid: slide geometry, tile count, model
    PatchChunk   level-0 (x, y) and tumour probability of `chunk_size` patches, in grid order,
                 sent as soon as their batch is scored
    SlideSummary once: slide score and label (aggregator.onnx on the streaming pooling state),
                 tumour ROIs (results.rois, level-0 px: computed here, once per slide) with
                 their area in um^2 and tile statistics, timings, and the domain check
                 (core.domain): each tile's features against the training tiles' (streamed
                 in the chunks as `domain_distance`), the slide's stain (wsi.stain) and pixel
                 size against the training slides'

(results.scored holds the header and summary types; `score_slide` assembles all three into one
`results.scored.ScoredSlide`, the batch job's in-process call.)

Artefact tiles (wsi.tile_quality: pen / marker ink, glass, out of focus, under the manifest's
`artefacts` limits) are measured on the tiles as read, scored and streamed with their flags,
and left out of the pooling state and the ROIs: a pen stroke across tissue neither raises the
slide score nor draws an ROI. A slide whose every tile is an artefact is labelled `no_tissue`.

Work overlaps: the tile reader (wsi.decode_once.make_tile_reader: each stored tile decoded
once where the slide allows, else wsi.tiles.TileReader on OpenSlide) decodes the next batches
in background threads into a bounded queue while the engine runs, and two batches are in the
engine at once, so the model never waits for a read it could have had. Memory is bounded
whatever the slide size: at most `queue_batches + 2` tile batches exist (and the decode-once
reader's cache, whose peak it computes before reading), and per patch only (x, y, score) is
kept (for the ROIs) with its domain distance; the features leave the engine only as that, and
the slide score comes from the O(k) or O(H) state of serving.aggregate.

`cancel` (a threading.Event, set by the server when the client cancels or its deadline passes)
stops the slide within a fraction of a second: the reader is closed (queued reads dropped), the
queued engine requests are cancelled, and the generator returns without a summary.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import nullcontext

import numpy as np

from core.domain import UNKNOWN
from core.errors import Cancelled, RequestError
from core.runtime import available_cores
from results.rois import tumour_rois
from results.scored import PatchChunk, ScoredSlide, SlideHeader, SlideSummary, Timings
from serving.aggregate import make_state, slide_score
from serving.engine import Engine, on_device
from serving.inference import FEATURES
from wsi.decode_once import make_tile_reader
from wsi.grid import tiles_for_slide
from wsi.scale import ReadScale
from wsi.slide import Slide, open_slide
from wsi.stain import StainSample
from wsi.tile_quality import artefact_flags, measure_tiles
from wsi.tiles import TileBatch

log = logging.getLogger(__name__)

# How often a waiting scorer looks at its cancel event (seconds): the cancel latency bound.
CANCEL_POLL_S = 0.05
NO_TISSUE = "no_tissue"


SlideEvent = SlideHeader | PatchChunk | SlideSummary


# The first engine run of a slide scores this many tiles, the rest full batches: a slide's first
# scores then wait for a few tiles of model time instead of a whole batch (64 tiles are ~8 s of
# a 2-core CPU), so a live viewer paints within a second or two.
FIRST_BATCH_TILES = 8


def ramp_first_batch(batches, first_tiles: int = FIRST_BATCH_TILES) -> Iterator[TileBatch]:
    """`batches` with the first one split into its first `first_tiles` tiles and the rest."""
    it = iter(batches)
    head = next(it, None)
    if head is None:
        return
    if len(head.index) > first_tiles:
        k = first_tiles
        yield TileBatch(head.index[:k], head.coords[:k], head.tiles[:k])
        head = TileBatch(head.index[k:], head.coords[k:], head.tiles[k:])
    yield head
    yield from it


def default_reader_workers() -> int:
    """Tile-decode threads of a slide: one per core this process may run on (taskset/cgroup
    aware), at least 2. No upper cap: a 16-core GPU host needs all 16 to feed the GPU (decodes
    release the GIL), and on a CPU host the engine's threads sleep between runs."""
    return max(2, available_cores())


class SlideScorer:
    """Streams the scores of slides through an Engine (shared by concurrent slides)."""

    def __init__(self, engine: Engine, *, reader_workers: int | None = None,
                 queue_batches: int = 4, in_flight: int = 2, default_chunk_size: int | None = None,
                 fallback_mpp: float | None = None,
                 first_batch_tiles: int = FIRST_BATCH_TILES):
        self.engine = engine
        self.first_batch_tiles = int(first_batch_tiles)   # 0: no small first run
        manifest = engine.manifest
        self.tiling = manifest.tiling
        self.tile_size = self.tiling.tile_size
        self.min_tissue = self.tiling.min_tissue
        self.slide_threshold = manifest.slide_threshold
        self.roi_threshold = manifest.roi_threshold
        self.tissue_params = manifest.tissue
        self.artefacts = manifest.artefacts
        self.reader_workers = reader_workers or default_reader_workers()
        self.queue_batches = int(queue_batches)
        self.in_flight = max(1, int(in_flight))
        self.default_chunk_size = int(default_chunk_size or engine.batch_size)
        self.fallback_mpp = fallback_mpp

    def check_parameters(self, chunk_size: int | None, min_tissue: float | None,
                         roi_threshold: float | None) -> tuple[int, float, float]:
        """Validated (chunk_size, min_tissue, roi_threshold), defaults from the manifest."""
        chunk_size = self.default_chunk_size if not chunk_size else int(chunk_size)
        min_tissue = self.min_tissue if min_tissue is None else float(min_tissue)
        roi_threshold = self.roi_threshold if roi_threshold is None else float(roi_threshold)
        if not 1 <= chunk_size <= 1_000_000:
            raise RequestError(f"chunk_size must be in [1, 1000000], got {chunk_size}")
        if not 0.0 < min_tissue <= 1.0:
            raise RequestError(f"min_tissue must be in (0, 1], got {min_tissue}")
        if not 0.0 < roi_threshold < 1.0:
            raise RequestError(f"roi_threshold must be in (0, 1), got {roi_threshold}")
        return chunk_size, min_tissue, roi_threshold

    def score(self, slide_path: str | os.PathLike, *, chunk_size: int | None = None,
              min_tissue: float | None = None, roi_threshold: float | None = None,
              cancel: threading.Event | None = None, display_path: str | None = None,
              slide: Slide | None = None) -> Iterator[SlideEvent]:
        """Header, PatchChunks, Summary for one slide; returns early (no summary) on cancel.

        Raises SlideError (bad slide) or RequestError (bad parameter) before or while streaming.
        `display_path` is the name reported back (the server passes the client's relative path).
        `slide`: the slide at `slide_path` already open (the batch job writes its files from the
        same handle); the caller keeps it open and closes it.
        """
        chunk_size, min_tissue, roi_threshold = self.check_parameters(chunk_size, min_tissue,
                                                                      roi_threshold)
        cancel = cancel or threading.Event()
        engine = self.engine
        started = time.perf_counter()
        with (nullcontext(slide) if slide is not None
              else open_slide(slide_path, fallback_mpp=self.fallback_mpp)) as slide:
            timings = Timings(open_s=time.perf_counter() - started)
            _, grid = tiles_for_slide(slide, self.tiling.replace(min_tissue=min_tissue),
                                      params=self.tissue_params)
            timings.tissue_s = time.perf_counter() - started - timings.open_s
            n = len(grid)
            tile_size0 = grid.tile_size_level0
            scale = grid.scale
            name = display_path if display_path is not None else str(slide_path)
            log.info("%s: %s", name, scale.describe())
            yield SlideHeader(name, slide.name, slide.dimensions[0], slide.dimensions[1],
                              slide.level_count, slide.mpp, slide.mpp_source, tile_size0,
                              scale.level, n, engine.model, self.tile_size,
                              tuple(slide.bounds_offset), scale.target_mpp, scale.factor,
                              scale.upsampled)
            if cancel.is_set():
                return
            scores = np.empty(n, np.float32)
            flags = np.zeros(n, np.uint8)
            # The domain check (core.domain): each tile's features against the training tiles',
            # the stain of a spread-out sample of the clean tiles (wsi.stain).
            domain = engine.domain
            distance = np.full(n, np.nan, np.float32)
            stain = StainSample(n) if domain is not None else None
            state = make_state(engine.pooling)
            scoring_started = time.perf_counter()
            reader = self._tile_reader(slide, grid.coords, scale)
            # The reader's consumer may be blocked on a tile read when the cancel comes:
            # close it from a watcher thread so that the wait ends at once.
            finished = threading.Event()
            watcher = threading.Thread(target=_close_on_cancel, args=(cancel, finished, reader),
                                       name="cancel-watch", daemon=True)
            watcher.start()
            pending: collections.deque[tuple[int, Future]] = collections.deque()
            emitted = done = 0
            try:
                batches = (ramp_first_batch(reader, self.first_batch_tiles)
                           if self.first_batch_tiles > 0 else iter(reader))
                while True:
                    # Keep `in_flight` batches in the engine; collect the oldest when full.
                    batch = next(batches, None) if not cancel.is_set() else None
                    if batch is not None:
                        first = int(batch.index[0])
                        future = engine.submit(batch.tiles)
                        # Measured while the engine runs this batch (a few ms of numpy; tiles
                        # decoded on the GPU are measured on a host copy).
                        host = batch.tiles.to_host() if on_device(batch.tiles) else batch.tiles
                        flags[first:first + len(batch.index)] = artefact_flags(
                            measure_tiles(host, self.tissue_params, mpp=scale.read_mpp),
                            self.artefacts)
                        if stain is not None:
                            stain.add(first, host, flags[first:first + len(batch.index)] == 0)
                        pending.append((first, future))
                        # The first (small) batch runs alone: queued beside the next one, the
                        # engine's batcher would merge them into one full run.
                        if len(pending) < self.in_flight and timings.first_score_s:
                            continue
                    if not pending or cancel.is_set():
                        break
                    start, future = pending.popleft()
                    outputs = _wait(future, cancel)
                    if outputs is None:
                        break
                    count = len(outputs["patch_scores"])
                    scores[start:start + count] = outputs["patch_scores"]
                    if domain is not None:
                        distance[start:start + count] = domain.tile_distance(outputs[FEATURES])
                    state.update(select_patches(outputs, flags[start:start + count] == 0))
                    done = start + count
                    if not timings.first_score_s:
                        timings.first_score_s = time.perf_counter() - started
                    # Send every complete chunk now; the last partial one at the end.
                    while done - emitted >= chunk_size or (done == n and emitted < n):
                        stop = min(emitted + chunk_size, done)
                        yield PatchChunk(emitted, grid.coords[emitted:stop], scores[emitted:stop].copy(),
                                         flags[emitted:stop].copy(), distance[emitted:stop].copy())
                        emitted = stop
            finally:
                finished.set()
                reader.close()
                for _, future in pending:
                    future.cancel()
            if cancel.is_set() or done < n:
                log.info("%s: cancelled after %d of %d tiles", name, done, n)
                return
            timings.scoring_s = time.perf_counter() - scoring_started
            clean = flags == 0
            if state.count:
                logit, probability = slide_score(engine, state)
                label = "tumor" if probability >= self.slide_threshold else "normal"
            else:   # no tile, or only artefacts: nothing to base a slide label on
                logit = probability = float("nan")
                label = NO_TISSUE
                if n:
                    log.warning("%s: all %d tiles are artefacts (ink, glass or blur): %s", name, n,
                                NO_TISSUE)
            rois = tumour_rois(grid.coords[clean], scores[clean], tile_size0, roi_threshold,
                               slide.mpp)
            check = UNKNOWN if domain is None else domain.check(
                distance[clean], stain.statistics(), slide.mpp, slide.mpp_source)
            if check.in_domain is False:
                log.info("%s: out of domain: %s", name, "; ".join(check.reasons))
            timings.total_s = time.perf_counter() - started
            timings.tiles_per_second = n / timings.scoring_s if timings.scoring_s > 0 else 0.0
            yield SlideSummary(name, probability, label, self.slide_threshold, roi_threshold, n,
                               int(np.count_nonzero(flags)), rois, slide.mpp, timings,
                               engine.model, logit, check)

    def _tile_reader(self, slide, coords: np.ndarray, scale: ReadScale):
        """The GPU decode reader when the engine runs on a GPU and the slide's tiles decode there
        (wsi.gpu_decode: patches assembled in device memory, bound to the backbone's input);
        else the CPU reader (decode-once or OpenSlide). Each reads at the model's scale
        (wsi.scale) and logs which runs and why."""
        engine = self.engine
        if engine.on_gpu:   # MILROI_GPU_DECODE=0 turns it off
            from wsi.gpu_decode import make_gpu_tile_reader

            reader = make_gpu_tile_reader(slide, coords, tile_size=scale.read_size,
                                          level=scale.level, out_size=scale.tile_size,
                                          batch_size=engine.batch_size,
                                          queue_batches=self.queue_batches)
            if reader is not None:
                return reader
        return make_tile_reader(slide, coords, tile_size=scale.read_size, level=scale.level,
                                out_size=scale.tile_size, workers=self.reader_workers,
                                batch_size=engine.batch_size, queue_batches=self.queue_batches)

    def score_slide(self, slide_path: str | os.PathLike, **kwargs) -> ScoredSlide:
        """Run `score` to the end: the whole scored slide (the batch job's in-process call)."""
        header = summary = None
        chunks = []
        for event in self.score(slide_path, **kwargs):
            if isinstance(event, PatchChunk):
                chunks.append(event)
            elif isinstance(event, SlideHeader):
                header = event
            else:
                summary = event
        if summary is None:
            raise Cancelled(f"scoring of {slide_path} was cancelled")
        return ScoredSlide.from_chunks(header, chunks, summary)


def select_patches(outputs: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    """The engine outputs of the patches where `keep` is True (per-patch arrays only)."""
    if keep.all():
        return outputs
    n = len(keep)
    return {k: (v[keep] if isinstance(v, np.ndarray) and v.ndim and len(v) == n else v)
            for k, v in outputs.items()}


def _wait(future: Future, cancel: threading.Event):
    """The future's result, or None as soon as `cancel` is set."""
    while True:
        try:
            return future.result(timeout=CANCEL_POLL_S)
        except FutureTimeout:
            if cancel.is_set():
                future.cancel()
                return None


def _close_on_cancel(cancel: threading.Event, finished: threading.Event, reader) -> None:
    while not finished.is_set():
        if cancel.wait(CANCEL_POLL_S):
            reader.close()
            return
