"""serving.batcher.DynamicBatcher on its own: what it runs, in which batches, and what each
caller gets back. `run` is a plain function of the tiles (the batcher's whole contract with the
engine), gated by events so that what is queued when a run starts is known, not timed."""
from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import numpy as np
import pytest

from core.errors import RequestError
from serving.batcher import DynamicBatcher


class GatedRun:
    """Doubles each tile's id; the first call waits until `release` is set."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()
        self.calls: list[list[int]] = []

    def __call__(self, tiles):
        self.calls.append(tiles.tolist())
        if len(self.calls) == 1:
            self.started.set()
            assert self.release.wait(30)
        return {"double": tiles * 2, "id": tiles}


def test_requests_queued_during_a_run_share_the_next_run_and_get_their_own_outputs():
    run = GatedRun()
    batcher = DynamicBatcher(run, batch_size=8, max_wait_s=0.0)
    try:
        first = batcher.submit(np.array([0]))
        assert run.started.wait(30)          # the first run is busy: the next requests queue
        rest = [batcher.submit(np.arange(10 * i, 10 * i + 3)) for i in range(1, 4)]
        assert batcher.queue_depth() == 9
        run.release.set()
        np.testing.assert_array_equal(first.result(30)["double"], [0])
        for i, future in enumerate(rest, start=1):
            np.testing.assert_array_equal(future.result(30)["id"], np.arange(10 * i, 10 * i + 3))
        # 9 queued tiles, batches of 8: the first two requests together, the third alone
        assert run.calls == [[0], [10, 11, 12, 20, 21, 22], [30, 31, 32]]
        assert (batcher.stats.runs, batcher.stats.merged_runs, batcher.stats.tiles) == (3, 1, 10)
    finally:
        batcher.close()


def test_a_large_request_is_split_into_batches_and_joined_in_order():
    calls = []

    def run(tiles):
        calls.append(len(tiles))
        return {"id": tiles}

    batcher = DynamicBatcher(run, batch_size=4, max_wait_s=0.0)
    try:
        np.testing.assert_array_equal(batcher.submit(np.arange(10)).result(30)["id"], np.arange(10))
        assert calls == [4, 4, 2]
    finally:
        batcher.close()


def test_a_cancelled_request_is_dropped_unrun_and_errors_reach_every_caller():
    run = GatedRun()
    batcher = DynamicBatcher(run, batch_size=8, max_wait_s=0.0)
    try:
        batcher.submit(np.array([0]))
        assert run.started.wait(30)
        dropped, kept = batcher.submit(np.array([1])), batcher.submit(np.array([2]))
        assert dropped.cancel()
        run.release.set()
        assert kept.result(30)["id"].tolist() == [2]
        with pytest.raises(CancelledError):
            dropped.result(0)
        assert [2] in run.calls and [1, 2] not in run.calls
    finally:
        batcher.close()

    def failing(tiles):
        raise ValueError("no model")

    batcher = DynamicBatcher(failing, batch_size=8, max_wait_s=0.0)
    with pytest.raises(ValueError, match="no model"):
        batcher.submit(np.array([1])).result(30)
    batcher.close()
    with pytest.raises(RequestError, match="closed"):
        batcher.submit(np.array([1]))


def test_unmergeable_requests_run_alone():
    run = GatedRun()
    batcher = DynamicBatcher(run, batch_size=8, max_wait_s=0.0, mergeable=lambda t: False)
    try:
        batcher.submit(np.array([0]))
        assert run.started.wait(30)
        futures = [batcher.submit(np.array([i])) for i in (1, 2)]
        run.release.set()
        assert [f.result(30)["id"].tolist() for f in futures] == [[1], [2]]
        assert run.calls == [[0], [1], [2]] and batcher.stats.merged_runs == 0
    finally:
        batcher.close()
