"""Fixtures of the container tests: the serve image built with buildah, containers made from it,
a real exported bundle and small synthetic slides.

No Docker daemon here or in CI: scripts/containers/build_images.sh builds the image with buildah
(vfs storage, chroot isolation, no pulls) on a base image made locally by debootstrap, and the
tests run commands in it with `buildah run`, which with chroot isolation shares the host's
network namespace (what test (b) relies on, and checks).

The tests need root (buildah with vfs/chroot) and, on a machine without buildah/debootstrap, the
Debian mirror to install them; without either they are skipped with that reason. Anything else
that goes wrong is a failure.

MILROI_TEST_WITH_CUDA=1 builds the image as shipped (CUDA 13 / cuDNN 9 runtime wheels, ~3.3 GB);
the default (0) leaves those wheels out, which keeps CI lean: the CI machines have no GPU and the
image is otherwise identical (same Dockerfile, same onnxruntime-gpu package on its CPU provider).
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from containers_support import (
    BASE_IMAGE,
    NO_TOOLS,
    SCRIPTS,
    SERVE_IMAGE,
    WITH_CUDA,
    Container,
    image_size_bytes,
)


@pytest.fixture(scope="session")
def container_tools() -> None:
    """buildah and debootstrap present (installed when missing), or a skip saying why not."""
    if os.geteuid() != 0:
        pytest.skip("container tests need root (buildah with vfs storage and chroot isolation)")
    result = subprocess.run(["bash", "-c", f"source {SCRIPTS / 'common.sh'} && ensure_tools"],
                            capture_output=True, text=True, timeout=900)
    if result.returncode == NO_TOOLS:
        pytest.skip(f"cannot install buildah/debootstrap: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="session")
def serve_image(container_tools, tmp_path_factory) -> dict:
    """The serve image, built (or rebuilt from cached layers) by build_images.sh; returns the
    image name, the build seconds and the image size the script recorded."""
    # the script's build figures go to $MILROI_CONTAINER_RESULTS when set, else to a scratch
    # file: a test run never edits the committed benchmarks/results/containers.json
    figures = os.environ.get("MILROI_CONTAINER_RESULTS") or str(
        tmp_path_factory.mktemp("figures") / "containers.json")
    env = dict(os.environ, SERVE_IMAGE=SERVE_IMAGE, BASE_IMAGE=BASE_IMAGE,
               WITH_CUDA="1" if WITH_CUDA else "0", BENCH_JSON=figures)
    start = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPTS / "build_images.sh"), "serve"], env=env,
                            capture_output=True, text=True, timeout=1800)
    seconds = time.monotonic() - start
    assert result.returncode == 0, f"build failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    size = image_size_bytes(SERVE_IMAGE)
    print(f"\n{SERVE_IMAGE}: built in {seconds:.0f} s (base image included), "
          f"{size / 2**30:.2f} GiB")
    return {"image": SERVE_IMAGE, "build_seconds": seconds, "size_bytes": size}


@pytest.fixture
def container(serve_image):
    made = []

    def make() -> Container:
        made.append(Container(serve_image["image"]))
        return made[-1]

    yield make
    for c in made:
        c.remove()


def world_readable(path: Path) -> Path:
    """The image runs as uid 10001: pytest's 0700 temp folders must let it in."""
    for p in [path, *path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return path


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """ResNet-50 (random init, seed 0) + Chowder head, exported by training.export."""
    import torch

    from training.backbone import build_backbone
    from training.export import export_bundle
    from training.heads import build_head

    backbone = build_backbone("none", layer="pool", seed=0)
    torch.manual_seed(0)
    head = build_head({"kind": "chowder", "in_dim": backbone.feature_dim}).eval()
    out = tmp_path_factory.mktemp("bundle") / "chowder"
    export_bundle(out, backbone, head, overwrite=True)
    return world_readable(out)


@pytest.fixture(scope="session")
def slides(tmp_path_factory) -> Path:
    """Two small synthetic H&E slides (pyramidal JPEG TIFF, 0.243 um/px) in a folder tree."""
    from wsi.synth import write_synthetic_slide

    root = tmp_path_factory.mktemp("slides")
    write_synthetic_slide(root / "a.tif", width=1536, height=1280, seed=0)
    (root / "sub").mkdir()
    write_synthetic_slide(root / "sub" / "b.tif", width=1280, height=1280, seed=1)
    return world_readable(root)


@pytest.fixture
def out_dir(tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)   # written by the image's non-root user
    return out

