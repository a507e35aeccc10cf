"""Read the tiles of a grid in background threads while the consumer (the model) runs.

`TileReader` yields `TileBatch`es in grid order. Tiles are read one per task by a
ThreadPoolExecutor (OpenSlide decodes with the GIL released, so threads scale with cores) into
a preallocated batch array; at most `queue_batches` batches are in flight or waiting, so memory
stays bounded (queue_batches x batch_size x 150 KB) however fast the readers are and however
slow the consumer is. `close()` cancels every read not yet started and waits only for the few
running ones (one tile each): a cancelled gRPC call stops promptly. A read error in a worker is
raised in the consumer, as a SlideError naming the slide.
"""
from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from core.errors import ConfigError, MilroiError, RequestError, SlideError
from core.tiling import DEFAULT_TILING
from wsi.scale import resize_tile


@dataclass
class TileBatch:
    index: np.ndarray    # int64 [n] position of each tile in the coords given to the reader
    coords: np.ndarray   # int64 [n, 2] level-0 (x, y) top-left
    tiles: np.ndarray    # uint8 [n, tile_size, tile_size, 3] RGB


class _PendingBatch:
    """One batch being filled by the workers: its array and the futures of its tile reads."""

    def __init__(self, start: int, stop: int, tile_size: int):
        self.start, self.stop = start, stop
        self.tiles = np.empty((stop - start, tile_size, tile_size, 3), dtype=np.uint8)
        self.futures: list[Future] = []


class QueuedBatchReader:
    """What every tile reader shares: the consumer loop that keeps at most `queue_batches`
    batches in work, single iteration, `close()` on exit and at the end of the loop.

    A subclass sets `queue_batches`, calls `super().__init__()` and gives `_has_next_batch()`,
    `_submit_next_batch()` (start the reads of the next batch, append it to `_pending`),
    `_wait_for(batch)` (True once read, False if closed meanwhile) and `close()`.
    """

    def __init__(self) -> None:
        self._closed = threading.Event()
        self._pending: collections.deque = collections.deque()
        self._iterated = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[TileBatch]:
        if self._iterated:
            raise RequestError("a TileReader can be iterated only once")
        self._iterated = True
        try:
            while not self._closed.is_set():
                # Keep the queue full: reads of the next batches overlap the consumer's work.
                while len(self._pending) < self.queue_batches and self._has_next_batch():
                    try:
                        self._submit_next_batch()
                    except RuntimeError:   # the executors were shut down by close() meanwhile
                        if self._closed.is_set():
                            return
                        raise
                if not self._pending:
                    return
                batch = self._pending.popleft()
                if not self._wait_for(batch):
                    return   # closed meanwhile (e.g. from the gRPC cancel callback)
                yield TileBatch(index=np.arange(batch.start, batch.stop, dtype=np.int64),
                                coords=self.coords[batch.start:batch.stop], tiles=batch.tiles)
        finally:
            self.close()
            self._pending.clear()   # here, not in close(): only the consumer touches the deque

    def _has_next_batch(self) -> bool:
        raise NotImplementedError

    def _submit_next_batch(self) -> None:
        raise NotImplementedError

    def _wait_for(self, batch) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class TileReader(QueuedBatchReader):
    """Iterable of TileBatch over `coords` (level-0 top-left corners), in their order, each tile
    read by OpenSlide's read_region: `tile_size` px at `level`, resized to `out_size` px (the
    model's input, wsi.scale) when that differs."""

    def __init__(self, slide, coords, tile_size: int = DEFAULT_TILING.tile_size,
                 level: int = 0, workers: int = 4,
                 batch_size: int = 64, queue_batches: int = 4, out_size: int | None = None):
        if workers < 1 or batch_size < 1 or queue_batches < 1:
            raise ConfigError(f"workers, batch_size and queue_batches must be >= 1, got "
                              f"{workers}, {batch_size}, {queue_batches}")
        self.slide = slide
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.tile_size = int(tile_size)
        self.out_size = int(out_size or tile_size)
        self.level = int(level)
        self.batch_size = int(batch_size)
        self.queue_batches = int(queue_batches)
        super().__init__()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tile-reader")
        self._next_start = 0

    def __len__(self) -> int:
        """Number of batches."""
        return -(-len(self.coords) // self.batch_size)

    def _has_next_batch(self) -> bool:
        return self._next_start < len(self.coords)

    def _read_into(self, batch: _PendingBatch, row: int) -> None:
        if self._closed.is_set():   # closed while queued: skip the read
            return
        x, y = self.coords[batch.start + row]
        region = self.slide.read_region(x, y, self.tile_size, self.tile_size, self.level)
        batch.tiles[row] = resize_tile(region, self.out_size)

    def _submit_next_batch(self) -> None:
        start = self._next_start
        stop = min(start + self.batch_size, len(self.coords))
        batch = _PendingBatch(start, stop, self.out_size)
        batch.futures = [self._executor.submit(self._read_into, batch, row)
                         for row in range(stop - start)]
        self._pending.append(batch)
        self._next_start = stop

    def _wait_for(self, batch: _PendingBatch) -> bool:
        """Wait until every tile of `batch` is read; False if the reader was closed meanwhile."""
        for future in batch.futures:
            try:
                future.result()
            except CancelledError:
                return False
            except MilroiError:
                raise
            except Exception as exc:   # anything else a worker hit: still one clear slide error
                raise SlideError(getattr(self.slide, "path", "?"), f"tile read failed: {exc!r}") from exc
        return not self._closed.is_set()

    def close(self) -> None:
        """Stop reading: queued reads are cancelled, running ones (one tile each) finish."""
        self._closed.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
