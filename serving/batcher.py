"""Dynamic batching, apart from what runs the batches (as Triton's and KServe's batchers are).

`DynamicBatcher(run, batch_size, max_wait_s)`: `submit(tiles)` queues a request and returns a
Future. One runner thread takes queued requests in arrival order and packs them into one call of
`run` on up to `batch_size` tiles; when the queue holds less than a full batch it waits at most
`max_wait_s` for more. So four clients scoring at once share full batches instead of each running
its own small ones, and one client alone never waits (a full request runs at once). Requests
larger than `batch_size` are split, and their parts' outputs joined again in order.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from core.errors import RequestError

Outputs = dict[str, np.ndarray]


@dataclass
class BatcherStats:
    """Counters of the batcher (read by the metrics and the tests)."""

    runs: int = 0          # calls of `run` (batches)
    tiles: int = 0         # tiles run
    requests: int = 0      # submit() parts completed (after splitting to batch_size)
    merged_runs: int = 0   # runs that combined tiles of more than one request
    run_seconds: float = 0.0


@dataclass
class _Request:
    tiles: np.ndarray
    future: Future
    arrived: float = field(default_factory=time.monotonic)


def _is_host_array(tiles) -> bool:
    return isinstance(tiles, np.ndarray)


class DynamicBatcher:
    """Queues tile requests and runs them through `run(tiles) -> {name: array [n, ...]}` in
    batches of up to `batch_size` tiles, each output sliced back to its request.

    `mergeable(tiles)` says whether a request's tiles may be concatenated with another's (tiles
    in GPU memory run as they came: no concatenation on the device). `on_batch(tiles, requests,
    seconds)` is called after each run (the server's metrics)."""

    def __init__(self, run: Callable[[np.ndarray], Outputs], batch_size: int, max_wait_s: float,
                 *, name: str = "batcher", mergeable: Callable[[object], bool] = _is_host_array,
                 on_batch: Callable[[int, int, float], None] | None = None):
        self._run = run
        self.batch_size = int(batch_size)
        self.max_wait_s = float(max_wait_s)
        self.name = name
        self._mergeable = mergeable
        self._on_batch = on_batch
        self.stats = BatcherStats()
        self._queue: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._runner = threading.Thread(target=self._run_loop, name=f"{name}-batcher", daemon=True)
        self._runner.start()

    def submit(self, tiles) -> Future:
        """Queue tiles; the Future gives {output name: array} for them, in order."""
        parts = [tiles[i:i + self.batch_size] for i in range(0, len(tiles), self.batch_size)]
        if len(parts) <= 1:
            return self._enqueue(tiles)
        futures = [self._enqueue(part) for part in parts]
        combined: Future = Future()
        remaining = [len(futures)]
        lock = threading.Lock()

        def done(_):
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            try:
                results = [f.result() for f in futures]
                combined.set_result({k: np.concatenate([r[k] for r in results]) for k in results[0]})
            except BaseException as exc:  # noqa: BLE001 - forwarded to the caller
                combined.set_exception(exc)
        for f in futures:
            f.add_done_callback(done)
        return combined

    def queue_depth(self) -> int:
        """Tiles waiting for a run."""
        with self._cond:
            return sum(len(r.tiles) for r in self._queue)

    def close(self, wait: bool = True) -> None:
        """Stop accepting requests; queued ones still run; the runner thread ends."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait and threading.current_thread() is not self._runner:
            self._runner.join()

    def _enqueue(self, tiles) -> Future:
        request = _Request(tiles, Future())
        with self._cond:
            if self._closed:
                raise RequestError(f"{self.name} is closed")
            self._queue.append(request)
            self._cond.notify()
        return request.future

    def _next_batch(self) -> list[_Request] | None:
        """Requests for the next run, in arrival order; None once closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._queue[0].arrived + self.max_wait_s
            while (sum(len(r.tiles) for r in self._queue) < self.batch_size and not self._closed
                   and (left := deadline - time.monotonic()) > 0):
                self._cond.wait(left)
            batch, size = [], 0
            while self._queue and size + len(self._queue[0].tiles) <= self.batch_size:
                if batch and not (self._mergeable(self._queue[0].tiles)
                                  and self._mergeable(batch[0].tiles)):
                    break
                request = self._queue.popleft()
                # A request cancelled while queued (its stream went away) is dropped unrun.
                if request.future.set_running_or_notify_cancel():
                    batch.append(request)
                    size += len(request.tiles)
            return batch

    def _run_loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            started = time.perf_counter()
            try:
                tiles = batch[0].tiles if len(batch) == 1 else np.concatenate([r.tiles for r in batch])
                outputs = self._run(tiles)
            except BaseException as exc:  # noqa: BLE001 - every waiting request gets the error
                for request in batch:
                    request.future.set_exception(exc)
                continue
            seconds = time.perf_counter() - started
            stats = self.stats
            stats.runs += 1
            stats.tiles += len(tiles)
            stats.requests += len(batch)
            stats.merged_runs += len(batch) > 1
            stats.run_seconds += seconds
            start = 0
            for request in batch:
                stop = start + len(request.tiles)
                request.future.set_result({k: v[start:stop] for k, v in outputs.items()})
                start = stop
            if self._on_batch is not None:
                self._on_batch(len(tiles), len(batch), seconds)
