"""Open a bundle's graphs on the best place this host has, and say what was chosen.

`open_sessions(bundle_dir, manifest, provider=, backend=, precision=, ...)` -> `Sessions`:

- execution providers: `provider="auto"` tries TensorRT, CUDA, CPU in that order and keeps the
  first that really initialises. onnxruntime-gpu lists CUDA and TensorRT as *available* even on
  a machine without their libraries and then silently falls back to CPU, so the active provider
  is read back from `session.get_providers()` after creation; an explicit `cuda`/`tensorrt` that
  does not initialise is an error, not a silent CPU run;
- GPU precision: fp32, fp16 (converted at load time with onnxruntime.transformers.float16,
  inputs and outputs kept uint8/float32; TensorRT uses its own fp16 mode) or int8; "auto" times
  fp32, fp16 and (CUDA provider) fp16 with NHWC convolutions on a few batches and keeps the
  fastest whose features agree with fp32;
- CPU: the backbone runs in onnxruntime or OpenVINO at fp32, bf16 or int8, chosen by measurement
  when `backend` or `precision` is "auto" (core.inference_backends: every allowed candidate
  timed, the fastest that passes the feature agreement gate kept, the choice cached per host);
  int8 loads the bundle's `backbone_int8.onnx` (static QDQ quantisation made at export);
- the head and the aggregator are tiny: the head runs where the backbone runs, the aggregator on
  the CPU, both in onnxruntime.

CPU sessions: graph optimisation ALL, intra-op threads = the cores this process may use, one
inter-op thread, no spin-waiting (core.runtime.session_options).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.bundle import INT8_ROLE, BundleManifest
from core.errors import BundleError, ConfigError, MilroiError
from core.inference_backends import (
    ONNXRUNTIME,
    OPENVINO,
    Candidate,
    choose,
    describe_rows,
    he_like_tiles,
    log_table,
    measure,
)
from core.runtime import session_options
from serving.inference import CpuInference, GpuInference

log = logging.getLogger(__name__)

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
PROVIDER_CHOICES = {"auto": (TRT, CUDA, CPU), "tensorrt": (TRT,), "cuda": (CUDA,), "cpu": (CPU,)}
PROVIDER_NAMES = {TRT: "tensorrt", CUDA: "cuda", CPU: "cpu"}
DEFAULT_PROVIDER = "auto"
GPU_PRECISIONS = ("fp32", "fp16", "int8")   # what onnxruntime's CUDA/TensorRT providers run


@dataclass(frozen=True)
class Sessions:
    """A bundle's graphs, open, and what runs them (every field set on the CPU and the GPU)."""

    inference: CpuInference | GpuInference
    aggregator: object          # onnxruntime session (pooled state -> slide logit), on the CPU
    backbone: object | None     # the backbone's onnxruntime session (None when OpenVINO runs it)
    provider: str               # the backbone's onnxruntime provider (CPU under OpenVINO)
    providers: list[str]        # the backbone session's provider chain
    backend: str                # onnxruntime | openvino
    precision: str              # fp32 | fp16 | bf16 | int8, as it runs
    layout: str                 # "nhwc" when the CUDA provider runs NHWC convolutions, else ""
    choice_table: list[dict]    # the timed candidates when "auto" chose, else []

    @property
    def on_gpu(self) -> bool:
        return self.inference.on_gpu


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


def open_sessions(bundle_dir: Path, manifest: BundleManifest, *, provider: str, backend: str,
                  precision: str, batch_size: int, threads: int, what: str) -> Sessions:
    """Open the backbone, head and aggregator of a bundle (module docstring); `what` names the
    model in log lines."""
    import onnxruntime as ort

    return _Opener(ort, Path(bundle_dir), manifest, batch_size, threads, what).open(
        provider, backend, precision)


class _Opener:
    """The settings every session of one bundle is opened with."""

    def __init__(self, ort, bundle_dir: Path, manifest: BundleManifest, batch_size: int,
                 threads: int, what: str):
        self.ort, self.bundle_dir, self.manifest = ort, bundle_dir, manifest
        self.batch_size, self.threads, self.what = batch_size, threads, what
        self.tile_size = manifest.tiling.tile_size
        files = manifest.files
        self.graphs = {"fp32": bundle_dir / files["backbone"]}
        if INT8_ROLE in files:
            self.graphs["int8"] = bundle_dir / files[INT8_ROLE]

    def open(self, provider: str, backend: str, precision: str) -> Sessions:
        if precision == "int8" and "int8" not in self.graphs:
            raise BundleError(self.bundle_dir, "precision int8 needs an int8 backbone "
                                               "(export with --int8: files.backbone_int8)")
        files = self.manifest.files
        gpu = None
        if backend != OPENVINO and precision in ("auto", *GPU_PRECISIONS):
            gpu = self._gpu_backbone(provider, precision)
        if gpu is not None:
            backbone, providers, precision, layout, table = gpu
            head, _ = self._open(files["head"], PROVIDER_NAMES[providers[0]], "fp32")
            inference = GpuInference(backbone, head, self.ort)
            backend = ONNXRUNTIME
        else:
            if provider in ("cuda", "tensorrt"):
                raise BundleError(self.bundle_dir, f"precision {precision} does not run on "
                                                   f"provider {provider}")
            choice = choose(self.graphs, self._calibration_tiles, self.threads, backend=backend,
                            precision=precision, what=self.what)
            backend, precision, layout = choice.backend, choice.precision, ""
            table = describe_rows(choice.table)
            # The onnxruntime session when onnxruntime runs it (OpenVINO has none).
            backbone, providers = getattr(choice.features, "session", None), [CPU]
            head, _ = self._open(files["head"], "cpu", "fp32")
            inference = CpuInference(choice.features, head)
        aggregator, _ = self._open(files["aggregator"], "cpu", "fp32")
        return Sessions(inference, aggregator, backbone, providers[0], list(providers), backend,
                        precision, layout, table)

    def _calibration_tiles(self, n: int) -> np.ndarray:
        return he_like_tiles(n, self.tile_size)

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
        available = set(self.ort.get_available_providers())
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
            self.ort.set_default_logger_severity(4)
        for candidate in wanted:
            chain = [self._provider_options(p, precision, layout)
                     for p in PROVIDER_CHOICES["auto"][PROVIDER_CHOICES["auto"].index(candidate):]]
            try:
                session = self.ort.InferenceSession(
                    self._model_bytes(path, candidate, precision) if backbone else str(path),
                    sess_options=session_options(self.ort, self.threads), providers=chain)
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

    def _gpu_backbone(self, provider: str, precision: str):
        """(session, providers, precision, layout, choice table) of the backbone on a GPU
        provider when one initialises; None when provider auto finds none (the CPU backends
        take over).

        Precision auto: fp32, fp16 and, on the CUDA provider, fp16 with NHWC convolutions are
        timed on a few batches and the fastest whose features agree with fp32 is kept."""
        gpu = tuple(p for p in PROVIDER_CHOICES[provider] if p != CPU)
        if not gpu:
            return None
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
                log.info("%s: fp16 NHWC not timed (%s)", self.what, exc)
                continue
            if session is None or providers[0] == CPU:
                if layout:
                    continue
                return None   # no GPU here: the CPU backends
            sessions[(p, layout)] = (session, providers)
        chosen, table = variants[0], []
        if len(sessions) > 1:
            # Several variants on the GPU: the fastest whose features agree with fp32.
            options = [Candidate(ONNXRUNTIME, p, self.graphs["fp32"], layout)
                       for p, layout in sessions]
            rows, _ = measure(options, self.graphs["fp32"], self._calibration_tiles(self.batch_size),
                              self.threads, open_candidate=lambda c: (
                                  lambda tiles, s=sessions[(c.precision, c.layout)][0]:
                                  s.run(["features"], {"tiles": tiles})[0]))
            best = max((r for r in rows if r["passes_gate"]), key=lambda r: r["tiles_per_s"])
            log_table(rows, best, self.what)
            chosen, table = (best["precision"], best.get("layout", "")), describe_rows(rows)
        session, providers = sessions[chosen]
        return session, providers, chosen[0], chosen[1], table
