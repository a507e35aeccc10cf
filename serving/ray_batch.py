"""`milroi-serve score ... --ray ADDRESS|auto|local`: the batch job with slides spread over Ray actors.

Each actor holds one onnxruntime engine (`serving.backends.LocalBackend`, the in-process scorer)
and scores whole slides; `RayBackend` is a `serving.backends.SlideScoringBackend`, so the folder
job is `serving.batch.score_folder` unchanged: same slide discovery, done markers, resumability,
summary.csv and failed rows, and the same output files byte for byte.

Why the actors return the scores to the driver instead of writing OUT themselves: a slide's
result is small (int64 coords + float32 score per tile, ~1.2 MB for a 100k-tile slide), while
the writing code (`serving.batch.score_one` -> `results.outputs`) then runs in exactly one process,
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

import dataclasses
import logging
import os
import queue
from pathlib import Path

import ray
from ray.exceptions import RayActorError, RayTaskError

from core.errors import ClusterError
from core.ray_cluster import RayOptions, connect, default_actor_count, first_line
from results.scored import ScoredSlide
from serving.backends import LocalBackend
from serving.options import EngineOptions
from serving.overrides import ScoringOverrides

log = logging.getLogger(__name__)


class ScoringActor(LocalBackend):
    """The work of one Ray actor: one engine (model loaded once), whole slides in, scores out.

    `LocalBackend` but for the engine's thread count: by default onnxruntime runs one thread
    per core of the node, so N actors on a node would start N x cores threads; here each engine
    gets the CPUs Ray reserved for its actor."""

    def __init__(self, model_uri: str, engine: EngineOptions, overrides: ScoringOverrides,
                 tracking_uri: str | None = None):
        if engine.threads is None:  # in an actor: the CPUs Ray reserved for it
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            engine = dataclasses.replace(engine, threads=max(1, round(cpus)))
        super().__init__(model_uri, engine, overrides, tracking_uri=tracking_uri)

    def describe(self) -> tuple[str, str, int, object]:
        return self.model, self.model_version, self.engine.threads, self.tissue

    def score(self, path: str, key: str, slide=None) -> ScoredSlide:
        return super().score(Path(path), key)   # its errors pickle: the driver gets the same


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

    scores_here = False   # the actors open the slides, maybe on other nodes

    def __init__(self, model_uri: str, ray_options: RayOptions,
                 engine: EngineOptions = EngineOptions(),
                 overrides: ScoringOverrides = ScoringOverrides(), *,
                 tracking_uri: str | None = None, actor_class: type = ScoringActor):
        r = ray_options
        self.max_restarts = r.max_restarts
        self.fallback_mpp = overrides.fallback_mpp
        count = r.actors or default_actor_count(r.num_cpus, r.num_gpus)
        remote = ray.remote(actor_class).options(
            num_cpus=r.num_cpus, num_gpus=r.num_gpus, max_restarts=r.max_restarts,
            max_task_retries=r.max_restarts, runtime_env=_actor_env() or None)
        args = (_absolute(model_uri), engine, overrides, tracking_uri)
        self._new_actor = lambda: remote.remote(*args)
        self.actors = [self._new_actor() for _ in range(count)]
        try:
            described = ray.get([actor.describe.remote() for actor in self.actors])
        except (RayTaskError, RayActorError) as exc:
            self.close()
            cause = exc.cause if isinstance(exc, RayTaskError) else exc
            raise ClusterError(f"Ray actors could not load model {model_uri}: {cause}") from None
        models = {(name, version) for name, version, _, _ in described}
        self.engine_threads = [threads for _, _, threads, _ in described]
        self.tissue = described[0][3]
        if len(models) != 1:  # an alias moved while the actors started: one version per job
            self.close()
            raise ClusterError(f"Ray actors loaded different versions of {model_uri}: "
                               f"{sorted(models)}; run the job again")
        (self.model, self.model_version), = models
        self._idle: queue.Queue = queue.Queue()
        for actor in self.actors:
            self._idle.put(actor)
        log.info("Ray: %d actors (%s CPU, %s GPU each) scoring with %s version %s", count,
                 r.num_cpus, r.num_gpus, self.model, self.model_version)

    @property
    def workers(self) -> int:
        return len(self.actors)

    def score(self, path: Path, key: str, slide=None) -> ScoredSlide:
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
            raise ClusterError(f"{path}: the Ray worker scoring it died "
                               f"({self.max_restarts} restarts): {first_line(exc)}") from None
        finally:
            self._idle.put(actor)
        if scored.model.version != self.model_version:  # a restarted actor re-resolved an alias
            raise ClusterError(f"{path}: scored by model version {scored.model.version}, the job "
                               f"runs {self.model_version}; run the job again")
        return scored

    owns_ray = False  # set when this backend opened the Ray connection: close() ends it

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.owns_ray:
            ray.shutdown()


def open_ray_backend(model_uri: str, ray_options: RayOptions, engine: EngineOptions,
                     overrides: ScoringOverrides, tracking_uri: str | None = None) -> RayBackend:
    """The actor pool of one `score` command; its close() also ends the Ray connection when
    this call opened it."""
    owns_ray = connect(ray_options.address)
    try:
        backend = RayBackend(model_uri, ray_options, engine, overrides, tracking_uri=tracking_uri)
    except BaseException:
        if owns_ray:
            ray.shutdown()
        raise
    backend.owns_ray = owns_ray
    return backend
