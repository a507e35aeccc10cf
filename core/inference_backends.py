"""Which runtime runs a backbone graph on the CPU, chosen by measurement.

Two engines read the same ONNX graphs of a bundle (`backbone.onnx`, `backbone_int8.onnx`):

- **onnxruntime** (the CPU provider of onnxruntime-gpu), with the session options of
  `core.runtime.session_options`;
- **OpenVINO** (`openvino` on PyPI; not `onnxruntime-openvino`, which would replace the
  onnxruntime module of onnxruntime-gpu). It runs QDQ int8 graphs as they are and, on CPUs
  with AMX/AVX-512 BF16, fp32 graphs in bf16.

Precisions, each honoured exactly when asked for: `fp32` (OpenVINO with the f32 inference hint,
never the bf16 it would pick by itself on AMX), `bf16` (OpenVINO, the fp32 graph with the bf16
hint, only on CPUs that report BF16), `fp16` (OpenVINO, only on CPUs that report FP16; GPUs are
served by onnxruntime's CUDA/TensorRT providers in serving.engine), `int8` (the bundle's
statically quantised graph, on either engine).

`choose(...)` with `backend="auto"` and/or `precision="auto"`: every allowed backend x precision
is opened and timed on the same batches of H&E-like tiles (interleaved, median of a few runs);
the fastest one whose features agree with onnxruntime fp32 (per-tile cosine >= MIN_COSINE, the
gate int8 bundles already pass at export) is kept and the table is logged. The choice depends on
the host, so it is cached on disk per graph content x host (CPU model and flags, threads) x
library versions; a later load on the same host reuses it instead of re-timing (like a TensorRT
engine cache). `MILROI_CACHE_DIR` moves the cache (default ~/.cache/milroi).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import ConfigError
from core.runtime import session_options

log = logging.getLogger(__name__)

ONNXRUNTIME, OPENVINO = "onnxruntime", "openvino"
BACKENDS = (ONNXRUNTIME, OPENVINO)
BACKEND_CHOICES = ("auto", *BACKENDS)
PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16", "int8")
DEFAULT_BACKEND, DEFAULT_PRECISION = "auto", "auto"
MIN_COSINE = 0.99            # feature agreement with onnxruntime fp32 (as for int8 at export)
CALIBRATION_BATCH = 16       # tiles per timed run: long enough to time, short enough to load fast
CALIBRATION_ROUNDS = 3       # timed runs of each candidate (interleaved); the median counts
# OpenVINO's inference precision hint for each precision (int8: what is not quantised runs f32)
OPENVINO_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}

Features = Callable[[np.ndarray], np.ndarray]   # uint8 tiles [n, s, s, 3] -> float32 [n, d]


def cache_dir() -> Path:
    return Path(os.environ.get("MILROI_CACHE_DIR", Path.home() / ".cache" / "milroi"))


def check_choice(backend: str, precision: str) -> None:
    if backend not in BACKEND_CHOICES:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    if precision not in PRECISION_CHOICES:
        raise ConfigError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")


def openvino_capabilities() -> set[str] | None:
    """OpenVINO's CPU optimisation capabilities ({"FP32", "BF16", "INT8", ...}); None if not installed."""
    try:
        import openvino as ov
    except ImportError:
        return None
    return set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def he_like_tiles(n: int, tile_size: int, seed: int = 0) -> np.ndarray:
    """Smooth, H&E-coloured uint8 tiles [n, s, s, 3]: what backends are timed and compared on.

    Pink stroma with purple nuclei-like blobs: real-looking statistics (not white noise, which
    drives a random-init ResNet into unrealistically large activations).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:tile_size, 0:tile_size]
    pink, purple = np.array([230, 170, 200.0]), np.array([110, 60, 150.0])
    tiles = np.empty((n, tile_size, tile_size, 3), np.uint8)
    for i in range(n):
        centres = rng.uniform(0, tile_size, (40, 2))
        d2 = ((xx[..., None] - centres[:, 0]) ** 2 + (yy[..., None] - centres[:, 1]) ** 2)
        nuclei = np.exp(-d2 / (2 * rng.uniform(3, 8) ** 2)).max(-1)[..., None]
        rgb = pink * (1 - nuclei) + purple * nuclei + rng.normal(0, 6, (tile_size, tile_size, 3))
        tiles[i] = np.clip(rgb, 0, 255).astype(np.uint8)
    return tiles


# -- the two engines ---------------------------------------------------------------------------
class OnnxruntimeFeatures:
    """The graph in an onnxruntime CPU session (kept as `.session` for who wants to look at it)."""

    def __init__(self, graph: Path, threads: int):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(graph), sess_options=session_options(ort, threads),
                                            providers=["CPUExecutionProvider"])

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return self.session.run(["features"], {"tiles": tiles})[0]


def open_openvino(graph: Path, threads: int, precision: str,
                  input_shape: tuple[int, ...] | None = None) -> Features:
    """The graph compiled by OpenVINO for the CPU with the hint of `precision`; refuses a CPU
    that would run something else than asked (an explicit precision is honoured exactly).

    The batch stays dynamic as exported (the engine's batches vary: first-score ramp, tails)
    unless `input_shape` fixes it (the benchmark's bare rows)."""
    import openvino as ov

    core = ov.Core()
    hint = OPENVINO_HINTS[precision]
    model = core.read_model(str(graph))
    if input_shape is not None:
        model.reshape({"tiles": list(input_shape)})
    compiled = core.compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        # Tile decoders share these cores: do not pin OpenVINO's threads to them.
        "ENABLE_CPU_PINNING": False})
    actual = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    if actual != hint:
        raise ConfigError(f"OpenVINO runs {graph.name} in {actual} on this CPU, not the {hint} "
                          f"that precision {precision} asks for")
    request, output, lock = compiled.create_infer_request(), compiled.output("features"), threading.Lock()

    def run(tiles: np.ndarray) -> np.ndarray:
        with lock:   # one infer request: runs are serialised, as onnxruntime's session.run is per call
            return request.infer({"tiles": tiles})[output].copy()

    return run


@dataclass(frozen=True)
class Candidate:
    """One backend x precision on one graph file (and, on a CUDA GPU, a tensor layout)."""

    backend: str
    precision: str
    graph: Path
    layout: str = ""    # "nhwc": onnxruntime CUDA's prefer_nhwc (serving.engine); "" the default

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}" + (f" {self.layout}" if self.layout else "")

    def open(self, threads: int) -> Features:
        if self.backend == ONNXRUNTIME:
            return OnnxruntimeFeatures(self.graph, threads)
        return open_openvino(self.graph, threads, self.precision)


def candidates(graphs: dict[str, Path], backend: str = DEFAULT_BACKEND,
               precision: str = DEFAULT_PRECISION) -> list[Candidate]:
    """Every backend x precision the request allows on this host, onnxruntime fp32 first.

    `graphs`: precision -> graph file ("fp32" always; "int8" when the bundle has one). An
    explicit choice that this host cannot run is a ConfigError naming why.
    """
    check_choice(backend, precision)
    capabilities = openvino_capabilities()
    out, why_not = [], []
    for name in BACKENDS:
        if backend not in ("auto", name):
            continue
        if name == OPENVINO and capabilities is None:
            why_not.append("openvino is not installed (pip install 'milroi[openvino]')")
            continue
        for p in ("fp32", "int8", "bf16", "fp16"):
            if precision not in ("auto", p):
                continue
            graph = graphs.get("int8" if p == "int8" else "fp32")
            if graph is None:
                why_not.append(f"{name} {p}: no int8 graph (a bundle exported with --int8 has one)")
            elif name == ONNXRUNTIME and p in ("bf16", "fp16"):
                why_not.append(f"onnxruntime {p}: not on the CPU provider (fp16 is a GPU precision)")
            elif name == OPENVINO and p in ("bf16", "fp16") and p.upper() not in capabilities:
                why_not.append(f"openvino {p}: this CPU has no native {p} "
                               f"(OpenVINO capabilities {sorted(capabilities)})")
            else:
                out.append(Candidate(name, p, Path(graph)))
    if not out:
        raise ConfigError(f"no CPU backend runs backend {backend} at precision {precision}: "
                          + "; ".join(why_not))
    return out


# -- the measured choice -----------------------------------------------------------------------
@dataclass
class Choice:
    """What runs the backbone, and the measurements it was chosen on (empty when not timed)."""

    backend: str
    precision: str
    features: Features = field(repr=False)
    table: list[dict] = field(default_factory=list)
    cached: bool = False

    def describe(self) -> dict:
        return {"backend": self.backend, "precision": self.precision, "timed": bool(self.table),
                "cached": self.cached, "table": self.table}


def feature_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-tile cosine of two feature arrays [n, d] (the agreement gate's measure)."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _host_key() -> dict:
    """What makes a measured choice valid: the CPU, and the versions of the two runtimes."""
    import onnxruntime

    cpu, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = sorted(f for f in value.split() if f.startswith(("avx512", "amx")))
                break
    except OSError:
        pass
    try:
        import openvino
        ov_version = openvino.__version__
    except ImportError:
        ov_version = None
    return {"cpu": cpu, "flags": flags, "onnxruntime": onnxruntime.__version__, "openvino": ov_version}


class ChoiceCache:
    """{key: measured choice} in one JSON file; written atomically (concurrent loaders: last wins)."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / "backend_choice.json"

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> dict | None:
        return self._read().get(key)

    def put(self, key: str, value: dict) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            entries = self._read()
            entries[key] = value
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".backend_choice.")
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as exc:   # a read-only home must not stop a server from loading
            log.warning("backend choice not cached (%s): %s", self.path, exc)


def cache_key(options: list[Candidate], threads: int, batch: int) -> str:
    described = {"candidates": [(c.backend, c.precision, _digest(c.graph)) for c in options],
                 "threads": threads, "batch": batch, "host": _host_key()}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def measure(options: list[Candidate], reference_graph: Path, tiles: np.ndarray, threads: int,
            rounds: int = CALIBRATION_ROUNDS,
            open_candidate: Callable[[Candidate], Features] | None = None,
            ) -> tuple[list[dict], dict[str, Features]]:
    """Open and time every candidate on `tiles` (interleaved rounds, median); each row has the
    rate and the per-tile feature cosine to onnxruntime fp32 (`reference_graph`) on the same tiles.

    `open_candidate` opens a candidate elsewhere than the CPU (serving.engine's GPU sessions).
    """
    open_candidate = open_candidate or (lambda c: c.open(threads))
    tiles = np.ascontiguousarray(tiles, dtype=np.uint8)
    reference_candidate = Candidate(ONNXRUNTIME, "fp32", Path(reference_graph))
    reference = None
    if reference_candidate not in options:
        reference = reference_candidate.open(threads)(tiles)
    opened: dict[str, Features] = {}
    rows: list[dict] = []
    # The reference first when it is a candidate: the others are compared with its features.
    for c in sorted(options, key=lambda c: c != reference_candidate):
        started = time.perf_counter()
        run = open_candidate(c)
        load_s = time.perf_counter() - started
        features = run(tiles)   # warm-up, and the features the gate compares
        if reference is None:
            reference = features
        opened[c.label] = run
        cos = feature_cosine(features, reference)
        rows.append({"backend": c.backend, "precision": c.precision, "graph": c.graph.name,
                     **({"layout": c.layout} if c.layout else {}),
                     "load_s": round(load_s, 2), "cosine_min": round(float(cos.min()), 5),
                     "passes_gate": bool(cos.min() >= MIN_COSINE), "seconds": []})
    for _ in range(rounds):
        for row in rows:
            started = time.perf_counter()
            opened[row_label(row)](tiles)
            row["seconds"].append(round(time.perf_counter() - started, 4))
    for row in rows:
        row["tiles_per_s"] = round(len(tiles) / statistics.median(row["seconds"]), 1)
    return rows, opened


def row_label(row: dict) -> str:
    """The Candidate.label of a measured row."""
    layout = row.get("layout", "")
    return f"{row['backend']} {row['precision']}" + (f" {layout}" if layout else "")


def _pick(rows: list[dict]) -> dict:
    passing = [r for r in rows if r["passes_gate"]]
    if not passing:
        raise ConfigError("no backend x precision passes the feature agreement gate (cosine >= "
                          f"{MIN_COSINE} to onnxruntime fp32): " + ", ".join(
                              f"{r['backend']} {r['precision']} {r['cosine_min']:.4f}" for r in rows))
    return max(passing, key=lambda r: r["tiles_per_s"])


def log_table(rows: list[dict], chosen: dict, what: str) -> None:
    lines = [f"{'backend':<12} {'precision':<9} {'tiles/s':>8} {'cosine':>8}  gate"]
    for r in rows:
        mark = " <- chosen" if r is chosen else ""
        precision = r["precision"] + (f"/{r['layout']}" if r.get("layout") else "")
        lines.append(f"{r['backend']:<12} {precision:<9} {r['tiles_per_s']:>8.1f} "
                     f"{r['cosine_min']:>8.4f}  {'pass' if r['passes_gate'] else 'FAIL'}{mark}")
    log.info("%s: backbone backend chosen by measurement:\n%s", what, "\n".join(lines))


def choose(graphs: dict[str, Path], tiles: Callable[[int], np.ndarray], threads: int, *,
           backend: str = DEFAULT_BACKEND, precision: str = DEFAULT_PRECISION,
           cache: ChoiceCache | None = None, what: str = "backbone") -> Choice:
    """The backbone runner for this request on this host.

    One allowed candidate: opened as asked, nothing timed. Several: measured on
    `tiles(CALIBRATION_BATCH)` (or taken from the cache) and the fastest that passes the gate kept.
    """
    options = candidates(graphs, backend, precision)
    if len(options) == 1:
        only = options[0]
        return Choice(only.backend, only.precision, only.open(threads))
    cache = cache or ChoiceCache()
    key = cache_key(options, threads, CALIBRATION_BATCH)
    hit = cache.get(key)
    if hit is not None:
        chosen = next((c for c in options if (c.backend, c.precision) == tuple(hit["chosen"])), None)
        if chosen is not None:
            log.info("%s: backbone on %s %s (measured choice cached in %s)", what,
                     chosen.backend, chosen.precision, cache.path)
            return Choice(chosen.backend, chosen.precision, chosen.open(threads), hit["table"], True)
    rows, opened = measure(options, graphs["fp32"], tiles(CALIBRATION_BATCH), threads)
    best = _pick(rows)
    log_table(rows, best, what)
    cache.put(key, {"chosen": [best["backend"], best["precision"]], "table": rows,
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "host": _host_key()})
    return Choice(best["backend"], best["precision"], opened[row_label(best)], rows)


def describe_rows(rows: list[dict]) -> list[dict]:
    """The table without per-run seconds (what GetModel and the logs carry)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]



def add_backend_arguments(parser, gpu: bool = False) -> None:
    """--backend and --precision, as `serve`, `score` and `features` take them."""
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default=DEFAULT_BACKEND,
                        help="what runs the backbone on the CPU: onnxruntime, openvino, or auto "
                             "(time each on a few batches at load, keep the fastest that passes "
                             f"the feature agreement gate, cosine >= {MIN_COSINE}; the choice is "
                             f"cached per host) (default {DEFAULT_BACKEND})")
    gpu_note = "fp16 on GPUs; " if gpu else ""
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default=DEFAULT_PRECISION,
                        help="backbone precision, honoured exactly when given: fp32, "
                             f"{gpu_note}bf16 (OpenVINO on CPUs with BF16), int8 (the bundle's "
                             "backbone_int8.onnx from `milroi-train export --int8`), or auto "
                             f"(chosen with the backend) (default {DEFAULT_PRECISION})")
