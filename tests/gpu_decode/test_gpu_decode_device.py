"""wsi.gpu_decode on a CUDA device (skipped where there is none): the GPU reader's batches, in
device memory, match the CPU decode-once reader's within max |diff| <= 2 (nvJPEG's IDCT is not
libjpeg's islow one; fancy chroma upsampling on both), each source tile is decoded once, buffers
are not overwritten while held, and the reason RGB-coded JPEG stays on the CPU still holds."""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import tifffile
from gpu_slides import CMU_SMALL

from core.errors import SlideError
from wsi.decode_once import make_tile_reader, patch_tiles, tiled_level
from wsi.gpu_decode import DeviceBatch, gpu_decode_available, make_gpu_tile_reader
from wsi.slide import open_slide

AVAILABLE, REASON = gpu_decode_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"no GPU decode here: {REASON}")
PATCH = 224
MAX_DIFF = 2


def _grid(x0, y0, x1, y1, step=PATCH):
    ys, xs = np.mgrid[y0:y1:step, x0:x1:step]
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


def _coords(slide):
    w, h = slide.dimensions
    return np.concatenate([_grid(0, 0, w, h), _grid(100, 37, w, h, step=3 * PATCH),
                           [[-100, -50], [w - 100, h - 30], [w + 500, h + 500]]])


@pytest.mark.parametrize("name,batch_size", [("camelyon_512", 32), ("camelyon_256", 13),
                                             ("edges_absent", 5)])
def test_gpu_batches_match_the_cpu_reader(request, name, batch_size):
    path = request.getfixturevalue(name)
    with open_slide(path) as slide:
        coords = _coords(slide)
        level = tiled_level(slide)
        cpu = np.concatenate([b.tiles.copy() for b in make_tile_reader(
            slide, coords, batch_size=batch_size, reader="decode-once")])
        reader = make_gpu_tile_reader(slide, coords, batch_size=batch_size, queue_batches=3)
        assert reader is not None
        gpu = []
        for batch in reader:
            assert isinstance(batch.tiles, DeviceBatch)
            assert batch.tiles.shape == (len(batch.index), PATCH, PATCH, 3)
            gpu.append(batch.tiles.to_host())
    gpu = np.concatenate(gpu)
    diff = np.abs(gpu.astype(np.int16) - cpu).max(axis=(1, 2, 3))
    assert diff.max() <= MAX_DIFF, f"{name}: max |diff| {diff.max()} at patch {int(diff.argmax())}"
    used = np.unique(patch_tiles(coords, PATCH, level))
    used = used[(used >= 0) & (level.byte_counts[np.maximum(used, 0)] > 0)]
    assert reader.decodes == len(used)                              # each source tile once
    assert reader.cache_high_water <= reader.plan.peak_tiles + 1
    assert (gpu[-1] == 255).all()                                   # off the slide: white


def test_a_held_batch_is_never_overwritten_and_views_share_it(camelyon_512):
    """The engine may hold several batches at once (the pipeline keeps two in flight): their
    buffers are not handed to later batches until dropped."""
    with open_slide(camelyon_512) as slide:
        coords = _grid(0, 0, 4096, 4096)
        reader = make_gpu_tile_reader(slide, coords, batch_size=8, queue_batches=2)
        held, copies = [], []
        for batch in reader:
            held.append(batch.tiles)
            copies.append(batch.tiles.to_host())
        for tiles, copy in zip(held, copies):
            np.testing.assert_array_equal(tiles.to_host(), copy)
        head = held[0][:3]
        np.testing.assert_array_equal(head.to_host(), copies[0][:3])
        assert head.__cuda_array_interface__["data"][0] == held[0].ptr
        allocated = reader._pool.allocated
        assert allocated == len(held)            # none reused while held
        del held, head, batch
        gc.collect()


def test_buffers_are_reused_once_dropped(camelyon_512):
    with open_slide(camelyon_512) as slide:
        reader = make_gpu_tile_reader(slide, _grid(0, 0, 4096, 4096), batch_size=8, queue_batches=2)
        n = sum(len(b.index) for b in reader)
    assert n == 19 * 19
    assert reader._pool.allocated <= 2 + 3   # queue + the one consumed + slack


def test_a_corrupt_tile_is_a_slide_error_naming_the_region(camelyon_512, tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(camelyon_512.read_bytes())
    with tifffile.TiffFile(bad, mode="r+b") as tif:
        page = tif.pages[0]
        tif.filehandle.seek(int(page.dataoffsets[10]))
        tif.filehandle.write(bytes(int(page.databytecounts[10])))
    with open_slide(bad) as slide:
        reader = make_gpu_tile_reader(slide, np.array([[1100, 600]]))
        with pytest.raises(SlideError, match=r"\(1100, 600\)"):
            list(reader)


def test_rgb_coded_jpeg_is_colour_converted_by_the_gpu_decoder():
    """Pins why wsi.gpu_decode.gpu_source leaves Aperio's RGB-coded JPEG to the CPU: nvJPEG
    decodes its RGB samples as YCbCr. If this fails, nvJPEG honours the Adobe marker and the GPU
    path could take these slides too."""
    from nvidia import nvimgcodec

    from wsi import gpu_decode

    with open_slide(CMU_SMALL) as slide:
        level = tiled_level(slide)
        fd = os.open(level.path, os.O_RDONLY)
        try:
            stream, expected = level.jpeg_stream(fd, 0), level.decode(fd, 0)
        finally:
            os.close(fd)
    decoder = gpu_decode._make_decoder(nvimgcodec, 0)
    image = decoder.decode(nvimgcodec.CodeStream(stream), params=gpu_decode._decode_params(nvimgcodec))
    got = np.asarray(image.cpu())
    assert np.abs(got.astype(np.int16) - expected).max() > 10
