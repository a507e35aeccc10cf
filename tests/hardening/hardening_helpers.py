"""Helpers of the hardening tests: slide and bad-file writers, servers in and out of process.

(A module of its own name: test modules cannot import `conftest` reliably when several test
folders have one.)
"""
from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
from server_testing import free_port, stop_process, wait_serving

DATA = Path(__file__).resolve().parents[1] / "data"


BIN = Path(sys.executable).parent


GOOD_SLIDES = [f"s{i}.tif" for i in range(8)]


GOOD_SIZE = (1024, 896)   # ~10-20 tissue tiles: a stream takes about a second on two shared cores


def write_huge_claim_tiff(path: Path, width: int, height: int, tile: int = 4096,
                          mpp: float = 0.243) -> Path:
    """A valid tiled TIFF header claiming width x height px at `mpp` um/px, every tile offset
    pointing at one deflate-compressed tile: a few hundred KB on disk for a 'slide' of any size."""
    tile_data = zlib.compress(np.full((tile, tile, 3), 200, np.uint8).tobytes(), 9)
    n = (-(-width // tile)) * (-(-height // tile))
    # resolution in px per cm as a RATIONAL (numerator, denominator), unit 3 = centimetre
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, None), (259, 3, 1, 8),
            (262, 3, 1, 2), (277, 3, 1, 3), (282, 5, 1, None), (283, 5, 1, None), (284, 3, 1, 1),
            (296, 3, 1, 3), (322, 3, 1, tile), (323, 3, 1, tile), (324, 4, n, None),
            (325, 4, n, None)]
    data_at = 8
    ifd_at = data_at + len(tile_data) + (len(tile_data) & 1)
    arrays_at = ifd_at + 2 + 12 * len(tags) + 4
    offsets_at, counts_at, bps_at = arrays_at, arrays_at + 4 * n, arrays_at + 8 * n
    rational_at = bps_at + 6
    pointers = {258: bps_at, 324: offsets_at if n > 1 else data_at,
                325: counts_at if n > 1 else len(tile_data), 282: rational_at, 283: rational_at}
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHII", tag, kind, count, pointers.get(tag, value) if value is None else value)
        for tag, kind, count, value in tags) + struct.pack("<I", 0)
    body = struct.pack("<2sHI", b"II", 42, ifd_at) + tile_data + b"\0" * (len(tile_data) & 1) + ifd
    if n > 1:
        body += struct.pack(f"<{n}I", *[data_at] * n) + struct.pack(f"<{n}I", *[len(tile_data)] * n)
    else:   # keep the arrays' place: the bits per sample and the rational follow at fixed offsets
        body += b"\0" * (8 * n)
    px_per_cm = round(1e4 / mpp * 1000)
    path.write_bytes(body + struct.pack("<3H", 8, 8, 8) + struct.pack("<2I", px_per_cm, 1000))
    return path


def write_bad_files(folder: Path, good: Path) -> dict[str, Path]:
    """The bad inputs (name -> path): each must fail alone, with one clear status."""
    import tifffile
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    files["empty"] = folder / "empty.svs"
    files["empty"].write_bytes(b"")
    # The first 40% of a good pyramidal TIFF: header and first tiles present, the rest gone.
    files["truncated"] = folder / "truncated.tif"
    files["truncated"].write_bytes(good.read_bytes()[: int(good.stat().st_size * 0.4)])
    files["text"] = folder / "text.svs"
    files["text"].write_text("this is not a slide\n" * 50)
    plain = np.full((1200, 1600, 3), 230, np.uint8)
    plain[300:900, 400:1200] = (150, 80, 160)
    files["png"] = folder / "plain.png"
    Image.fromarray(plain).save(files["png"])
    files["stripped_tiff"] = folder / "stripped.tif"      # single level, strips, not tiles
    tifffile.imwrite(files["stripped_tiff"], plain, photometric="rgb")
    files["huge_claim"] = write_huge_claim_tiff(folder / "huge_claim.tif", 400_000, 400_000)
    # Plausible size, but one level: a tissue mask would scan 4.9e9 px.
    files["no_pyramid_huge"] = write_huge_claim_tiff(folder / "no_pyramid_huge.tif", 70_000, 70_000)
    files["broken_svs"] = folder / "broken.svs"            # real SVS with corrupt tile data
    shutil.copy(DATA / "broken.svs", files["broken_svs"])
    return files


def write_single_level_tiff(path: Path, source: Path) -> Path:
    """A tiled TIFF without a pyramid (one level): `source`'s level 0, 0.243 um/px."""
    import tifffile

    from wsi.slide import open_slide

    with open_slide(source) as slide:
        rgb = slide.read_level(0)
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(1e4 / 0.243, 1e4 / 0.243), resolutionunit="CENTIMETER")
    return path


def write_corrupt_tiles_slide(path: Path, source: Path) -> Path:
    """`source` with the JPEG data of the second half of its level-0 tiles zeroed: it opens, its
    tissue mask (from a lower level) and first tiles read fine, later tile reads fail."""
    import tifffile

    with tifffile.TiffFile(source) as tif:
        offsets, counts = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
    data = bytearray(source.read_bytes())
    for offset, count in list(zip(offsets, counts))[len(offsets) // 2:]:
        data[offset:offset + count] = bytes(count)
    path.write_bytes(bytes(data))
    return path


class InProcessServer:
    """A ScoringServer in its own event-loop thread of the test process."""

    def __init__(self, config):
        from serving.server import ScoringServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def build():
            return ScoringServer(config)

        self.server = self.call(build())
        self.port = self.call(self.server.start())
        self.address = f"127.0.0.1:{self.port}"
        self.call(asyncio.wait_for(self.server.ready.wait(), 120), 125)

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def engine(self):
        return self.server.source.current.engine

    def stop(self) -> None:
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class ServeProcess:
    """`milroi-serve serve` as a subprocess on a free loopback port."""

    def __init__(self, args: list[str], log_path: Path):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [str(BIN / "milroi-serve"), "serve", "--provider", "cpu", "--port", str(self.port),
             *args], stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "MLFLOW_TRACKING_URI": ""})

    def wait_serving(self, timeout: float = 120) -> None:
        wait_serving(self.address, self.proc, self.log_path, timeout)

    def stop(self) -> None:
        stop_process(self.proc, 30)
        self._log.close()

