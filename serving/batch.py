"""`milroi-serve score SLIDES_DIR --out OUT`: score every slide of a folder, resumably.

The slides are scored either in this process (`--model URI`: onnxruntime engine + the streaming
`serving.pipeline.SlideScorer`, exactly what the server runs) or through a running server
(`--server HOST:PORT`, `serving.client.ScoringClient`). Either way each slide gets the
`results.outputs` files in OUT/<slide>/ (patch CSV, QuPath GeoJSON, heatmap PNG, Spatiopath JSON),
and the folder gets OUT/summary.csv with one row per slide.

Crash safety: every file is written through `core.files.atomic_write` (temp file + rename), and a
slide's `done.json` marker is written last, so a slide counts as finished only when all its
outputs are complete. Killed at any moment (even SIGKILL) and run again, the job skips the
finished slides, re-scores the others, and removes the temp files a killed write left behind.
summary.csv is rewritten (atomically) after every slide. A slide that fails (corrupt file, server
error) gets a `failed` row with its error, the other slides are still scored, failed slides are
tried again on the next run, and the exit code is non-zero.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from core.cli import add_ray_arguments, add_tracking_uri_argument
from core.errors import ConfigError, MilroiError
from core.ray_cluster import RayOptions
from results.layout import (
    SUMMARY_NAME,
    clear_unfinished,
    domain_columns,
    read_done_marker,
    remove_stale_summary_temps,
    write_done_marker,
    write_summary,
)
from serving.backends import LocalBackend, RemoteBackend, SlideScoringBackend
from serving.client import add_connection_arguments, client_from_args
from serving.options import EngineOptions, add_engine_arguments
from serving.overrides import ScoringOverrides, add_scoring_arguments
from wsi.discovery import find_slides, slide_name

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Naming the slides


def slide_keys(root: Path, slides: list[Path]) -> list[str]:
    """Each slide's name in OUT and in summary.csv: its path under `root` without the extension
    (a/b/tumor_001), so slides of the same name in different subfolders do not collide; with the
    extension where two files differ only by it (x.tif and x.svs)."""
    stems = [(path.relative_to(root).parent / slide_name(path)).as_posix() for path in slides]
    counts = Counter(stems)
    return [stem if counts[stem] == 1 else path.relative_to(root).as_posix()
            for stem, path in zip(stems, slides)]


# ---------------------------------------------------------------------------------------------
# The folder job (its files: results.layout)


def score_one(backend: SlideScoringBackend, path: Path, key: str, out_dir: Path) -> dict:
    """Score one slide and write its outputs then its done marker; returns its summary row.
    Never raises for a bad slide or a failed call: the row says `failed` with the error."""
    from results.outputs import write_scored_slide
    from wsi.slide import open_slide

    started = time.perf_counter()
    slide_out = out_dir / key
    row = {"slide": key, "path": str(path), "model": backend.model,
           "model_version": backend.model_version}
    try:
        clear_unfinished(slide_out)
        # Opened once here: an in-process backend scores from this handle, and the writers
        # read the thumbnail and the bounds from it. A backend that scores elsewhere (a server,
        # Ray actors) scores first, so that a slide it rejects fails with its own error.
        if backend.scores_here:
            with open_slide(path, fallback_mpp=backend.fallback_mpp) as slide:
                scored = backend.score(path, key, slide)
                write_scored_slide(slide_out, slide, scored, tissue=backend.tissue)
        else:
            scored = backend.score(path, key)
            with open_slide(path, fallback_mpp=backend.fallback_mpp) as slide:
                write_scored_slide(slide_out, slide, scored, tissue=backend.tissue)
        s = scored.summary
        score = float(s.slide_score)
        row.update(status="ok", label=s.label, score=None if np.isnan(score) else score,
                   threshold=float(s.slide_threshold), tiles=len(scored.scores), rois=len(s.rois),
                   artefact_tiles=s.artefact_count,
                   model=s.model.name, model_version=s.model.version, error="",
                   seconds=round(time.perf_counter() - started, 3),
                   **scored.header.scale_record(), decision=s.decision.decision,
                   decision_reason=s.decision.reason, **domain_columns(s.domain))
        write_done_marker(slide_out, row)   # last: marks the slide finished
    except MilroiError as exc:  # SlideError (bad file), ScoringError (server), ...
        row.update(status="failed", error=str(exc), seconds=round(time.perf_counter() - started, 3))
        log.error("%s failed: %s", key, exc)
    except Exception as exc:  # noqa: BLE001 - one slide's unforeseen failure must not stop the folder
        log.exception("%s failed", key)
        row.update(status="failed", error=f"{path}: {type(exc).__name__}: {exc}",
                   seconds=round(time.perf_counter() - started, 3))
    return row


def score_folder(slides_dir: Path, out_dir: Path, backend: SlideScoringBackend, *,
                 workers: int = 1, progress: bool = True) -> list[dict]:
    """Score every unfinished slide under `slides_dir` into `out_dir`; returns all summary rows
    (finished earlier, scored now, failed now), also written to OUT/summary.csv."""
    from tqdm import tqdm

    slides_dir, out_dir = Path(slides_dir), Path(out_dir)
    slides = find_slides(slides_dir, exclude=out_dir).slides
    if not slides:
        raise ConfigError(f"no slides found under {slides_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_summary_temps(out_dir)
    rows: dict[str, dict] = {}
    todo = []
    for path, key in zip(slides, slide_keys(slides_dir, slides)):
        done = read_done_marker(out_dir / key)
        if done is not None and done.get("model_version") == backend.model_version:
            rows[key] = done
        else:
            if done is not None:
                log.info("%s was scored by model version %s, now %s: scoring again", key,
                         done.get("model_version"), backend.model_version)
            todo.append((path, key))
    if rows:
        log.info("%d of %d slides already finished, skipped", len(rows), len(slides))
    write_summary(out_dir, list(rows.values()))

    # disable=None: a bar on a terminal, none in logs.
    with (tqdm(total=len(slides), initial=len(rows), unit="slide",
               disable=True if not progress else None, desc="slides") as bar,
          ThreadPoolExecutor(max(1, workers)) as pool):
        # Submit lazily, at most `workers` at a time, so that a killed job has started few slides.
        pending, queue = set(), iter(todo)

        def submit_next() -> None:
            item = next(queue, None)
            if item is not None:
                pending.add(pool.submit(score_one, backend, item[0], item[1], out_dir))

        for _ in range(max(1, workers)):
            submit_next()
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                row = future.result()
                rows[row["slide"]] = row
                write_summary(out_dir, list(rows.values()))
                bar.update(1)
                bar.set_postfix_str(f"{row['slide']}: {row['status']}")
                submit_next()
    return sorted(rows.values(), key=lambda r: r["slide"])


# ---------------------------------------------------------------------------------------------
# CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides_dir", type=Path, help="folder of slides (searched recursively)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: OUT/<slide>/ per slide and OUT/summary.csv")
    source = parser.add_argument_group("model (one of)")
    source.add_argument("--model", help="model to run in process: models:/NAME@ALIAS, "
                                        "models:/NAME/VERSION or a bundle folder")
    add_connection_arguments(source, required=False)
    parser.add_argument("--remote-root", default="",
                        help="with --server: the folder under the server's slide root that "
                             "holds SLIDES_DIR's content (default: the slide root itself)")
    parser.add_argument("--workers", type=int, default=1, help="slides in parallel (default 1)")
    add_scoring_arguments(parser)
    add_engine_arguments(parser)   # for --model and --ray; a server has its own
    add_tracking_uri_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ray_arguments(parser, actor_holds="model")


def backend_from_args(args: argparse.Namespace) -> tuple[SlideScoringBackend, int]:
    """The backend the flags ask for and how many slides it scores at once."""
    if (args.model is None) == (args.server is None):
        raise ConfigError("give exactly one of --model (in process) or --server (through a server)")
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    overrides, ray_options = ScoringOverrides.from_args(args), RayOptions.from_args(args)
    if ray_options is not None:
        if args.server is not None:
            raise ConfigError("--ray scores in Ray actors: give --model, not --server")
        from serving.ray_batch import open_ray_backend  # imports ray: only with --ray

        backend = open_ray_backend(args.model, ray_options, EngineOptions.from_args(args),
                                   overrides, tracking_uri=args.tracking_uri)
        return backend, backend.workers  # one slide in flight per actor
    if args.server is not None:
        client = client_from_args(args)
        try:
            return RemoteBackend(client, args.slides_dir, args.remote_root, overrides), args.workers
        except BaseException:
            client.close()
            raise
    return (LocalBackend(args.model, EngineOptions.from_args(args), overrides,
                         tracking_uri=args.tracking_uri), args.workers)


def run(args: argparse.Namespace) -> int:
    backend, workers = backend_from_args(args)
    try:
        rows = score_folder(args.slides_dir, args.out, backend, workers=workers,
                            progress=not args.no_progress)
    finally:
        backend.close()
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows) - len(failed)} of {len(rows)} slides scored, {len(failed)} failed; "
          f"summary: {Path(args.out) / SUMMARY_NAME}")
    for row in failed:
        print(f"  failed {row['slide']}: {row['error']}")
    return 1 if failed else 0
