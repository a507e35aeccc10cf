"""`milroi-serve score ... --ray ADDRESS|auto|local`: the batch job with slides spread over Ray actors.

Each actor holds one onnxruntime engine (`serving.batch.LocalBackend`, the in-process scorer)
and scores whole slides; `RayBackend` is a `serving.batch.SlideScoringBackend`, so the folder
job is `serving.batch.score_folder` unchanged: same slide discovery, done markers, resumability,
summary.csv and failed rows, and the same output files byte for byte.

Why the actors return the scores to the driver instead of writing OUT themselves: a slide's
result is small (int64 coords + float32 score per tile, ~1.2 MB for a 100k-tile slide), while
the writing code (`serving.batch.score_one` -> `wsi.outputs`) then runs in exactly one process,
so there is one writer of OUT/summary.csv and of the done markers (no cross-node races on the
shared file system) and no second copy of the writing code. The driver reads each slide once
more for its heatmap thumbnail (a low pyramid level), hence it needs the slides too: a shared
file system (NFS, Lustre, a mounted bucket) with the same paths on every node is assumed.

Failures:
- a bad slide raises in the actor; the original exception (SlideError ...) is re-raised on the
  driver, so its row in summary.csv says the same as the local run. It is not retried by Ray:
  a corrupt file fails the same way every time (the next run of the job tries it again).
- a worker process that dies (segfault, OOM kill, node lost) is restarted by Ray up to
  `max_restarts` times and the slide it was scoring is re-run on the restarted actor
  (`max_task_retries`); past that the slide gets a `failed` row naming the cause, the dead
  actor is replaced by a fresh one, and the job goes on with the other slides.
"""
from __future__ import annotations

import argparse
import logging
import os
import queue
from pathlib import Path

import ray
from ray.exceptions import RayActorError, RayTaskError

from serving.batch import LocalBackend, ScoredSlide
from wsi.errors import WsiError

log = logging.getLogger(__name__)

DEFAULT_MAX_RESTARTS = 2


class ScoringActor(LocalBackend):
    """The work of one Ray actor: one engine (model loaded once), whole slides in, scores out.

    `LocalBackend` but for the engine's thread count: by default onnxruntime runs one thread
    per core of the node, so N actors on a node would start N x cores threads; here each engine
    gets the CPUs Ray reserved for its actor."""

    def __init__(self, model_uri: str, tracking_uri: str | None, provider: str,
                 min_tissue: float | None, roi_threshold: float | None,
                 threads: int | None = None, precision: str = "fp32"):
        if threads is None:  # in an actor: the CPUs Ray reserved for it
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            threads = max(1, round(cpus))
        super().__init__(model_uri, tracking_uri=tracking_uri, provider=provider,
                         precision=precision, min_tissue=min_tissue, roi_threshold=roi_threshold,
                         threads=threads)

    def describe(self) -> tuple[str, str, int]:
        return self.model, self.model_version, self.engine.threads

    def score(self, path: str, key: str) -> ScoredSlide:
        try:
            return super().score(Path(path), key)
        except WsiError as exc:
            # SlideError(path, cause) does not survive pickling to the driver; its message is
            # what the summary row shows, so send that as a plain WsiError.
            raise WsiError(str(exc)) from None


def connect(address: str, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at `address` ("auto": the one this node belongs to, `ray://host:10001`,
    `host:6379`) or start a local one ("local"); returns True when this call started the
    connection (the caller then shuts it down). An already initialised Ray is used as it is."""
    if ray.is_initialized():
        return False
    if address not in ("auto", "local"):
        _check_reachable(address)
    try:
        if address == "local":
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise WsiError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from exc
    return True


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on an address nobody listens on: ray.init would retry for minutes."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise WsiError(f"--ray {address!r}: give auto, local, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise WsiError(f"cannot reach the Ray cluster at {address!r}: {exc}") from None


def default_actor_count(num_cpus: float, num_gpus: float) -> int:
    """As many actors as the cluster can hold at once: one per `num_gpus` GPUs when actors take
    GPUs, else one per `num_cpus` CPUs."""
    resources = ray.cluster_resources()
    if num_gpus > 0:
        count = int(resources.get("GPU", 0) // num_gpus)
        if count < 1:
            raise WsiError(f"the Ray cluster has no GPU for actors of {num_gpus} GPU(s) "
                           f"(resources: {resources})")
        return count
    return max(1, int(resources.get("CPU", 1) // num_cpus))


def _absolute(uri: str) -> str:
    """A bundle folder given relative to the driver's cwd, as every node sees it (shared FS);
    models:/ URIs are left alone."""
    return str(Path(uri).absolute()) if Path(uri).exists() else uri


def _actor_env() -> dict:
    """Environment the actors need from the driver's: where MLflow is (models:/ URIs)."""
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
           if os.environ.get(k)}
    return {"env_vars": env} if env else {}


class RayBackend:
    """`SlideScoringBackend` over a pool of Ray actors; thread safe: `score_folder` calls
    `score` from as many threads as there are actors, each call borrows one idle actor."""

    def __init__(self, model_uri: str, *, actors: int | None = None, num_cpus: float = 1,
                 num_gpus: float = 0, max_restarts: int = DEFAULT_MAX_RESTARTS,
                 tracking_uri: str | None = None, provider: str = "auto",
                 min_tissue: float | None = None, roi_threshold: float | None = None,
                 precision: str = "fp32", actor_class: type = ScoringActor):
        if max_restarts < 0:
            raise WsiError(f"--ray-max-restarts must be >= 0, got {max_restarts}")
        self.max_restarts = max_restarts
        count = actors or default_actor_count(num_cpus, num_gpus)
        if count < 1:
            raise WsiError(f"--ray-actors must be at least 1, got {count}")
        remote = ray.remote(actor_class).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
            max_task_retries=max_restarts, runtime_env=_actor_env() or None)
        args = (_absolute(model_uri), tracking_uri, provider, min_tissue, roi_threshold)
        self._new_actor = lambda: remote.remote(*args, precision=precision)
        self.actors = [self._new_actor() for _ in range(count)]
        try:
            described = ray.get([actor.describe.remote() for actor in self.actors])
        except (RayTaskError, RayActorError) as exc:
            self.close()
            cause = exc.cause if isinstance(exc, RayTaskError) else exc
            raise WsiError(f"Ray actors could not load model {model_uri}: {cause}") from None
        models = {(name, version) for name, version, _ in described}
        self.engine_threads = [threads for _, _, threads in described]
        if len(models) != 1:  # an alias moved while the actors started: one version per job
            self.close()
            raise WsiError(f"Ray actors loaded different versions of {model_uri}: "
                           f"{sorted(models)}; run the job again")
        (self.model, self.model_version), = models
        self._idle: queue.Queue = queue.Queue()
        for actor in self.actors:
            self._idle.put(actor)
        log.info("Ray: %d actors (%s CPU, %s GPU each) scoring with %s version %s", count,
                 num_cpus, num_gpus, self.model, self.model_version)

    @property
    def workers(self) -> int:
        return len(self.actors)

    def score(self, path: Path, key: str) -> ScoredSlide:
        actor = self._idle.get()
        try:
            scored = ray.get(actor.score.remote(str(Path(path).absolute()), key))
        except RayTaskError as exc:  # the slide's own error, raised in the actor: re-raise it
            raise exc.cause from None
        except RayActorError as exc:  # the worker died more than max_restarts times
            ray.kill(actor, no_restart=True)
            replacement = self._new_actor()
            self.actors[self.actors.index(actor)] = replacement
            actor = replacement
            raise WsiError(f"{path}: the Ray worker scoring it died "
                           f"({self.max_restarts} restarts): {_first_line(exc)}") from None
        finally:
            self._idle.put(actor)
        if scored.model_version != self.model_version:  # a restarted actor re-resolved an alias
            raise WsiError(f"{path}: scored by model version {scored.model_version}, the job "
                           f"runs {self.model_version}; run the job again")
        return scored

    owns_ray = False  # set when this backend opened the Ray connection: close() ends it

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.owns_ray:
            ray.shutdown()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# CLI: the --ray options are serving.batch's; this builds the backend they ask for


def backend_from_args(args: argparse.Namespace) -> RayBackend:
    """The actor pool of one `score` command; its close() also ends the Ray connection when
    this call opened it."""
    owns_ray = connect(args.ray)
    try:
        backend = RayBackend(
            args.model, actors=args.ray_actors, num_cpus=args.ray_num_cpus,
            num_gpus=args.ray_num_gpus, max_restarts=args.ray_max_restarts,
            tracking_uri=args.tracking_uri, provider=args.provider, min_tissue=args.min_tissue,
            roi_threshold=args.roi_threshold, precision=getattr(args, "precision", "fp32"))
    except BaseException:
        if owns_ray:
            ray.shutdown()
        raise
    backend.owns_ray = owns_ray
    return backend
