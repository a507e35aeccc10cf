"""Deep-zoom tiles of a slide for OpenSeadragon, from OpenSlide's DeepZoomGenerator.

`limit_bounds=False`: the deep-zoom image is the whole level-0 plane from (0, 0), so OpenSeadragon's
image coordinates are level-0 pixels and the heatmap, the ROIs and the patch CSV line up with the
slide without an offset. Rendering (OpenSlide decode + JPEG encode) is blocking work: the app runs
`tile()` in a worker thread, and keeps the encoded tiles in a bounded LRU (bytes, not count). A
slide that cannot be opened or read gives an error tile (and the message), never an exception
out of the app.

OpenSlide's error state sticks to a handle: after one failed read (a corrupt tile), every later
read of that handle fails, intact levels included. So a handle that failed a read is dropped
from the cache, and the next request reopens the slide: only the tiles touching the damage stay
error tiles.
"""
from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from core.errors import MilroiError, RequestError, SlideError

TILE_SIZE = 254   # + 2 x overlap 1 = 256 px tiles, OpenSlide's deepzoom_server default
OVERLAP = 1
JPEG_QUALITY = 80
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
OPEN_SLIDES = 16  # slide handles kept open (each holds OpenSlide's own tile cache)


@dataclass(frozen=True)
class DeepZoomInfo:
    width: int
    height: int
    tile_size: int
    overlap: int
    levels: int
    mpp: float


@dataclass(frozen=True)
class Tile:
    data: bytes
    media_type: str
    error: str = ""   # why this is an error tile ("" for a slide tile)


class _OpenSlide:
    """One slide and its DeepZoomGenerator (both thread-safe for reads)."""

    def __init__(self, path: Path):
        from openslide.deepzoom import DeepZoomGenerator

        from wsi.slide import open_slide

        self.slide = open_slide(path)
        self.dz = DeepZoomGenerator(self.slide.openslide, tile_size=TILE_SIZE, overlap=OVERLAP,
                                    limit_bounds=False)
        w, h = self.slide.dimensions
        self.info = DeepZoomInfo(w, h, TILE_SIZE, OVERLAP, self.dz.level_count, self.slide.mpp)


class TileSource:
    """Open slides and their rendered tiles, both bounded."""

    def __init__(self, cache_bytes: int = DEFAULT_CACHE_BYTES, open_slides: int = OPEN_SLIDES):
        self.cache_bytes = cache_bytes
        self._tiles: OrderedDict[tuple, bytes] = OrderedDict()
        self._held = 0
        self._slides: OrderedDict[Path, _OpenSlide] = OrderedDict()
        self._open_slides = open_slides
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.reopened = 0   # handles dropped after a failed read

    def _slide(self, path: Path) -> _OpenSlide:
        with self._lock:
            opened = self._slides.get(path)
            if opened is not None:
                self._slides.move_to_end(path)
                return opened
        opened = _OpenSlide(path)   # outside the lock: opening a slide takes a while
        with self._lock:
            self._slides[path] = opened
            while len(self._slides) > self._open_slides:
                # Dropped, not closed: a thread may still be reading it; GC closes it.
                self._slides.popitem(last=False)
        return opened

    def _forget(self, path: Path, failed: _OpenSlide) -> None:
        """Drop `failed` (a handle in OpenSlide's sticky error state); a handle opened since by
        another thread stays."""
        with self._lock:
            if self._slides.get(path) is failed:
                del self._slides[path]   # not closed: another thread may hold it; GC closes it
                self.reopened += 1

    def info(self, path: Path) -> DeepZoomInfo:
        """Size and pyramid of the slide; SlideError when it cannot be opened."""
        return self._slide(path).info

    def probe(self, path: Path) -> str:
        """"" when the slide's lowest-resolution pixels decode, else why not (a corrupt file
        often opens, and fails only when its tiles are read)."""
        try:
            opened = self._slide(path)
        except MilroiError as exc:
            return str(exc)
        try:
            level = opened.slide.level_count - 1
            w, h = opened.slide.level_dimensions[level]
            scale = opened.slide.level_downsamples[level]
            opened.slide.read_region(0, 0, min(w, 64), min(h, 64), level)
            opened.slide.read_region(int((w // 2) * scale), int((h // 2) * scale),
                                     min(w - w // 2, 64), min(h - h // 2, 64), level)
        except MilroiError as exc:
            self._forget(path, opened)
            return str(exc)
        return ""

    def tile(self, path: Path, level: int, col: int, row: int) -> Tile:
        """The JPEG of deep-zoom tile (level, col, row), or an error tile (PNG) saying why."""
        key = (path, level, col, row)
        with self._lock:
            data = self._tiles.get(key)
            if data is not None:
                self._tiles.move_to_end(key)
                self.hits += 1
                return Tile(data, "image/jpeg")
            self.misses += 1
        try:
            opened = self._slide(path)
            if not (0 <= level < opened.dz.level_count):
                raise RequestError(f"no deep-zoom level {level} (0..{opened.dz.level_count - 1})")
            cols, rows = opened.dz.level_tiles[level]
            if not (0 <= col < cols and 0 <= row < rows):
                raise RequestError(f"no tile ({col}, {row}) at level {level} ({cols} x {rows})")
            try:
                image = opened.dz.get_tile(level, (col, row))
            except Exception as exc:  # noqa: BLE001 - OpenSlideError, OSError: a corrupt slide
                self._forget(path, opened)
                raise SlideError(path, f"cannot decode deep-zoom tile {level}/{col}_{row}: {exc}") \
                    from exc
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
        except MilroiError as exc:
            return Tile(error_tile(str(exc)), "image/png", str(exc))
        data = buffer.getvalue()
        with self._lock:
            if key not in self._tiles:
                self._tiles[key] = data
                self._held += len(data)
            while self._held > self.cache_bytes and self._tiles:
                _, dropped = self._tiles.popitem(last=False)
                self._held -= len(dropped)
        return Tile(data, "image/jpeg")


def error_tile(message: str, size: int = TILE_SIZE + 2 * OVERLAP) -> bytes:
    """A grey tile with a red cross and the start of the message: visibly not tissue."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (90, 90, 90))
    draw = ImageDraw.Draw(image)
    draw.line((0, 0, size, size), fill=(200, 40, 40), width=4)
    draw.line((0, size, size, 0), fill=(200, 40, 40), width=4)
    words, lines, line = message.split(), [], ""
    for word in words:   # wrap at ~36 characters (the default bitmap font)
        if len(line) + len(word) > 36:
            lines.append(line)
            line = ""
        line = f"{line} {word}".strip()
    lines.append(line)
    draw.text((6, 6), "slide error", fill=(255, 255, 255))
    for i, text in enumerate(lines[:12]):
        draw.text((6, 24 + 14 * i), text, fill=(255, 235, 235))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
