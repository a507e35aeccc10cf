"""build_images.sh guards the disk: it refuses to start a build the storage has no room for, with
a message that says how much is needed and where, instead of buildah's "no space left on device"
halfway through a vfs layer copy."""
from __future__ import annotations

import os
import subprocess

from containers_support import BASE_IMAGE, SCRIPTS, buildah


def test_build_stops_before_writing_when_disk_is_short(all_builds_ended, tmp_path):
    layers_before = buildah("images", "--all", "--quiet").stdout.split()
    env = dict(os.environ, MILROI_MIN_FREE_GIB="1000000", WITH_CUDA="0", BASE_IMAGE=BASE_IMAGE,
               SERVE_IMAGE="localhost/milroi-serve:disk-check", BENCH_JSON=str(tmp_path / "b.json"))
    result = subprocess.run(["bash", str(SCRIPTS / "build_images.sh"), "serve"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert "needs about 1000000 GiB free for buildah's vfs storage" in result.stderr
    assert "GiB free" in result.stderr.splitlines()[-2]
    assert buildah("images", "--all", "--quiet").stdout.split() == layers_before
    assert not (tmp_path / "b.json").exists()
