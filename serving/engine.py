"""onnxruntime inference for a model bundle, with dynamic batching across concurrent requests.

`Engine(bundle_dir)` opens the three graphs of a bundle (docs/INTERFACES.md):

- execution providers: `provider="auto"` tries TensorRT, CUDA, CPU in that order and keeps the
  first that really initialises. onnxruntime-gpu lists CUDA and TensorRT as *available* even on
  a machine without their libraries and then silently falls back to CPU, so the active provider
  is read back from `session.get_providers()` after creation; an explicit `cuda`/`tensorrt` that
  does not initialise is an error, not a silent CPU run;
- CPU: graph optimisation ALL, intra-op threads = the cores this process may use, one inter-op
  thread, no spin-waiting (the tile-decoding threads need those cores between runs);
- GPU: IO binding (tiles copied to the device once, features stay there between the backbone and
  the head) and optionally an fp16 backbone (`precision="fp16"`, converted at load time with
  onnxruntime.transformers.float16, inputs and outputs kept uint8/float32; TensorRT uses its own
  fp16 mode);
- int8: `precision="int8"` loads the bundle's `backbone_int8.onnx` (static QDQ quantisation made
  at export, training.quantize) instead of backbone.onnx; on AVX-512 VNNI CPUs about 2-3x the
  fp32 speed (benchmarks/results/bench.json);
- CPU backends: on the CPU the backbone runs in onnxruntime or OpenVINO (`backend=`), chosen by
  measurement when `backend` or `precision` is "auto" (core.inference_backends: every allowed
  backend x precision timed on a few batches at load, the fastest that passes the feature
  agreement gate kept, the choice cached per host). On a GPU, precision "auto" times fp32, fp16
  and (CUDA provider) fp16 with NHWC convolutions the same way. The head and the aggregator
  always run in onnxruntime (they are tiny).

Dynamic batching: `submit(tiles)` queues a request and returns a Future. One runner thread takes
queued requests in arrival order and packs them into one run of up to `batch_size` tiles; when
the queue holds less than a full batch it waits at most `max_wait_s` for more. So four clients
scoring at once share full batches instead of each running its own small ones, and one client
alone never waits (a full request runs at once). Requests larger than `batch_size` are split.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.bundle import INT8_ROLE, BundleManifest, bundle_digest
from core.errors import BundleError, ConfigError, MilroiError, RequestError
from core.inference_backends import (
    DEFAULT_BACKEND,
    DEFAULT_PRECISION,
    ONNXRUNTIME,
    OPENVINO,
    Candidate,
    check_choice,
    choose,
    describe_rows,
    he_like_tiles,
    log_table,
    measure,
)
from core.runtime import available_cores, session_options
from results.scored import ModelRef

log = logging.getLogger(__name__)

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
PROVIDER_CHOICES = {"auto": (TRT, CUDA, CPU), "tensorrt": (TRT,), "cuda": (CUDA,), "cpu": (CPU,)}
PROVIDER_NAMES = {TRT: "tensorrt", CUDA: "cuda", CPU: "cpu"}
DEFAULT_PROVIDER = "auto"
GPU_PRECISIONS = ("fp32", "fp16", "int8")   # what onnxruntime's CUDA/TensorRT providers run
DEFAULT_BATCH_SIZE = 64      # tiles per model run
DEFAULT_MAX_WAIT_S = 0.005   # how long the batcher waits to fill a batch


def _tensorrt_loadable() -> bool:
    """Whether the TensorRT runtime library can be loaded (what onnxruntime's TRT provider needs)."""
    import ctypes

    for name in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so", "nvinfer_10.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def on_device(tiles) -> bool:
    """Whether a batch of tiles is in GPU memory (a wsi.gpu_decode.DeviceBatch), not numpy."""
    return hasattr(tiles, "__cuda_array_interface__") and not isinstance(tiles, np.ndarray)


@dataclass
class EngineStats:
    """Counters of the batcher (read by the metrics and the tests)."""

    runs: int = 0          # model runs (batches)
    tiles: int = 0         # tiles scored
    requests: int = 0      # submit() calls completed (after splitting to batch_size)
    merged_runs: int = 0   # runs that combined tiles of more than one request
    run_seconds: float = 0.0


@dataclass
class _Request:
    tiles: np.ndarray
    future: Future
    arrived: float = field(default_factory=time.monotonic)


class Engine:
    """Backbone + head (+ aggregator) sessions of one bundle, and the batcher that feeds them."""

    def __init__(self, bundle_dir: str | os.PathLike, *, provider: str = DEFAULT_PROVIDER,
                 backend: str = DEFAULT_BACKEND, precision: str = DEFAULT_PRECISION,
                 batch_size: int = DEFAULT_BATCH_SIZE, max_wait_s: float = DEFAULT_MAX_WAIT_S,
                 threads: int | None = None, model: ModelRef | None = None,
                 on_batch: Callable[[int, int, float], None] | None = None):
        import onnxruntime as ort

        if provider not in PROVIDER_CHOICES:
            raise ConfigError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDER_CHOICES)}")
        check_choice(backend, precision)
        if backend == OPENVINO and provider in ("cuda", "tensorrt"):
            raise ConfigError(f"backend openvino runs on the CPU; provider {provider} needs "
                              "backend onnxruntime (or auto)")
        if batch_size < 1 or max_wait_s < 0:
            raise ConfigError(f"batch_size must be >= 1 and max_wait_s >= 0, got {batch_size}, {max_wait_s}")
        self._ort = ort
        self.bundle_dir = Path(bundle_dir)
        self.manifest = BundleManifest.read(self.bundle_dir)
        self.model = model or ModelRef(self.manifest.name, bundle_digest(self.bundle_dir),
                                       run_id=self.manifest.run_id or "")
        self.batch_size = int(batch_size)
        self.max_wait_s = float(max_wait_s)
        self.threads = int(threads or available_cores())
        self.tile_size = self.manifest.tiling.tile_size
        self.pooling = dict(self.manifest.pooling)
        self._on_batch = on_batch

        files = self.manifest.files
        self.graphs = {"fp32": self.bundle_dir / files["backbone"]}
        if INT8_ROLE in files:
            self.graphs["int8"] = self.bundle_dir / files[INT8_ROLE]
        elif precision == "int8":
            raise BundleError(self.bundle_dir, "precision int8 needs an int8 backbone "
                                               "(export with --int8: files.backbone_int8)")
        what = f"model {self.model.name} {self.model.version}"
        self.backbone, self.providers, self.choice_table = None, [CPU], []
        self.layout = ""   # "nhwc" when the CUDA provider runs NHWC convolutions
        if backend != OPENVINO and precision in ("auto", *GPU_PRECISIONS):
            self._open_gpu_backbone(provider, precision, what)
        self.on_gpu = self.backbone is not None
        if self.on_gpu:
            self.backend = ONNXRUNTIME
        else:
            if provider in ("cuda", "tensorrt"):
                raise BundleError(self.bundle_dir, f"precision {precision} does not run on "
                                                   f"provider {provider}")
            choice = choose(self.graphs, self._calibration_tiles, self.threads, backend=backend,
                            precision=precision, what=what)
            self.backend, self.precision = choice.backend, choice.precision
            self.choice_table = describe_rows(choice.table)
            self.cpu_features = choice.features
            # The onnxruntime session when onnxruntime runs it (OpenVINO has none).
            self.backbone = getattr(choice.features, "session", None)
        self.provider = self.providers[0]
        # The head and the aggregator are tiny; they run in onnxruntime where the backbone runs.
        active = PROVIDER_NAMES[self.provider]
        self.head, _ = self._open(files["head"], active, "fp32")
        self.aggregator, _ = self._open(files["aggregator"], "cpu", "fp32")
        self.head_outputs = [o.name for o in self.head.get_outputs()]
        log.info("%s: backbone on %s %s (provider %s, session providers %s), batch %d, "
                 "%d CPU threads", what, self.backend, self.precision,
                 PROVIDER_NAMES[self.provider], self.providers, self.batch_size, self.threads)

        self.stats = EngineStats()
        self._queue: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._runner = threading.Thread(target=self._run_loop, name="engine-batcher", daemon=True)
        self._runner.start()

    # -- sessions ------------------------------------------------------------------------------
    def _session_options(self):
        return session_options(self._ort, self.threads)

    def _provider_options(self, name: str, precision: str, layout: str = ""):
        if name == TRT:
            cache = Path(os.environ.get("MILROI_TRT_CACHE", Path.home() / ".cache" / "milroi" / "trt"))
            cache.mkdir(parents=True, exist_ok=True)
            shape = f"tiles:{{}}x{self.tile_size}x{self.tile_size}x3"
            return (TRT, {"trt_fp16_enable": precision == "fp16", "trt_engine_cache_enable": True,
                          "trt_engine_cache_path": str(cache),
                          "trt_profile_min_shapes": shape.format(1),
                          "trt_profile_opt_shapes": shape.format(self.batch_size),
                          "trt_profile_max_shapes": shape.format(self.batch_size)})
        if name == CUDA:
            options = {"cudnn_conv_algo_search": "HEURISTIC"}
            if layout == "nhwc":   # NHWC convolutions (tensor cores' native layout), if built in
                options["prefer_nhwc"] = "1"
            return (CUDA, options)
        return name

    def _model_bytes(self, path: Path, provider: str, precision: str) -> bytes | str:
        if precision != "fp16" or provider != CUDA:
            return str(path)
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # keep_io_types: the graph still takes uint8 tiles and returns float32 features.
        model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
        return model.SerializeToString()

    def _open(self, file_name: str, provider: str, precision: str, backbone: bool = False,
              cpu_fallback: bool = True, layout: str = ""):
        """A session on the first candidate provider that initialises; (session, providers).
        Without `cpu_fallback`, (None, []) when no GPU provider initialises."""
        path = self.bundle_dir / file_name
        available = set(self._ort.get_available_providers())
        wanted = [p for p in PROVIDER_CHOICES[provider] if p in available or p == CPU]
        if not cpu_fallback:
            wanted = [p for p in wanted if p != CPU]
            if not wanted:
                return None, []
        if provider != "auto" and wanted[0] not in available:
            raise ConfigError(f"provider {provider} is not in this onnxruntime build "
                              f"(available: {sorted(available)})")
        errors = []
        if TRT in wanted and not _tensorrt_loadable():
            # onnxruntime would print a page of "EP Error" and retry; say it in one line instead.
            wanted.remove(TRT)
            errors.append("tensorrt: libnvinfer not found")
            if not wanted and not cpu_fallback:
                return None, []
            if not wanted:
                raise BundleError(self.bundle_dir, "provider tensorrt requested but the TensorRT "
                                                   "libraries (libnvinfer) are not installed")
        if provider == "auto":
            # Probing providers whose libraries are missing prints onnxruntime errors; the
            # outcome is logged below, once, in our words.
            self._ort.set_default_logger_severity(4)
        for candidate in wanted:
            chain = [self._provider_options(p, precision, layout)
                     for p in PROVIDER_CHOICES["auto"][PROVIDER_CHOICES["auto"].index(candidate):]]
            try:
                session = self._ort.InferenceSession(
                    self._model_bytes(path, candidate, precision) if backbone else str(path),
                    sess_options=self._session_options(), providers=chain)
            except Exception as exc:  # a provider whose libraries are missing may raise instead
                errors.append(f"{PROVIDER_NAMES[candidate]}: {exc}")
                if provider != "auto":
                    break
                continue
            active = session.get_providers()
            if active[0] == candidate:
                if errors:
                    log.warning("%s: providers tried before %s: %s", file_name,
                                PROVIDER_NAMES[candidate], "; ".join(errors))
                return session, active
            errors.append(f"{PROVIDER_NAMES[candidate]}: did not initialise (session runs on {active[0]})")
            if provider != "auto":
                break
        if not cpu_fallback and provider == "auto":
            log.info("%s: no GPU provider initialises (%s): the CPU backends run it", file_name,
                     "; ".join(errors))
            return None, []
        raise BundleError(self.bundle_dir, f"{file_name} does not load on provider {provider}: "
                                           + "; ".join(errors))

    def _calibration_tiles(self, n: int) -> np.ndarray:
        return he_like_tiles(n, self.tile_size)

    def _open_gpu_backbone(self, provider: str, precision: str, what: str) -> None:
        """The backbone on a GPU provider when one initialises (sets backbone, providers,
        precision, layout); a no-op when provider auto finds none (the CPU backends take over).

        Precision auto: fp32, fp16 and, on the CUDA provider, fp16 with NHWC convolutions are
        timed on a few batches and the fastest whose features agree with fp32 is kept."""
        gpu = tuple(p for p in PROVIDER_CHOICES[provider] if p != CPU)
        if not gpu:
            return
        variants = ([("fp32", ""), ("fp16", ""), ("fp16", "nhwc")] if precision == "auto"
                    else [(precision, "")])
        sessions = {}
        for p, layout in variants:
            if layout and next(iter(sessions.values()))[1][0] != CUDA:
                continue   # a CUDA provider option; TensorRT chooses its own layouts
            graph = self.graphs["int8" if p == "int8" else "fp32"].name
            try:
                session, providers = self._open(graph, provider, p, backbone=True,
                                                cpu_fallback=provider != "auto", layout=layout)
            except MilroiError as exc:
                if not layout:
                    raise
                log.info("%s: fp16 NHWC not timed (%s)", what, exc)
                continue
            if session is None or providers[0] == CPU:
                if layout:
                    continue
                return   # no GPU here: the CPU backends
            sessions[(p, layout)] = (session, providers)
        chosen = variants[0]
        if len(sessions) > 1:
            # Several variants on the GPU: the fastest whose features agree with fp32.
            options = [Candidate(ONNXRUNTIME, p, self.graphs["fp32"], layout)
                       for p, layout in sessions]
            rows, _ = measure(options, self.graphs["fp32"], self._calibration_tiles(self.batch_size),
                              self.threads, open_candidate=lambda c: (
                                  lambda tiles, s=sessions[(c.precision, c.layout)][0]:
                                  s.run(["features"], {"tiles": tiles})[0]))
            best = max((r for r in rows if r["passes_gate"]), key=lambda r: r["tiles_per_s"])
            log_table(rows, best, what)
            chosen, self.choice_table = (best["precision"], best.get("layout", "")), describe_rows(rows)
        self.precision, self.layout = chosen
        self.backbone, self.providers = sessions[chosen]

    # -- inference -----------------------------------------------------------------------------
    def infer(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """Run backbone + head now on uint8 tiles [n, s, s, 3] (no batching): output name -> array."""
        if on_device(tiles):
            if not self.on_gpu:
                raise RequestError("tiles decoded on a GPU reach an engine that runs on the CPU")
        else:
            tiles = np.ascontiguousarray(tiles, dtype=np.uint8)
        if not self.on_gpu:
            features = self.cpu_features(tiles)
            return dict(zip(self.head_outputs, self.head.run(self.head_outputs, {"features": features})))
        # IO binding: the tiles go to the device once (or were decoded there: wsi.gpu_decode);
        # the features never come back to the host.
        device = "cuda"
        backbone = self.backbone.io_binding()
        if on_device(tiles):
            backbone.bind_input("tiles", device, tiles.device_id, np.uint8, list(tiles.shape),
                                tiles.ptr)
        else:
            backbone.bind_ortvalue_input("tiles", self._ort.OrtValue.ortvalue_from_numpy(tiles, device, 0))
        backbone.bind_output("features", device, 0)
        self.backbone.run_with_iobinding(backbone)
        features = backbone.get_outputs()[0]
        head = self.head.io_binding()
        head.bind_ortvalue_input("features", features)
        for name in self.head_outputs:
            head.bind_output(name, "cpu")
        self.head.run_with_iobinding(head)
        return dict(zip(self.head_outputs, (v.numpy() for v in head.get_outputs())))

    def slide_logit(self, pooled: np.ndarray) -> float:
        """aggregator.onnx on the pooled state [1, P] -> the slide logit."""
        pooled = np.ascontiguousarray(pooled, dtype=np.float32).reshape(1, -1)
        return float(self.aggregator.run(["slide_logit"], {"pooled": pooled})[0].reshape(-1)[0])

    def check_tiles(self, tiles: np.ndarray) -> np.ndarray:
        if not on_device(tiles):
            tiles = np.asarray(tiles)
        expected = (self.tile_size, self.tile_size, 3)
        if tiles.dtype != np.uint8 or len(tiles.shape) != 4 or tuple(tiles.shape[1:]) != expected:
            raise RequestError(f"tiles must be uint8 [n, {self.tile_size}, {self.tile_size}, 3], "
                               f"got {tiles.dtype} {list(tiles.shape)}")
        return tiles

    def submit(self, tiles: np.ndarray) -> Future:
        """Queue tiles for the batcher; the Future gives {output name: array} for them, in order."""
        tiles = self.check_tiles(tiles)
        parts = [tiles[i:i + self.batch_size] for i in range(0, len(tiles), self.batch_size)]
        if len(parts) <= 1:
            return self._enqueue(tiles)
        futures = [self._enqueue(part) for part in parts]
        combined: Future = Future()
        remaining = [len(futures)]
        lock = threading.Lock()

        def done(_):
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            try:
                results = [f.result() for f in futures]
                combined.set_result({k: np.concatenate([r[k] for r in results]) for k in results[0]})
            except BaseException as exc:  # noqa: BLE001 - forwarded to the caller
                combined.set_exception(exc)
        for f in futures:
            f.add_done_callback(done)
        return combined

    def score(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """submit() and wait."""
        return self.submit(tiles).result()

    def queue_depth(self) -> int:
        """Tiles waiting for the batcher."""
        with self._cond:
            return sum(len(r.tiles) for r in self._queue)

    def _enqueue(self, tiles: np.ndarray) -> Future:
        request = _Request(tiles, Future())
        with self._cond:
            if self._closed:
                raise RequestError(f"engine of model {self.model.name} {self.model.version} is closed")
            self._queue.append(request)
            self._cond.notify()
        return request.future

    def _next_batch(self) -> list[_Request] | None:
        """Requests for the next run, in arrival order; None once closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._queue[0].arrived + self.max_wait_s
            while (sum(len(r.tiles) for r in self._queue) < self.batch_size and not self._closed
                   and (left := deadline - time.monotonic()) > 0):
                self._cond.wait(left)
            batch, size = [], 0
            while self._queue and size + len(self._queue[0].tiles) <= self.batch_size:
                # Tiles already on the GPU run as they are (no concatenation on the device).
                if batch and (on_device(self._queue[0].tiles) or on_device(batch[0].tiles)):
                    break
                request = self._queue.popleft()
                # A request cancelled while queued (its stream went away) is dropped unrun.
                if request.future.set_running_or_notify_cancel():
                    batch.append(request)
                    size += len(request.tiles)
            return batch

    def _run_loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            started = time.perf_counter()
            try:
                tiles = batch[0].tiles if len(batch) == 1 else np.concatenate([r.tiles for r in batch])
                outputs = self.infer(tiles)
            except BaseException as exc:  # noqa: BLE001 - every waiting request gets the error
                for request in batch:
                    request.future.set_exception(exc)
                continue
            seconds = time.perf_counter() - started
            stats = self.stats
            stats.runs += 1
            stats.tiles += len(tiles)
            stats.requests += len(batch)
            stats.merged_runs += len(batch) > 1
            stats.run_seconds += seconds
            start = 0
            for request in batch:
                stop = start + len(request.tiles)
                request.future.set_result({k: v[start:stop] for k, v in outputs.items()})
                start = stop
            if self._on_batch is not None:
                self._on_batch(len(tiles), len(batch), seconds)

    def close(self, wait: bool = True) -> None:
        """Stop accepting requests; queued ones still run; the runner thread ends."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait and threading.current_thread() is not self._runner:
            self._runner.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        return {"provider": PROVIDER_NAMES[self.provider], "providers": list(self.providers),
                "backend": self.backend, "precision": self.precision, "layout": self.layout,
                "batch_size": self.batch_size, "threads": self.threads,
                "backend_choice": self.choice_table}
