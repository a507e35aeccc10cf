"""The tile-decode threads of a slide scale to the cores this process may use (issue 26: a
16-core GPU host was fed by 8 reader threads)."""
from __future__ import annotations

import os
import subprocess
import sys

from serving.engine import Engine
from serving.pipeline import SlideScorer, default_reader_workers


def test_reader_threads_follow_the_cores_with_no_cap(monkeypatch, chowder_bundle):
    assert default_reader_workers() == max(2, len(os.sched_getaffinity(0)))
    with Engine(chowder_bundle, provider="cpu", batch_size=8) as engine:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
        assert SlideScorer(engine).reader_workers == 16     # the GPU host: all 16, not 8
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
        assert SlideScorer(engine).reader_workers == 64
        assert SlideScorer(engine, reader_workers=3).reader_workers == 3   # an explicit choice


def test_a_process_pinned_to_one_core_still_gets_two_reader_threads():
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from serving.pipeline import default_reader_workers; print(default_reader_workers())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=120)
    assert out.stdout.split()[-1] == "2"
