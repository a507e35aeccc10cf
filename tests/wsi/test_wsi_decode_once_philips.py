"""wsi.decode_once on Philips TIFF: a synthetic slide as Philips' exporter writes it (tests/
slide_testing.write_philips_tiff), sparse, that OpenSlide itself opens as vendor "philips".
The decode-once reader must give the OpenSlide reader's patches, missing tiles included, with
one decode per stored tile used and none for a missing one."""
from __future__ import annotations

import logging

import numpy as np
import openslide
import pytest
import tifffile
from format_slides import stained_tissue
from slide_testing import write_philips_tiff

from wsi.decode_once import DecodeOnceReader, make_tile_reader, tiled_level
from wsi.slide import open_slide
from wsi.tiles import TileReader

PATCH, TILE, MPP = 224, 512, 0.2273
# 2400 x 1900 px of tissue, padded (as Philips pads) to 5 x 4 tiles of 512: 2560 x 2048.
WIDTH, HEIGHT, COLUMNS = 2560, 2048, 5
# Sparse: tiles left out (row-major): (2, 0), (1, 1), (2, 1), (2, 2) and the corner (4, 3).
MISSING = (2, 6, 7, 12, 19)


def _tissue(seed: int = 5) -> np.ndarray:
    """Stained tissue with grain: every pixel differs from its neighbours, so a patch cropped a
    pixel off, or from the wrong tile, cannot pass for the right one."""
    rng = np.random.default_rng(seed)
    tissue = stained_tissue(2400, seed=seed)[:1900].astype(np.int16)
    return np.clip(tissue + rng.integers(-30, 31, tissue.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def philips(tmp_path_factory):
    return write_philips_tiff(tmp_path_factory.mktemp("philips") / "sparse.tiff", _tissue(),
                              mpp=MPP, levels=3, tile=TILE, missing=MISSING)


def _grid(x0, y0, x1, y1, step=PATCH):
    ys, xs = np.mgrid[y0:y1:step, x0:x1:step]
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


# Patches that touch missing tiles in every way, and the slide's edges.
SPECIAL = np.array([
    [1100, 100],    # wholly inside missing tile 2
    [900, 100],     # across present tile 1 and missing tile 2
    [400, 400],     # across tiles 0, 1, 5 (present) and 6 (missing)
    [900, 900],     # across 6, 7, 12 (missing) and 11 (present)
    [1400, 1400],   # across 12 (missing), 13, 17, 18 (present)
    [2200, 1700],   # inside missing corner tile 19
    [2460, 1948],   # the corner: missing tile 19 and off the slide
    [2460, 10],     # the right edge, present tile 4 and off the slide
    [-100, -50],    # off the top-left
    [10, 1948],     # the bottom edge, present tile 15
])


def _source_tiles(coords):
    """The stored tiles the patches overlap, by hand (pixel ranges clipped to the image)."""
    used = set()
    for x, y in coords.tolist():
        xs = range(max(x, 0), min(x + PATCH, WIDTH))
        ys = range(max(y, 0), min(y + PATCH, HEIGHT))
        if xs and ys:
            used |= {r * COLUMNS + c for c in range(xs[0] // TILE, xs[-1] // TILE + 1)
                     for r in range(ys[0] // TILE, ys[-1] // TILE + 1)}
    return used


def test_openslide_reads_it_as_philips_with_the_xml_pixel_size(philips):
    with open_slide(philips) as slide:
        assert slide.vendor == "philips" and slide.reader == "openslide"
        assert slide.dimensions == (WIDTH, HEIGHT)
        # levels 1-2 are padded to whole tiles in the file; OpenSlide sizes them by the spacings
        assert slide.level_dimensions == ((WIDTH, HEIGHT), (1280, 1024), (640, 512))
        assert slide.properties["philips.DICOM_PIXEL_SPACING"] == f'"{MPP / 1000:.6g}" "{MPP / 1000:.6g}"'
        # No resolution tags to fall back on: the pixel size is the XML's, via openslide.mpp-x/y.
        assert "tiff.ResolutionUnit" not in slide.properties or \
            slide.properties["tiff.ResolutionUnit"] == "none"
        assert slide.mpp_source == "metadata" and slide.mpp == pytest.approx(MPP)
        source = tiled_level(slide)
    with tifffile.TiffFile(philips) as tif:
        assert tif.is_philips and tif.pages[0].is_tiled     # page 0 is level 0, XML and all
        assert tif.pages[1].imagewidth == 1536               # the padded level 1 (1280 px true)
    assert (source.tile_width, source.tile_height, source.kind) == (TILE, TILE, "JPEG")
    assert source.jpeg_tables is not None                    # one shared JPEGTables tag
    assert set(np.flatnonzero(source.byte_counts == 0)) == set(MISSING)
    assert (source.offsets[list(MISSING)] == 0).all()


def test_missing_tiles_are_transparent_in_openslide_and_white_in_milroi(philips):
    """What the OpenSlide reader path gives: OpenSlide leaves a missing tile transparent (alpha 0;
    its philips driver paints nothing there) and wsi.slide composites that on white."""
    with open_slide(philips) as slide:
        rgba = np.asarray(slide.openslide.read_region((900, 100), 0, (PATCH, PATCH)))
        rgb = slide.read_region(900, 100, PATCH, PATCH)
    assert (rgba[:, 124:, 3] == 0).all() and (rgba[:, :124, 3] == 255).all()   # tile 2 from x 1024
    assert (rgb[:, 124:] == 255).all() and not (rgb[:, :124] == 255).all()


def test_pixels_are_the_openslide_readers_including_missing_tiles(philips, caplog):
    coords = np.concatenate([_grid(0, 0, WIDTH, HEIGHT), SPECIAL])
    caplog.set_level(logging.INFO, logger="wsi.decode_once")
    with open_slide(philips) as slide:
        reader = make_tile_reader(slide, coords, workers=3, batch_size=16)
        assert isinstance(reader, DecodeOnceReader)
        assert "tile reader: decode-once, level 0, JPEG 512x512 tiles (philips)" in caplog.text
        tiles = np.concatenate([b.tiles.copy() for b in reader])
        expected = np.concatenate([b.tiles.copy() for b in
                                   make_tile_reader(slide, coords, reader="openslide", workers=3)])
    assert "tile reader: OpenSlide read_region" in caplog.text     # the second, forced one
    diff = np.abs(tiles.astype(np.int16) - expected)
    assert diff.max() <= 2, f"max |diff| {diff.max()}"
    special = tiles[-len(SPECIAL):]
    assert (special[0] == 255).all() and (special[5] == 255).all()      # wholly missing: white
    assert (special[1][:, 124:] == 255).all() and (special[1][:, :124] != 255).any()
    # [900, 900]: only its bottom-left quarter lies on a stored tile (11)
    assert (special[3][:124] == 255).all() and (special[3][124:, 124:] == 255).all()
    assert (special[3][124:, :124] != 255).any()
    used = _source_tiles(coords)
    assert reader.decodes == len(used - set(MISSING)) and reader.absent == len(used & set(MISSING))


@pytest.mark.parametrize("coords", [SPECIAL, _grid(300, 200, 1900, 1500)])
def test_one_decode_per_stored_tile_used_and_none_for_missing_ones(philips, monkeypatch, coords):
    """Counted at the codec: each stored tile the patches touch is decoded once, a missing tile
    never (its zero bytes are not even read)."""
    import imagecodecs

    calls: list[int] = []
    decode = imagecodecs.jpeg8_decode

    def counting_decode(data, **kwargs):
        calls.append(len(data))
        return decode(data, **kwargs)

    monkeypatch.setattr(imagecodecs, "jpeg8_decode", counting_decode)
    with open_slide(philips) as slide:
        source = tiled_level(slide)
        reader = make_tile_reader(slide, coords, workers=2, batch_size=3, queue_batches=2)
        assert sum(len(b.index) for b in reader) == len(coords)
    used = _source_tiles(coords)
    stored = sorted(used - set(MISSING))
    assert sorted(calls) == sorted(int(source.byte_counts[i]) for i in stored)   # those, once each
    assert reader.decodes == len(stored) and reader.absent == len(used & set(MISSING)) > 0
    assert not reader._cache


def test_philips_dp_v11_depth_tags(tmp_path):
    """Philips DP v1.1 writes ImageDepth and TileDepth = the level count; OpenSlide ignores
    them, tifffile undoes them for a Philips file, so the decode-once reader still reads it."""
    path = write_philips_tiff(tmp_path / "dp11.tiff", _tissue()[:700, :1000], mpp=MPP, levels=2,
                              missing=(1,), depth_tags=True)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].tags["ImageDepth"].value == 2 and tif.pages[0].imagedepth == 1
    coords = _grid(0, 0, 1024, 1024, step=200)
    with open_slide(path) as slide:
        assert slide.vendor == "philips"
        reader = make_tile_reader(slide, coords)
        assert isinstance(reader, DecodeOnceReader)
        tiles = np.concatenate([b.tiles.copy() for b in reader])
        expected = np.stack([slide.read_region(int(x), int(y), PATCH, PATCH) for x, y in coords])
    assert np.abs(tiles.astype(np.int16) - expected).max() <= 2
    assert reader.absent == 1


def test_philips_that_tifffile_does_not_recognise_goes_to_openslide(tmp_path, caplog):
    """OpenSlide takes any Software starting "Philips"; tifffile wants "Philips DP" (and only
    then undoes DP v1.1's depth tags): without it, the OpenSlide reader runs and says why."""
    path = write_philips_tiff(tmp_path / "other.tiff", _tissue()[:700, :1000], mpp=MPP, levels=2,
                              software="Philips IntelliSite")
    caplog.set_level(logging.INFO, logger="wsi.decode_once")
    with open_slide(path) as slide:
        assert openslide.OpenSlide(str(path)).properties["openslide.vendor"] == "philips"
        reader = make_tile_reader(slide, _grid(0, 0, 672, 448))
        assert isinstance(reader, TileReader)
        reader.close()
    assert "tile reader: OpenSlide read_region" in caplog.text
    assert "tifffile finds no Philips DP metadata" in caplog.text
