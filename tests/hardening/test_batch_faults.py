"""`milroi-serve score` under faults: bad files in the folder, SIGKILL at random points."""
from __future__ import annotations

import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from batch_testing import read_summary, slide_files, stable_summary
from hardening_helpers import BIN, write_bad_files

from results.layout import DONE_MARKER
from serving.cli import main as serve_main

# The bad files of conftest.write_bad_files that the folder walk takes for slides (a slide
# extension, or content OpenSlide recognises), with a word of their expected error.
BAD_IN_FOLDER = {"empty": "empty file", "truncated": "truncated", "text": "not a slide format",
                 "stripped": "not a slide format", "huge_claim": "hand-crafted header",
                 "no_pyramid_huge": "no pyramid level", "broken": "broken.svs"}


def batch(*args) -> int:
    return serve_main(["score", *map(str, args), "--no-progress"])


def test_bad_files_are_failed_rows_and_good_slides_still_scored(bundle, good_root, tmp_path,
                                                                 capsys):
    folder = tmp_path / "slides"
    write_bad_files(folder, good_root / "s0.tif")
    for name in ("s0.tif", "s1.tif"):
        shutil.copy(good_root / name, folder / name)
    out = tmp_path / "out"
    assert batch(folder, "--model", bundle, "--out", out) == 1
    summary = read_summary(out)
    # plain.png is not a slide by extension nor by content: not in the folder's slide list.
    assert sorted(summary) == sorted([*BAD_IN_FOLDER, "s0", "s1"])
    for key, word in BAD_IN_FOLDER.items():
        row = summary[key]
        assert row["status"] == "failed" and word in row["error"], row
        assert not (out / key / DONE_MARKER).exists()
    for key in ("s0", "s1"):
        assert summary[key]["status"] == "ok" and int(summary[key]["tiles"]) > 0
        assert (out / key / DONE_MARKER).exists()
    printed = capsys.readouterr().out
    assert "2 of 9 slides scored, 7 failed" in printed and "failed huge_claim" in printed
    # A rerun keeps the finished outputs and reports the same failures.
    before = slide_files(out)
    assert batch(folder, "--model", bundle, "--out", out) == 1
    assert slide_files(out) == before
    assert {k: r["status"] for k, r in read_summary(out).items()} == \
        {k: r["status"] for k, r in summary.items()}


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun_equals_an_uninterrupted_run(bundle, good_root,
                                                                         tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("s0.tif", "s1.tif", "s2.tif", "s3.tif"):
        shutil.copy(good_root / name, folder / name)
    command = [str(BIN / "milroi-serve"), "score", str(folder), "--model", str(bundle),
               "--provider", "cpu", "--no-progress"]
    reference = tmp_path / "reference"
    started = time.monotonic()
    subprocess.run([*command, "--out", str(reference)], check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    duration = time.monotonic() - started
    expected_files, expected_summary = slide_files(reference), stable_summary(reference)
    assert len(expected_summary) == 4

    # Three kills at seeded random times across the run (start-up included), each followed
    # by a rerun that must finish the job with the same bytes as the uninterrupted run.
    for trial, delay in enumerate(np.random.default_rng(9).uniform(0.2, 0.95, 3) * duration):
        out = tmp_path / f"killed{trial}"
        process = subprocess.Popen([*command, "--out", str(out)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            time.sleep(delay)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(30)
        finished = {p: p.stat().st_mtime_ns for p in out.glob(f"*/{DONE_MARKER}")}
        rerun = subprocess.run([*command, "--out", str(out)], timeout=300,
                               capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished: not redone
        assert slide_files(out) == expected_files, f"kill at {delay:.1f} s"
        assert stable_summary(out) == expected_summary
        assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp file left
