"""wsi.tiles.TileReader: same pixels as read_region, grid order, prompt close, worker errors."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tifffile
from PIL import Image

from core.errors import MilroiError, SlideError
from wsi.slide import open_slide
from wsi.tiles import TileReader


class CountingSlide:
    """A real open slide whose reads are counted and slowed down, to watch the threads work."""

    def __init__(self, slide, delay_s: float):
        self.slide, self.delay_s, self.path = slide, delay_s, slide.path
        self.reads = 0
        self._lock = threading.Lock()

    def read_region(self, *args):
        with self._lock:
            self.reads += 1
        time.sleep(self.delay_s)
        return self.slide.read_region(*args)


def _grid(n_x, n_y, step=224):
    ys, xs = np.mgrid[0:n_y, 0:n_x] * step
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


def _reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("tile-reader")]


@pytest.mark.parametrize("workers,batch_size", [(1, 7), (4, 16)])
def test_batches_are_exactly_read_region_in_order(he_tiff, workers, batch_size):
    coords = _grid(12, 9)[::-1].copy()        # any order given is the order returned
    with open_slide(he_tiff) as slide:
        batches = list(TileReader(slide, coords, workers=workers, batch_size=batch_size))
        expected = np.stack([slide.read_region(x, y, 224, 224) for x, y in coords])
    assert [len(b.index) for b in batches] == [batch_size] * (len(coords) // batch_size) + \
        ([len(coords) % batch_size] if len(coords) % batch_size else [])
    np.testing.assert_array_equal(np.concatenate([b.index for b in batches]), np.arange(len(coords)))
    np.testing.assert_array_equal(np.concatenate([b.coords for b in batches]), coords)
    tiles = np.concatenate([b.tiles for b in batches])
    assert tiles.dtype == np.uint8 and tiles.shape == (len(coords), 224, 224, 3)
    np.testing.assert_array_equal(tiles, expected)


def test_level_one_tiles(lossless_tiff):
    path, rgb = lossless_tiff
    with open_slide(path) as slide:
        (batch,) = list(TileReader(slide, [[0, 0], [256, 512]], tile_size=64, level=1))
    level1 = np.asarray(Image.fromarray(rgb).reduce(2))    # how the fixture wrote level 1
    np.testing.assert_array_equal(batch.tiles[1], level1[256:320, 128:192])


def test_reading_runs_ahead_but_stays_bounded(he_tiff):
    with open_slide(he_tiff) as real:
        slide = CountingSlide(real, delay_s=0.002)
        reader = TileReader(slide, _grid(16, 12), workers=4, batch_size=8, queue_batches=3)
        batches = iter(reader)
        next(batches)
        time.sleep(0.3)                        # a slow consumer: the readers must stop at the bound
        assert 8 < slide.reads <= 3 * 8 + 8    # read ahead, but at most the queued batches
        reader.close()


def test_close_mid_way_stops_the_threads_promptly(he_tiff):
    with open_slide(he_tiff) as real:
        slide = CountingSlide(real, delay_s=0.02)
        reader = TileReader(slide, _grid(16, 12), workers=4, batch_size=16, queue_batches=4)
        received = 0
        for batch in reader:
            received += len(batch.index)
            if received >= 32:
                started = time.perf_counter()
                reader.close()
                closed_in = time.perf_counter() - started
                break
        reads_at_close = slide.reads
        time.sleep(0.2)
        assert slide.reads == reads_at_close           # nothing read after close()
        assert reads_at_close < 16 * 12                 # the rest of the slide was never read
        assert closed_in < 0.5                          # only the running reads finish
        assert not _reader_threads()


def test_close_from_another_thread_ends_the_iteration(he_tiff):
    """What the gRPC server does when the client cancels: close() from its callback thread."""
    with open_slide(he_tiff) as real:
        reader = TileReader(CountingSlide(real, delay_s=0.05), _grid(16, 12), workers=2, batch_size=32)
        threading.Timer(0.1, reader.close).start()
        started = time.perf_counter()
        received = sum(len(b.index) for b in reader)
    assert received < 16 * 12 and time.perf_counter() - started < 1.5


def test_a_worker_error_is_a_slide_error_in_the_consumer(tmp_path, he_tiff):
    data = bytearray(he_tiff.read_bytes())
    with tifffile.TiffFile(he_tiff) as tif:       # zero the JPEG data of level-0 tile 37
        offset, count = tif.pages[0].dataoffsets[37], tif.pages[0].databytecounts[37]
    data[offset:offset + count] = bytes(count)
    bad = tmp_path / "bad_tile.tif"
    bad.write_bytes(bytes(data))
    tile_37 = ((37 % 16) * 256, (37 // 16) * 256)
    coords = np.concatenate([_grid(4, 1, 256), [tile_37]])
    with open_slide(bad) as slide:
        # queue_batches=1: the bad tile is not read before the good batch is out (OpenSlide's
        # error state is sticky: after the first failed read every read of the handle fails).
        reader = TileReader(slide, coords, workers=2, batch_size=4, queue_batches=1)
        batches = iter(reader)
        assert len(next(batches).index) == 4            # the good tiles come first
        with pytest.raises(SlideError, match="bad_tile.tif"):
            next(batches)
    assert not _reader_threads()


def test_bad_parameters_and_single_use(he_tiff):
    with open_slide(he_tiff) as slide:
        with pytest.raises(MilroiError):
            TileReader(slide, _grid(2, 2), workers=0)
        reader = TileReader(slide, _grid(2, 2))
        assert len(reader) == 1
        list(reader)
        with pytest.raises(MilroiError, match="once"):
            list(reader)
