"""Python client of the milroi scoring service (`milroi.v1.SlideScoring`) and `milroi-serve client`.

`ScoringClient` wraps one synchronous gRPC channel:

- `score_slide(path)` streams one slide: the returned `SlideScoringStream` already holds the
  `header`, iterates over `PatchChunk`s (numpy coords, scores, flags) as the server computes
  them, and has the `summary` (slide score, label, the server's ROI polygons as shapely
  Polygons, mpp) once exhausted; `score_slide_all(path)` collects all of it into one
  `results.scored.ScoredSlide`, the type the in-process pipeline gives too;
- `score_tiles(tiles)` scores uint8 [N, 224, 224, 3] tiles the caller read itself;
- `get_model()` describes the served model; `wait_until_serving()` polls grpc.health.v1.

Every call has a deadline (`timeout`, seconds, for the whole call including retries), carries the
bearer token when one is given (as gRPC call credentials: over TLS, or over plaintext only to a
loopback address unless `insecure_token=True`), and retries with exponential backoff on UNAVAILABLE only, and
only until the first response has arrived: a stream that broke after it delivered scores is
never replayed, so a caller never sees a patch twice. Every failure is a `ScoringError` with the
gRPC code and the server's message.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shapely.geometry import Polygon

from core.bundle import encoder_name
from core.domain import UNKNOWN, DomainCheck
from core.errors import AuthError, ConfigError, MilroiError, RequestError
from core.tiling import TissueParams
from milroi.v1 import scoring_pb2, scoring_pb2_grpc
from results.rois import with_tile_stats
from results.scored import ModelRef, PatchChunk, Roi, ScoredSlide, SlideHeader, SlideSummary, Timings
from serving.overrides import add_scoring_arguments
from serving.security import is_loopback_target, read_token

log = logging.getLogger(__name__)

# Summaries with many ROI polygons and manifests can exceed gRPC's 4 MiB receive default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Tiles per ScoreTiles request: 16 x 224 x 224 x 3 bytes = 2.4 MB, under the servers' 4 MiB default.
DEFAULT_TILE_BATCH = 16
_BACKOFF_INITIAL_S = 0.5
_BACKOFF_MAX_S = 8.0

T = TypeVar("T")


class ScoringError(MilroiError):
    """A failed call to the scoring service: the gRPC status code and the server's message."""

    def __init__(self, code: grpc.StatusCode, message: str, *, target: str = "", method: str = "",
                 attempts: int = 1):
        self._init = (code, message, target, method, attempts)
        self.code = code
        self.message = message
        self.target = target
        self.method = method
        self.attempts = attempts  # calls made, retries included
        where = f"{method} on {target}" if target else method
        super().__init__(f"{where} failed: {code.name}: {message}")

    def __reduce__(self):   # keyword-only arguments: pickle what __init__ was given
        code, message, target, method, attempts = self._init
        return _scoring_error, (code.name, message, target, method, attempts)

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError, target: str, method: str, attempts: int) -> ScoringError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", target=target, method=method,
                   attempts=attempts)


def _scoring_error(code_name: str, message: str, target: str, method: str,
                   attempts: int) -> ScoringError:
    return ScoringError(grpc.StatusCode[code_name], message, target=target, method=method,
                        attempts=attempts)


# ---------------------------------------------------------------------------------------------
# Plain results (no protobuf types leak out of this module)


def model_ref_from_proto(ref: scoring_pb2.ModelRef) -> ModelRef:
    return ModelRef(ref.name, ref.version, ref.alias, ref.run_id)


def header_from_proto(h: scoring_pb2.SlideHeader) -> SlideHeader:
    # A server from before input_px tiled level 0 only, where tile_size is the input side
    return SlideHeader(h.slide_path, PurePosixPath(h.slide_path).stem, h.width, h.height,
                       h.level_count, h.mpp, h.mpp_source, h.tile_size, h.tile_level, h.tile_count,
                       model_ref_from_proto(h.model), h.input_px or h.tile_size,
                       (h.bounds_x, h.bounds_y), h.model_mpp or math.nan,
                       h.scale_factor or math.nan, h.upsampled)


def summary_from_proto(s: scoring_pb2.SlideSummary, slide_path: str) -> SlideSummary:
    rois = [Roi(_polygon_from_proto(p), p.area_um2, p.max_score, p.mean_score, p.tiles)
            for p in s.rois]
    timings = Timings(**{f.name: getattr(s.timings, f.name) for f in fields(Timings)})
    # A server from before slide_logit sends 0.0 for it: recover it from the score.
    logit = s.slide_logit if s.HasField("slide_logit") else _logit(s.slide_score)
    return SlideSummary(slide_path, s.slide_score, s.label, s.threshold, s.roi_threshold,
                        s.tile_count, s.artefact_count, rois, s.mpp, timings,
                        model_ref_from_proto(s.model), logit, domain_from_proto(s))


def domain_from_proto(s: scoring_pb2.SlideSummary) -> DomainCheck:
    """The domain check of a summary; a server from before it, or a model without a
    description, leaves in_domain unset: not known."""
    if not s.HasField("in_domain"):
        return DomainCheck(None, math.nan, tuple(s.domain_reasons) or UNKNOWN.reasons)
    return DomainCheck(s.in_domain, s.domain_score if s.HasField("domain_score") else math.nan,
                       tuple(s.domain_reasons), dict(s.domain_criteria))


def _logit(p: float) -> float:
    return math.nan if not 0.0 < p < 1.0 else math.log(p / (1.0 - p))


@dataclass(frozen=True)
class ServedModel:
    model: ModelRef
    head: str
    input_px: int        # side of the model's input tile, px at input_mpp
    input_mpp: float     # the model's input pixel size, um/px (NaN from an older server)
    feature_dim: int
    slide_threshold: float
    roi_threshold: float
    provider: str
    providers: list[str]
    manifest: dict = field(default_factory=dict)

    @property
    def tissue(self) -> TissueParams | None:
        """The model's tissue-mask settings (None from a server that does not send its
        manifest)."""
        values = self.manifest.get("tissue")
        return TissueParams.from_dict(values) if isinstance(values, dict) else None

    @property
    def encoder(self) -> str:
        """The encoder's registry name (training.encoders) from the served manifest; "" from a
        server that does not send it."""
        return encoder_name(self.manifest.get("encoder") or {},
                            str(self.manifest.get("backbone_layer", "")))

    @classmethod
    def from_proto(cls, m: scoring_pb2.ModelInfo) -> ServedModel:
        manifest = json.loads(m.manifest_json) if m.manifest_json else {}
        return cls(model_ref_from_proto(m.model), m.head, m.input_px or m.tile_size,
                   m.input_mpp or math.nan,
                   m.feature_dim, m.threshold, m.roi_threshold, m.provider, list(m.providers),
                   manifest)


def _polygon_from_proto(p: scoring_pb2.Polygon) -> Polygon:
    def ring(r: scoring_pb2.Ring) -> np.ndarray:
        return np.column_stack([np.asarray(r.x, np.float64), np.asarray(r.y, np.float64)])

    return Polygon(ring(p.exterior), [ring(h) for h in p.holes])


# ---------------------------------------------------------------------------------------------
# The streaming result of one slide


class SlideScoringStream:
    """One ScoreSlide call in progress: `.header` now, chunks by iteration, `.summary` at the end.

    Use it as a context manager (or call `cancel()`) when you may stop early: that cancels the
    call, and the server stops reading and scoring the slide.
    """

    def __init__(self, call, first: scoring_pb2.ScoreSlideResponse, error: Callable):
        self._call = call
        self._error = error  # grpc.RpcError -> ScoringError
        if first.WhichOneof("kind") != "header":
            call.cancel()
            raise error(None, f"stream began with {first.WhichOneof('kind')!r}, not a header")
        self.header = header_from_proto(first.header)
        self._summary: SlideSummary | None = None
        self._received = 0

    @property
    def summary(self) -> SlideSummary:
        if self._summary is None:
            raise RuntimeError("the summary arrives after the last chunk: exhaust the stream first")
        return self._summary

    @property
    def received(self) -> int:
        """Patches received so far."""
        return self._received

    def __iter__(self) -> Iterator[PatchChunk]:
        try:
            for response in self._call:
                kind = response.WhichOneof("kind")
                if kind == "patches":
                    yield self._chunk(response.patches)
                elif kind == "summary":
                    self._summary = summary_from_proto(response.summary, self.header.slide_path)
                else:
                    raise self._error(None, f"unexpected {kind!r} message in the stream")
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        except ScoringError:  # a protocol error: stop the server's work on this slide too
            self._call.cancel()
            raise
        if self._summary is None:
            raise self._error(None, "stream ended without a summary")
        if self._summary.tile_count != self._received:
            raise self._error(None, f"summary counts {self._summary.tile_count} tiles but "
                                    f"{self._received} scores arrived")

    def _chunk(self, p: scoring_pb2.PatchScores) -> PatchChunk:
        n = len(p.score)
        if p.offset != self._received or len(p.x) != n or len(p.y) != n:
            raise self._error(None, f"malformed chunk at offset {p.offset} (expected offset "
                                    f"{self._received}, {n} scores, {len(p.x)} x, {len(p.y)} y)")
        if len(p.artefact) not in (0, n) or len(p.domain_distance) not in (0, n):
            raise self._error(None, f"malformed chunk at offset {p.offset}: {len(p.artefact)} "
                                    f"artefact flags and {len(p.domain_distance)} domain "
                                    f"distances for {n} scores")
        self._received += n
        flags = np.asarray(p.artefact, np.uint8) if len(p.artefact) else np.zeros(n, np.uint8)
        coords = np.column_stack([np.asarray(p.x, np.int64), np.asarray(p.y, np.int64)])
        distance = (np.asarray(p.domain_distance, np.float32) if len(p.domain_distance)
                    else np.full(n, np.nan, np.float32))
        return PatchChunk(p.offset, coords.reshape(-1, 2), np.asarray(p.score, np.float32), flags,
                          distance)

    def collect(self, progress: Callable[[int], None] | None = None) -> ScoredSlide:
        """Read the rest of the stream into one `ScoredSlide`; `progress(n)` after each chunk.

        The ROIs are the server's polygons; their tile statistics are taken again from the
        scores received, in float64 (the message carries them as float32)."""
        chunks = []
        for chunk in self:
            chunks.append(chunk)
            if progress is not None:
                progress(len(chunk))
        scored = ScoredSlide.from_chunks(self.header, chunks, self.summary)
        clean = scored.clean
        return scored.with_rois(with_tile_stats(self.summary.polygons, scored.coords[clean],
                                                scored.scores[clean], scored.tile_size,
                                                self.summary.mpp))

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> SlideScoringStream:
        return self

    def __exit__(self, *exc) -> None:
        if self._summary is None:
            self.cancel()


# ---------------------------------------------------------------------------------------------
# The client


class ScoringClient:
    """A synchronous client of one milroi server. Thread-safe; use as a context manager.

    target   "host:port"
    token    bearer token sent with every call (`authorization: Bearer`, as call credentials)
    tls_ca   PEM file of the CA that signed the server certificate (TLS); `tls=True` without it
             uses the system roots; neither: plaintext
    insecure_token  allow the token over plaintext to a non-loopback target (it travels in
             clear); without it that is refused here, before any connection (ConfigError)
    timeout  default deadline of a call in seconds (None: no deadline), retries included
    retries  extra attempts after UNAVAILABLE, with exponential backoff (0.5 s, 1 s, 2 s, ...)
    """

    def __init__(self, target: str, *, token: str | None = None, tls_ca: str | Path | None = None,
                 tls: bool = False, timeout: float | None = None, retries: int = 3,
                 insecure_token: bool = False):
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self._channel = open_channel(target, token=token, tls_ca=tls_ca, tls=tls,
                                     insecure_token=insecure_token)
        self._stub = scoring_pb2_grpc.SlideScoringStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # -- lifecycle

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ScoringClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- retry and deadline machinery

    def _deadline(self, timeout: float | None) -> float | None:
        timeout = self.timeout if timeout is None else timeout
        return None if timeout is None else time.monotonic() + timeout

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        return None if deadline is None else max(deadline - time.monotonic(), 0.0)

    def _with_retries(self, method: str, attempt: Callable[[float | None], T],
                      deadline: float | None) -> tuple[T, int]:
        """Run `attempt(timeout)` until it returns, retrying UNAVAILABLE with backoff.

        `attempt` must return once the first response has arrived, so that a retry can never
        replay results the caller has already seen. Returns (result, attempts made).
        """
        backoff = _BACKOFF_INITIAL_S
        for attempt_no in range(1, self.retries + 2):
            try:
                return attempt(self._remaining(deadline)), attempt_no
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                last_try = attempt_no > self.retries
                # Jitter keeps many clients of a restarting server from retrying in lockstep.
                pause = backoff * random.uniform(0.8, 1.2)
                remaining = self._remaining(deadline)
                if code != grpc.StatusCode.UNAVAILABLE or last_try or \
                        (remaining is not None and remaining <= pause):
                    raise ScoringError.from_rpc(exc, self.target, method, attempt_no) from None
                log.warning("%s on %s: UNAVAILABLE (%s); retry %d/%d in %.1f s", method,
                            self.target, exc.details(), attempt_no, self.retries, pause)
                time.sleep(pause)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
        raise AssertionError("unreachable")

    def _error_factory(self, method: str, attempts: int) -> Callable:
        def make(exc: grpc.RpcError | None, message: str = "") -> ScoringError:
            if exc is not None:
                return ScoringError.from_rpc(exc, self.target, method, attempts)
            return ScoringError(grpc.StatusCode.INTERNAL, f"protocol error: {message}",
                                target=self.target, method=method, attempts=attempts)
        return make

    # -- RPCs

    def get_model(self, *, timeout: float | None = None) -> ServedModel:
        """The model the server is serving now."""
        info, _ = self._with_retries(
            "GetModel", lambda t: self._stub.GetModel(scoring_pb2.GetModelRequest(), timeout=t),
            self._deadline(timeout))
        return ServedModel.from_proto(info)

    def score_slide(self, slide_path: str, *, chunk_size: int = 0, min_tissue: float | None = None,
                    roi_threshold: float | None = None,
                    timeout: float | None = None) -> SlideScoringStream:
        """Start scoring a slide (path relative to the server's slide root); returns once the
        header has arrived. The deadline covers the whole stream."""
        request = scoring_pb2.ScoreSlideRequest(slide_path=str(slide_path), chunk_size=chunk_size)
        if min_tissue is not None:
            request.min_tissue = min_tissue
        if roi_threshold is not None:
            request.roi_threshold = roi_threshold

        def attempt(t):
            call = self._stub.ScoreSlide(request, timeout=t)
            try:
                return call, next(call)
            except StopIteration:
                raise ScoringError(grpc.StatusCode.INTERNAL, "protocol error: empty stream",
                                   target=self.target, method="ScoreSlide") from None

        (call, first), attempts = self._with_retries("ScoreSlide", attempt,
                                                     self._deadline(timeout))
        return SlideScoringStream(call, first, self._error_factory("ScoreSlide", attempts))

    def score_slide_all(self, slide_path: str, **kwargs) -> ScoredSlide:
        """Score a slide and return every patch score, the header and the summary."""
        with self.score_slide(slide_path, **kwargs) as stream:
            return stream.collect()

    def score_tiles(self, tiles: np.ndarray, coords: np.ndarray | None = None, *,
                    batch_size: int = DEFAULT_TILE_BATCH,
                    timeout: float | None = None) -> np.ndarray:
        """Tumour probability (float32 [N]) of uint8 RGB tiles [N, size, size, 3]."""
        tiles = np.ascontiguousarray(tiles)
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[3] != 3 \
                or tiles.shape[1] != tiles.shape[2]:
            raise RequestError(f"tiles must be uint8 [N, size, size, 3], got {tiles.dtype} "
                               f"{list(tiles.shape)}")
        if coords is not None:
            coords = np.asarray(coords, np.int64).reshape(len(tiles), 2)
        n, size = len(tiles), tiles.shape[1]
        if n == 0:
            return np.zeros(0, np.float32)
        starts = range(0, n, batch_size)

        def requests():
            for start in starts:
                block = slice(start, start + batch_size)
                request = scoring_pb2.ScoreTilesRequest(
                    tiles=tiles[block].tobytes(), count=len(tiles[block]), tile_size=size)
                if coords is not None:
                    request.x.extend(coords[block, 0].tolist())
                    request.y.extend(coords[block, 1].tolist())
                yield request

        def attempt(t):
            call = self._stub.ScoreTiles(requests(), timeout=t)
            return call, next(call)

        (call, first), attempts = self._with_retries("ScoreTiles", attempt,
                                                     self._deadline(timeout))
        error = self._error_factory("ScoreTiles", attempts)
        scores = np.empty(n, np.float32)
        try:
            for batch_index, response in enumerate(_chain(first, call)):
                start = batch_index * batch_size
                expected = min(batch_size, n - start)
                if response.batch_index != batch_index or len(response.score) != expected:
                    call.cancel()
                    raise error(None, f"response {response.batch_index} with "
                                      f"{len(response.score)} scores, expected batch {batch_index} "
                                      f"of {expected}")
                scores[start:start + expected] = response.score
        except grpc.RpcError as exc:
            raise error(exc) from None
        if batch_index != len(starts) - 1:
            raise error(None, f"{batch_index + 1} responses for {len(starts)} batches")
        return scores

    def wait_until_serving(self, timeout: float = 30.0, service: str = "") -> None:
        """Block until the server's health service reports SERVING for `service` ("" = the
        server as a whole); raises ScoringError(DEADLINE_EXCEEDED) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        request = health_pb2.HealthCheckRequest(service=service)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ScoringError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"not serving after {timeout:g} s (last: {last})",
                                   target=self.target, method="Health.Check")
            try:
                # wait_for_ready: wait for the connection instead of failing while it is down.
                reply = self._health.Check(request, timeout=min(remaining, 5.0),
                                           wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise ScoringError.from_rpc(exc, self.target, "Health.Check", 1) from None
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))


def _chain(first, rest):
    yield first
    yield from rest


# ---------------------------------------------------------------------------------------------
# The channel and its credentials

_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def open_channel(target: str, *, token: str | None = None, tls_ca: str | Path | None = None,
                 tls: bool = False, insecure_token: bool = False) -> grpc.Channel:
    """A channel to `target` whose calls carry `token` (if any) as call credentials.

    TLS (`tls_ca` or `tls`): the token rides on the TLS channel. Plaintext with a token: to a
    loopback target over gRPC's local credentials (gRPC checks that the peer is this machine);
    to any other target only with `insecure_token`, else ConfigError, raised before any
    connection is made.
    """
    if tls_ca is not None or tls:
        try:
            roots = Path(tls_ca).read_bytes() if tls_ca is not None else None
        except OSError as exc:
            raise AuthError(f"cannot read TLS CA file {tls_ca}: {exc.strerror or exc}") from None
        creds = grpc.ssl_channel_credentials(root_certificates=roots)
        if token:
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(token))
        return grpc.secure_channel(target, creds, options=_CHANNEL_OPTIONS)
    if not token:
        return grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
    if insecure_token:
        return insecure_token_channel(target, token)
    if not is_loopback_target(target):
        raise ConfigError(f"refusing to send the bearer token in clear to {target}, which is not "
                          "a loopback address: connect with TLS (--tls-ca), or pass "
                          "--insecure-token to send it unencrypted anyway")
    kind = (grpc.LocalConnectionType.UDS if target.startswith(("unix:", "unix-abstract:"))
            else grpc.LocalConnectionType.LOCAL_TCP)
    creds = grpc.composite_channel_credentials(grpc.local_channel_credentials(kind),
                                               grpc.access_token_call_credentials(token))
    return grpc.secure_channel(target, creds, options=_CHANNEL_OPTIONS)


def insecure_token_channel(target: str, token: str) -> grpc.Channel:
    """A plaintext channel whose calls carry `authorization: Bearer <token>` (--insecure-token).

    gRPC attaches call credentials only to channels it deems secure, so here the same header
    is added by a client interceptor: the explicit, unencrypted case."""
    return grpc.intercept_channel(grpc.insecure_channel(target, options=_CHANNEL_OPTIONS),
                                  _BearerMetadata(token))


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata",
                                                          "credentials", "wait_for_ready",
                                                          "compression")),
                   grpc.ClientCallDetails):
    """grpc.ClientCallDetails with new metadata (the pattern of gRPC's interceptor examples)."""


class _BearerMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                      grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout,
                            [*(details.metadata or ()), self._header], details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)


# ---------------------------------------------------------------------------------------------
# `milroi-serve client score SLIDE` / `milroi-serve client model`


def add_connection_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--server, --token-file, --tls-ca, --timeout, --retries (shared with `milroi-serve score`)."""
    parser.add_argument("--server", required=required, metavar="HOST:PORT",
                        help="address of a running `milroi-serve serve`")
    parser.add_argument("--token-file", type=Path,
                        help="file holding the bearer token the server expects")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) of a TLS server")
    parser.add_argument("--insecure-token", action="store_true",
                        help="send the token over plaintext to a non-loopback server (it travels "
                             "unencrypted; without TLS it is refused otherwise)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="deadline of one call in seconds (default: none)")
    parser.add_argument("--retries", type=int, default=3,
                        help="retries while the server is UNAVAILABLE (default 3)")


def client_from_args(args: argparse.Namespace) -> ScoringClient:
    token = read_token(args.token_file) if args.token_file is not None else None
    return ScoringClient(args.server, token=token, tls_ca=args.tls_ca, timeout=args.timeout,
                         retries=args.retries, insecure_token=args.insecure_token)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    score = actions.add_parser("score", help="score one slide through a running server")
    score.add_argument("slide", help="slide path relative to the server's slide root")
    add_connection_arguments(score)
    score.add_argument("--chunk-size", type=int, default=0,
                       help="patches per streamed message (default: the server's)")
    add_scoring_arguments(score)
    score.add_argument("--out", type=Path,
                       help="write the per-slide outputs (patch CSV, GeoJSON, heatmap, "
                            "Spatiopath JSON) to this folder; needs the slide file locally")
    score.add_argument("--local-slide", type=Path,
                       help="local copy of the slide for --out (default: SLIDE as a local path)")
    score.add_argument("--json", action="store_true",
                       help="print the header and summary as JSON on stdout")
    model = actions.add_parser("model", help="print the model the server is serving")
    add_connection_arguments(model)
    model.add_argument("--json", action="store_true", help="print as JSON")


def run(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        if args.action == "model":
            return _run_model(client, args)
        return _run_score(client, args)


def _run_model(client: ScoringClient, args) -> int:
    model = client.get_model()
    if args.json:
        print(json.dumps(asdict(model), indent=2))
        return 0
    m = model.model
    print(f"model      {m.name} version {m.version}" + (f" (@{m.alias})" if m.alias else ""))
    print(f"run        {m.run_id or '-'}")
    print(f"head       {model.head}, {model.feature_dim}-d features, tile {model.input_px} px "
          f"at {model.input_mpp:g} um/px")
    print(f"encoder    {model.encoder or '-'}")
    print(f"thresholds slide {model.slide_threshold:g}, ROI {model.roi_threshold:g}")
    print(f"provider   {model.provider} (of {', '.join(model.providers)})")
    return 0


def _run_score(client: ScoringClient, args) -> int:
    from tqdm import tqdm

    local_slide = None
    if args.out is not None:
        local_slide = args.local_slide or Path(args.slide)
        if not local_slide.is_file():  # fail before the server spends time on the slide
            raise ConfigError(f"--out needs the slide locally: {local_slide} is not a file "
                              "(give --local-slide)")
    with client.score_slide(args.slide, chunk_size=args.chunk_size, min_tissue=args.min_tissue,
                            roi_threshold=args.roi_threshold) as stream:
        h = stream.header
        log.info("%s: %d x %d px, %.3f um/px (%s), %d tiles, model %s v%s", h.slide_path,
                 h.width, h.height, h.mpp, h.mpp_source, h.tile_count, h.model.name,
                 h.model.version)
        with tqdm(total=h.tile_count, unit="tile", desc=Path(h.slide_path).name,
                  file=sys.stderr, disable=None) as bar:
            result = stream.collect(progress=bar.update)
    if args.out is not None:
        from results.outputs import write_scored_slide
        from wsi.slide import open_slide

        with open_slide(local_slide, fallback_mpp=args.fallback_mpp) as slide:
            paths = write_scored_slide(args.out, slide, result, tissue=client.get_model().tissue)
        log.info("outputs: %s", ", ".join(str(p) for p in paths.values()))
    s = result.summary
    if args.json:
        print(json.dumps({"header": asdict(h), "summary": s.to_dict()}, indent=2))
    else:
        print(f"{h.slide_path}: {s.label} (score {s.slide_score:.4f}, threshold {s.slide_threshold:g}), "
              f"{s.tile_count} tiles ({s.artefact_count} artefacts left out), {len(s.rois)} ROI(s) "
              f"at patch score >= "
              f"{s.roi_threshold:g}, {s.timings.total_s:.1f} s, "
              f"model {s.model.name} v{s.model.version}")
    return 0
