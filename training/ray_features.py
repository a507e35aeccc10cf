"""`milroi-train features ... --ray ADDRESS|auto|local`: feature extraction over Ray actors.

Each actor builds the backbone once (`training.extraction.feature_model`: onnxruntime on
its CPUs, torch on its GPU when it has one) and runs
`training.extraction.extract_features` on whole slides, writing FEATURES_DIR/h5_files/<slide>.h5
itself. Unlike the scoring job, the actors write: a slide's features are large (100k tiles x
1024 float32 = 400 MB for a Camelyon slide) and shipping them through the driver would double
the traffic, while each slide has its own file, written under a temp name and renamed when
complete, so the writers never touch the same file. A shared file system with the same paths
on every node is assumed. Resumability is the local run's: a finished .h5 exists, a killed
write leaves only a hidden .partial file, and a rerun skips the finished slides.

Failures: a bad slide (SlideError) is reported and counted, as in the local run, and not
retried (it fails the same way every time). A worker that dies is restarted up to
`max_restarts` times, the slide re-run on the restarted actor; past that the slide is counted
as failed, the actor replaced, and the other slides go on.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import ray
from ray.exceptions import RayActorError, RayTaskError

from core.errors import ConfigError, MilroiError
from core.ray_cluster import RayOptions, connect, default_actor_count, first_line
from training.extraction import ExtractionOptions, FeatureModelOptions, extract_features, feature_model
from training.feature_file import feature_path
from wsi.discovery import slide_name

log = logging.getLogger(__name__)


class FeatureActor:
    """The work of one Ray actor: one backbone, whole slides in, one h5 per slide written."""

    def __init__(self, model_options: FeatureModelOptions):
        self.model, self.device = feature_model(model_options)

    def extract(self, slide_path: str, out_h5: str, options: ExtractionOptions) -> dict:
        summary = extract_features(slide_path, out_h5, self.model, options, device=self.device,
                                   progress=False)
        return {**summary, "path": str(summary["path"])}


def extract_on_ray(slides: list[Path], out: Path, model_options: FeatureModelOptions,
                   options: ExtractionOptions, ray_options: RayOptions,
                   actor_class: type = FeatureActor) -> int:
    """Features of `slides` into `out` over Ray actors; the exit code of `features.run`."""
    if model_options.threads is not None and model_options.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {model_options.threads}")
    owns_ray = connect(ray_options.address)
    try:
        weights = model_options.weights
        if weights not in ("imagenet", "pretrained", "none") and Path(weights).exists():
            weights = str(Path(weights).absolute())  # as the other nodes see it
        remote = ray.remote(actor_class).options(
            num_cpus=ray_options.num_cpus, num_gpus=ray_options.num_gpus,
            max_restarts=ray_options.max_restarts, max_task_retries=ray_options.max_restarts)
        device = (model_options.device if model_options.device != "auto"
                  else ("cuda" if ray_options.num_gpus else "cpu"))
        # an actor's onnxruntime threads: its CPU share, not every core of its node
        threads = (model_options.threads if model_options.threads is not None
                   else max(1, int(ray_options.num_cpus)))
        actor_options = dataclasses.replace(model_options, weights=weights, device=device,
                                            threads=threads)

        def new_actor():
            return remote.remote(actor_options)

        count = ray_options.actors or default_actor_count(ray_options.num_cpus,
                                                          ray_options.num_gpus)
        todo = [(str(path.absolute()), str(feature_path(out, slide_name(path)).absolute()))
                for path in slides]
        log.info("%d slides over %d Ray actors (%s CPU, %s GPU each)", len(todo), count,
                 ray_options.num_cpus, ray_options.num_gpus)
        failed, written, skipped = _run_pool(new_actor, count, todo, options,
                                             ray_options.max_restarts)
    finally:
        if owns_ray:
            ray.shutdown()
    log.info("features: %d slides written, %d already done, %d failed", written, skipped,
             len(failed))
    if failed:
        log.error("failed slides: %s", ", ".join(failed))
        return 1
    return 0


def _run_pool(new_actor, count: int, todo: list[tuple[str, str]], options: ExtractionOptions,
              max_restarts: int) -> tuple[list[str], int, int]:
    """One slide in flight per actor; an actor takes the next slide when it returns one."""
    actors = [new_actor() for _ in range(min(count, len(todo)))]
    queue = iter(todo)
    in_flight: dict = {}  # ObjectRef -> (actor, slide path)

    def submit(actor) -> None:
        item = next(queue, None)
        if item is not None:
            in_flight[actor.extract.remote(item[0], item[1], options)] = (actor, item[0])

    for actor in actors:
        submit(actor)
    failed, written, skipped = [], 0, 0
    try:
        while in_flight:
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            actor, path = in_flight.pop(ref)
            try:
                summary = ray.get(ref)
                skipped += summary["skipped"]
                written += not summary["skipped"]
                if summary.get("no_tissue"):
                    log.warning("%s: no tissue tile, recorded as no_tissue (0 tiles)", path)
            except RayTaskError as exc:  # the slide's own error (corrupt file ...)
                log.error("%s", exc.cause if isinstance(exc.cause, MilroiError) else exc)
                failed.append(path)
            except RayActorError as exc:  # the worker died more than max_restarts times
                log.error("%s: the Ray worker extracting it died (%d restarts): %s", path,
                          max_restarts, first_line(exc))
                failed.append(path)
                ray.kill(actor, no_restart=True)
                actors[actors.index(actor)] = actor = new_actor()
            submit(actor)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    return failed, written, skipped
