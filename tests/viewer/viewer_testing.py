"""Helpers of the viewer tests: a scored folder, a gRPC server, the viewer, headless Chromium.

(A module of its own name: test modules cannot import `conftest` reliably when several test
folders have one.)
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from server_testing import stop_process

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
# The flags of the issue: no sandbox (CI runs as root), nothing fetched in the background.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SLIDE = "synth_tumor"            # the scored synthetic slide the tests look at
SLIDE_SIZE = (2688, 2240)        # ~70 tissue tiles: scored in seconds on 2 CPU cores
# The hostile folder (conftest `hostile`): names and damage the viewer must survive.
JAPANESE = "スライド"              # unreadable (broken.svs): its error goes into a header
NEWLINE = "two\nlines"           # a readable slide whose name holds a newline
SCRIPTED = "<img src=x onerror=window.pwned=1>"   # unreadable: its name is in the error text
CORRUPT = "corrupt"              # readable, one level-0 tile's JPEG bytes zeroed
# The domain check written into a copy of the scores (conftest `domain_scored`): the reasons of
# the out-of-domain slide (one with markup: shown as text), the tiles' distances in turn.
DOMAIN_REASONS = ("stain: <img src=x onerror=window.pwned=1> 1.80x the training slides' mean",
                  "scale: 0.5 um/px, the training slides 0.24-0.26 um/px (limit x1.25 either way)")
TILE_DISTANCES = (float("nan"), 1.5, 0.25)   # unknown, out, in


def ensure_chromium() -> Path:
    """Debian's chromium, installed by scripts/install_chromium.sh when it is absent."""
    if not CHROMIUM.exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "install_chromium.sh")], check=True)
    return CHROMIUM


def make_slides(root: Path, outside: Path) -> Path:
    """The slide folder: a synthetic tumour slide, a slide without tissue, a corrupt slide
    (tests/data/broken.svs) and a symlink to a slide outside the folder."""
    from slide_testing import write_blank_slide

    from wsi.synth import write_synthetic_slide

    root.mkdir(parents=True, exist_ok=True)
    write_synthetic_slide(root / f"{SLIDE}.tif", *SLIDE_SIZE, seed=2, tumor=True)
    shutil.copy(DATA / "broken.svs", root / "broken.svs")
    write_blank_slide(root / "blank.tif")   # no tissue tile: status ok, label no_tissue
    outside.mkdir(parents=True, exist_ok=True)
    write_synthetic_slide(outside / "secret.tif", 512, 512, seed=4, tumor=False)
    os.symlink(outside / "secret.tif", root / "escape.tif")
    return root


def score_folder(slides: Path, bundle: Path, out: Path, roi_threshold: float) -> int:
    """`milroi-serve score` in process, as a user runs it."""
    from serving.cli import main as serve_main

    return serve_main(["score", str(slides), "--model", str(bundle), "--out", str(out),
                       "--roi-threshold", str(roi_threshold), "--no-progress"])


def _env() -> dict:
    # The worktree's code, as in this process (the console scripts may point at another checkout).
    path = os.pathsep.join([str(ROOT), str(ROOT / "proto"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "MLFLOW_TRACKING_URI": ""}


class Process:
    """A `python -m serving.cli ...` subprocess with its log; stopped with SIGTERM."""

    def __init__(self, args: list[str], log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "serving.cli", *args], cwd=ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT, env=_env())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc, 20)
        self._log.close()


def wait_http(url: str, process: Process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.proc.poll() is None, process.log()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise TimeoutError(f"{url} not answering after {timeout} s: {process.log()[-2000:]}")


def http_get(url: str) -> tuple[int, bytes, dict]:
    """(status, body, headers) without raising for 4xx/5xx."""
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def metric(metrics_url: str, name: str, **labels) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# ---------------------------------------------------------------------------------------------
# The pages


def read_csv_rows(scored, key=SLIDE) -> list[dict]:
    with open(scored.out / key / f"{key}_patches.csv", newline="") as f:
        return list(csv.DictReader(f))


def open_slide_page(page, viewer, key=SLIDE):
    page.goto(f"{viewer.url}/slide/{key}")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    page.wait_for_function("() => window.milroi.state.viewer.world.getItemAt(0).getFullyLoaded()",
                           timeout=30_000)
    page.wait_for_function("() => document.getElementById('heatmap').dataset.loaded !== ''")


def screen_point(page, x: float, y: float) -> tuple[float, float]:
    """Page coordinates of level-0 point (x, y) in the OpenSeadragon view."""
    return tuple(page.evaluate("""([x, y]) => {
        const v = window.milroi.state.viewer;
        const p = v.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
        const box = v.element.getBoundingClientRect();
        return [box.left + p.x, box.top + p.y];
    }""", [x, y]))
