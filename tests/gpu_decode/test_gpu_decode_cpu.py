"""wsi.gpu_decode, what a CPU can check: the JPEG streams the GPU decoder is given decode to the
CPU reader's pixels, the device work plan is the decode-once plan (each source tile decoded
once, the same crops) and gives the CPU reader's patches when executed, and what is not decoded
on the GPU (no device, JPEG 2000, RGB-coded JPEG) goes to the CPU reader with a log line."""
from __future__ import annotations

import logging
import os

import imagecodecs
import numpy as np
import pytest
from gpu_slides import ABSENT_TILE, CMU_SMALL, TCGA_JP2K

from wsi import gpu_decode
from wsi.decode_once import NotApplicable, make_tile_reader, patch_tiles, tiled_level
from wsi.gpu_decode import (
    assemble_on_host,
    assembly_plan,
    gpu_decode_available,
    gpu_source,
    make_gpu_tile_reader,
)
from wsi.slide import open_slide

PATCH = 224
SLIDES = ["camelyon_512", "camelyon_256", "edges_absent", "cmu"]


def _grid(x0, y0, x1, y1, step=PATCH):
    ys, xs = np.mgrid[y0:y1:step, x0:x1:step]
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


def _path(request, name):
    return CMU_SMALL if name == "cmu" else request.getfixturevalue(name)


def _coords(slide):
    """The whole slide's grid, a grid shifted off the tile boundaries, and patches hanging over
    every edge and one wholly off the slide."""
    w, h = slide.dimensions
    return np.concatenate([_grid(0, 0, w, h), _grid(100, 37, w, h, step=3 * PATCH),
                           [[-100, -50], [w - 100, h - 30], [w - 50, 10], [10, h - 60],
                            [w + 500, h + 500]]])


def _streams(slide, indices):
    """{tile: the self-contained JPEG stream the GPU decoder gets} and {tile: CPU reader's tile}."""
    level = tiled_level(slide)
    fd = os.open(level.path, os.O_RDONLY)
    try:
        return ({i: level.jpeg_stream(fd, i) for i in indices},
                {i: level.decode(fd, i) for i in indices})
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", SLIDES)
def test_the_gpu_streams_decode_alone_to_the_cpu_readers_pixels(request, name):
    """Each stream read with no TIFF side information (tables merged in, Adobe APP14 marker on
    RGB-coded tiles) decodes to exactly the tile the CPU decode-once reader crops from."""
    with open_slide(_path(request, name)) as slide:
        level = tiled_level(slide)
        used = np.unique(patch_tiles(_coords(slide), PATCH, level))
        used = [int(i) for i in used if i >= 0 and level.byte_counts[i] > 0]
        streams, tiles = _streams(slide, used)
    assert len(used) >= 4
    for index in used:
        alone = imagecodecs.jpeg8_decode(streams[index])   # no tables=, no colorspace=
        np.testing.assert_array_equal(alone, tiles[index], err_msg=f"{name} tile {index}")


try:   # the nvImageCodec wheel imports without a GPU (its CPU backend is libjpeg-turbo)
    from nvidia import nvimgcodec
except ImportError:
    nvimgcodec = None
needs_nvimgcodec = pytest.mark.skipif(nvimgcodec is None, reason="nvidia-nvimgcodec-cu13 not installed")


@needs_nvimgcodec
@pytest.mark.parametrize("name", SLIDES)
def test_nvimagecodec_parses_the_streams_and_its_libjpeg_backend_gives_the_same_pixels(request, name):
    """nvImageCodec's own JPEG parser reads every stream (size, 8-bit, 3 channels) and its CPU
    backend (libjpeg-turbo, the same API as the GPU one) decodes them to the CPU reader's tiles."""
    decoder = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                                 backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)],
                                 options=gpu_decode._DECODER_OPTIONS)
    with open_slide(_path(request, name)) as slide:
        level = tiled_level(slide)
        present = np.flatnonzero(level.byte_counts > 0)[:12]
        streams, tiles = _streams(slide, present.tolist())
    sources = [nvimgcodec.CodeStream(streams[int(i)]) for i in present]
    for source in sources:
        assert (source.codec_name, source.width, source.height, source.num_channels) == \
            ("jpeg", level.tile_width, level.tile_height, 3)
    images = decoder.decode(sources, params=gpu_decode._decode_params(nvimgcodec))
    for index, image in zip(present.tolist(), images):
        np.testing.assert_array_equal(np.asarray(image.cpu()), tiles[index])


@needs_nvimgcodec
def test_nvimagecodec_reads_an_rgb_coded_jpeg_as_ycbcr_so_the_gpu_leaves_it_to_the_cpu():
    """Why Aperio's RGB-coded JPEG stays on the CPU: nvImageCodec's parser calls every
    3-component stream YCbCr (it ignores the Adobe transform flag), so its nvJPEG decoders would
    colour-convert these RGB samples."""
    with open_slide(CMU_SMALL) as slide:
        assert tiled_level(slide).jpeg_colorspace == "RGB"
        streams, _ = _streams(slide, [0])
        assert nvimgcodec.CodeStream(streams[0]).color_spec == nvimgcodec.ColorSpec.SYCC
        with pytest.raises(NotApplicable, match="RGB-coded JPEG"):
            gpu_source(slide)


@pytest.mark.parametrize("name,batch_size", [("camelyon_512", 16), ("camelyon_256", 7),
                                             ("edges_absent", 5), ("cmu", 16)])
def test_the_device_plan_gives_the_cpu_readers_patches(request, name, batch_size):
    """The device work (white fills, rectangle copies from decoded tiles) executed with numpy on
    the decoded streams gives the patches of the CPU decode-once reader, batch by batch."""
    with open_slide(_path(request, name)) as slide:
        coords = _coords(slide)
        level = tiled_level(slide)
        steps = assembly_plan(coords, PATCH, level, batch_size)
        streams, _ = _streams(slide, [int(i) for s in steps for i in s.decode])
        reader = make_tile_reader(slide, coords, tile_size=PATCH, workers=2, batch_size=batch_size,
                                  queue_batches=2, reader="decode-once")
        expected = [b.tiles.copy() for b in reader]
    decoded = {}
    for step, want in zip(steps, expected, strict=True):
        decoded.update({i: imagecodecs.jpeg8_decode(streams[i]) for i in step.decode.tolist()})
        np.testing.assert_array_equal(assemble_on_host(step, decoded, PATCH), want)
        for index in step.release.tolist():
            del decoded[index]   # released at its last use: a later batch needing it would fail
    assert not decoded


@pytest.mark.parametrize("name", ["camelyon_512", "camelyon_256", "edges_absent"])
def test_each_source_tile_used_is_decoded_once_at_its_first_batch(request, name):
    with open_slide(_path(request, name)) as slide:
        coords = _coords(slide)
        level = tiled_level(slide)
    steps = assembly_plan(coords, PATCH, level, 9)
    decoded = np.concatenate([s.decode for s in steps])
    released = np.concatenate([s.release for s in steps])
    used = np.unique(patch_tiles(coords, PATCH, level))
    used = used[(used >= 0) & (level.byte_counts[np.maximum(used, 0)] > 0)]
    assert len(decoded) == len(np.unique(decoded)) == len(used)     # once each, and only those
    np.testing.assert_array_equal(np.sort(decoded), used)
    np.testing.assert_array_equal(np.sort(released), used)
    held: set[int] = set()
    for step in steps:
        held |= set(step.decode.tolist())
        assert set(step.copies[:, 0].tolist()) <= held   # every copy reads a tile decoded by then
        held -= set(step.release.tolist())
    # read_region decodes every tile each patch touches (on a cache miss): far more decodes
    assert 2 * len(decoded) < np.count_nonzero(patch_tiles(coords, PATCH, level) >= 0)


def test_patches_straddling_two_and_four_tiles_and_the_edges(camelyon_512, edges_absent):
    with open_slide(camelyon_512) as slide:
        level = tiled_level(slide)
    coords = np.array([[400, 100], [400, 400], [1024, 1024], [4000, 4000], [-300, 10]])
    (step,) = assembly_plan(coords, PATCH, level, len(coords))
    by_row = {r: step.copies[step.copies[:, 3] == r] for r in range(len(coords))}
    # columns: tile, src y, src x, row, dst y, dst x, height, width
    np.testing.assert_array_equal(by_row[0], [[0, 100, 400, 0, 0, 0, 224, 112],
                                              [1, 100, 0, 0, 0, 112, 224, 112]])
    np.testing.assert_array_equal(by_row[1], [[0, 400, 400, 1, 0, 0, 112, 112],
                                              [1, 400, 0, 1, 0, 112, 112, 112],
                                              [8, 0, 400, 1, 112, 0, 112, 112],
                                              [9, 0, 0, 1, 112, 112, 112, 112]])
    np.testing.assert_array_equal(by_row[2], [[18, 0, 0, 2, 0, 0, 224, 224]])   # on a tile corner
    np.testing.assert_array_equal(by_row[3], [[63, 416, 416, 3, 0, 0, 96, 96]])  # bottom-right edge
    assert len(by_row[4]) == 0                                                   # off the slide
    np.testing.assert_array_equal(step.fill, [3, 4])
    with open_slide(edges_absent) as slide:
        level = tiled_level(slide)
    # 1000 x 900 px, 4 x 4 tiles of 256: tile 5 (x 256-511, y 256-511) is absent
    coords = np.array([[300, 300], [200, 200], [900, 100]])
    (step,) = assembly_plan(coords, PATCH, level, 3)
    assert ABSENT_TILE not in step.decode and ABSENT_TILE not in step.copies[:, 0]
    np.testing.assert_array_equal(step.fill, [0, 1, 2])   # touching the absent tile (2), edge
    np.testing.assert_array_equal(step.copies[step.copies[:, 3] == 0, 0], [6, 9, 10])
    np.testing.assert_array_equal(step.copies[step.copies[:, 3] == 2],
                                  [[3, 100, 132, 2, 0, 0, 156, 100], [7, 0, 132, 2, 156, 0, 68, 100]])


@pytest.mark.skipif(gpu_decode_available()[0], reason="this machine has a CUDA device")
def test_without_a_gpu_decode_is_unavailable_with_a_reason_and_the_cpu_reader_runs(camelyon_512, caplog):
    ok, reason = gpu_decode_available()
    assert not ok and reason
    assert any(word in reason for word in ("CUDA", "cuda-bindings", "nvImageCodec")), reason
    with open_slide(camelyon_512) as slide, caplog.at_level(logging.INFO, logger="wsi"):
        gpu_source(slide)   # the slide itself would be decoded on a GPU
        assert make_gpu_tile_reader(slide, _grid(0, 0, 1024, 1024)) is None
        reader = make_tile_reader(slide, _grid(0, 0, 1024, 1024))
        assert sum(len(b.index) for b in reader) == 25
    assert f"GPU tile decode not used, the CPU reader runs ({reason})" in caplog.text
    assert "tile reader: decode-once" in caplog.text


def test_the_environment_switch_turns_gpu_decode_off(monkeypatch):
    monkeypatch.setenv(gpu_decode.GPU_DECODE_ENV, "0")
    gpu_decode_available.cache_clear()
    try:
        assert gpu_decode_available() == (False, f"{gpu_decode.GPU_DECODE_ENV}=0")
    finally:
        monkeypatch.delenv(gpu_decode.GPU_DECODE_ENV)
        gpu_decode_available.cache_clear()


def test_jpeg_2000_goes_to_the_cpu_reader():
    with open_slide(TCGA_JP2K) as slide:
        with pytest.raises(NotApplicable, match="JPEG 2000 tiles"):
            gpu_source(slide)


def test_a_device_batch_is_what_io_binding_takes_and_slices_without_copying():
    """No device needed to check the description onnxruntime's bind_input and the CUDA array
    interface read: pointer, shape, uint8, contiguous; a slice is an offset into the same memory."""
    from wsi.gpu_decode import DeviceBatch

    batch = DeviceBatch(ptr=1 << 32, n=8, tile_size=PATCH, device_id=1)
    assert batch.shape == (8, PATCH, PATCH, 3) and batch.nbytes == 8 * PATCH * PATCH * 3
    assert batch.__cuda_array_interface__ == {"shape": (8, PATCH, PATCH, 3), "typestr": "|u1",
                                              "data": (1 << 32, False), "version": 3,
                                              "strides": None, "stream": None}
    head, tail = batch[:3], batch[3:]
    assert (head.ptr, head.shape[0], head.device_id) == (1 << 32, 3, 1)
    assert (tail.ptr, len(tail)) == ((1 << 32) + 3 * PATCH * PATCH * 3, 5)
    assert len(batch[6:20]) == 2 and len(batch[5:2]) == 0
    with pytest.raises(TypeError):
        batch[::2]
