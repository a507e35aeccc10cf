"""What `milroi-serve score` left in SCORES_DIR, read for the viewer.

SCORES_DIR/summary.csv lists the slides (one row per slide, `results.layout.SUMMARY_COLUMNS`);
SCORES_DIR/<slide>/ holds that slide's `results.outputs` files. Slide keys come from the browser, so
both the result folder and the slide file are found through `serving.security.SlideRoots`, the
gRPC server's own confinement: no `..`, no absolute path, no symlink leading out (PathDenied ->
403), and a key that is in no summary row is SlideNotFound (404).
"""
from __future__ import annotations

import io
import json
import math
import threading
from collections import OrderedDict
from functools import cached_property
from pathlib import Path

import numpy as np

from core.errors import ConfigError, PathDenied, SlideNotFound
from results.layout import HEATMAP_CMAP, OUTPUT_SUFFIXES, SUMMARY_NAME, read_summary
from results.outputs import TileScores, read_tile_scores, score_map
from serving.security import SlideRoots
from wsi.discovery import find_slides, slide_name
from wsi.tile_quality import flag_names


def scores_json(table: TileScores) -> bytes:
    """A slide's tile scores as JSON arrays, for the page's hover (scores to 6 decimals, as the
    patch CSV has them; artefact names as the CSV writes them; each tile's `domain_distance`
    to 3 decimals, null where not known, when the folder has any: core.domain, > 1 out)."""
    names = {int(v): flag_names(int(v)) for v in np.unique(table.flags)}
    out = {"tile_size": table.tile_size, "x": table.coords[:, 0].tolist(),
           "y": table.coords[:, 1].tolist(),
           "score": np.round(table.scores.astype(np.float64), 6).tolist(),
           "artefact": [names[int(v)] for v in table.flags]}
    distance = table.domain_distance
    # Left out when no tile has one (a model without a training description): no array of nulls.
    if distance is not None and np.isfinite(distance).any():
        rounded = np.round(distance.astype(np.float64), 3)
        out["domain_distance"] = [d if math.isfinite(d) else None for d in rounded.tolist()]
    return json.dumps(out, separators=(",", ":")).encode()


class LoadedScores:
    """A slide's tile scores as the viewer keeps them: the table, and its JSON encoded once."""

    def __init__(self, table: TileScores):
        self.table = table

    @cached_property
    def json(self) -> bytes:
        return scores_json(self.table)


def heatmap_rgba(table: TileScores, dimensions: tuple[int, int], threshold: float,
                 cmap: str = HEATMAP_CMAP) -> np.ndarray:
    """One RGBA pixel per tile of the level-0 grid (rows = ceil(h / tile), cols = ceil(w / tile)):
    the colour-map colour of each clean tile scored >= threshold, transparent elsewhere
    (background, tiles below the threshold, artefact tiles, as in results.outputs' heatmap)."""
    from matplotlib import colormaps

    if not len(table):   # no tile (no tissue): nothing to place
        return np.zeros((1, 1, 4), np.uint8)
    keep = (table.flags == 0) & (table.scores >= threshold)
    grid, _ = score_map(table.coords[keep], table.scores[keep], table.tile_size, dimensions)
    shown = ~np.isnan(grid)
    out = np.zeros((*grid.shape, 4), np.uint8)
    out[shown] = colormaps[cmap](np.clip(grid[shown], 0, 1), bytes=True)
    out[shown, 3] = 255
    return out


def legend_stops(n: int = 11, cmap: str = HEATMAP_CMAP) -> list[str]:
    """`n` evenly spaced colours of the colour map, as CSS hex, for the page's legend."""
    from matplotlib import colormaps

    colours = colormaps[cmap](np.linspace(0, 1, n), bytes=True)
    return [f"#{r:02x}{g:02x}{b:02x}" for r, g, b, _ in colours]


def png_bytes(rgba: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class ScoresDir:
    """SCORES_DIR and the slide folders it was scored from.

    summary.csv is read once per version of the file (its size and mtime), and so is the slide
    file of each key: a page asks for hundreds of tiles, and each must not re-read the summary or
    search the slide folders again (a recursive search with OpenSlide's format probe on every
    other file). A running job that rewrites summary.csv makes the next request read it anew.
    """

    def __init__(self, scores_dir: Path, slide_dirs: list[Path], cache_size: int = 8):
        self.path = Path(scores_dir)
        if not (self.path / SUMMARY_NAME).is_file():
            raise ConfigError(f"{self.path} has no {SUMMARY_NAME}: give the --out folder of "
                              "`milroi-serve score`")
        self.results = SlideRoots([self.path])
        self.slides = SlideRoots(slide_dirs)
        self._tables: OrderedDict[Path, tuple[float, LoadedScores]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._parse_lock = threading.Lock()
        self._summary: _Summary | None = None
        self.summary_reads = 0   # how often summary.csv was parsed (tests, diagnostics)

    # -- the slide list

    def _current(self) -> _Summary:
        """summary.csv as now on disk, parsed only when it changed since the last look."""
        file = self.path / SUMMARY_NAME
        stat = file.stat()
        version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if self._summary is not None and self._summary.version == version:
                return self._summary
        snapshot = _Summary(version, read_summary(self.path))
        with self._lock:
            self._summary = snapshot
            self.summary_reads += 1
        return snapshot

    def summary(self) -> list[dict]:
        """summary.csv's rows as a browser may read them (`browser_row`; a running job updates
        the file: see `_current`)."""
        return [self.browser_row(row) for row in self._current().rows]

    def row(self, key: str) -> dict:
        """The summary row of `key`, once the key passed the confinement rules."""
        self.result_folder(key)
        row = self._current().by_key.get(key)
        if row is None:
            raise SlideNotFound(f"no slide {key!r} in {SUMMARY_NAME}")
        return self.browser_row(row)

    def browser_row(self, row: dict) -> dict:
        """A summary row without this machine's paths: the error's paths relative to their
        folder, the slide's `path` relative to its --slides folder (its file name when it lies
        in none: scores copied from elsewhere)."""
        out = dict(row)
        out["error"] = self.wire_message(out.get("error") or "")
        recorded = out.get("path") or ""
        relative = self.wire_message(recorded)
        out["path"] = Path(relative).name if Path(relative).is_absolute() else relative
        return out

    def result_folder(self, key: str) -> Path | None:
        """SCORES_DIR/<key> resolved (None when a failed slide left no folder); PathDenied for
        a key that escapes SCORES_DIR."""
        try:
            return self.results.resolve(key)
        except SlideNotFound:
            return None

    # -- one slide's files

    def output(self, key: str, kind: str) -> Path:
        """The `kind` output file of a scored slide (csv, geojson, spatiopath, heatmap)."""
        self.row(key)
        folder = self.result_folder(key)
        found = sorted(folder.glob(f"*{OUTPUT_SUFFIXES[kind]}")) if folder and folder.is_dir() else []
        if not found:
            raise SlideNotFound(f"slide {key!r} has no {kind} output")
        resolved = found[0].resolve()
        if not resolved.is_relative_to(self.results.roots[0]):
            raise PathDenied(f"the {kind} output of {key!r} leads outside {self.path}")
        return resolved

    def tile_scores(self, key: str) -> LoadedScores:
        """The slide's tile scores, read once per file version (a small LRU): the binary scores
        file, or the patch CSV in a folder scored before that file existed."""
        try:
            path = self.output(key, "scores")
        except SlideNotFound:
            path = self.output(key, "csv")
        mtime = path.stat().st_mtime
        # One parse at a time: the page asks for the heatmap and the hover table at once, and
        # the second request waits for the first one's table instead of parsing it again.
        with self._parse_lock:
            with self._lock:
                cached = self._tables.get(path)
                if cached is not None and cached[0] == mtime:
                    self._tables.move_to_end(path)
                    return cached[1]
            table = LoadedScores(read_tile_scores(path))
            with self._lock:
                self._tables[path] = (mtime, table)
                while len(self._tables) > self._cache_size:
                    self._tables.popitem(last=False)
        return table

    def slide_file(self, key: str) -> Path:
        """The slide file of `key` under the --slides folders: the summary's `path` when it lies
        under one of them, else a slide of the key's name in the key's subfolder (scores copied
        or moved). Found once per summary version; confined again on every call (a symlink
        may have changed since)."""
        self.row(key)   # the key's own confinement first (403 before 404)
        return self.slides.resolve(self._relative_slide_path(key))

    def slide_request_path(self, key: str) -> str:
        """The slide's path relative to its --slides folder: what ScoreSlide is asked for (the
        gRPC server's slide root is the same folder)."""
        path = self.slide_file(key)
        for root in self.slides.roots:
            if path.is_relative_to(root):
                return path.relative_to(root).as_posix()
        return self._relative_slide_path(key)

    def wire_message(self, message: str) -> str:
        """`message` as a browser may read it: paths under SCORES_DIR or a --slides folder made
        relative to it (the server's log keeps the original), as gRPC errors are
        (docs/errors.md)."""
        return self.slides.wire_message(self.results.wire_message(message))

    def _relative_slide_path(self, key: str) -> str:
        snapshot = self._current()
        with snapshot.lock:   # one search per key and summary version, even from many threads
            found = snapshot.slide_paths.get(key)
            if found is None:
                found = self._find_slide_path(snapshot, key)
                snapshot.slide_paths[key] = found
        if isinstance(found, SlideNotFound):
            raise SlideNotFound(str(found))   # a fresh exception: no traceback grows on the cached one
        return found

    def _find_slide_path(self, snapshot: _Summary, key: str) -> str | SlideNotFound:
        row = snapshot.by_key.get(key)
        if row is None:
            return SlideNotFound(f"no slide {key!r} in {SUMMARY_NAME}")
        recorded = row.get("path", "")
        if recorded:
            original = Path(recorded)
            for root in self.slides.roots:
                for candidate in (original, original.absolute()):
                    if candidate.is_relative_to(root):
                        return candidate.relative_to(root).as_posix()
        parent, name = Path(key).parent, slide_name(Path(key))
        for root in self.slides.roots:
            folder = root / parent
            if folder.is_dir() and folder.resolve().is_relative_to(root):
                found = snapshot.slides_in(folder).get(name)
                if found is not None:
                    return found.relative_to(root).as_posix()
        return SlideNotFound(f"no slide file for {key!r} under the --slides folders")


class _Summary:
    """One version of summary.csv: its rows by slide key, and the slide files found for them
    (a folder searched at most once per version)."""

    def __init__(self, version: tuple, rows: list[dict]):
        self.version = version
        self.rows = rows
        self.by_key: dict[str, dict] = {}
        for row in rows:   # the first row of a key, as a scan of the file finds it
            self.by_key.setdefault(row.get("slide", ""), row)
        self.slide_paths: dict[str, str | SlideNotFound] = {}
        self._folders: dict[Path, dict[str, Path]] = {}
        self.lock = threading.Lock()

    def slides_in(self, folder: Path) -> dict[str, Path]:
        """The slides under `folder` by name (`wsi.discovery.slide_name`), first of a name kept."""
        if folder not in self._folders:
            by_name: dict[str, Path] = {}
            for path in find_slides(folder).slides:
                by_name.setdefault(slide_name(path), path)
            self._folders[folder] = by_name
        return self._folders[folder]
