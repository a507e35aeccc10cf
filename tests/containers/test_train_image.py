"""The train image (Dockerfile.train), when it has been built (`make images` or
`scripts/containers/build_images.sh train`): synthetic slides -> ResNet-50 features -> a MIL head
fitted and tracked in MLflow, all inside the image, as its non-root user.

The test does not build the image itself: the build takes ~8 min on 2 CPUs and, under buildah's
vfs storage, ~35 GB of transient disk, too much for every CI run; it is skipped with that reason
when the image is absent.
"""
from __future__ import annotations

import shutil
import sqlite3

import pytest

from containers_support import Container, buildah, image_size_bytes

pytestmark = pytest.mark.slow

TRAIN_IMAGE = "localhost/milroi-train:latest"


@pytest.fixture(scope="module")
def train_image(container_tools) -> str:
    if buildah("inspect", "--type", "image", TRAIN_IMAGE, check=False).returncode != 0:
        pytest.skip(f"no {TRAIN_IMAGE}: build it with `make images` or "
                    "scripts/containers/build_images.sh train (~8 min, ~35 GB transient disk)")
    # under vfs a working container is a full copy of the image's file system (~7 GB): on a disk
    # without room for it, say so instead of failing halfway with "no space left on device"
    need = image_size_bytes(TRAIN_IMAGE) + 2 * 2**30
    root = buildah("info", "--format", "{{.store.GraphRoot}}").stdout.strip()
    free = shutil.disk_usage(root).free
    if free < need:
        pytest.skip(f"{TRAIN_IMAGE} is here, but a working container of it needs "
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
