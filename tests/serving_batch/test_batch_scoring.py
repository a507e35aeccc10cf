"""`milroi-serve score`: a folder of slides, in process and through a server, resumable."""
from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from batch_testing import read_summary, slide_files, stable_summary
from serving_batch_helpers import MILROI_SERVE, wait_for

from core.errors import MilroiError
from results.layout import DONE_MARKER, SUMMARY_NAME, read_done_marker
from serving.batch import slide_keys
from serving.cli import main as serve_main
from wsi.discovery import find_slides

OK_SLIDES = ["sub/synth_tumor", "synth_normal"]
ALL_SLIDES = ["blank", "broken", *OK_SLIDES]


def batch(*args: str) -> int:
    return serve_main(["score", *map(str, args), "--no-progress"])


@pytest.fixture(scope="module")
def in_process_out(tmp_path_factory, bundle, slides_dir) -> tuple[Path, int]:
    """One uninterrupted in-process run over the test folder: the reference of the others."""
    out = tmp_path_factory.mktemp("batch") / "out"
    return out, batch(slides_dir, "--model", bundle, "--out", out)


def test_find_slides_recurses_and_keeps_only_slides(slides_dir, tmp_path):
    found = find_slides(slides_dir).slides
    assert slide_keys(slides_dir, found) == ALL_SLIDES  # notes.txt skipped
    # Names differing only by extension keep it, so their outputs do not collide.
    assert slide_keys(tmp_path, [tmp_path / "a" / "x.svs", tmp_path / "a" / "x.tif",
                                 tmp_path / "y.tif"]) == ["a/x.svs", "a/x.tif", "y"]
    # A slide without a known extension is found by its content; OUT inside the folder is not.
    root = tmp_path / "root"
    (root / "out").mkdir(parents=True)
    (root / "scan.img").write_bytes((slides_dir / "synth_normal.tif").read_bytes())
    (root / "out" / "copy.tif").write_bytes(b"x")
    assert find_slides(root, exclude=root / "out").slides == [root / "scan.img"]


def test_in_process_writes_every_output_and_a_summary_row_per_slide(in_process_out, bundle):
    out, code = in_process_out
    assert code == 1  # broken.svs failed: the job says so
    summary = read_summary(out)
    assert sorted(summary) == ALL_SLIDES
    from core.bundle import bundle_digest

    for key in OK_SLIDES:
        row = summary[key]
        assert row["status"] == "ok" and row["error"] == ""
        assert 0.0 <= float(row["score"]) <= 1.0
        assert row["label"] == ("tumor" if float(row["score"]) >= 0.5 else "normal")
        assert row["model"] == "batch-test" and row["model_version"] == bundle_digest(bundle)
        files = {p.name for p in (out / key).iterdir()}
        assert DONE_MARKER in files and len(files) == 6, files  # 5 outputs + marker
        # The patch table holds every scored tile.
        patch_csv = next((out / key).glob("*.csv"))
        table = np.loadtxt(patch_csv, delimiter=",", skiprows=1, ndmin=2, usecols=(0, 1, 2, 3))
        assert int(row["tiles"]) == len(table) > 0
        assert ((table[:, 3] >= 0) & (table[:, 3] <= 1)).all()
        with patch_csv.open() as f:   # the summary counts the tiles the CSV flags
            flagged = sum(1 for r in csv.DictReader(f) if r["artefact"])
        assert int(row["artefact_tiles"]) == flagged
        assert read_done_marker(out / key)["score"] == pytest.approx(float(row["score"]), 1e-5)
        # one decision (results.decision), stated alike in summary.csv, GeoJSON and Spatiopath
        agree = {("tumor", True): "tumor", ("normal", False): "normal"}
        assert row["decision"] == agree.get((row["label"], int(row["rois"]) > 0), "review")
        assert (row["decision_reason"] == "") == (row["decision"] != "review")
        stated = {"decision": row["decision"], "reason": row["decision_reason"]}
        geojson = json.loads(next((out / key).glob("*.geojson")).read_text())
        assert geojson["properties"]["decision"] == stated
        assert json.loads(next((out / key).glob("*_spatiopath.json")).read_text())[
            "decision"] == stated
    blank = summary["blank"]  # no tissue: finished, with no score and no tile
    assert (blank["status"], blank["label"], blank["score"], blank["tiles"]) == \
        ("ok", "no_tissue", "", "0")
    assert blank["decision"] == "no_tissue"
    assert read_done_marker(out / "blank") is not None
    bad = summary["broken"]
    assert bad["status"] == "failed" and "broken.svs" in bad["error"]
    assert not (out / "broken" / DONE_MARKER).exists()


def test_rerun_skips_finished_slides(in_process_out, bundle, slides_dir):
    out, _ = in_process_out
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()
              and p.name != SUMMARY_NAME}
    assert batch(slides_dir, "--model", bundle, "--out", out) == 1  # broken.svs is retried
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()
             and p.name != SUMMARY_NAME}
    assert after == before  # nothing rewritten
    assert read_summary(out)["broken"]["status"] == "failed"


def test_sigkill_mid_folder_then_rerun_equals_uninterrupted_run(in_process_out, bundle,
                                                                slides_dir, tmp_path):
    reference, _ = in_process_out
    out = tmp_path / "out"
    proc = subprocess.Popen([MILROI_SERVE, "score", str(slides_dir), "--model", str(bundle),
                             "--out", str(out), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill as soon as the first tissue slide is finished: the last one is then being scored.
        wait_for(lambda: (out / "sub" / "synth_tumor" / DONE_MARKER).exists(), timeout=180,
                 interval=0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "synth_normal" / DONE_MARKER).exists()
    finished_before = {p: p.stat().st_mtime_ns for p in out.glob(f"**/{DONE_MARKER}")}
    # What a kill in the middle of a write leaves behind (atomic_write's temp files are named
    # after their target), whether or not this kill happened to land in one.
    (out / "synth_normal").mkdir(exist_ok=True)
    (out / "synth_normal" / ".synth_normal.geojson.k1ll3d.tmp").write_text('{"type": "Feat')
    (out / f".{SUMMARY_NAME}.k1ll3d.tmp").write_text("slide,sta")

    assert batch(slides_dir, "--model", bundle, "--out", out) == 1
    assert {p: p.stat().st_mtime_ns for p in finished_before} == finished_before  # skipped
    assert slide_files(out) == slide_files(reference)  # no temp or partial file left, same bytes
    assert stable_summary(out) == stable_summary(reference)
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


def test_server_mode_gives_the_in_process_scores(in_process_out, server, slides_dir, tmp_path):
    reference, _ = in_process_out
    out = tmp_path / "remote"
    assert batch(slides_dir, "--server", server.target, "--out", out, "--workers", "2") == 1
    assert slide_files(out) == slide_files(reference)
    remote, local = stable_summary(out), stable_summary(reference)
    assert remote["broken"]["status"] == "failed"
    assert "INVALID_ARGUMENT" in remote["broken"]["error"]
    for key in OK_SLIDES:
        assert remote[key] == local[key]


def test_remote_root_maps_the_folder_under_the_server_root(server, slides_dir, tmp_path):
    """SLIDES_DIR = the server root's `sub` folder, named with --remote-root."""
    out = tmp_path / "remote_sub"
    assert batch(slides_dir / "sub", "--server", server.target, "--remote-root", "sub",
                 "--out", out) == 0
    assert read_summary(out)["synth_tumor"]["status"] == "ok"


def test_a_model_change_rescoring_and_clear_errors(in_process_out, bundle, slides_dir, tmp_path,
                                                   capsys):
    out, _ = in_process_out
    # A done marker of another model version does not count as finished.
    stale = tmp_path / "stale"
    (stale / "synth_normal").mkdir(parents=True)
    marker = json.loads((out / "synth_normal" / DONE_MARKER).read_text())
    (stale / "synth_normal" / DONE_MARKER).write_text(json.dumps({**marker, "model_version": "0"}))
    batch(slides_dir, "--model", bundle, "--out", stale)
    assert read_done_marker(stale / "synth_normal")["model_version"] == marker["model_version"]
    # Bad invocations: one line, non-zero.
    assert batch(tmp_path / "nowhere", "--model", bundle, "--out", tmp_path / "o") == 1
    assert batch(slides_dir, "--out", tmp_path / "o") == 1
    assert batch(slides_dir, "--model", tmp_path, "--out", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and "exactly one of --model" in err and "manifest" in err


def test_real_slides_of_tests_data(bundle, tmp_path):
    """tests/data as it is: Aperio JPEG (CMU-1, a 20x scan at 0.499 um/px), Aperio JPEG 2000
    without a pixel size (TCGA), a corrupt SVS, and files that are not slides (README, XML).
    CMU-1 is scored at the model's 0.243 um/px (enlarged, and the summary says so); the TCGA
    slide fails with the fix in its message, and is scored once --fallback-mpp gives its size."""
    from core.bundle import BundleManifest
    from wsi.grid import tiles_for_slide
    from wsi.slide import open_slide

    data = Path(__file__).resolve().parents[1] / "data"
    out = tmp_path / "out"
    assert batch(data, "--model", bundle, "--out", out, "--workers", "2") == 1
    summary = read_summary(out)
    assert sorted(summary) == ["CMU-1-Small-Region", "TCGA-CR-7395-01A-01-TS1", "broken"]
    assert summary["broken"]["status"] == "failed"
    tcga = summary["TCGA-CR-7395-01A-01-TS1"]
    assert tcga["status"] == "failed" and "no pixel size" in tcga["error"] \
        and "--fallback-mpp" in tcga["error"]
    cmu = summary["CMU-1-Small-Region"]
    assert cmu["status"] == "ok"
    assert (cmu["slide_mpp"], cmu["mpp_source"], cmu["model_mpp"]) == ("0.499", "metadata", "0.243")
    assert float(cmu["scale_factor"]) == pytest.approx(0.243 / 0.499, rel=1e-3)
    assert (cmu["read_level"], cmu["upsampled"]) == ("0", "True")
    geojson = json.loads((out / "CMU-1-Small-Region" / "CMU-1-Small-Region.geojson").read_text())
    assert geojson["properties"]["scale"]["upsampled"] is True
    spatiopath = json.loads(
        (out / "CMU-1-Small-Region" / "CMU-1-Small-Region_spatiopath.json").read_text())
    assert spatiopath["scale"]["model_mpp"] == 0.243 and spatiopath["tile_size"] == 109

    out2 = tmp_path / "out2"
    assert batch(data, "--model", bundle, "--out", out2, "--fallback-mpp", "0.5") == 1   # broken
    tcga = read_summary(out2)["TCGA-CR-7395-01A-01-TS1"]
    assert (tcga["status"], tcga["mpp_source"], tcga["slide_mpp"]) == ("ok", "user", "0.5")
    manifest = BundleManifest.read(bundle)
    for key, fallback in (("CMU-1-Small-Region", None), ("TCGA-CR-7395-01A-01-TS1", 0.5)):
        with open_slide(data / f"{key}.svs", fallback_mpp=fallback) as slide:
            _, grid = tiles_for_slide(slide, manifest.tiling, params=manifest.tissue)
        assert int(read_summary(out2)[key]["tiles"]) == len(grid) > 10


def test_score_sets_the_engine_batch_size_and_threads(bundle, slides_dir, tmp_path):
    """`score --model` takes the engine options the server takes (one declaration of them)."""
    import argparse

    from serving import batch as batch_command

    parser = argparse.ArgumentParser()
    batch_command.configure_parser(parser)
    args = parser.parse_args([str(slides_dir), "--out", str(tmp_path / "out"), "--model",
                              str(bundle), "--provider", "cpu", "--batch-size", "8",
                              "--threads", "1"])
    backend, workers = batch_command.backend_from_args(args)
    try:
        assert (backend.engine.batch_size, backend.engine.threads, workers) == (8, 1, 1)
    finally:
        backend.close()
    with pytest.raises(MilroiError, match="--threads must be at least 1"):
        batch_command.backend_from_args(parser.parse_args(
            [str(slides_dir), "--out", str(tmp_path / "out"), "--model", str(bundle),
             "--threads", "0"]))


def test_a_20x_model_on_a_40x_slide_writes_level_0_tiles_alike_in_process_and_through_a_server(
        bundle, slides_dir, tmp_path):
    """A bundle whose 224 px input is at 0.486 um/px, on a 0.243 um/px slide: read from pyramid
    level 1 (2x). Every file states tiles in level-0 px (448), whether the slide was scored in
    this process, through a server (`score --server`) or with `client score --out`; the CSV,
    the ROIs and the GeoJSON are the same. The server's header says so (tile_size, level-0 px;
    tile_level; the scale) beside the model's input side (input_px)."""
    from serving_batch_helpers import ServerProcess

    from serving.client import ScoringClient
    from wsi.slide import open_slide

    level1 = tmp_path / "level1"
    shutil.copytree(bundle, level1)
    manifest = json.loads((level1 / "manifest.json").read_text())
    manifest["target_mpp"] = 0.486
    (level1 / "manifest.json").write_text(json.dumps(manifest))
    root = tmp_path / "slides"
    root.mkdir()
    shutil.copy(slides_dir / "sub" / "synth_tumor.tif", root / "synth_tumor.tif")
    with open_slide(root / "synth_tumor.tif") as slide:
        size0 = round(224 * slide.level_downsamples[1])
    assert size0 == 448
    local, remote, client_out = tmp_path / "local", tmp_path / "remote", tmp_path / "client"
    assert batch(root, "--model", level1, "--out", local) == 0
    server = ServerProcess(level1, [root], tmp_path / "server.log")
    try:
        server.wait_serving()
        assert batch(root, "--server", server.target, "--out", remote) == 0
        assert serve_main(["client", "score", "synth_tumor.tif", "--server", server.target,
                           "--out", str(client_out), "--local-slide",
                           str(root / "synth_tumor.tif")]) == 0
        with ScoringClient(server.target) as client:
            header = client.score_slide_all("synth_tumor.tif").header
            assert (header.tile_size, header.input_px, header.tile_level) == (448, 224, 1)
            assert (header.model_mpp, header.upsampled) == (0.486, False)
            assert header.scale_factor == pytest.approx(2.0, rel=1e-3)
            assert client.get_model().input_px == 224
            assert client.get_model().input_mpp == 0.486
    finally:
        server.stop()
    tables = [np.loadtxt(folder / name, delimiter=",", skiprows=1, usecols=(0, 1, 2, 3), ndmin=2)
              for folder, name in ((local / "synth_tumor", "synth_tumor_patches.csv"),
                                   (remote / "synth_tumor", "synth_tumor_patches.csv"),
                                   (client_out, "synth_tumor_patches.csv"))]
    assert len(tables[0]) > 0 and set(tables[0][:, 2]) == {448}
    for other in tables[1:]:
        np.testing.assert_array_equal(other[:, :3], tables[0][:, :3])
        np.testing.assert_allclose(other[:, 3], tables[0][:, 3], atol=2e-6)
    folders = (local / "synth_tumor", remote / "synth_tumor", client_out)
    spatiopath = [json.loads((f / "synth_tumor_spatiopath.json").read_text()) for f in folders]
    assert [doc["tile_size"] for doc in spatiopath] == [448, 448, 448]
    assert all(doc["scale"]["read_level"] == 1 and doc["scale"]["model_mpp"] == 0.486
               for doc in spatiopath)
    # the same ROIs (vertices to float rounding) and the same GeoJSON tiles and ROI outlines
    reference = [(p["x"], p["y"]) for p in spatiopath[0]["polygons"]]
    assert reference, "no ROI: the comparison would prove nothing"
    for doc in spatiopath[1:]:
        assert len(doc["polygons"]) == len(reference)
        for (x, y), polygon in zip(reference, doc["polygons"]):
            np.testing.assert_allclose(polygon["x"], x, atol=1e-6)
            np.testing.assert_allclose(polygon["y"], y, atol=1e-6)
    geojson = [json.loads((f / "synth_tumor.geojson").read_text()) for f in folders]
    shapes = [[feature["geometry"] for feature in doc["features"]] for doc in geojson]
    assert shapes[1] == shapes[0] and shapes[2] == shapes[0]


def test_in_process_opens_each_slide_once_and_computes_its_rois_once(bundle, slides_dir, tmp_path,
                                                                     monkeypatch):
    """The batch job's in-process path: one Slide per scored slide (the pipeline scores from the
    handle the writers use), one ROI union per slide (the writers take the pipeline's)."""
    import results.outputs
    import results.rois
    import wsi.slide

    opened, unions = [], []
    slide_init, roi_polygons = wsi.slide.Slide.__init__, results.rois.roi_polygons

    def counting_init(self, path, *args, **kwargs):
        opened.append(Path(path).name)
        slide_init(self, path, *args, **kwargs)

    def counting_polygons(*args, **kwargs):
        unions.append(1)
        return roi_polygons(*args, **kwargs)

    monkeypatch.setattr(wsi.slide.Slide, "__init__", counting_init)
    monkeypatch.setattr(results.rois, "roi_polygons", counting_polygons)
    monkeypatch.setattr(results.outputs, "roi_polygons", counting_polygons)
    src = tmp_path / "slides"
    shutil.copytree(slides_dir / "sub", src)   # synth_tumor.tif: tissue and ROIs
    assert batch(src, "--model", bundle, "--out", tmp_path / "out") == 0
    assert opened == ["synth_tumor.tif"] and unions == [1]
    assert int(read_summary(tmp_path / "out")["synth_tumor"]["rois"]) > 0
