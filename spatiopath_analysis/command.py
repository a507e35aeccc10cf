"""`milroi-serve spatiopath SCORES_DIR --cells CELLS --out OUT`: milroi's tumour ROIs analysed by
the real `spatiopath` package (Benimam et al., Nature Communications 2025), with the slide's cells.

For every slide scored into SCORES_DIR (its `<slide>_spatiopath.json`, from `milroi-serve score`
or `client score --out`; nothing is scored again):

1. the analysis windows (`spatiopath_analysis.windows`): the ROIs with a margin of the analysis zone,
   at one downsample per slide, the tissue (from the slide's tissue mask) as the analysed area;
   written to OUT/<slide>/<name>_windows.json;
2. the cells (`wsi.cells`: a CSV of level-0 x,y[,class] or a QuPath detections GeoJSON), of
   `--cell-class` only when given, mapped into the windows;
3. one `spatiopath.engine.SpatioPath` per slide, `add_patch` per window, then the windows
   pooled; each window's result and the pooled one saved with Spatiopath's own
   `SpatioPathResult.save` (OUT/<slide>/windows/<id>/, OUT/<slide>/pooled/) and plotted with its
   `plot_k0` (k0.png in each folder and OUT/<slide>/<name>_k0.png);
4. OUT/summary.csv: one row per slide (`slide`, `status`, `windows`, `cells`, `downsample`,
   `pixel_size_um`, then the pooled result's own `analysis` columns under their Spatiopath names).

spatiopath is GPL-3.0: it is an optional extra (`pip install 'milroi[spatiopath]'`), never
vendored and not in the serve image; without it the command says how to install it.

spatiopath 0.5.0's `compute_pooling()` raises TypeError (it passes `zoneMap=None` to
`getIndeciesAndCellsTable`, which takes its `len`); `pool_results` then pools as it would, with
the package's own helpers, on the windows' per-cell zones and distances.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import ConfigError, MilroiError
from core.files import atomic_write
from results.layout import (
    OUTPUT_SUFFIXES,
    SUMMARY_NAME,
    output_name,
    recorded_slide_path,
    write_summary,
)
from results.outputs import read_scored_rois
from spatiopath_analysis.windows import (
    DEFAULT_ANALYSIS_ZONE_UM,
    DEFAULT_WINDOW_PX,
    SlideWindows,
    plan_windows,
    windows_for_slide,
    write_windows_json,
)
from wsi.cells import CELL_SUFFIXES, GEOJSON_SUFFIXES, read_cells

log = logging.getLogger(__name__)

DEFAULT_ZONE_WIDTH_UM = 10.0    # Spatiopath's own default zone width
BASE_COLUMNS = ("slide", "status", "windows", "cells", "downsample", "pixel_size_um")
# The pooled `analysis` columns of spatiopath 0.5.0, used for the header only when no slide gave
# a result to read them from; imageName ("GLOBAL") and pixelSize (-1 when pooled) are left out.
SPATIOPATH_COLUMNS = ("totalNumberOfPoints", "zoneWidth", "numberOfLevelsets", "Threshold", "omega",
                      "levelsetsArea", "ACI", "SAI", "ASI", "MODIFIED_ASI", "log p-value",
                      "meanCouplingDistance")
LEFT_OUT_COLUMNS = ("imageName", "pixelSize")
INSTALL_HINT = ("milroi-serve spatiopath needs the spatiopath package (GPL-3.0, so not installed "
                "with milroi): pip install 'milroi[spatiopath]'  (or: pip install spatiopath==0.5.0)")


def import_spatiopath():
    """The engine module, or a ConfigError that says how to install it."""
    try:
        from spatiopath import engine
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} ({exc})") from None
    return engine


# ---------------------------------------------------------------------------------------------
# Finding the scored slides, their slide files and their cells


@dataclass
class SpatiopathInput:
    """A slide's entry in a results folder, as the analysis reads it (its ROIs file)."""
    key: str              # name in OUT and summary.csv (a/b/tumor_001, as `score` named it)
    name: str             # the slide's name (tumor_001)
    scores: Path          # <name>_spatiopath.json
    slide_path: Path | None


def find_scored_slides(scores_dir: Path, slides_dir: Path | None = None,
                       exclude: Path | None = None) -> list[SpatiopathInput]:
    """Every `<name>_spatiopath.json` under `scores_dir` (`score`'s OUT/<key>/ or `client
    score`'s --out); its slide file from `score`'s done.json, else found under `slides_dir`."""
    from wsi.discovery import find_slide

    found = []
    for path in sorted(scores_dir.rglob(f"*{OUTPUT_SUFFIXES['spatiopath']}")):
        if exclude is not None and exclude.resolve() in path.resolve().parents:
            continue
        name = output_name(path, "spatiopath")
        folder = path.parent.relative_to(scores_dir)
        key = folder.as_posix() if folder.name == name else (folder / name).as_posix()
        slide_path = recorded_slide_path(path.parent)
        if slide_path is None and slides_dir is not None:
            slide_path = find_slide(slides_dir, name)
        found.append(SpatiopathInput(key, name, path, slide_path))
    return found


def cells_file_for(cells: Path, slide: SpatiopathInput, single: bool) -> Path:
    """The cells of one slide: CELLS itself when it is a file (one slide only), else
    CELLS/<key>.csv|.geojson|.json, then CELLS/<name>.<same>."""
    if cells.is_file():
        if not single:
            raise ConfigError(f"--cells {cells} is one file but SCORES_DIR holds several slides: give "
                              "a folder of <slide>.csv or <slide>.geojson files")
        return cells
    for stem in dict.fromkeys((slide.key, slide.name)):
        for suffix in (".csv", ".geojson", ".json"):
            candidate = cells / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    raise ConfigError(f"no cells file for {slide.key}: expected {cells / slide.name}.csv or "
                      f".geojson ({', '.join(CELL_SUFFIXES)})")


# ---------------------------------------------------------------------------------------------
# The engine


def pool_results(engine, results: list, zone_width: float, analysis_zone: float):
    """The windows of one slide pooled: `engine.compute_pooling()`, or where it fails as in
    spatiopath 0.5.0, the same computation with the per-cell zones and distances it leaves out."""
    try:
        return engine.compute_pooling()
    except TypeError:   # 0.5.0: getIndeciesAndCellsTable(..., zoneMap=None, ...) -> len(None)
        pass
    import pandas as pd
    from spatiopath import helpers
    from spatiopath.engine import SpatioPathResult

    levels = pd.concat([r.LevelSetsTable for r in results], axis=0).groupby("Zone").sum()
    omega = sum(r.omega for r in results)
    points = sum(r.total_points for r in results)
    zones = np.concatenate([np.asarray(r.CellsTable["Zone"], np.float64) for r in results])
    distances = np.concatenate([np.asarray(r.CellsTable["Distance"], np.float64) for r in results])
    n_levels = int(np.ceil(analysis_zone / zone_width))
    k_table = helpers.computeKTable(levels, omega, points)
    indices, cells, tmp = helpers.getIndeciesAndCellsTable(k_table, levels, zones, distances, omega, points)
    analysis = helpers.getAnalysis("GLOBAL", indices, k_table, levels, cells, tmp, omega, points, -1,
                                   zone_width, n_levels)
    return SpatioPathResult(name="GLOBAL", analysis=analysis, KTable=k_table, IndecesTable=indices,
                            LevelSetsTable=levels, CellsTable=cells, omega=omega, total_points=points)


def save_k0_plot(result, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")   # files only, never a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        result.plot_k0(ax=ax, title=title)
        fig.tight_layout()
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=80)
    finally:
        plt.close(fig)


def analysis_row(result) -> dict:
    """The pooled result's own metric columns (Spatiopath's names)."""
    frame = result.analysis
    return {c: frame[c].iloc[0] for c in frame.columns if c not in LEFT_OUT_COLUMNS}


def analyse_windows(windows: SlideWindows, cell_xy: np.ndarray, out: Path, name: str, *,
                    zone_width: float, plots: bool = True) -> tuple[object | None, int]:
    """Run the engine on every window, save each result and the pooled one; returns the pooled
    result (None without an analysable window) and the cells analysed."""
    engine_module = import_spatiopath()
    for stale in (out / "windows", out / "pooled"):   # an earlier run's results (other windows)
        shutil.rmtree(stale, ignore_errors=True)
    width, height = windows.canvas
    engine = engine_module.SpatioPath(zone_width=zone_width, analysis_zone=windows.analysis_zone_um,
                                      pixel_size=windows.pixel_size_um, height=height, width=width)
    results, cells = [], 0
    for window, points in zip(windows.windows, windows.split_cells(cell_xy)):
        if not window.roi:
            log.info("%s %s: no tissue in the window, left out", name, window.id)
            continue
        # The engine rasterises onto its `width` x `height` (public attributes that add_patch
        # reads on every call): each window at its own size, so a small window never pays for
        # the largest. Pooling works on areas in um^2, whatever the grid.
        engine.width, engine.height = window.size
        result = engine.add_patch(window.id, window.set_a, points, window.roi)
        # The engine keeps every result: drop its full-window arrays so that memory stays that
        # of one window, whatever the number of windows.
        result.distanceMap = result.zoneMap = result.distMap = None
        result.setA = result.setB = None
        folder = out / "windows" / window.id
        result.save(str(folder), format="dir")
        if plots:
            save_k0_plot(result, folder / "k0.png", f"{name} {window.id}: K0")
        results.append(result)
        cells += len(points)
    if not results:
        return None, 0
    pooled = pool_results(engine, results, zone_width, windows.analysis_zone_um)
    pooled.save(str(out / "pooled"), format="dir")
    if plots:
        save_k0_plot(pooled, out / f"{name}_k0.png", f"{name}: K0, {len(results)} window(s) pooled")
    return pooled, cells


@dataclass(frozen=True)
class AnalysisOptions:
    zone_width: float = DEFAULT_ZONE_WIDTH_UM
    analysis_zone: float = DEFAULT_ANALYSIS_ZONE_UM
    window: int = DEFAULT_WINDOW_PX
    cell_class: str | None = None
    plots: bool = True

    def check(self) -> None:
        if not (self.zone_width > 0 and self.analysis_zone > 0):
            raise ConfigError(f"--zone-width and --analysis-zone must be > 0 um, got "
                              f"{self.zone_width:g} and {self.analysis_zone:g}")
        if self.analysis_zone < self.zone_width:
            raise ConfigError(f"--analysis-zone ({self.analysis_zone:g} um) must be at least one "
                              f"--zone-width ({self.zone_width:g} um)")
        if self.window < 64:
            raise ConfigError(f"--window must be at least 64 px, got {self.window}")


def analyse_slide(slide: SpatiopathInput, cells_path: Path, out_dir: Path, options: AnalysisOptions) -> dict:
    """One slide, start to end; returns its summary row (status ok, no_roi or failed)."""
    started = time.perf_counter()
    row = {"slide": slide.key, "windows": 0, "cells": 0}
    out = out_dir / slide.key
    rois = read_scored_rois(slide.scores)
    if not rois.polygons:
        write_windows_json(out / f"{slide.name}_windows.json",
                           plan_windows(rois, None, analysis_zone_um=options.analysis_zone,
                                        window_px=options.window))
        row.update(status="no_roi", error="")
        print(f"{slide.key}: no tumour ROI in {slide.scores.name}: no window, nothing to analyse")
        return row
    if slide.slide_path is None:
        raise ConfigError(f"{slide.key}: the slide file is unknown ({slide.scores} has no done.json "
                          "naming it, as `client score` leaves): give --slides DIR")
    windows = windows_for_slide(slide.scores, slide.slide_path, analysis_zone_um=options.analysis_zone,
                                window_px=options.window)
    write_windows_json(out / f"{slide.name}_windows.json", windows)
    if windows.pixel_size_um > options.zone_width:
        log.warning("%s: the windows' pixel size %.2f um (downsample %g) is coarser than the zone "
                    "width %g um: raise --window", slide.key, windows.pixel_size_um,
                    windows.downsample, options.zone_width)
    # A QuPath GeoJSON is in QuPath's frame: level 0 minus the slide's bounds offset.
    offset = rois.bounds_offset if cells_path.suffix.lower() in GEOJSON_SUFFIXES else (0, 0)
    cells = read_cells(cells_path, options.cell_class, rois.dimensions, boxes=windows.boxes(),
                       offset=offset)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # 0-cell windows divide by zero; seaborn's palette notes
        pooled, analysed = analyse_windows(windows, cells.xy, out, slide.name,
                                           zone_width=options.zone_width, plots=options.plots)
    row.update(status="ok", windows=len(windows.windows), cells=analysed, downsample=windows.downsample,
               pixel_size_um=windows.pixel_size_um, error="",
               seconds=round(time.perf_counter() - started, 3))
    if pooled is not None:
        row.update(analysis_row(pooled))
    log.info("%s: %d window(s) at downsample %g, %d cell(s), %.1f s", slide.key, len(windows.windows),
             windows.downsample, analysed, row["seconds"])
    return row


def write_analysis_summary(out_dir: Path, rows: list[dict]) -> Path:
    """OUT/summary.csv: BASE_COLUMNS, the pooled metric columns, seconds, error."""
    metrics = next((list(k for k in r if k not in BASE_COLUMNS + ("seconds", "error"))
                    for r in rows if r.get("status") == "ok" and "ACI" in r), list(SPATIOPATH_COLUMNS))
    return write_summary(out_dir, rows, list(BASE_COLUMNS) + metrics + ["seconds", "error"])


def analyse_folder(scores_dir: Path, cells: Path, out_dir: Path, options: AnalysisOptions,
                   slides_dir: Path | None = None) -> list[dict]:
    """Every scored slide of `scores_dir`; one failed slide does not stop the others."""
    options.check()
    import_spatiopath()   # fail first, with the install line, before any work
    scores_dir, cells, out_dir = Path(scores_dir), Path(cells), Path(out_dir)
    if not scores_dir.is_dir():
        raise ConfigError(f"SCORES_DIR {scores_dir} is not a folder")
    if not cells.exists():
        raise ConfigError(f"--cells {cells}: no such file or folder")
    slides = find_scored_slides(scores_dir, slides_dir, exclude=out_dir)
    if not slides:
        raise ConfigError(f"no <slide>{OUTPUT_SUFFIXES['spatiopath']} under {scores_dir}: score "
                          "the slides first (milroi-serve score SLIDES --out SCORES_DIR)")
    logging.getLogger("spatiopath").setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for slide in slides:
        started = time.perf_counter()
        try:
            row = analyse_slide(slide, cells_file_for(cells, slide, len(slides) == 1), out_dir, options)
        except MilroiError as exc:
            log.error("%s failed: %s", slide.key, exc)
            row = {"slide": slide.key, "status": "failed", "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - one slide's unforeseen failure must not stop the folder
            log.exception("%s failed", slide.key)
            row = {"slide": slide.key, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        row.setdefault("seconds", round(time.perf_counter() - started, 3))
        rows.append(row)
        write_analysis_summary(out_dir, rows)
    return rows


# ---------------------------------------------------------------------------------------------
# CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scores_dir", type=Path, metavar="SCORES_DIR",
                        help="what `milroi-serve score` (or `client score --out`) wrote: "
                             "<slide>_spatiopath.json files, searched recursively")
    parser.add_argument("--cells", type=Path, required=True, metavar="CELLS_DIR_OR_FILE",
                        help="folder of <slide>.csv (x,y level-0 px[,class]) or <slide>.geojson "
                             "(QuPath detections) files, or one such file for one slide")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT",
                        help="output folder: OUT/<slide>/ per slide and OUT/summary.csv")
    parser.add_argument("--zone-width", type=float, default=DEFAULT_ZONE_WIDTH_UM, metavar="UM",
                        help=f"Spatiopath zone width in um (default {DEFAULT_ZONE_WIDTH_UM:g})")
    parser.add_argument("--analysis-zone", type=float, default=DEFAULT_ANALYSIS_ZONE_UM, metavar="UM",
                        help="Spatiopath analysis zone in um, also the margin of the windows "
                             f"around each ROI (default {DEFAULT_ANALYSIS_ZONE_UM:g})")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW_PX, metavar="PX",
                        help="largest window side in px; the downsample is chosen so that the "
                             f"largest ROI with its margin fits (default {DEFAULT_WINDOW_PX})")
    parser.add_argument("--cell-class", default=None, metavar="NAME",
                        help="analyse only the cells of this class (CSV `class` column, QuPath "
                             "classification), e.g. 'Immune cells' (default: every cell)")
    parser.add_argument("--slides", type=Path, default=None, metavar="SLIDES_DIR",
                        help="folder of the slides, for scores that do not record their slide "
                             "file (`client score --out`)")
    parser.add_argument("--no-plots", action="store_true", help="no K0 plots")


def run(args: argparse.Namespace) -> int:
    options = AnalysisOptions(zone_width=args.zone_width, analysis_zone=args.analysis_zone,
                              window=args.window, cell_class=args.cell_class, plots=not args.no_plots)
    rows = analyse_folder(args.scores_dir, args.cells, args.out, options, slides_dir=args.slides)
    failed = [r for r in rows if r["status"] == "failed"]
    no_roi = [r for r in rows if r["status"] == "no_roi"]
    print(f"{len(rows) - len(failed) - len(no_roi)} of {len(rows)} slides analysed, {len(no_roi)} "
          f"without ROI, {len(failed)} failed; summary: {Path(args.out) / SUMMARY_NAME}")
    for row in failed:
        print(f"  failed {row['slide']}: {row['error']}")
    return 1 if failed else 0
