"""Decode a slide's level-0 JPEG tiles on the GPU (nvImageCodec / nvJPEG) straight into the
backbone's input buffer: issue 26's GPU path, beside the CPU decode-once reader.

The plan is the decode-once reader's (wsi.decode_once: `make_plan`, `patch_tiles`): every source
tile a batch needs is decoded once, at the first batch that needs it, kept on the device until
the last batch that needs it, and the 224-px patches are cut from the decoded tiles in grid
order. Here the decode runs on the GPU (one batched nvImageCodec call per batch: nvJPEG's
hardware engine on A100/H100, else its CUDA decoder) and the patches are assembled on the device
into one contiguous uint8 NHWC buffer [n, 224, 224, 3], the backbone's input, so no pixel
crosses the PCIe bus.

How the engine takes a batch (no host round trip): the reader yields `TileBatch`es whose
`tiles` is a `DeviceBatch` (uint8 NHWC on CUDA device `device_id`, `__cuda_array_interface__`,
`.ptr`, `.shape`), ready to read (the decode stream was synchronised before it was yielded):

    binding = backbone_session.io_binding()
    binding.bind_input("tiles", "cuda", batch.tiles.device_id, np.uint8,
                       list(batch.tiles.shape), batch.tiles.ptr)
    binding.bind_output("features", "cuda", batch.tiles.device_id)
    backbone_session.run_with_iobinding(binding)

A batch's buffer goes back to the reader's pool when the last reference to its DeviceBatch (and
to the views sliced from it) is dropped, never earlier: keep the batch while the engine runs it
(onnxruntime's `run_with_iobinding` returns once the run is done), then let it go.
`DeviceBatch.to_host()` copies it back, for tests and for what needs host pixels (the artefact
measures of serving.pipeline read `batch.tiles` on the host: the engine wiring must give them a
host copy, or measure on the device).

Cropping on the device without torch or cupy: each patch is at most four rectangles of decoded
tiles, and a rectangle copy between two pitched buffers is what `cudaMemcpy2DAsync` does (a
white fill: `cudaMemset2DAsync`). Those calls come from NVIDIA's `cuda-bindings` (cuda.bindings
.runtime: a thin, versioned binding of the CUDA runtime that the `gpu` extra installs, a few MB),
so the serve image needs neither torch nor cupy (70 MB and a kernel compiler cache) for one
strided copy. Decoding "straight into place" with nvImageCodec's ROI decode is not possible:
its `decode(..., image=)` reuses only Images whose buffer it allocated itself, and ROI decode
would decode a tile once per patch part instead of once.

The nvJPEG buffer-reuse hazard (pytorch/vision#9606, meta-pytorch/torchcodec#1634): nvJPEG's
hardware engine writes its destinations without waiting for the work queued on the stream it is
given, so a freed buffer handed to a decode while queued copies still read it is overwritten.
This reader therefore synchronises its stream before every decode call and before it drops a
decoded tile or hands out a batch buffer: the decoder never sees a stream with work queued on it.

What it decodes: JPEG tiles in YCbCr (generic tiled TIFF as Camelyon16 ships it, shared
JPEGTables; Aperio SVS with YCbCr JPEG), each given to the decoder as one self-contained stream
(`TiledLevel.jpeg_stream`). Absent (zero-byte) tiles are white, as on the CPU. Everything else
stays on the CPU reader (`gpu_source` says why): JPEG 2000 tiles, and Aperio's RGB-coded JPEG,
because nvImageCodec's JPEG parser takes every 3-component JPEG as YCbCr (it ignores the Adobe
APP14 transform flag) so nvJPEG would colour-convert RGB samples; a GPU test checks that claim.
Pixels: nvJPEG with fancy (interpolated) chroma upsampling, as libjpeg-turbo does by default;
tests allow max |diff| <= 2 against the CPU reader (nvJPEG's IDCT is not libjpeg's islow one).
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from core.errors import ConfigError, MilroiError, SlideError
from core.runtime import available_cores
from core.tiling import DEFAULT_TILING
from wsi.decode_once import (
    JPEG,
    NotApplicable,
    ReadPlan,
    TiledLevel,
    check_jpeg_stream,
    make_plan,
    patch_tiles,
    tiled_level,
)
from wsi.tiles import QueuedBatchReader

log = logging.getLogger(__name__)

# `0` turns the GPU decode off everywhere (the CPU reader runs), e.g. to compare pixels.
GPU_DECODE_ENV = "MILROI_GPU_DECODE"
# The most device memory the decoded-tile cache may need (its peak is known before reading).
MAX_DEVICE_CACHE_BYTES = 4 << 30
WHITE = 255   # off-slide and absent tiles, as OpenSlide draws them
# nvJPEG's hardware engine, then its CUDA decoders; never the CPU backend (its output is on the
# host). Fancy upsampling: interpolated chroma, libjpeg-turbo's default (and OpenSlide's).
_DECODER_OPTIONS = ":fancy_upsampling=1"


class GpuDecodeError(RuntimeError):
    """The CUDA runtime or nvImageCodec failed: the machine's fault, not the request's (the
    slide's bad data is a SlideError), so not a MilroiError: the server answers INTERNAL."""


# -- availability -------------------------------------------------------------------------------

@functools.cache
def gpu_decode_available(device_id: int = 0) -> tuple[bool, str]:
    """(True, what runs) when JPEG tiles can be decoded on CUDA device `device_id`, else (False,
    why not). Never raises: a CPU machine gets False and the reason, and the CPU reader runs.

    Checked in the order that keeps a CPU machine quiet: $MILROI_GPU_DECODE, the CUDA runtime
    binding (cuda-bindings), a device and a driver, then nvImageCodec (its import prints errors
    when the nvJPEG library is missing, so it comes last) and one real decode of a small JPEG
    on the device (nvImageCodec loads without nvJPEG and only fails when asked to decode)."""
    if os.environ.get(GPU_DECODE_ENV, "1") == "0":
        return False, f"{GPU_DECODE_ENV}=0"
    try:
        from cuda.bindings import runtime as cudart
    except Exception as exc:   # ImportError, or a binding whose libraries do not load
        return False, f"cuda-bindings is not installed (pip install milroi[gpu]): {exc}"
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception as exc:   # a binding that cannot load libcudart
        return False, f"the CUDA runtime does not load: {exc!r}"
    if err != cudart.cudaError_t.cudaSuccess:
        return False, f"no usable CUDA device: {_cuda_error_text(cudart, err)}"
    if device_id >= count:
        return False, f"CUDA device {device_id} asked for, {count} present"
    try:
        from nvidia import nvimgcodec
    except Exception as exc:   # ImportError, or its libnvimgcodec.so failing to load
        return False, f"nvImageCodec is not installed (pip install milroi[gpu]): {exc}"
    try:
        decoder = _make_decoder(nvimgcodec, device_id)
        import imagecodecs

        probe = np.zeros((16, 16, 3), np.uint8)
        probe[:, 8:] = (200, 40, 90)
        image = decoder.decode(nvimgcodec.CodeStream(imagecodecs.jpeg8_encode(probe, level=95)),
                               params=_decode_params(nvimgcodec))
        if image is None or image.buffer_kind != nvimgcodec.ImageBufferKind.STRIDED_DEVICE:
            return False, "nvImageCodec cannot decode JPEG on the device (nvJPEG library missing?)"
    except Exception as exc:
        return False, f"nvImageCodec does not decode on device {device_id}: {exc!r}"
    return True, (f"nvImageCodec {nvimgcodec.__version__} (CUDA {nvimgcodec.__cuda_version__}) "
                  f"on device {device_id}")


def _cuda_error_text(cudart, err) -> str:
    try:
        return f"{err.name}: {cudart.cudaGetErrorString(err)[1].decode()}"
    except Exception:
        return str(err)


def _make_decoder(nvimgcodec, device_id: int):
    kinds = (nvimgcodec.BackendKind.HW_GPU_ONLY, nvimgcodec.BackendKind.GPU_ONLY,
             nvimgcodec.BackendKind.HYBRID_CPU_GPU)
    return nvimgcodec.Decoder(device_id=device_id, max_num_cpu_threads=available_cores(),
                              backends=[nvimgcodec.Backend(k) for k in kinds],
                              options=_DECODER_OPTIONS)


def _decode_params(nvimgcodec):
    return nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                   sample_format=nvimgcodec.SampleFormat.I_RGB)


# -- what the GPU decodes, and the device assembly plan (plain numpy) --------------------------

def gpu_source(slide) -> TiledLevel:
    """The level-0 tile index of `slide` when the GPU decoder reads it; raises NotApplicable
    with the reason otherwise (then the CPU reader, decode-once or OpenSlide, runs)."""
    level = tiled_level(slide)
    if level.compression != JPEG:
        raise NotApplicable(f"{level.kind} tiles: the GPU path decodes JPEG only")
    if level.jpeg_colorspace == "RGB":
        raise NotApplicable("RGB-coded JPEG (Aperio): nvImageCodec reads 3-component JPEG as "
                            "YCbCr whatever its Adobe marker says")
    return level


@dataclass
class BatchAssembly:
    """What the device does for one batch of patches [start, stop), in this order."""

    start: int
    stop: int
    decode: np.ndarray    # source tiles first needed by this batch (decoded now), ascending
    fill: np.ndarray      # batch rows painted white first (off the slide, or an absent tile)
    copies: np.ndarray    # int64 [m, 8]: tile, src y, src x, batch row, dst y, dst x, height, width
    release: np.ndarray   # tiles no later batch needs: dropped once this batch is assembled


COPY_COLUMNS = ("tile", "src_y", "src_x", "row", "dst_y", "dst_x", "height", "width")


def assembly_plan(coords: np.ndarray, tile_size: int, level: TiledLevel, batch_size: int,
                  plan: ReadPlan | None = None) -> list[BatchAssembly]:
    """The decode-once plan as device work: per batch, the tiles to decode (each once, at its
    first batch), the white fills and the rectangle copies that cut every patch from its
    decoded tiles (the same rectangles `DecodeOnceReader._assemble` copies), and the tiles to
    drop after it."""
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    plan = plan or make_plan(coords, tile_size, level, batch_size, 1)
    per_patch = patch_tiles(coords, tile_size, level)
    absent = level.byte_counts == 0
    n_batches = len(plan.batch_tiles)
    first = np.full(len(level.byte_counts), n_batches, np.int64)
    last = np.full(len(level.byte_counts), -1, np.int64)
    for b, tiles in enumerate(plan.batch_tiles):
        first[tiles] = np.minimum(first[tiles], b)
        last[tiles] = b
    # Every (patch, tile) pair: the rectangle of the tile inside the patch, clipped to the image.
    patch, slot = np.nonzero(per_patch >= 0)
    tile = per_patch[patch, slot]
    x, y = coords[patch, 0], coords[patch, 1]
    tx = (tile % level.columns) * level.tile_width
    ty = (tile // level.columns) * level.tile_height
    x0, x1 = np.maximum(x, tx), np.minimum.reduce([x + tile_size, tx + level.tile_width,
                                                   np.full_like(x, level.width)])
    y0, y1 = np.maximum(y, ty), np.minimum.reduce([y + tile_size, ty + level.tile_height,
                                                   np.full_like(y, level.height)])
    copies = np.stack([tile, y0 - ty, x0 - tx, patch, y0 - y, x0 - x, y1 - y0, x1 - x0], axis=1)
    copies = copies[~absent[tile]]
    inside = ((coords >= 0).all(axis=1) & (coords[:, 0] + tile_size <= level.width)
              & (coords[:, 1] + tile_size <= level.height))
    needs_white = ~inside
    needs_white[patch[absent[tile]]] = True
    out = []
    order = np.argsort(copies[:, 3], kind="stable")
    copies = copies[order]
    bounds = np.searchsorted(copies[:, 3], np.arange(0, n_batches + 1) * batch_size)
    for b, tiles in enumerate(plan.batch_tiles):
        start, stop = b * batch_size, min((b + 1) * batch_size, len(coords))
        mine = copies[bounds[b]:bounds[b + 1]].copy()
        mine[:, 3] -= start
        present = tiles[~absent[tiles]]
        out.append(BatchAssembly(start, stop, present[first[present] == b],
                                 np.flatnonzero(needs_white[start:stop]), mine,
                                 present[last[present] == b]))
    return out


def assemble_on_host(step: BatchAssembly, decoded: dict[int, np.ndarray], tile_size: int) -> np.ndarray:
    """One batch of the plan executed with numpy on host tiles: the reference the device
    assembly is tested against (the same fills and rectangles, in the same order)."""
    batch = np.empty((step.stop - step.start, tile_size, tile_size, 3), np.uint8)
    batch[step.fill] = WHITE
    for tile, sy, sx, row, dy, dx, h, w in step.copies.tolist():
        batch[row, dy:dy + h, dx:dx + w] = decoded[tile][sy:sy + h, sx:sx + w]
    return batch


# -- device memory --------------------------------------------------------------------------------

class _Cuda:
    """The few CUDA runtime calls this module makes, each checked (cuda.bindings.runtime)."""

    def __init__(self, device_id: int):
        from cuda.bindings import runtime

        self.rt, self.device_id = runtime, device_id
        self.check(runtime.cudaSetDevice(device_id), "cudaSetDevice")
        self.stream = self.check(runtime.cudaStreamCreateWithFlags(
            runtime.cudaStreamNonBlocking), "cudaStreamCreate")

    def check(self, result, what: str):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise GpuDecodeError(f"{what} failed: {_cuda_error_text(self.rt, err)}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def set_device(self) -> None:   # per thread: the CUDA runtime's current device is thread-local
        self.check(self.rt.cudaSetDevice(self.device_id), "cudaSetDevice")

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(nbytes), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self.check(self.rt.cudaFree(ptr), "cudaFree")

    def copy_2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int):
        self.check(self.rt.cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height,
                                             self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                                             self.stream), "cudaMemcpy2DAsync")

    def fill(self, dst: int, nbytes: int, value: int) -> None:
        self.check(self.rt.cudaMemsetAsync(dst, value, nbytes, self.stream), "cudaMemsetAsync")

    def to_host(self, out: np.ndarray, src: int) -> None:
        self.check(self.rt.cudaMemcpy(out.ctypes.data, src, out.nbytes,
                                      self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost), "cudaMemcpy")

    def synchronize(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        self.rt.cudaStreamDestroy(self.stream)


class _BufferPool:
    """Batch buffers of one size on the device: a buffer is handed out again only after every
    DeviceBatch viewing it is gone (weakref.finalize), so a batch the engine still holds is
    never overwritten. Buffers come back after close() are freed."""

    def __init__(self, cuda: _Cuda, nbytes: int):
        self.cuda, self.nbytes = cuda, nbytes
        self._free: list[int] = []
        self._lock = threading.Lock()
        self._closed = False
        self.allocated = 0

    def take(self) -> int:
        with self._lock:
            if self._free:
                return self._free.pop()
            self.allocated += 1
        return self.cuda.malloc(self.nbytes)

    def give_back(self, ptr: int) -> None:
        with self._lock:
            if not self._closed:
                self._free.append(ptr)
                return
        try:   # a batch dropped after close(), possibly as the interpreter exits
            self.cuda.free(ptr)
        except GpuDecodeError as exc:
            log.debug("batch buffer not freed: %s", exc)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
        for ptr in free:
            self.cuda.free(ptr)


class DeviceBatch:
    """uint8 [n, s, s, 3] RGB, NHWC, contiguous, in device memory: the backbone's input.

    `ptr`, `shape`, `device_id` are what onnxruntime's IO binding takes (module docstring);
    `__cuda_array_interface__` (v3) lets cupy / numba / torch view it without a copy. Slicing the
    first axis (`batch[:8]`, `batch[8:]`) gives views of the same memory."""

    def __init__(self, ptr: int, n: int, tile_size: int, device_id: int, owner=None,
                 cuda: _Cuda | None = None):
        self.ptr, self.device_id = int(ptr), int(device_id)
        self.shape = (int(n), int(tile_size), int(tile_size), 3)
        self._owner, self._cuda = owner, cuda   # the owner keeps the pool from reusing the buffer

    dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    @property
    def __cuda_array_interface__(self) -> dict:
        # stream None: the producer synchronised its stream before handing the batch out.
        return {"shape": self.shape, "typestr": "|u1", "data": (self.ptr, False), "version": 3,
                "strides": None, "stream": None}

    def __getitem__(self, key) -> DeviceBatch:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a DeviceBatch slices its first axis with a step of 1 only")
        start, stop, _ = key.indices(len(self))
        stop = max(start, stop)
        row = self.nbytes // max(len(self), 1)
        return DeviceBatch(self.ptr + start * row, stop - start, self.shape[1], self.device_id,
                           owner=self, cuda=self._cuda)

    def to_host(self) -> np.ndarray:
        """A host copy (numpy, uint8 [n, s, s, 3])."""
        out = np.empty(self.shape, np.uint8)
        if out.size:
            self._cuda.to_host(out, self.ptr)
        return out


# -- the reader -----------------------------------------------------------------------------------

class _PendingBatch:
    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop
        self.tiles: DeviceBatch | None = None
        self.assembled: Future | None = None


class GpuDecodeReader(QueuedBatchReader):
    """Iterable of TileBatch over `coords` whose `tiles` is a DeviceBatch (module docstring),
    in the order of `coords`; the same guarantees as the CPU readers: at most `queue_batches`
    batches in work, prompt `close()`, a SlideError naming slide and region on a corrupt tile.

    One producer thread does each batch in order: read the compressed tiles it first needs
    (pread, one self-contained JPEG each), decode them in one batched nvImageCodec call on the
    reader's stream, paint the white rows, cut the patches (cudaMemcpy2DAsync), synchronise,
    drop the tiles no later batch needs. `decodes` counts the tiles decoded (each once)."""

    def __init__(self, slide, coords, level: TiledLevel, tile_size: int = DEFAULT_TILING.tile_size,
                 batch_size: int = 64, queue_batches: int = 4, device_id: int = 0,
                 plan: ReadPlan | None = None):
        if batch_size < 1 or queue_batches < 1:
            raise ConfigError(f"batch_size and queue_batches must be >= 1, got {batch_size}, "
                              f"{queue_batches}")
        if level.compression != JPEG:
            raise ConfigError(f"the GPU reader decodes JPEG tiles, not {level.kind}")
        super().__init__()
        from nvidia import nvimgcodec

        self.slide, self.source = slide, level
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.tile_size, self.batch_size = int(tile_size), int(batch_size)
        self.queue_batches, self.device_id = int(queue_batches), int(device_id)
        self.plan = plan or make_plan(self.coords, self.tile_size, level, self.batch_size,
                                      self.queue_batches)
        self.steps = assembly_plan(self.coords, self.tile_size, level, self.batch_size, self.plan)
        self._nvimgcodec = nvimgcodec
        self._cuda = _Cuda(self.device_id)
        self._decoder = _make_decoder(nvimgcodec, self.device_id)
        self._params = _decode_params(nvimgcodec)
        row_bytes = self.tile_size * self.tile_size * 3
        self._pool = _BufferPool(self._cuda, max(self.batch_size, 1) * row_bytes)
        self._tiles: dict[int, object] = {}   # tile index -> nvimgcodec.Image on the device
        self.decodes = 0
        self.cache_high_water = 0
        self._fd = os.open(level.path, os.O_RDONLY)
        self._producer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-tile-reader")
        self._close_lock = threading.Lock()   # close() runs from the cancel watcher and the loop
        self._next_batch = 0

    def __len__(self) -> int:
        return len(self.steps)

    def _has_next_batch(self) -> bool:
        return self._next_batch < len(self.steps)

    def _submit_next_batch(self) -> None:
        step = self.steps[self._next_batch]
        batch = _PendingBatch(step.start, step.stop)
        batch.assembled = self._producer.submit(self._produce, batch, step)
        self._pending.append(batch)
        self._next_batch += 1

    def _streams(self, step: BatchAssembly) -> list[bytes]:
        streams = []
        for index in step.decode.tolist():
            try:
                stream = self.source.jpeg_stream(self._fd, index)
                check_jpeg_stream(stream)
            except (OSError, ValueError) as exc:
                raise self._tile_error(step, index, exc) from exc
            streams.append(stream)
        return streams

    def _tile_error(self, step: BatchAssembly, index: int, cause) -> SlideError:
        rows = step.copies[step.copies[:, 0] == index, 3]
        x, y = self.coords[step.start + int(rows[0])] if len(rows) else self.source.tile_origin(index)
        return SlideError(self.source.path, f"read of {self.tile_size}x{self.tile_size} px at "
                                            f"({x}, {y}) level 0 failed: level-0 tile {index}: "
                                            f"corrupt or truncated JPEG data: {cause}")

    def _produce(self, batch: _PendingBatch, step: BatchAssembly) -> None:
        if self._closed.is_set():
            raise CancelledError()
        cuda, codec = self._cuda, self._nvimgcodec
        cuda.set_device()
        streams = self._streams(step)
        if streams:
            # Nothing may be queued on the stream when nvJPEG's hardware engine starts writing
            # (the buffer-reuse hazard): every earlier batch ended with a synchronise.
            images = self._decoder.decode([codec.CodeStream(s) for s in streams], params=self._params,
                                          cuda_stream=int(cuda.stream))
            for index, image in zip(step.decode.tolist(), images):
                expected = (self.source.tile_height, self.source.tile_width, 3)
                if image is None or tuple(image.shape) != expected:
                    got = "nothing" if image is None else f"{tuple(image.shape)}"
                    raise self._tile_error(step, index, f"nvImageCodec decoded {got}, not {expected}")
                if image.buffer_kind != codec.ImageBufferKind.STRIDED_DEVICE:
                    image = image.cuda(synchronize=False, cuda_stream=int(cuda.stream))
                self._tiles[index] = image
            self.decodes += len(streams)
            self.cache_high_water = max(self.cache_high_water, len(self._tiles))
        n = step.stop - step.start
        ptr = self._pool.take()
        out = DeviceBatch(ptr, n, self.tile_size, self.device_id, cuda=cuda)
        weakref.finalize(out, self._pool.give_back, ptr)
        ts = self.tile_size
        row_bytes, line = ts * ts * 3, ts * 3
        for row in step.fill.tolist():
            cuda.fill(ptr + row * row_bytes, row_bytes, WHITE)
        for tile, sy, sx, row, dy, dx, h, w in step.copies.tolist():
            image = self._tiles[tile]
            src_ptr = image.__cuda_array_interface__["data"][0]
            pitch = image.strides[0]
            cuda.copy_2d(ptr + row * row_bytes + dy * line + dx * 3, line,
                         src_ptr + sy * pitch + sx * 3, pitch, w * 3, h)
        # The batch is complete, and no copy still reads a tile about to be dropped.
        cuda.synchronize()
        for index in step.release.tolist():
            del self._tiles[index]
        batch.tiles = out

    def _wait_for(self, batch: _PendingBatch) -> bool:
        try:
            batch.assembled.result()
        except CancelledError:
            return False
        except (MilroiError, GpuDecodeError):
            raise
        except Exception as exc:   # nvImageCodec's own errors
            raise GpuDecodeError(f"{self.source.path}: GPU tile decode failed: {exc!r}") from exc
        return not self._closed.is_set()

    def close(self) -> None:
        """Stop reading: queued batches are cancelled, the running one finishes; decoded tiles,
        the stream and the free batch buffers are released (a batch still held by the consumer
        frees its buffer when it is dropped)."""
        self._closed.set()
        self._producer.shutdown(wait=True, cancel_futures=True)
        with self._close_lock:
            if self._fd < 0:
                return
            try:   # a batch that failed half-way may have decodes or copies still queued
                self._cuda.synchronize()
            except GpuDecodeError as exc:
                log.warning("%s: GPU stream not synchronised at close: %s", self.source.path, exc)
            self._tiles.clear()
            self._pool.close()
            self._cuda.close()
            os.close(self._fd)
            self._fd = -1


def make_gpu_tile_reader(slide, coords, tile_size: int = DEFAULT_TILING.tile_size,
                         level: int = 0, batch_size: int = 64, queue_batches: int = 4,
                         device_id: int = 0, out_size: int | None = None) -> GpuDecodeReader | None:
    """A GpuDecodeReader for `slide` when the GPU decodes it, else None (the caller then makes
    the CPU reader, wsi.decode_once.make_tile_reader). Logs which runs and why."""
    name = getattr(slide, "path", "?")
    ok, why = gpu_decode_available(device_id)
    try:
        if not ok:
            raise NotApplicable(why)
        if level != 0 or (out_size or tile_size) != tile_size:
            raise NotApplicable(f"tiles read at level {level} and resized {tile_size} -> "
                                f"{out_size} px for the model's scale; the GPU path decodes "
                                f"level-0 tiles at the model's scale only")
        source = gpu_source(slide)
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        plan = make_plan(coords, tile_size, source, batch_size, queue_batches)
        if plan.peak_bytes > MAX_DEVICE_CACHE_BYTES:
            raise NotApplicable(f"its decoded tiles would peak at {plan.peak_bytes / 2**20:.0f} MiB "
                                f"of device memory (> {MAX_DEVICE_CACHE_BYTES / 2**20:.0f} MiB)")
    except NotApplicable as reason:
        log.info("%s: GPU tile decode not used, the CPU reader runs (%s)", name, reason)
        return None
    used = int(np.count_nonzero(plan.uses))
    log.info("%s: tile reader: GPU decode (%s), JPEG %dx%d tiles: %d patches from %d source tiles "
             "(%.2f per patch), device cache peak %d tiles (%.0f MiB)", name, why, source.tile_width,
             source.tile_height, len(coords), used, used / max(len(coords), 1), plan.peak_tiles,
             plan.peak_bytes / 2**20)
    return GpuDecodeReader(slide, coords, source, tile_size=tile_size, batch_size=batch_size,
                           queue_batches=queue_batches, device_id=device_id, plan=plan)
