"""Take the README's screenshot of the viewer's slide page (docs/viewer.png) from a results folder.

    .venv/bin/python scripts/viewer_screenshot.py demo_out/scores demo_out/heldout tumor_001 \
        docs/viewer.png [--port 8091]

Starts `milroi-serve view SCORES --slides SLIDES` on loopback, opens the slide page of SLIDE in
Debian's headless chromium through Playwright (the viewer tests' browser and flags), waits until
the slide and its heatmap are drawn, and saves the page. Pick a slide whose label, ROIs and
heatmap agree (its `decision` in summary.csv is `tumor` or `normal`, not `review`).
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _wait(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the viewer exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"the viewer did not answer at {url}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scores", type=Path)
    parser.add_argument("slides", type=Path)
    parser.add_argument("slide", help="the slide's key (its name in summary.csv)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--port", type=int, default=8091)
    args = parser.parse_args(argv)
    from results.layout import SUMMARY_NAME

    with open(args.scores / SUMMARY_NAME) as f:
        row = next((r for r in csv.DictReader(f) if r["slide"] == args.slide), None)
    if row is None or row.get("decision") not in ("tumor", "normal"):
        raise SystemExit(f"{args.slide}: not a slide whose label and ROIs agree "
                         f"(decision {row and row.get('decision')})")
    from playwright.sync_api import sync_playwright

    url = f"http://127.0.0.1:{args.port}"
    viewer = subprocess.Popen([sys.executable, "-m", "serving.cli", "view", str(args.scores),
                               "--slides", str(args.slides), "--port", str(args.port)], cwd=ROOT)
    try:
        _wait(url + "/", viewer)
        with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
                viewport={"width": 1280, "height": 800})
            page = context.new_page()
            page.goto(f"{url}/slide/{args.slide}")
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            page.wait_for_function(
                "() => window.milroi.state.viewer.world.getItemAt(0).getFullyLoaded()",
                timeout=60_000)
            page.wait_for_function("() => document.getElementById('heatmap').dataset.loaded !== ''")
            page.wait_for_timeout(500)   # the last deep-zoom tiles fade in
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            context.close()
    finally:
        viewer.terminate()
        viewer.wait(timeout=30)
    print(f"{args.out}: the slide page of {args.slide} ({row['label']}, decision {row['decision']}, "
          f"{row['rois']} ROI(s), in_domain {row.get('in_domain', '')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
