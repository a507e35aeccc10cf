"""`milroi-serve serve`: the gRPC server streaming per-patch tumour scores (grpc.aio).

    milroi-serve serve --model models:/milroi@champion --slide-root /data/slides \
        [--port 50051] [--host 127.0.0.1] [--token-file F] [--tls-cert C --tls-key K]
        [--metrics-port 9100] [--max-concurrent 16] [--provider auto|cpu|cuda|tensorrt]
        [--backend auto|onnxruntime|openvino] [--precision auto|fp32|fp16|bf16|int8]

Services: milroi.v1.SlideScoring (proto/milroi/v1/scoring.proto), grpc.health.v1.Health
(NOT_SERVING until a model is loaded and again while draining) and server reflection.

The event loop only moves messages: slide reads, tissue masks and onnxruntime runs happen in
threads (a producer thread per ScoreSlide stream, the engine's batcher thread, the tile readers),
so the loop stays responsive to new calls, cancels and health checks while slides are scored.
Every failure becomes one gRPC status with a clear message and the server keeps serving:
NOT_FOUND (no such slide), INVALID_ARGUMENT (corrupt or non-slide file, bad parameter),
PERMISSION_DENIED (path outside the slide roots), UNAUTHENTICATED (bearer token),
RESOURCE_EXHAUSTED (beyond --max-concurrent), UNAVAILABLE (no model loaded yet). A message
names the slide by the path the client sent; the log keeps the server's absolute path.
With --token-file, one interceptor (serving.security.BearerTokenInterceptor) checks the token of
every call but health's.
A client cancel or deadline sets the stream's cancel event: its tile reads and queued model runs
stop within a fraction of a second. SIGTERM: health NOT_SERVING, in-flight streams finish within
--grace seconds, exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from core.cli import add_fallback_mpp_argument, add_tracking_uri_argument
from core.domain import DomainCheck
from core.errors import (
    AuthError,
    Busy,
    Cancelled,
    ConfigError,
    MilroiError,
    ModelNotReady,
    PathDenied,
    RequestError,
    SlideMissing,
    SlideNotFound,
)
from core.inference_backends import DEFAULT_BACKEND, DEFAULT_PRECISION
from milroi.v1 import scoring_pb2 as pb
from milroi.v1 import scoring_pb2_grpc as pb_grpc
from results.scored import ModelRef, PatchChunk, SlideHeader, SlideSummary
from serving.engine import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_WAIT_S,
    DEFAULT_PROVIDER,
    PROVIDER_NAMES,
    Engine,
)
from serving.inference import FEATURES
from serving.metrics import ServerMetrics
from serving.model_source import LoadedModel, ModelSource, ModelSpec
from serving.options import EngineOptions, add_engine_arguments
from serving.pipeline import SlideScorer
from serving.security import BearerTokenInterceptor, SlideRoots, read_token, server_credentials

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["SlideScoring"].full_name
MAX_TILES_PER_REQUEST = 4096
# ScoreSlide events a producer thread may be ahead of the client (bounds memory per stream).
MAX_BUFFERED_EVENTS = 16


# The gRPC status of each error type (docs/errors.md); the most specific class listed wins,
# so a subclass needs a row only when its code differs from its parent's.
STATUS_OF_ERROR: dict[type[MilroiError], grpc.StatusCode] = {
    AuthError: grpc.StatusCode.UNAUTHENTICATED,
    PathDenied: grpc.StatusCode.PERMISSION_DENIED,
    SlideNotFound: grpc.StatusCode.NOT_FOUND,
    SlideMissing: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    Busy: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Cancelled: grpc.StatusCode.CANCELLED,
    MilroiError: grpc.StatusCode.INVALID_ARGUMENT,   # a bad slide, request or parameter
}


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code of an error raised while serving a call: by its type (the first
    class of its method resolution order in STATUS_OF_ERROR); INTERNAL for anything else."""
    for cls in type(exc).__mro__:
        if cls in STATUS_OF_ERROR:
            return STATUS_OF_ERROR[cls]
    return grpc.StatusCode.INTERNAL


# -- dataclasses -> messages -------------------------------------------------------------------
def model_ref_pb(ref: ModelRef) -> pb.ModelRef:
    return pb.ModelRef(name=ref.name, version=str(ref.version), alias=ref.alias, run_id=ref.run_id)


def _ring(coords) -> pb.Ring:
    xy = np.asarray(coords, np.float64).reshape(-1, 2)
    return pb.Ring(x=xy[:, 0].tolist(), y=xy[:, 1].tolist())


def event_pb(event) -> pb.ScoreSlideResponse:
    if isinstance(event, PatchChunk):
        return pb.ScoreSlideResponse(patches=pb.PatchScores(
            offset=event.offset, x=event.coords[:, 0].tolist(), y=event.coords[:, 1].tolist(),
            score=event.scores.tolist(),
            artefact=[] if event.flags is None else event.flags.tolist(),
            domain_distance=_known(event.domain_distance)))
    if isinstance(event, SlideHeader):
        return pb.ScoreSlideResponse(header=pb.SlideHeader(
            slide_path=event.slide_path, width=event.width, height=event.height,
            level_count=event.level_count, mpp=event.mpp, mpp_source=event.mpp_source,
            tile_size=event.tile_size, tile_level=event.tile_level, tile_count=event.tile_count,
            model=model_ref_pb(event.model), input_px=event.input_px,
            bounds_x=event.bounds_offset[0], bounds_y=event.bounds_offset[1],
            model_mpp=event.model_mpp, scale_factor=event.scale_factor,
            upsampled=event.upsampled))
    if isinstance(event, SlideSummary):
        t = event.timings
        rois = [pb.Polygon(exterior=_ring(r.polygon.exterior.coords),
                           holes=[_ring(h.coords) for h in r.polygon.interiors],
                           area_um2=r.area_um2, max_score=r.max_score, mean_score=r.mean_score,
                           tiles=r.tiles)
                for r in event.rois]
        return pb.ScoreSlideResponse(summary=pb.SlideSummary(
            slide_score=event.slide_score, label=event.label, threshold=event.slide_threshold,
            tile_count=event.tile_count, rois=rois, mpp=event.mpp,
            roi_threshold=event.roi_threshold, model=model_ref_pb(event.model),
            artefact_count=event.artefact_count, slide_logit=event.slide_logit,
            decision=event.decision.decision, decision_reason=event.decision.reason,
            **domain_fields(event.domain),
            timings=pb.Timings(open_s=t.open_s, tissue_s=t.tissue_s, scoring_s=t.scoring_s,
                               total_s=t.total_s, first_score_s=t.first_score_s,
                               tiles_per_second=t.tiles_per_second)))
    raise TypeError(f"not a slide event: {type(event).__name__}")


def _known(distance) -> list[float]:
    """Per-tile domain distances for the wire: none at all where the model has no description."""
    if distance is None or not len(distance) or np.isnan(distance).all():
        return []
    return distance.tolist()


def domain_fields(check: DomainCheck) -> dict:
    """The SlideSummary fields of a domain check (unset where the model cannot tell)."""
    if check.in_domain is None:
        return {"domain_reasons": list(check.reasons)}
    return {"in_domain": check.in_domain, "domain_score": check.score,
            "domain_reasons": list(check.reasons), "domain_criteria": check.criteria}


def decode_tiles(request: pb.ScoreTilesRequest, tile_size: int) -> np.ndarray:
    """uint8 [count, s, s, 3] from a ScoreTilesRequest, checked against the model's tile size."""
    count, size = int(request.count), int(request.tile_size)
    if not 1 <= count <= MAX_TILES_PER_REQUEST:
        raise RequestError(f"count must be in [1, {MAX_TILES_PER_REQUEST}], got {count}")
    if size != tile_size:
        raise RequestError(f"tile_size {size} does not match the model's {tile_size}")
    expected = count * size * size * 3
    if len(request.tiles) != expected:
        raise RequestError(f"tiles holds {len(request.tiles)} bytes, expected {expected} "
                           f"({count} RGB tiles of {size}x{size})")
    if len(request.x) != len(request.y) or len(request.x) not in (0, count):
        raise RequestError(f"x and y must both be empty or hold {count} values, got "
                           f"{len(request.x)} and {len(request.y)}")
    return np.frombuffer(request.tiles, np.uint8).reshape(count, size, size, 3)


# -- the service --------------------------------------------------------------------------------
@dataclass
class ServerOptions:
    max_concurrent: int = 16
    reader_workers: int | None = None
    fallback_mpp: float | None = None


class SlideScoringService(pb_grpc.SlideScoringServicer):
    def __init__(self, source: ModelSource, roots: SlideRoots, metrics: ServerMetrics,
                 options: ServerOptions):
        self.source, self.roots, self.metrics, self.options = source, roots, metrics, options
        self._active = 0

    @contextlib.contextmanager
    def _slot(self):
        """One of --max-concurrent streams, or RESOURCE_EXHAUSTED (runs on the loop: no lock)."""
        if self._active >= self.options.max_concurrent:
            raise Busy(f"server busy: {self._active} streams running (--max-concurrent "
                       f"{self.options.max_concurrent}); retry later")
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1

    async def _fail(self, method: str, context, exc: BaseException,
                    slide_path: str | None = None, resolved: Path | None = None) -> None:
        """Log `exc` as it is, answer its status with the slide named as the client named it
        (`slide_path`; `resolved` is where it lies on this server). Raises (context.abort)."""
        code = status_of(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", method, exc_info=exc)
            message = f"internal error: {exc!r}"
        else:
            log.info("%s: %s: %s", method, code.name, exc)
            message = str(exc)
        await context.abort(code, self.roots.wire_message(message, slide_path, resolved))

    def _ended(self, method: str, context, started: float, code: str | None) -> None:
        """Count one ending of a call: `code` when the handler knew it (OK, or the status it
        answered), else the call ended from outside. A client's cancel reaches a streaming
        handler as CancelledError while it awaits, but as GeneratorExit while it is paused at
        `yield`; both end up here, in the handler's `finally`, exactly once."""
        if code is None:
            remaining = context.time_remaining()
            code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
        self.metrics.record(method, code, time.perf_counter() - started)

    # ScoreSlide ------------------------------------------------------------------------------
    async def ScoreSlide(self, request, context):
        method, started = "ScoreSlide", time.perf_counter()
        cancel = threading.Event()
        self.metrics.in_flight.inc()
        path = code = None
        try:
            path = self.roots.resolve(request.slide_path)
            with self._slot(), self.source.lease() as model:
                scorer = SlideScorer(model.engine, reader_workers=self.options.reader_workers,
                                     fallback_mpp=self.options.fallback_mpp)
                kwargs = dict(chunk_size=request.chunk_size or None,
                              min_tissue=request.min_tissue if request.HasField("min_tissue") else None,
                              roi_threshold=(request.roi_threshold if request.HasField("roi_threshold")
                                             else None))
                scorer.check_parameters(**kwargs)
                first = True
                async for event in _in_thread(lambda: scorer.score(
                        path, cancel=cancel, display_path=request.slide_path, **kwargs), cancel):
                    if first and isinstance(event, PatchChunk):
                        self.metrics.first_score.observe(time.perf_counter() - started)
                        first = False
                    yield event_pb(event)
        except Exception as exc:  # noqa: BLE001 - every error is one status
            cancel.set()
            code = status_of(exc).name
            await self._fail(method, context, exc, request.slide_path, path)
        else:
            code = "OK"
        finally:   # completed, failed, cancelled or the client gone: counted once, here
            cancel.set()
            self._ended(method, context, started, code)
            self.metrics.in_flight.dec()

    # ScoreTiles ------------------------------------------------------------------------------
    async def ScoreTiles(self, request_iterator, context):
        method, started = "ScoreTiles", time.perf_counter()
        self.metrics.in_flight.inc()
        feeder = code = None
        try:
            with self._slot(), self.source.lease() as model:
                engine, ref = model.engine, model_ref_pb(model.ref)
                # Requests are submitted as they arrive (a few ahead of the replies), so the
                # batcher can merge them with other streams' tiles.
                pending: asyncio.Queue = asyncio.Queue(maxsize=4)

                async def feed():
                    try:
                        async for req in request_iterator:
                            tiles = decode_tiles(req, engine.tile_size)
                            await pending.put((req, asyncio.wrap_future(engine.submit(tiles))))
                        await pending.put(None)
                    except Exception as exc:  # noqa: BLE001 - handed to the replying side
                        await pending.put(exc)

                feeder = asyncio.create_task(feed())
                index = 0
                while (item := await pending.get()) is not None:
                    if isinstance(item, Exception):
                        raise item
                    req, future = item
                    outputs = await future
                    distance = (engine.domain.tile_distance(outputs[FEATURES])
                                if engine.domain is not None else None)
                    yield pb.ScoreTilesResponse(score=outputs["patch_scores"].tolist(), x=req.x,
                                                y=req.y, batch_index=index, model=ref,
                                                domain_distance=_known(distance))
                    index += 1
        except Exception as exc:  # noqa: BLE001
            if context.cancelled():   # the client went away: its reads fail, nobody to answer
                code = None
            else:
                code = status_of(exc).name
                await self._fail(method, context, exc)
        else:
            # a client that went away can also end the request stream as if it had finished
            code = None if context.cancelled() else "OK"
        finally:
            if feeder is not None:
                feeder.cancel()
            self._ended(method, context, started, code)
            self.metrics.in_flight.dec()

    # GetModel --------------------------------------------------------------------------------
    async def GetModel(self, request, context):
        method, started = "GetModel", time.perf_counter()
        code = None
        try:
            with self.source.lease() as model:
                info = model_info(model)
        except Exception as exc:  # noqa: BLE001
            code = status_of(exc).name
            await self._fail(method, context, exc)
        else:
            code = "OK"
            return info
        finally:
            self._ended(method, context, started, code)


def model_info(model: LoadedModel) -> pb.ModelInfo:
    engine, manifest = model.engine, model.engine.manifest
    return pb.ModelInfo(
        model=model_ref_pb(model.ref), head=manifest.head,
        tile_size=manifest.tiling.tile_size, tile_level=0,
        input_px=manifest.tiling.tile_size, input_mpp=manifest.tiling.target_mpp,
        feature_dim=manifest.feature_dim, threshold=manifest.slide_threshold,
        roi_threshold=manifest.roi_threshold,
        provider=PROVIDER_NAMES[engine.provider], providers=list(engine.providers),
        manifest_json=json.dumps(manifest.to_dict(), sort_keys=True),
        backend=engine.backend, precision=engine.precision,
        backend_choice_json=json.dumps(engine.choice_table))


async def _in_thread(make_events, cancel: threading.Event):
    """Run a blocking generator in its own thread; yield its items on the event loop.

    At most MAX_BUFFERED_EVENTS items wait for the client; the producer blocks (checking
    `cancel`) beyond that. Errors of the generator are raised here. Leaving early sets `cancel`.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    credits = threading.Semaphore(MAX_BUFFERED_EVENTS)

    def put(item):
        with contextlib.suppress(RuntimeError):   # the loop is gone (server shutting down)
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def produce():
        try:
            for event in make_events():
                while not credits.acquire(timeout=0.05):
                    if cancel.is_set():
                        return
                put(("event", event))
        except BaseException as exc:  # noqa: BLE001 - raised on the loop side
            put(("error", exc))
        else:
            put(("end", None))

    threading.Thread(target=produce, name="score-slide", daemon=True).start()
    try:
        while True:
            kind, value = await queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
            credits.release()
    finally:
        cancel.set()


# -- server lifecycle ---------------------------------------------------------------------------
@dataclass
class ServerConfig:
    model: str
    slide_roots: list[str]
    host: str = "127.0.0.1"
    port: int = 50051
    token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_port: int | None = None
    max_concurrent: int = 16
    provider: str = DEFAULT_PROVIDER
    precision: str = DEFAULT_PRECISION
    backend: str = DEFAULT_BACKEND
    batch_size: int = DEFAULT_BATCH_SIZE
    max_wait_ms: float = DEFAULT_MAX_WAIT_S * 1000
    threads: int | None = None
    reader_workers: int | None = None
    tracking_uri: str | None = None
    poll_interval: float = 30.0
    grace: float = 30.0
    fallback_mpp: float | None = None
    engine_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_concurrent < 1 or self.poll_interval <= 0:
            raise ConfigError("--max-concurrent must be >= 1 and --poll-interval > 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        self.engine  # noqa: B018 - checks the engine options now, not at the first model load

    @property
    def engine(self) -> EngineOptions:
        return EngineOptions(self.provider, self.precision, self.batch_size, self.threads,
                             self.max_wait_ms / 1000, self.backend)


class ScoringServer:
    """The grpc.aio server with its model source, health, reflection and metrics."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.roots = SlideRoots(config.slide_roots)
        token = read_token(config.token_file) if config.token_file else None
        self.metrics = ServerMetrics()
        self.interceptors = [] if token is None else [BearerTokenInterceptor(
            token, on_denied=lambda method: self.metrics.record(
                method.rpartition("/")[2], "UNAUTHENTICATED", 0.0))]
        self.spec = ModelSpec.parse(config.model)
        self.source = ModelSource(self.spec, self._make_engine, tracking_uri=config.tracking_uri,
                                  poll_interval=config.poll_interval,
                                  on_change=self._model_changed,
                                  on_error=lambda exc: self.metrics.model_errors.inc())
        self.service = SlideScoringService(
            self.source, self.roots, self.metrics,
            ServerOptions(config.max_concurrent, config.reader_workers, config.fallback_mpp))
        self.health = health.aio.HealthServicer()
        self.metrics.queue_depth.set_function(
            lambda: self.source.current.engine.queue_depth() if self.source.current else 0)
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready = asyncio.Event()

    def _make_engine(self, bundle_dir: Path, ref: ModelRef) -> Engine:
        return self.config.engine.engine(bundle_dir, model=ref, on_batch=self.metrics.on_batch,
                                         **self.config.engine_kwargs)

    def _model_changed(self, model: LoadedModel) -> None:
        """From the poll thread: metrics now, health on the loop."""
        self.metrics.set_model(model.ref, PROVIDER_NAMES[model.engine.provider],
                               model.engine.backend, model.engine.precision)
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._set_serving(True), self._loop)

    async def _set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE):
            await self.health.set(name, status)
        if serving:
            self.ready.set()

    async def start(self) -> int:
        c = self.config
        self._loop = asyncio.get_running_loop()
        self.ready = asyncio.Event()
        await self._set_serving(False)
        self.server = grpc.aio.server(interceptors=self.interceptors, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024)])
        pb_grpc.add_SlideScoringServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        address = f"{c.host}:{c.port}"
        if c.tls_cert:
            self.port = self.server.add_secure_port(address, server_credentials(c.tls_cert, c.tls_key))
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise ConfigError(f"cannot listen on {address}")
        await self.server.start()
        if c.metrics_port is not None:
            self.metrics.serve(c.metrics_port, c.host)
            log.info("metrics on http://%s:%d/metrics", c.host, c.metrics_port)
        log.info("milroi-serve listening on %s:%d (%s), slide roots %s, model %s",
                 c.host, self.port, "TLS" if c.tls_cert else "plaintext",
                 ", ".join(map(str, self.roots.roots)), c.model)
        self.source.start()   # loads in the background: health says NOT_SERVING until then
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, no new calls, running ones get `grace` seconds."""
        grace = self.config.grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        self.source.stop()


# -- command line ------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig(model="", slide_roots=[])   # the defaults, stated once in ServerConfig
    parser.add_argument("--model", required=True,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION or a bundle folder")
    parser.add_argument("--slide-root", action="append", required=True, dest="slide_roots",
                        help="folder slides are read from (repeatable); request paths are relative to it")
    parser.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    parser.add_argument("--port", type=int, default=d.port,
                        help=f"port (default {d.port}, 0 = any free)")
    parser.add_argument("--token-file", default=None,
                        help="file holding the bearer token clients must send (every "
                             "method but grpc.health.v1, server reflection included)")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key)")
    parser.add_argument("--tls-key", default=None, help="PEM private key")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port")
    parser.add_argument("--max-concurrent", type=int, default=d.max_concurrent,
                        help="streams served at once; more get RESOURCE_EXHAUSTED "
                             f"(default {d.max_concurrent})")
    add_engine_arguments(parser, batching=True)
    parser.add_argument("--reader-workers", type=int, default=None,
                        help="tile-reading threads per slide (default: one per core, at least 2)")
    add_tracking_uri_argument(parser)
    parser.add_argument("--poll-interval", type=float, default=d.poll_interval,
                        help=f"seconds between checks of the model alias (default {d.poll_interval:g})")
    parser.add_argument("--grace", type=float, default=d.grace,
                        help=f"seconds in-flight streams get to finish on SIGTERM (default {d.grace:g})")
    add_fallback_mpp_argument(parser)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    engine = EngineOptions.from_args(args)
    return ServerConfig(
        model=args.model, slide_roots=args.slide_roots, host=args.host, port=args.port,
        token_file=args.token_file, tls_cert=args.tls_cert, tls_key=args.tls_key,
        metrics_port=args.metrics_port, max_concurrent=args.max_concurrent,
        provider=engine.provider, precision=engine.precision, backend=engine.backend,
        batch_size=engine.batch_size,
        max_wait_ms=engine.max_wait_s * 1000, threads=engine.threads,
        reader_workers=args.reader_workers, tracking_uri=args.tracking_uri,
        poll_interval=args.poll_interval, grace=args.grace, fallback_mpp=args.fallback_mpp)


async def serve(config: ServerConfig) -> int:
    server = ScoringServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining in-flight streams (grace %.0f s)", config.grace)
    await server.stop()
    log.info("stopped")
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(serve(config_from_args(args)))
