"""`milroi-serve score --ray`: the same outputs as the local run, failures, resumability and a
worker killed mid-slide, on a real local Ray cluster."""
from __future__ import annotations

import pytest
from ray_test_helpers import crashing, done_markers, output_files, summary_rows

from core.ray_cluster import RayOptions
from serving.batch import score_folder
from serving.cli import main as serve_main
from serving.options import EngineOptions
from serving.ray_batch import RayBackend, ScoringActor

pytestmark = pytest.mark.slow

OK_SLIDES = ["sub/synth_tumor", "synth_normal"]
BROKEN_ERROR = "cannot read slide"


def score(*args) -> int:
    return serve_main(["score", *map(str, args), "--no-progress"])


@pytest.fixture(scope="module")
def local_out(tmp_path_factory, bundle, slides_dir):
    """The plain in-process run: the reference."""
    out = tmp_path_factory.mktemp("local") / "out"
    assert score(slides_dir, "--model", bundle, "--out", out) == 1  # broken.svs failed
    return out


@pytest.fixture(scope="module")
def ray_out(tmp_path_factory, ray_cluster, bundle, slides_dir):
    out = tmp_path_factory.mktemp("ray") / "out"
    assert score(slides_dir, "--model", bundle, "--out", out, "--ray", "auto",
                 "--ray-actors", "2") == 1
    return out


def test_ray_run_writes_the_local_runs_files_byte_for_byte(local_out, ray_out):
    local_files = output_files(local_out)
    assert {name.rsplit("/", 1)[0] for name in local_files} == set(OK_SLIDES)
    assert output_files(ray_out) == local_files
    assert summary_rows(ray_out) == summary_rows(local_out)
    assert done_markers(ray_out) == done_markers(local_out)
    assert sorted(done_markers(ray_out)) == OK_SLIDES


def test_corrupt_slide_is_a_failed_row_with_the_local_error(ray_out):
    row = summary_rows(ray_out)["broken"]
    assert row["status"] == "failed"
    assert BROKEN_ERROR in row["error"] and "broken.svs" in row["error"]
    assert "Traceback" not in row["error"] and "ray::" not in row["error"]
    assert not (ray_out / "broken" / "done.json").exists()


def test_rerun_skips_finished_slides(ray_cluster, bundle, slides_dir, ray_out, local_out):
    before = {p: p.stat().st_mtime_ns for p in ray_out.rglob("*") if p.is_file()
              and p.name != "summary.csv"}
    assert score(slides_dir, "--model", bundle, "--out", ray_out, "--ray", "auto") == 1
    after = {p: p.stat().st_mtime_ns for p in ray_out.rglob("*") if p.is_file()
             and p.name != "summary.csv"}
    assert after == before  # nothing finished was rewritten
    assert summary_rows(ray_out) == summary_rows(local_out)  # broken tried again, failed again


def test_worker_killed_mid_slide_is_restarted_and_the_slide_completes(
        ray_cluster, bundle, slides_dir, local_out, tmp_path):
    marker = tmp_path / "crashed"
    backend = RayBackend(str(bundle), RayOptions("auto", actors=1, max_restarts=1),
                         EngineOptions(provider="cpu"),
                         actor_class=crashing(ScoringActor, "score", "synth_normal", marker))
    try:
        first_actor = backend.actors[0]
        assert backend.engine_threads == [1]  # the actor's 1 CPU, not one thread per core
        rows = score_folder(slides_dir, tmp_path / "out", backend, workers=1, progress=False)
        assert backend.actors == [first_actor]  # restarted by Ray, not replaced
    finally:
        backend.close()
    assert marker.exists()  # the worker did die on synth_normal
    assert {r["slide"]: r["status"] for r in rows} == {
        "broken": "failed", "sub/synth_tumor": "ok", "synth_normal": "ok"}
    assert output_files(tmp_path / "out") == output_files(local_out)


def test_worker_dying_past_its_restarts_fails_only_that_slide(
        ray_cluster, bundle, slides_dir, local_out, tmp_path):
    # Slides go in order broken, sub/synth_tumor, synth_normal: the crash is not the last one.
    backend = RayBackend(str(bundle), RayOptions("auto", actors=1, max_restarts=1),
                         EngineOptions(provider="cpu"),
                         actor_class=crashing(ScoringActor, "score", "synth_tumor", None))
    try:
        rows = {r["slide"]: r for r in score_folder(slides_dir, tmp_path / "out", backend,
                                                    workers=1, progress=False)}
    finally:
        backend.close()
    assert rows["sub/synth_tumor"]["status"] == "failed"
    assert "Ray worker scoring it died (1 restarts)" in rows["sub/synth_tumor"]["error"]
    assert summary_rows(tmp_path / "out")["sub/synth_tumor"]["status"] == "failed"
    # The dead actor was replaced: the slide after it was still scored, as the local run did.
    assert rows["synth_normal"]["status"] == "ok"
    assert output_files(tmp_path / "out") == {
        k: v for k, v in output_files(local_out).items() if k.startswith("synth_normal/")}


def test_ray_with_server_is_refused(ray_cluster, slides_dir, tmp_path, capsys):
    assert score(slides_dir, "--server", "127.0.0.1:1", "--out", tmp_path / "o",
                 "--ray", "auto") != 0
    assert "--ray scores in Ray actors: give --model, not --server" in capsys.readouterr().err


def test_cli_with_its_own_local_ray_gives_the_same_outputs(bundle, slides_dir, local_out,
                                                           tmp_path):
    """`--ray local` in a fresh process: starts a Ray of its own, scores, shuts it down."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "out"
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("milroi-serve")), "score", str(slides_dir),
         "--model", str(bundle), "--out", str(out), "--ray", "local", "--ray-actors", "1",
         "--no-progress"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stderr[-2000:]  # broken.svs
    assert "2 of 3 slides scored, 1 failed" in proc.stdout
    assert output_files(out) == output_files(local_out)
    assert summary_rows(out) == summary_rows(local_out)
