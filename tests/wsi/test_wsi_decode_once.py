"""wsi.decode_once: OpenSlide's pixels from each source tile decoded once, TileReader's contract,
and the choice of reader (with the fallback to OpenSlide and its log line)."""
from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import tifffile
from slide_testing import write_camelyon_layout_slide
from wsi_slides import CMU_SMALL, TCGA_JP2K, write_pyramid_tiff

from core.errors import ConfigError, MilroiError, SlideError
from wsi.decode_once import READER_ENV, DecodeOnceReader, make_tile_reader, tiled_level
from wsi.slide import open_slide
from wsi.tiles import TileReader

PATCH = 224


@pytest.fixture(scope="module")
def camelyon_512(tmp_path_factory):
    """Camelyon16's own layout: generic TIFF, 512-px YCbCr JPEG tiles, one shared JPEGTables."""
    return write_camelyon_layout_slide(tmp_path_factory.mktemp("c512"), 512)


@pytest.fixture(scope="module")
def he_512(tmp_path_factory, he_image):
    """The synthetic H&E image with 512-px JPEG tiles (no shared tables) and odd edges."""
    return write_pyramid_tiff(tmp_path_factory.mktemp("he512") / "he_512.tif",
                              he_image[0][:2999, :3901], levels=2, tile=512)


def _grid(x0, y0, x1, y1, step=PATCH):
    ys, xs = np.mgrid[y0:y1:step, x0:x1:step]
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


def _read(path, coords, **kwargs):
    with open_slide(path) as slide:
        reader = make_tile_reader(slide, coords, **kwargs)
        tiles = np.concatenate([b.tiles.copy() for b in reader]) if len(coords) else None
        expected = np.stack([slide.read_region(int(x), int(y), PATCH, PATCH) for x, y in coords])
    return reader, tiles, expected


def _source_tiles(coords, width, height, tw, th):
    """The stored tiles the patches overlap, counted by hand (pixel ranges, clipped to the image)."""
    used = set()
    for x, y in coords.tolist():
        xs = range(max(x, 0), min(x + PATCH, width))
        ys = range(max(y, 0), min(y + PATCH, height))
        if xs and ys:
            used |= {(c, r) for c in range(xs[0] // tw, xs[-1] // tw + 1)
                     for r in range(ys[0] // th, ys[-1] // th + 1)}
    return used


def _reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("tile-reader")]


@pytest.mark.parametrize("slide_fixture,window", [
    ("he_tiff", None),                        # 256-px YCbCr JPEG tiles, whole slide and edges
    ("he_512", None),                         # 512-px tiles, edges not on a tile boundary
    ("camelyon_512", None),                   # 512-px tiles with shared JPEGTables (Camelyon16)
    ("cmu", None),                            # Aperio SVS, 240-px RGB-coded JPEG, JPEGTables
    ("tcga", (3400, 2500, 4443, 3567)),       # Aperio SVS JPEG 2000 (RGB), its bottom-right edge
])
def test_pixels_are_openslides(request, slide_fixture, window):
    path = {"cmu": CMU_SMALL, "tcga": TCGA_JP2K}.get(slide_fixture) or request.getfixturevalue(slide_fixture)
    with open_slide(path) as slide:
        w, h = slide.dimensions
    x0, y0, x1, y1 = window or (0, 0, w, h)
    coords = np.concatenate([_grid(x0, y0, x1, y1), [[-100, -50], [w - 100, h - 30]]])
    reader, tiles, expected = _read(path, coords, workers=3, batch_size=16)
    assert isinstance(reader, DecodeOnceReader)
    diff = np.abs(tiles.astype(np.int16) - expected)
    assert diff.max() <= 2, f"max |diff| {diff.max()}"
    assert (tiles[-2][:50] == 255).all() and (tiles[-1][30:] == 255).all()   # off the slide: white
    source = reader.source
    assert reader.decodes == len(_source_tiles(coords, w, h, source.tile_width, source.tile_height))


def test_patches_straddling_two_and_four_tiles(camelyon_512):
    coords = np.array([[100, 100],     # inside one tile
                       [400, 10],      # across tiles (0, 0) and (1, 0)
                       [10, 400],      # across (0, 0) and (0, 1)
                       [400, 400],     # across four tiles
                       [3872, 3872]])  # the slide's bottom-right corner
    reader, tiles, expected = _read(camelyon_512, coords, workers=2, batch_size=2)
    assert [len(set(t) - {-1}) for t in reader._patch_tiles] == [1, 2, 2, 4, 1]
    np.testing.assert_array_equal(tiles, expected)
    assert reader.decodes == 1 + 1 + 1 + 1 + 1   # tiles 0, 1, 8, 9 and the corner one


@pytest.mark.parametrize("batch_size,queue_batches", [(64, 4), (7, 1), (300, 2)])
def test_each_source_tile_is_decoded_exactly_once(camelyon_512, monkeypatch, batch_size, queue_batches):
    """A whole 224-px grid over 512-px tiles: one libjpeg call per source tile used, ~0.2 per patch."""
    import imagecodecs

    calls: list[int] = []
    decode = imagecodecs.jpeg8_decode

    def counting_decode(data, **kwargs):   # counts the codec's own calls, not the reader's tally
        calls.append(len(data))
        return decode(data, **kwargs)

    monkeypatch.setattr(imagecodecs, "jpeg8_decode", counting_decode)
    coords = _grid(0, 0, 4096, 4096)
    with open_slide(camelyon_512) as slide:
        reader = make_tile_reader(slide, coords, workers=3, batch_size=batch_size,
                                  queue_batches=queue_batches)
        n = sum(len(b.index) for b in reader)
    assert n == len(coords) == 19 * 19
    used = _source_tiles(coords, 4096, 4096, 512, 512)
    assert len(calls) == reader.decodes == len(used) == 64            # each one once
    assert len(calls) / n < 0.2
    assert not reader._cache                                          # all dropped at their last use
    assert 0 < reader.cache_high_water <= reader.plan.peak_tiles      # the bound computed up front
    if batch_size * queue_batches < 19 * 4:                           # read-ahead of a few patch rows:
        assert reader.plan.peak_tiles <= 8 * 3                        # at most three tile rows held


def _with_tile(path, tmp_path, name, index, change):
    """A copy of `path` whose level-0 tile `index` is changed by `change(file, offset, count)`."""
    out = tmp_path / name
    out.write_bytes(path.read_bytes())
    with tifffile.TiffFile(out, mode="r+b") as tif:
        page = tif.pages[0]
        change(tif, page, int(page.dataoffsets[index]), int(page.databytecounts[index]))
    return out


def test_an_absent_tile_is_white_as_in_openslide(he_512, tmp_path):
    def drop(tif, page, offset, count):   # a zero-byte tile, as scanners leave for empty glass
        counts = list(page.databytecounts)
        counts[9] = 0
        page.tags["TileByteCounts"].overwrite(counts)

    absent = _with_tile(he_512, tmp_path, "absent.tif", 9, drop)   # tile (1, 1) of 8 columns
    coords = np.array([[300, 300], [512, 512], [700, 800], [1100, 700], [0, 0]])
    reader, tiles, expected = _read(absent, coords, workers=2)
    np.testing.assert_array_equal(tiles, expected)
    assert (tiles[1] == 255).all()                          # wholly inside the absent tile
    assert (tiles[0][212:, 212:] == 255).all() and not (tiles[0][:200, :200] == 255).all()
    assert reader.absent == 1 and reader.decodes == 4       # tiles 0, 1, 8, 10; 9 is absent


def test_a_corrupt_tile_is_a_slide_error_naming_slide_and_region(camelyon_512, tmp_path):
    def zero(tif, page, offset, count):
        tif.filehandle.seek(offset)
        tif.filehandle.write(bytes(count))

    bad = _with_tile(camelyon_512, tmp_path, "bad_tile.tif", 10, zero)   # tile (2, 1)
    coords = np.concatenate([_grid(0, 0, 896, 224), [[1100, 600]]])
    with open_slide(bad) as slide:
        reader = make_tile_reader(slide, coords, workers=2, batch_size=4, queue_batches=1)
        batches = iter(reader)
        assert len(next(batches).index) == 4                # the good patches come first
        with pytest.raises(SlideError, match=r"bad_tile\.tif.*\(1100, 600\).*tile 10 .*\(1024, 512\).*"
                                             r"corrupt or truncated tile data"):
            next(batches)
    assert not _reader_threads()


def _damage(kind, stream):
    half = len(stream) // 2
    return {"cut short": stream[:half] + bytes(len(stream) - half),          # zeroed tail
            "cut, then end marker": stream[:half] + b"\xff\xd9" + bytes(len(stream) - half - 2),
            "stray marker": stream[:half] + b"\xff\xc0" + stream[half + 2:]}[kind]


@pytest.mark.parametrize("kind", ["cut short", "cut, then end marker", "stray marker"])
@pytest.mark.parametrize("slide", ["camelyon_512", "tcga"])
def test_damaged_tile_data_fails_where_openslide_fails(request, tmp_path, kind, slide):
    """Damaged JPEG data that libjpeg decodes with only a warning (imagecodecs would return grey
    or smeared pixels) is an error for OpenSlide and so for this reader; OpenJPEG (both readers'
    JPEG 2000 decoder) decodes these damaged codestreams, to the same pixels in both."""
    path = TCGA_JP2K if slide == "tcga" else request.getfixturevalue(slide)
    # a patch inside tile (8, 4) of 18 columns (TCGA) / (2, 2) of 8 columns
    index, patch = (4 * 18 + 8, [2100, 1050]) if slide == "tcga" else (18, [1100, 1100])

    def damage(tif, page, offset, count):
        tif.filehandle.seek(offset)
        stream = tif.filehandle.read(count)
        tif.filehandle.seek(offset)
        tif.filehandle.write(_damage(kind, stream))

    bad = _with_tile(path, tmp_path, f"damaged{path.suffix}", index, damage)
    outcome = {}
    with open_slide(bad) as slide_:
        for reader in ("openslide", "decode-once"):
            try:
                outcome[reader] = np.concatenate([b.tiles.copy() for b in
                                                  make_tile_reader(slide_, [patch], reader=reader)])
            except SlideError as exc:
                assert "damaged" in str(exc) and "corrupt or truncated tile data" in str(exc)
                outcome[reader] = "error"
    if slide == "camelyon_512":
        assert outcome == {"openslide": "error", "decode-once": "error"}
    else:
        assert np.abs(outcome["openslide"].astype(np.int16) - outcome["decode-once"]).max() <= 2


def test_tile_data_past_the_end_of_the_file_is_a_slide_error(camelyon_512, tmp_path):
    def past_end(tif, page, offset, count):
        offsets = list(page.dataoffsets)
        offsets[20] = len(camelyon_512.read_bytes()) - 10
        page.tags["TileOffsets"].overwrite(offsets)

    bad = _with_tile(camelyon_512, tmp_path, "cut.tif", 20, past_end)   # tile (4, 2)
    with open_slide(bad) as slide:
        with pytest.raises(SlideError, match=r"cut\.tif.*\(2100, 1100\).*tile 20 .*truncated.*the file "
                                             r"ends"):
            list(make_tile_reader(slide, [[0, 0], [2100, 1100]]))


def test_read_ahead_is_bounded_and_close_is_prompt(camelyon_512):
    coords = _grid(0, 0, 4096, 4096)
    with open_slide(camelyon_512) as slide:
        reader = make_tile_reader(slide, coords, workers=2, batch_size=8, queue_batches=3)
        batches = iter(reader)
        next(batches)
        time.sleep(0.3)      # a slow consumer: decodes stop at the tiles of the queued batches
        ahead = set().union(*(set(t.tolist()) for t in reader.plan.batch_tiles[:4]))
        assert 0 < reader.decodes <= len(ahead) < 64
        started = time.perf_counter()
        reader.close()
        assert time.perf_counter() - started < 0.5
        decodes = reader.decodes
        time.sleep(0.1)
        assert reader.decodes == decodes and not _reader_threads()


def test_close_from_another_thread_ends_the_iteration(camelyon_512):
    """What the gRPC server does on a client's cancel: close() from its callback thread."""
    coords = np.tile(_grid(0, 0, 4096, 4096), (20, 1))   # long enough to be cut short
    with open_slide(camelyon_512) as slide:
        reader = make_tile_reader(slide, coords, workers=2, batch_size=32)
        threading.Timer(0.2, reader.close).start()
        started = time.perf_counter()
        received = sum(len(b.index) for b in reader)
    assert received < len(coords) and time.perf_counter() - started < 3
    assert not _reader_threads()


def test_which_reader_runs_and_the_log_line(he_tiff, lossless_tiff, caplog, monkeypatch):
    coords = _grid(0, 0, 672, 448)
    caplog.set_level(logging.INFO, logger="wsi.decode_once")
    with open_slide(he_tiff) as slide:
        reader = make_tile_reader(slide, coords)
        assert isinstance(reader, DecodeOnceReader)
        assert "tile reader: decode-once, level 0, JPEG 256x256 tiles" in caplog.text
        reader.close()
        # a coarser level is tiled JPEG too: read from there (wsi.scale's reads)
        reader = make_tile_reader(slide, coords, level=1, tile_size=112, out_size=224)
        assert isinstance(reader, DecodeOnceReader)
        assert "tile reader: decode-once, level 1" in caplog.text
        reader.close()
        monkeypatch.setattr(slide, "reader", "tiffslide 2.5", raising=False)   # wsi.slide's OME path
        assert isinstance(make_tile_reader(slide, coords), TileReader)
        assert "opened by tiffslide 2.5, not OpenSlide" in caplog.text
        monkeypatch.delattr(slide, "reader", raising=False)
        monkeypatch.setenv(READER_ENV, "openslide")
        assert isinstance(make_tile_reader(slide, coords), TileReader)
        monkeypatch.setenv(READER_ENV, "fastest")
        with pytest.raises(ConfigError, match="fastest"):
            make_tile_reader(slide, coords)
    monkeypatch.delenv(READER_ENV)
    caplog.clear()
    with open_slide(lossless_tiff[0]) as slide:               # zlib tiles: OpenSlide reads them
        reader = make_tile_reader(slide, coords)
        assert isinstance(reader, TileReader)
        assert "OpenSlide read_region" in caplog.text and "compression 8" in caplog.text
        list(reader)
        with pytest.raises(ConfigError, match="decode-once reader cannot read it"):
            make_tile_reader(slide, coords, reader="decode-once")


def test_bad_parameters_and_single_use(he_tiff):
    with open_slide(he_tiff) as slide:
        with pytest.raises(MilroiError):
            make_tile_reader(slide, _grid(0, 0, 448, 448), workers=0)
        reader = make_tile_reader(slide, _grid(0, 0, 448, 448))
        assert len(reader) == 1
        list(reader)
        with pytest.raises(MilroiError, match="once"):
            list(reader)


@pytest.mark.parametrize("slide", ["camelyon_512", "cmu", "he_tiff"])
def test_self_contained_jpeg_streams_decode_to_the_same_pixels(request, slide):
    """The streams a GPU batch decoder would be given (tables inlined, RGB-coded tiles marked)
    decode, with no TIFF side information, to the reader's pixels: in libjpeg-turbo
    (imagecodecs) and in Pillow's decoder."""
    import io
    import os

    import imagecodecs
    from PIL import Image

    path = CMU_SMALL if slide == "cmu" else request.getfixturevalue(slide)
    with open_slide(path) as slide_:
        source = tiled_level(slide_)
    assert (source.jpeg_tables is not None) == (slide != "he_tiff")
    assert (source.jpeg_colorspace == "RGB") == (slide == "cmu")
    fd = os.open(path, os.O_RDONLY)
    try:
        for index in np.linspace(0, len(source.offsets) - 1, 6).astype(int):
            expected = source.decode(fd, index)
            stream = source.jpeg_stream(fd, index)
            np.testing.assert_array_equal(imagecodecs.jpeg8_decode(stream), expected)
            pillow = np.asarray(Image.open(io.BytesIO(stream)).convert("RGB"))
            assert np.abs(pillow.astype(np.int16) - expected).max() <= 2
    finally:
        os.close(fd)
