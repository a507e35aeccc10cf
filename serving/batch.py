"""`milroi-serve score SLIDES_DIR --out OUT`: score every slide of a folder, resumably.

The slides are scored either in this process (`--model URI`: onnxruntime engine + the streaming
`serving.pipeline.SlideScorer`, exactly what the server runs) or through a running server
(`--server HOST:PORT`, `serving.client.ScoringClient`). Either way each slide gets the
`wsi.outputs` files in OUT/<slide>/ (patch CSV, QuPath GeoJSON, heatmap PNG, Spatiopath JSON),
and the folder gets OUT/summary.csv with one row per slide.

Crash safety: every file is written through `wsi.outputs.atomic_write` (temp file + rename), and a
slide's `done.json` marker is written last, so a slide counts as finished only when all its
outputs are complete. Killed at any moment (even SIGKILL) and run again, the job skips the
finished slides, re-scores the others, and removes the temp files a killed write left behind.
summary.csv is rewritten (atomically) after every slide. A slide that fails (corrupt file, server
error) gets a `failed` row with its error, the other slides are still scored, failed slides are
tried again on the next run, and the exit code is non-zero.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Protocol

import numpy as np

from wsi.cli import add_ray_arguments
from wsi.errors import WsiError

log = logging.getLogger(__name__)

# Extensions of the formats OpenSlide reads; a file with one of them is a slide even when it is
# damaged (it is then reported as failed, not silently skipped). Other files are slides when
# OpenSlide recognises their content.
SLIDE_SUFFIXES = frozenset({".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".svslide",
                            ".bif", ".vms"})
DONE_MARKER = "done.json"
SUMMARY_NAME = "summary.csv"
SUMMARY_COLUMNS = ("slide", "status", "label", "score", "threshold", "tiles", "rois", "seconds",
                   "model", "model_version", "error", "path")


# ---------------------------------------------------------------------------------------------
# Finding the slides


def find_slides(root: Path, exclude: Path | None = None) -> list[Path]:
    """Every slide file under `root` (recursive, sorted), leaving out the folder `exclude`."""
    import openslide

    root = Path(root)
    if not root.is_dir():
        raise WsiError(f"slide folder {root} is not a directory")
    exclude = exclude.resolve() if exclude is not None else None
    slides = []
    for path in sorted(root.rglob("*")):
        if path.name.startswith(".") or not path.is_file():
            continue
        if exclude is not None and (path.resolve() == exclude or exclude in path.resolve().parents):
            continue
        if path.suffix.lower() in SLIDE_SUFFIXES:
            slides.append(path)
            continue
        try:
            detected = openslide.OpenSlide.detect_format(str(path))
        except Exception:  # unreadable: not something we can call a slide
            detected = None
        if detected:
            slides.append(path)
    return slides


def slide_keys(root: Path, slides: list[Path]) -> list[str]:
    """Each slide's name in OUT and in summary.csv: its path under `root` without the extension
    (a/b/tumor_001), so slides of the same name in different subfolders do not collide; with the
    extension where two files differ only by it (x.tif and x.svs)."""
    stems = [path.relative_to(root).with_suffix("").as_posix() for path in slides]
    counts = Counter(stems)
    return [stem if counts[stem] == 1 else path.relative_to(root).as_posix()
            for stem, path in zip(stems, slides)]


# ---------------------------------------------------------------------------------------------
# Scoring one slide, in process or through a server


@dataclass
class ScoredSlide:
    """What the batch job needs of a scored slide, whichever way it was scored."""
    coords: np.ndarray   # int64 [N, 2] level-0 (x, y)
    scores: np.ndarray   # float32 [N]
    tile_size: int
    slide_score: float
    label: str
    threshold: float
    roi_threshold: float
    rois: int            # tumour ROI polygons at roi_threshold
    model: str
    model_version: str


class SlideScoringBackend(Protocol):
    model: str
    model_version: str

    def score(self, path: Path, key: str) -> ScoredSlide: ...

    def close(self) -> None: ...


class LocalBackend:
    """Scores in this process: the server's engine and pipeline on a bundle or registered model."""

    def __init__(self, model_uri: str, *, tracking_uri: str | None = None,
                 provider: str = "auto", precision: str = "fp32", min_tissue: float | None = None,
                 roi_threshold: float | None = None, threads: int | None = None):
        from serving.engine import Engine
        from serving.model_source import ModelSource
        from serving.pipeline import SlideScorer

        # Resolve and load once: a batch job keeps one model version for the whole folder.
        source = ModelSource(model_uri, lambda path, ref: Engine(path, provider=provider,
                                                                    precision=precision, model=ref,
                                                                    threads=threads),
                             tracking_uri=tracking_uri)
        source.refresh()
        self.engine = source.current.engine
        self.scorer = SlideScorer(self.engine)
        self.model, self.model_version = self.engine.model.name, self.engine.model.version
        self.min_tissue, self.roi_threshold = min_tissue, roi_threshold
        # Fail on a bad parameter now, not once per slide.
        self.scorer.check_parameters(None, min_tissue, roi_threshold)

    def score(self, path: Path, key: str) -> ScoredSlide:
        s = self.scorer.score_slide(path, min_tissue=self.min_tissue,
                                    roi_threshold=self.roi_threshold, display_path=key)
        return ScoredSlide(s.coords, s.scores, s.tile_size, s.slide_score, s.label, s.threshold,
                           s.roi_threshold, len(s.rois), s.model.name, s.model.version)

    def close(self) -> None:
        self.engine.close()


class RemoteBackend:
    """Scores through a running server; slides are named by their path under `remote_root`
    (the folder, relative to the server's slide root, that holds SLIDES_DIR's content)."""

    def __init__(self, client, slides_dir: Path, remote_root: str = "", *,
                 min_tissue: float | None = None, roi_threshold: float | None = None):
        self.client, self.slides_dir = client, Path(slides_dir)
        self.remote_root = PurePosixPath(remote_root) if remote_root else None
        served = client.get_model()
        self.model, self.model_version = served.model.name, served.model.version
        self.min_tissue, self.roi_threshold = min_tissue, roi_threshold

    def remote_path(self, path: Path) -> str:
        rel = PurePosixPath(path.relative_to(self.slides_dir).as_posix())
        return str(self.remote_root / rel if self.remote_root else rel)

    def score(self, path: Path, key: str) -> ScoredSlide:
        result = self.client.score_slide_all(self.remote_path(path), min_tissue=self.min_tissue,
                                             roi_threshold=self.roi_threshold)
        s = result.summary
        return ScoredSlide(result.coords, result.scores, result.header.tile_size, s.slide_score,
                           s.label, s.threshold, s.roi_threshold, len(s.rois), s.model.name,
                           s.model.version)

    def close(self) -> None:
        self.client.close()


def _concat(parts, empty_shape, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(empty_shape, dtype)


# ---------------------------------------------------------------------------------------------
# The folder job


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else ("" if value is None else str(value))


def write_summary(out_dir: Path, rows: list[dict]) -> Path:
    """OUT/summary.csv, one row per slide in slide order, replaced atomically."""
    from wsi.outputs import atomic_write

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["slide"]):
        writer.writerow({k: _fmt(row.get(k)) for k in SUMMARY_COLUMNS})
    path = out_dir / SUMMARY_NAME
    with atomic_write(path, "w") as f:
        f.write(buffer.getvalue())
    return path


def read_done_marker(slide_out: Path) -> dict | None:
    """The summary row of a finished slide, or None when it is not finished."""
    try:
        row = json.loads((slide_out / DONE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) and row.get("status") == "ok" else None


def clear_unfinished(slide_out: Path) -> None:
    """Delete the files of a slide that is not finished (outputs of an interrupted run, temp
    files a killed write left behind), done marker first. Subfolders are other slides' (a/ and
    a/b/), so they stay."""
    if slide_out.is_dir():
        (slide_out / DONE_MARKER).unlink(missing_ok=True)
        for path in slide_out.iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)


def remove_stale_summary_temps(out_dir: Path) -> None:
    """Temp files of summary.csv left by a job killed while it replaced the file (atomic_write
    names its temp files after the target)."""
    for path in out_dir.iterdir():
        if path.is_file() and SUMMARY_NAME in path.name and path.name != SUMMARY_NAME:
            path.unlink(missing_ok=True)


def score_one(backend: SlideScoringBackend, path: Path, key: str, out_dir: Path) -> dict:
    """Score one slide and write its outputs then its done marker; returns its summary row.
    Never raises for a bad slide or a failed call: the row says `failed` with the error."""
    from wsi.outputs import atomic_write, write_slide_outputs
    from wsi.slide import open_slide

    started = time.perf_counter()
    slide_out = out_dir / key
    row = {"slide": key, "path": str(path), "model": backend.model,
           "model_version": backend.model_version}
    try:
        clear_unfinished(slide_out)
        scored = backend.score(path, key)
        with open_slide(path) as slide:
            write_slide_outputs(slide_out, slide, scored.coords, scored.scores, scored.tile_size,
                                scored.roi_threshold)
        score = float(scored.slide_score)
        row.update(status="ok", label=scored.label, score=None if np.isnan(score) else score,
                   threshold=float(scored.threshold), tiles=len(scored.scores), rois=scored.rois,
                   model=scored.model, model_version=scored.model_version, error="",
                   seconds=round(time.perf_counter() - started, 3))
        with atomic_write(slide_out / DONE_MARKER, "w") as f:  # last: marks the slide finished
            json.dump(row, f, indent=2)
    except WsiError as exc:  # SlideError (bad file) and ScoringError (server) are both WsiError
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
    slides = find_slides(slides_dir, exclude=out_dir)
    if not slides:
        raise WsiError(f"no slides found under {slides_dir}")
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
    with tqdm(total=len(slides), initial=len(rows), unit="slide",
              disable=True if not progress else None, desc="slides") as bar, ThreadPoolExecutor(max(1, workers)) as pool:
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
    from serving.client import add_connection_arguments

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
    parser.add_argument("--min-tissue", type=float, default=None,
                        help="minimum tissue fraction of a tile (default: the model's)")
    parser.add_argument("--roi-threshold", type=float, default=None,
                        help="patch score that makes a tile part of a tumour ROI "
                             "(default: the model's)")
    parser.add_argument("--provider", default="auto", choices=("auto", "cpu", "cuda", "tensorrt"),
                        help="onnxruntime execution provider for --model (default auto: "
                             "TensorRT, CUDA, CPU, the first that works)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                        help="backbone precision in process: fp16 on GPUs, int8 (the bundle's "
                             "backbone_int8.onnx, from `milroi-train export --int8`) on CPUs")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI for models:/ URIs (default: MLFLOW_TRACKING_URI "
                             "or the local sqlite store)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ray_arguments(parser, actor_holds="model")


def run(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.server is None):
        raise WsiError("give exactly one of --model (in process) or --server (through a server)")
    if args.workers < 1:
        raise WsiError(f"--workers must be at least 1, got {args.workers}")
    if getattr(args, "ray", None) is not None:
        if args.server is not None:
            raise WsiError("--ray scores in Ray actors: give --model, not --server")
        from serving.ray_batch import backend_from_args  # imports ray: only with --ray

        backend = backend_from_args(args)
        args.workers = backend.workers  # one slide in flight per actor
    elif args.server is not None:
        from serving.client import client_from_args

        client = client_from_args(args)
        try:
            backend = RemoteBackend(client, args.slides_dir, args.remote_root,
                                    min_tissue=args.min_tissue, roi_threshold=args.roi_threshold)
        except BaseException:
            client.close()
            raise
    else:
        backend = LocalBackend(args.model, tracking_uri=args.tracking_uri, provider=args.provider,
                               precision=args.precision,
                               min_tissue=args.min_tissue, roi_threshold=args.roi_threshold)
    try:
        rows = score_folder(args.slides_dir, args.out, backend, workers=args.workers,
                            progress=not args.no_progress)
    finally:
        backend.close()
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows) - len(failed)} of {len(rows)} slides scored, {len(failed)} failed; "
          f"summary: {Path(args.out) / SUMMARY_NAME}")
    for row in failed:
        print(f"  failed {row['slide']}: {row['error']}")
    return 1 if failed else 0
