"""Read a grid's patches from a tiled TIFF-family slide decoding each source tile once.

OpenSlide's `read_region` decodes every stored tile a 224-px patch touches, for every patch:
Camelyon16 stores level 0 as 512-px JPEG tiles, so a grid touches ~1.9 tiles per patch and
each tile is decoded several times (as often as OpenSlide's small cache misses). This reader
instead takes the compressed level-0 tiles straight from the file (tifffile gives the offsets,
byte counts, shared JPEGTables and colour space), decodes each of them once (imagecodecs:
libjpeg-turbo, OpenJPEG; the GIL is released, so the decode threads run in parallel) and crops
the patches from a cache of decoded tiles, in grid order.

It keeps the contract of `wsi.tiles.TileReader` (same constructor, `TileBatch`es in the order
of `coords`, bounded read-ahead, prompt `close()`, a `SlideError` naming slide and region on a
corrupt tile). The cache is exact, not LRU: the whole plan is known up front, so each tile is
kept from the first batch that needs it to the last one and then dropped; its peak size is
computed before reading starts and a plan over `MAX_CACHE_BYTES` (a slide some 300k px wide
with tissue across) goes to OpenSlide instead, so memory stays bounded.

What it reads: generic tiled TIFF (Camelyon16), Aperio SVS and Philips TIFF, any pyramid level
stored as tiles (wsi.scale reads a coarser level for a model at a coarser pixel size, then
resizes each patch), 8-bit RGB,
JPEG tiles (YCbCr, or Aperio's RGB-coded JPEG without JFIF marker) or Aperio JPEG 2000 in RGB
(33005). An absent tile (byte count 0: a sparse Philips slide leaves out every tile outside its
scanned regions) is white: OpenSlide leaves it transparent and `wsi.slide` composites
transparency on white. Damaged JPEG data fails where
OpenSlide fails it (it treats libjpeg's warnings as errors; imagecodecs does not, so
`check_jpeg_stream` looks for what those warnings report). Anything else (other vendors,
other compressions, Aperio's YCbCr JPEG 2000 (33003), DICOM folders) goes to
the OpenSlide reader: `make_tile_reader` chooses and logs which reader runs and why.
For a GPU batch decoder (issue 26's nvImageCodec path, not built yet) `TiledLevel.jpeg_stream`
gives each JPEG tile as one self-contained stream (tables inlined, RGB-coded tiles marked);
tests check that these decode to the same pixels with no TIFF side information.
Pixels: identical to OpenSlide's on the test slides (both are libjpeg-turbo / OpenJPEG with
their default settings: islow DCT, fancy chroma upsampling); tests allow max |diff| <= 2.
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import ConfigError, MilroiError, SlideError
from core.tiling import DEFAULT_TILING
from wsi.scale import resize_tile
from wsi.tiles import QueuedBatchReader, TileReader

log = logging.getLogger(__name__)

JPEG, JPEG2000_RGB = 7, 33005                     # TIFF Compression tag values read here
_KIND = {JPEG: "JPEG", JPEG2000_RGB: "JPEG 2000"}
_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR = 2, 6
VENDORS = ("generic-tiff", "aperio", "philips")   # OpenSlide's names of the formats read here
# The most memory the cache of decoded tiles may need (its peak is computed before reading).
MAX_CACHE_BYTES = 1 << 30
# `openslide` forces the OpenSlide reader everywhere (an escape hatch, e.g. to compare pixels).
READER_ENV = "MILROI_TILE_READER"


class NotApplicable(Exception):
    """The decode-once reader does not read this slide; the message says why."""


@dataclass(frozen=True)
class TiledLevel:
    """Where the compressed tiles of a slide's level 0 lie in its file, and how to decode them."""

    path: Path
    width: int
    height: int
    tile_width: int
    tile_height: int
    offsets: np.ndarray       # int64 [rows * columns], row-major
    byte_counts: np.ndarray   # int64, 0 = absent tile
    compression: int
    jpeg_tables: bytes | None
    jpeg_colorspace: str | None   # "RGB": Aperio's RGB-coded JPEG; None: the stream's own (YCbCr)

    @property
    def columns(self) -> int:
        return -(-self.width // self.tile_width)

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile_height)

    @property
    def kind(self) -> str:
        return _KIND[self.compression]

    @property
    def tile_bytes(self) -> int:
        return self.tile_width * self.tile_height * 3

    def tile_origin(self, index: int) -> tuple[int, int]:
        return (index % self.columns) * self.tile_width, (index // self.columns) * self.tile_height

    def jpeg_stream(self, fd: int, index: int) -> bytes | None:
        """Tile `index` as one self-contained JPEG (`self_contained_jpeg`); None if absent."""
        if self.compression != JPEG:
            raise ValueError(f"tiles are {self.kind}, not JPEG")
        count, offset = int(self.byte_counts[index]), int(self.offsets[index])
        if count == 0:
            return None
        return self_contained_jpeg(os.pread(fd, count, offset), self.jpeg_tables,
                                   rgb=self.jpeg_colorspace == "RGB")

    def decode(self, fd: int, index: int) -> np.ndarray | None:
        """RGB uint8 [tile_height, tile_width, 3] of tile `index`; None for an absent tile.
        Raises SlideError naming the tile's level-0 region when its data is bad."""
        count, offset = int(self.byte_counts[index]), int(self.offsets[index])
        if count == 0:
            return None
        import imagecodecs

        try:
            data = os.pread(fd, count, offset)   # no shared file position: thread-safe
            if len(data) != count:
                raise ValueError(f"the file ends {count - len(data)} bytes into its data")
            if self.compression == JPEG:
                check_jpeg_stream(data)
                tile = imagecodecs.jpeg8_decode(data, tables=self.jpeg_tables,
                                                colorspace=self.jpeg_colorspace, outcolorspace="RGB")
            else:   # OpenJPEG, as in OpenSlide: a damaged codestream fails (or not) alike
                tile = imagecodecs.jpeg2k_decode(data)
            if tile.shape != (self.tile_height, self.tile_width, 3) or tile.dtype != np.uint8:
                raise ValueError(f"decodes to {tile.shape} {tile.dtype}, not "
                                 f"({self.tile_height}, {self.tile_width}, 3) uint8")
        except (OSError, ValueError, RuntimeError, imagecodecs.DelayedImportError,
                imagecodecs.Jpeg8Error, imagecodecs.Jpeg2kError) as exc:
            x, y = self.tile_origin(index)
            raise SlideError(self.path, f"level-0 tile {index} ({self.tile_width}x{self.tile_height}"
                                        f" px at ({x}, {y}), {count} bytes of {self.kind}): corrupt "
                                        f"or truncated tile data: {exc}") from exc
        return tile


# Bytes that may follow 0xFF inside a scan: stuffing (00), restart markers (D0-D7), fill (FF),
# and the table / scan markers of a multi-scan stream (C4 DHT, DA SOS, DB DQT, DD DRI).
_SCAN_FF_OK = np.zeros(256, bool)
_SCAN_FF_OK[[0x00, 0xFF, 0xC4, 0xDA, 0xDB, 0xDD, *range(0xD0, 0xD8)]] = True


# APP14 "Adobe", version 100, no flags, transform 0: the samples are RGB, not YCbCr.
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def self_contained_jpeg(stream: bytes, tables: bytes | None, rgb: bool) -> bytes:
    """A TIFF JPEG tile as one stream that any decoder reads alone, with no TIFF side
    information: what a batched GPU decoder (nvImageCodec / nvJPEG) is given. The shared
    JPEGTables' segments go in after its start-of-image marker, and Aperio's RGB-coded tiles
    (photometric RGB, no JFIF) get an Adobe APP14 marker saying transform 0, without which a
    decoder would convert their samples from YCbCr."""
    head = b"\xff\xd8" + (_ADOBE_RGB if rgb else b"")
    if tables:
        head += tables[2:-2]   # between the tables stream's own SOI and EOI
    return head + stream[2:]


def check_jpeg_stream(data: bytes) -> None:
    """Raise ValueError for a JPEG tile stream that libjpeg would decode only with a warning.

    OpenSlide fails a read on any libjpeg warning ("Premature end of JPEG file", "Corrupt JPEG
    data: premature end of data segment"); imagecodecs decodes such a stream silently into
    grey or smeared pixels. These checks find what those warnings report (a stream cut short
    or zeroed, a marker that does not belong inside the scan) in a few microseconds: no
    start-of-image, no end-of-image at the end, no scan, or a stray marker in the scan."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG stream (no start-of-image marker)")
    if data[-2:] != b"\xff\xd9":
        raise ValueError("premature end of JPEG stream (no end-of-image marker)")
    pos = 2
    while True:   # header segments up to the first scan
        if pos + 4 > len(data) or data[pos] != 0xFF:
            raise ValueError(f"corrupt JPEG header at byte {pos}")
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        pos += 2 + length
        if marker == 0xDA:
            break
    scan = np.frombuffer(data, np.uint8, len(data) - 2 - pos, pos)
    ff = np.flatnonzero(scan[:-1] == 0xFF)
    stray = ff[~_SCAN_FF_OK[scan[ff + 1]]]
    if len(stray):
        raise ValueError(f"corrupt JPEG data: marker 0x{int(scan[stray[0] + 1]):02X} inside the "
                         f"scan at byte {pos + int(stray[0])}")


def tiled_level(slide, level: int = 0) -> TiledLevel:
    """The compressed tile index of pyramid `level` of `slide` (an open `wsi.slide.Slide`);
    raises NotApplicable with the reason when the decode-once reader does not read it."""
    opened_by = getattr(slide, "reader", "openslide")   # wsi.slide may open OME-TIFF otherwise
    if not str(opened_by).startswith("openslide"):
        raise NotApplicable(f"opened by {opened_by}, not OpenSlide")
    vendor = getattr(slide, "vendor", None)
    if vendor not in VENDORS:
        raise NotApplicable(f"vendor {vendor!r} is not one of {', '.join(VENDORS)}")
    path = Path(slide.path)
    if not path.is_file():
        raise NotApplicable("not a single file")
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if vendor == "philips":
                _check_philips(tif)
            size = tuple(slide.level_dimensions[level])
            page = next((p for p in tif.pages if p.is_tiled and (p.imagewidth, p.imagelength)
                         == size), None)
            if page is None:
                raise NotApplicable(f"no tiled TIFF page of the level-{level} size {size}")
            return _describe(path, page)
    except NotApplicable:
        raise
    except Exception as exc:   # tifffile's view of a file OpenSlide opened: never fatal here
        raise NotApplicable(f"tifffile cannot index it: {exc!r}") from exc


def _check_philips(tif) -> None:
    """A slide OpenSlide calls Philips must be one to tifffile too: only then does tifffile
    undo the ImageDepth / TileDepth that Philips DP v1.1 writes wrongly (the pyramid's level
    count). Level 0 is page 0 (OpenSlide's driver takes the first tiled directory, the one with
    the XML; the reduced levels follow, smaller): the size match in tiled_level finds it. The
    XML's pixel spacing reaches `Slide.mpp` through OpenSlide's openslide.mpp-x/y."""
    if not tif.is_philips:
        raise NotApplicable("OpenSlide reads it as Philips, tifffile finds no Philips DP metadata")
    if not tif.pages[0].is_tiled:
        raise NotApplicable("Philips TIFF whose first page (level 0) is not tiled")


def _describe(path: Path, page) -> TiledLevel:
    if page.compression not in _KIND:
        raise NotApplicable(f"compression {int(page.compression)} ({page.compression.name}); "
                            f"reads JPEG (7) and RGB JPEG 2000 (33005)")
    if (page.samplesperpixel, page.bitspersample, int(page.planarconfig)) != (3, 8, 1) \
            or page.extrasamples or page.imagedepth != 1:
        raise NotApplicable(f"{page.samplesperpixel} samples of {page.bitspersample} bits, "
                            f"planar config {int(page.planarconfig)}: reads 8-bit RGB, contiguous")
    photometric = int(page.photometric)
    if page.compression == JPEG:
        if photometric not in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR):
            raise NotApplicable(f"JPEG with photometric {photometric}")
        # tifffile's rule (jpeg_decode_colorspace): an RGB-photometric JPEG without a JFIF marker
        # (Aperio) holds RGB samples, not YCbCr; libjpeg would otherwise guess YCbCr.
        colorspace = "RGB" if photometric == _PHOTOMETRIC_RGB and not page.is_jfif else None
    else:
        if photometric != _PHOTOMETRIC_RGB:
            raise NotApplicable(f"JPEG 2000 with photometric {photometric}")
        colorspace = None
    level = TiledLevel(path, int(page.imagewidth), int(page.imagelength), int(page.tilewidth),
                       int(page.tilelength), np.asarray(page.dataoffsets, np.int64),
                       np.asarray(page.databytecounts, np.int64), int(page.compression),
                       page.jpegtables if page.compression == JPEG else None, colorspace)
    if len(level.offsets) != level.rows * level.columns:
        raise NotApplicable(f"{len(level.offsets)} tile offsets for a grid of "
                            f"{level.columns} x {level.rows} tiles")
    return level


@dataclass
class ReadPlan:
    """Which source tiles each batch needs, how many batches use each, and the cache's peak."""

    batch_tiles: list[np.ndarray]   # per batch: the source tile indices it needs, sorted
    uses: np.ndarray                # per source tile: how many batches need it
    peak_tiles: int                 # most tiles decoded and held at once (with the read-ahead)
    peak_bytes: int


def patch_tiles(coords: np.ndarray, tile_size: int, level: TiledLevel) -> np.ndarray:
    """int64 [n, k]: the source tiles each patch overlaps (-1 pads); patches are clipped to
    the image, so a patch off the slide needs no tile."""
    x, y = coords[:, 0], coords[:, 1]
    spans = []
    for start, size, tile, count in ((x, level.width, level.tile_width, level.columns),
                                     (y, level.height, level.tile_height, level.rows)):
        first = np.clip(start, 0, None) // tile
        last = (np.clip(start + tile_size, None, size) - 1) // tile
        empty = (start >= size) | (start + tile_size <= 0)
        spans.append((first, np.where(empty, -1, np.minimum(last, count - 1)),
                      -(-(tile_size - 1) // tile) + 1))
    (cx0, cx1, kx), (cy0, cy1, ky) = spans
    dx, dy = np.arange(kx), np.arange(ky)
    cols = cx0[:, None, None] + dx[None, None, :]
    rows = cy0[:, None, None] + dy[None, :, None]
    valid = (cols <= cx1[:, None, None]) & (rows <= cy1[:, None, None])
    return np.where(valid, rows * level.columns + cols, -1).reshape(len(coords), kx * ky)


def make_plan(coords: np.ndarray, tile_size: int, level: TiledLevel, batch_size: int,
              queue_batches: int) -> ReadPlan:
    tiles = patch_tiles(coords, tile_size, level)
    n_batches = -(-len(coords) // batch_size)
    batch = np.repeat(np.arange(len(coords)) // batch_size, tiles.shape[1])
    flat = tiles.ravel()
    keep = flat >= 0
    n_tiles = level.rows * level.columns
    pairs = np.unique(batch[keep] * n_tiles + flat[keep])   # (batch, tile) once each, sorted
    pair_batch, pair_tile = pairs // n_tiles, pairs % n_tiles
    bounds = np.searchsorted(pair_batch, np.arange(n_batches + 1))
    batch_tiles = [pair_tile[bounds[b]:bounds[b + 1]] for b in range(n_batches)]
    uses = np.bincount(pair_tile, minlength=n_tiles)
    peak = 0
    if len(pairs):
        used = np.flatnonzero(uses)
        first = np.full(n_tiles, n_batches, np.int64)
        last = np.full(n_tiles, -1, np.int64)
        np.minimum.at(first, pair_tile, pair_batch)
        np.maximum.at(last, pair_tile, pair_batch)
        # While batch s is assembled, batches up to s + queue_batches - 1 have their decodes
        # submitted and nothing used only by batches < s is left: held = tiles whose
        # [first - queue_batches + 1, last] window covers s.
        live = np.zeros(n_batches + 1, np.int64)
        np.add.at(live, np.maximum(first[used] - queue_batches + 1, 0), 1)
        np.add.at(live, last[used] + 1, -1)
        peak = int(np.cumsum(live).max())
    return ReadPlan(batch_tiles, uses, peak, peak * level.tile_bytes)


class _PendingBatch:
    def __init__(self, start: int, stop: int, tile_size: int):
        self.start, self.stop = start, stop
        self.tiles = np.empty((stop - start, tile_size, tile_size, 3), dtype=np.uint8)
        self.assembled: Future | None = None


class DecodeOnceReader(QueuedBatchReader):
    """Iterable of TileBatch over `coords` (level-0 top-left corners), in their order, from a
    TiledLevel: `tile_size` px regions at that level, resized to `out_size` px when that differs
    (wsi.scale). Same interface and guarantees as wsi.tiles.TileReader."""

    def __init__(self, slide, coords, level: TiledLevel, tile_size: int = DEFAULT_TILING.tile_size,
                 workers: int = 4, batch_size: int = 64, queue_batches: int = 4,
                 plan: ReadPlan | None = None, downsample: float = 1.0,
                 out_size: int | None = None):
        if workers < 1 or batch_size < 1 or queue_batches < 1:
            raise ConfigError(f"workers, batch_size and queue_batches must be >= 1, got "
                              f"{workers}, {batch_size}, {queue_batches}")
        super().__init__()
        self.slide, self.source = slide, level
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        # where each patch starts at the level read (OpenSlide's read_region: level-0 / downsample)
        self.level_coords = level_coords(self.coords, downsample)
        self.tile_size = int(tile_size)
        self.out_size = int(out_size or tile_size)
        self.batch_size = int(batch_size)
        self.queue_batches = int(queue_batches)
        self.plan = plan or make_plan(self.level_coords, self.tile_size, level, self.batch_size,
                                      self.queue_batches)
        self._patch_tiles = patch_tiles(self.level_coords, self.tile_size, level)
        self._remaining = self.plan.uses.copy()
        self._cache: dict[int, Future] = {}     # tile index -> its decode (ndarray | None)
        self._lock = threading.Lock()
        self.decodes = 0                         # tiles decoded so far (absent ones excluded)
        self.absent = 0                          # absent (zero-byte) tiles met
        self.cache_high_water = 0                # most tiles held or being decoded at once
        self._fd = os.open(level.path, os.O_RDONLY)
        # Decodes run on `workers` threads; one more thread crops each batch from the decoded
        # tiles in order (a separate pool: it waits on decodes, which must never wait on it).
        self._decoders = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tile-reader-decode")
        self._cropper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-reader-crop")
        # The resizes (wsi.scale) cost more than the crops: spread over `workers` threads (PIL
        # releases the GIL), not on the one crop thread. They wait on nothing, so no deadlock.
        self._resizers = (ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tile-reader-resize")
                          if self.out_size != self.tile_size else None)
        self._next_batch = 0

    def __len__(self) -> int:
        """Number of batches."""
        return len(self.plan.batch_tiles)

    def _has_next_batch(self) -> bool:
        return self._next_batch < len(self)

    # -- workers ---------------------------------------------------------------------------
    def _decode(self, index: int) -> np.ndarray | None:
        if self._closed.is_set():
            raise CancelledError()
        tile = self.source.decode(self._fd, index)
        with self._lock:
            if tile is None:
                self.absent += 1
            else:
                self.decodes += 1
        return tile

    def _assemble(self, batch: _PendingBatch, decodes: dict[int, Future]) -> None:
        """Crop every patch of `batch` from its decoded tiles, then drop the tiles no later
        batch needs. Runs on the single crop thread, batches in order."""
        if self._closed.is_set():
            return
        tiles = {}
        for index, future in decodes.items():
            try:
                tiles[index] = future.result()
            except SlideError as exc:
                row = next(r for r in range(batch.stop - batch.start)
                           if index in self._patch_tiles[batch.start + r])
                x, y = self.coords[batch.start + row]
                raise SlideError(self.source.path, f"read of {self.tile_size}x{self.tile_size} px at "
                                                   f"({x}, {y}) level-0 px failed: {exc.cause}") from exc
        ts, src = self.tile_size, self.source
        resize = self._resizers is not None
        regions = np.empty((batch.stop - batch.start, ts, ts, 3), np.uint8) if resize else batch.tiles
        for row in range(batch.stop - batch.start):
            x, y = (int(v) for v in self.level_coords[batch.start + row])
            out = regions[row]
            needed = [i for i in self._patch_tiles[batch.start + row] if i >= 0]
            inside = x >= 0 and y >= 0 and x + ts <= src.width and y + ts <= src.height
            if not inside or any(tiles[i] is None for i in needed):
                out[:] = 255    # off the slide or an absent tile: white, as OpenSlide draws it
            for index in needed:
                tile = tiles[index]
                if tile is None:
                    continue
                tx, ty = src.tile_origin(index)
                x0, x1 = max(x, tx), min(x + ts, tx + src.tile_width, src.width)
                y0, y1 = max(y, ty), min(y + ts, ty + src.tile_height, src.height)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = tile[y0 - ty:y1 - ty, x0 - tx:x1 - tx]
        if resize:
            def resize_row(row: int) -> None:
                batch.tiles[row] = resize_tile(regions[row], self.out_size)
            for done in [self._resizers.submit(resize_row, r) for r in range(len(regions))]:
                done.result()
        with self._lock:
            for index in decodes:
                self._remaining[index] -= 1
                if self._remaining[index] == 0:
                    del self._cache[index]

    # -- consumer --------------------------------------------------------------------------
    def _submit_next_batch(self) -> None:
        b = self._next_batch
        start = b * self.batch_size
        batch = _PendingBatch(start, min(start + self.batch_size, len(self.coords)), self.out_size)
        decodes = {}
        with self._lock:
            for index in self.plan.batch_tiles[b].tolist():
                future = self._cache.get(index)
                if future is None:
                    future = self._cache[index] = self._decoders.submit(self._decode, index)
                decodes[index] = future
            self.cache_high_water = max(self.cache_high_water, len(self._cache))
        batch.assembled = self._cropper.submit(self._assemble, batch, decodes)
        self._pending.append(batch)
        self._next_batch = b + 1

    def _wait_for(self, batch: _PendingBatch) -> bool:
        try:
            batch.assembled.result()
        except CancelledError:
            return False
        except MilroiError:
            raise
        except Exception as exc:
            raise SlideError(self.source.path, f"tile read failed: {exc!r}") from exc
        return not self._closed.is_set()

    def close(self) -> None:
        """Stop reading: queued decodes and crops are cancelled, running ones (one tile or one
        batch's crops each) finish; the file is closed."""
        self._closed.set()
        self._decoders.shutdown(wait=True, cancel_futures=True)
        self._cropper.shutdown(wait=True, cancel_futures=True)
        if self._resizers is not None:
            self._resizers.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._cache.clear()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def level_coords(coords: np.ndarray, downsample: float) -> np.ndarray:
    """Level-0 corners as px at a level of that downsample (exact at level 0 and wherever the
    grid's step is a multiple of the downsample, as wsi.grid lays it out on a 2^k pyramid)."""
    if downsample == 1:
        return coords
    return np.floor(coords / downsample + 0.5).astype(np.int64)


def make_tile_reader(slide, coords, tile_size: int = DEFAULT_TILING.tile_size,
                     level: int = 0, workers: int = 4, batch_size: int = 64,
                     queue_batches: int = 4, reader: str | None = None,
                     out_size: int | None = None):
    """The tile reader for `slide`: DecodeOnceReader where it applies, else wsi.tiles.TileReader
    (OpenSlide). Each reads `tile_size` px regions at `level` and yields them resized to
    `out_size` px (the model's input; wsi.scale plans both). `reader` ("auto", "decode-once",
    "openslide"; default $MILROI_TILE_READER, else
    auto) forces one; "decode-once" on a slide it does not read is a ConfigError. Logs which
    reader runs and why."""
    choice = reader or os.environ.get(READER_ENV) or "auto"
    if choice not in ("auto", "decode-once", "openslide"):
        raise ConfigError(f"tile reader {choice!r}: one of auto, decode-once, openslide")
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    name = getattr(slide, "path", "?")
    try:
        if choice == "openslide":
            raise NotApplicable(f"{READER_ENV} or the caller asked for it")
        source = tiled_level(slide, level)
        downsample = float(slide.level_downsamples[level])
        plan = make_plan(level_coords(coords, downsample), tile_size, source, batch_size,
                         queue_batches)
        if plan.peak_bytes > MAX_CACHE_BYTES:
            raise NotApplicable(f"its tile cache would peak at {plan.peak_bytes / 2**20:.0f} MiB "
                                f"(> {MAX_CACHE_BYTES / 2**20:.0f} MiB)")
    except NotApplicable as why:
        if choice == "decode-once":
            raise ConfigError(f"{name}: the decode-once reader cannot read it: {why}") from None
        log.info("%s: tile reader: OpenSlide read_region, %d workers (%s)", name, workers, why)
        return TileReader(slide, coords, tile_size=tile_size, level=level, workers=workers,
                          batch_size=batch_size, queue_batches=queue_batches, out_size=out_size)
    used = int(np.count_nonzero(plan.uses))
    log.info("%s: tile reader: decode-once, level %d, %s %dx%d tiles (%s), %d workers: %d patches "
             "from %d source tiles (%.2f per patch), cache peak %d tiles (%.0f MiB)", name, level,
             source.kind, source.tile_width, source.tile_height, getattr(slide, "vendor", "?"), workers,
             len(coords), used, used / max(len(coords), 1), plan.peak_tiles, plan.peak_bytes / 2**20)
    return DecodeOnceReader(slide, coords, source, tile_size=tile_size, workers=workers,
                            batch_size=batch_size, queue_batches=queue_batches, plan=plan,
                            downsample=downsample, out_size=out_size)
