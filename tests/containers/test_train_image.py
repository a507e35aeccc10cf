"""The train image (Dockerfile.train), built from this checkout by
`scripts/containers/build_images.sh train` and then run: synthetic slides -> ResNet-50 features ->
a MIL head fitted and tracked in MLflow, all inside the image, as its non-root user, with the
image's own guarantee that `serving` is absent (the layering rule, docs/ARCHITECTURE.md).

Measured on 2 shared CPUs: the build ~4 min (pip install ~150 s, the rest vfs layer copies; it
runs in the background while the other folders' tests run, image_builds.py), the run ~1 min.
Under buildah's vfs storage the build needs ~34 GB of transient disk: with less free the test is
skipped, saying so (build_images.sh would refuse).
"""
from __future__ import annotations

import shutil
import sqlite3

import pytest
from containers_support import Container, buildah, image_size_bytes
from image_builds import TRAIN_IMAGE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def train_image(container_tools, image_builds) -> str:
    """The train image of this checkout, built in this run (a stale image would test old
    code); skipped when the disk cannot hold the build."""
    result = image_builds.result("train")
    if result.skip:
        pytest.skip(result.skip)
    result.check()
    print(f"\n{TRAIN_IMAGE}: built in {result.seconds:.0f} s, "
          f"{image_size_bytes(TRAIN_IMAGE) / 2**30:.2f} GiB")
    root = buildah("info", "--format", "{{.store.GraphRoot}}").stdout.strip()
    # under vfs a working container is a full copy of the image's file system (~7 GB): on a disk
    # without room for it, say so instead of failing halfway with "no space left on device"
    need = image_size_bytes(TRAIN_IMAGE) + 2 * 2**30
    free = shutil.disk_usage(root).free
    if free < need:
        pytest.skip(f"{TRAIN_IMAGE} is built, but a working container of it needs "
                    f"{need / 2**30:.1f} GiB free in {root} and {free / 2**30:.1f} GiB are")
    return TRAIN_IMAGE


def test_train_image_features_and_fit(train_image, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)   # written by the image's user, uid 10001
    ctr = Container(train_image)
    try:
        def run(*args: str):
            result = ctr.run(*args, volumes={work: "/work"}, timeout=900)
            assert result.returncode == 0, f"{args}:\n{result.stderr[-3000:]}"
            return result

        probe = run("python", "-c", "import importlib.util as u, os, torch, torchvision; "
                    "print(torch.__version__, torchvision.__version__, os.getuid(), "
                    "u.find_spec('serving') is None)")
        torch_version, vision_version, uid, no_serving = probe.stdout.split()
        assert torch_version.startswith("2.14.1") and "cu" in torch_version   # the CUDA build
        assert vision_version.startswith("0.29.1")
        assert uid == "10001" and no_serving == "True"

        run("milroi-train", "synth", "/work/ds", "--tumor", "2", "--normal", "2",
            "--size", "768x768", "--seed", "0")
        run("milroi-train", "features", "/work/ds", "--out", "/work/feat", "--weights", "none",
            "--device", "cpu", "--no-progress")
        assert sorted(p.name for p in (work / "feat" / "h5_files").iterdir()) == [
            "normal_001.h5", "normal_002.h5", "tumor_001.h5", "tumor_002.h5"]
        fit = run("milroi-train", "fit", "/work/feat", "--labels", "/work/ds/reference.csv",
                  "--folds", "1", "--epochs", "3", "--seed", "0")
        assert "run_id=" in fit.stdout
    finally:
        ctr.remove()

    # MLflow's default store: sqlite:///mlflow.db in the working directory /work
    with sqlite3.connect(work / "mlflow.db") as db:
        finished = db.execute("SELECT COUNT(*) FROM runs WHERE status = 'FINISHED'").fetchone()[0]
    assert finished >= 1
    assert (work / "mlflow.db").stat().st_uid == 10001
