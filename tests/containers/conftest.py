"""Fixtures of the container tests: the serve image built with buildah, containers made from it,
a real exported bundle and small synthetic slides.

No Docker daemon here or in CI: scripts/containers/build_images.sh builds the image with buildah
(vfs storage, chroot isolation, no pulls) on a base image made locally by debootstrap, and the
tests run commands in it with `buildah run`, which with chroot isolation shares the host's
network namespace (what test (b) relies on, and checks).

The tests need root (buildah with vfs/chroot) and, on a machine without buildah/debootstrap, the
Debian mirror to install them; without either they are skipped with that reason. Anything else
that goes wrong is a failure.

The images are built in the background from the moment collection ends, and these tests run
last (image_builds.py): the builds overlap the rest of the suite instead of adding to it.

MILROI_TEST_WITH_CUDA=1 builds the image as shipped (CUDA 13 / cuDNN 9 runtime wheels, ~3.3 GB);
the default (0) leaves those wheels out, which keeps CI lean: the CI machines have no GPU and the
image is otherwise identical (same Dockerfile, same onnxruntime-gpu package on its CPU provider).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from containers_support import SERVE_IMAGE, Container, image_size_bytes
from image_builds import ImageBuilds

# The images each test file needs; test_build_script.py builds none but must not run beside one.
IMAGES_OF = {"test_serve_image.py": ["serve"], "test_train_image.py": ["train"],
             "test_build_script.py": []}
_builds: ImageBuilds | None = None


def pytest_collection_finish(session) -> None:
    """Once the run's tests are known: move the container tests to the end and start building
    the images they need in the background, so the builds overlap the other folders' tests."""
    global _builds
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return   # a worker runs this folder first and builds in image_builds (tests/conftest.py)
    here = Path(__file__).parent
    ours = [item for item in session.items if here in item.path.parents]
    if not ours or session.config.option.collectonly:
        return
    session.items[:] = [item for item in session.items if here not in item.path.parents] + ours
    if os.geteuid() != 0:
        return   # container_tools skips, saying why
    wanted = {image for item in ours for image in IMAGES_OF.get(item.path.name, ["serve"])}
    _builds = ImageBuilds([image for image in ("serve", "train") if image in wanted]).start()


def pytest_sessionfinish(session) -> None:
    if _builds is not None:
        _builds.stop()


@pytest.fixture(scope="session")
def image_builds() -> ImageBuilds:
    """The builds: started in the background by pytest_collection_finish in a one-process run,
    or now (an xdist worker, whose first folder this is, or a run that reaches a container test
    some other way)."""
    global _builds
    if os.geteuid() != 0:
        pytest.skip("container tests need root (buildah with vfs storage and chroot isolation)")
    if _builds is None:
        _builds = ImageBuilds(["serve", "train"]).start()
    return _builds


@pytest.fixture(scope="session")
def container_tools(image_builds) -> None:
    """buildah and debootstrap present (installed when missing), or a skip saying why not."""
    result = image_builds.result("tools")
    if result.skip:
        pytest.skip(result.skip)
    result.check()


@pytest.fixture(scope="session")
def all_builds_ended(container_tools, image_builds) -> None:
    """Every background build has ended: for a test that counts the storage's images."""
    for step in image_builds.steps:
        image_builds.result(step)


@pytest.fixture(scope="session")
def serve_image(container_tools, image_builds) -> dict:
    """The serve image, built (or rebuilt from cached layers) by build_images.sh; returns the
    image name, the build seconds and the image size the script recorded."""
    result = image_builds.result("serve")
    if result.skip:
        pytest.skip(result.skip)
    result.check()
    size = image_size_bytes(SERVE_IMAGE)
    print(f"\n{SERVE_IMAGE}: built in {result.seconds:.0f} s (base image included), "
          f"{size / 2**30:.2f} GiB")
    return {"image": SERVE_IMAGE, "build_seconds": result.seconds, "size_bytes": size}


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

