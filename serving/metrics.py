"""Prometheus metrics of the scoring server (prometheus_client, served on --metrics-port).

One `ServerMetrics` per server, on its own CollectorRegistry (two servers in one process, as in
the tests, do not collide). Engine counters (runs, batch sizes, queue depth) are fed by the
engine's batch callback and read at scrape time.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("milroi_requests", "RPCs by method and final status code",
                                ["method", "code"], registry=r)
        self.errors = Counter("milroi_errors", "RPCs that ended with a status other than OK",
                              ["method", "code"], registry=r)
        self.latency = Histogram("milroi_request_seconds", "RPC duration (whole stream)",
                                 ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_score = Histogram("milroi_first_score_seconds",
                                     "ScoreSlide: time from request to the first patch scores",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.tiles = Counter("milroi_tiles_scored", "tiles scored by the model", registry=r)
        self.batches = Histogram("milroi_batch_size", "tiles per model run",
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_seconds = Histogram("milroi_batch_seconds", "duration of one model run",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("milroi_in_flight", "RPCs being served", registry=r)
        self.queue_depth = Gauge("milroi_queue_depth", "tiles waiting for the batcher", registry=r)
        self.model = Info("milroi_model", "model being served", registry=r)
        self.model_swaps = Counter("milroi_model_swaps", "model versions loaded", registry=r)
        self.model_errors = Counter("milroi_model_load_errors", "failed model loads/polls", registry=r)

    def on_batch(self, tiles: int, requests: int, seconds: float) -> None:
        """Engine callback after each model run."""
        self.tiles.inc(tiles)
        self.batches.observe(tiles)
        self.batch_seconds.observe(seconds)

    def set_model(self, ref, provider: str, backend: str = "", precision: str = "") -> None:
        self.model.info({"name": ref.name, "version": str(ref.version), "alias": ref.alias,
                         "run_id": ref.run_id, "provider": provider, "backend": backend,
                         "precision": precision})
        self.model_swaps.inc()

    def record(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        if code != "OK":
            self.errors.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Start the /metrics HTTP endpoint in a daemon thread; returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)
