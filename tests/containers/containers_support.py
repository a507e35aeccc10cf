"""Names and helpers shared by the container tests and their fixtures."""
from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "containers"
BUILDAH = ["buildah", "--storage-driver", "vfs"]
BASE_IMAGE = "localhost/milroi-base:bookworm"
WITH_CUDA = os.environ.get("MILROI_TEST_WITH_CUDA", "0") == "1"
SERVE_IMAGE = "localhost/milroi-serve:" + ("latest" if WITH_CUDA else "cpu")
NO_TOOLS = 3   # exit status of ensure_tools (common.sh): not root / apt unreachable


def buildah(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*BUILDAH, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"buildah {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def image_size_bytes(image: str) -> int:
    """The image's uncompressed size, as scripts/containers/common.sh computes it."""
    result = subprocess.run(
        ["bash", "-c", f"source {SCRIPTS / 'common.sh'} && image_size_bytes {image}"],
        capture_output=True, text=True, check=True)
    return int(result.stdout)


class Container:
    """A working container of an image (`buildah from`), commands run in it with `buildah run`."""

    def __init__(self, image: str):
        self.name = f"milroi-test-{uuid.uuid4().hex[:8]}"
        buildah("from", "--pull-never", "--name", self.name, image)

    def command(self, *args: str, volumes: dict[Path, str] | None = None,
                user: str | None = None) -> list[str]:
        """`buildah run` of args, as the image's user unless `user` is given."""
        options = [f"--volume={host}:{target}" for host, target in (volumes or {}).items()]
        if user is not None:
            options.append(f"--user={user}")
        return [*BUILDAH, "run", "--isolation", "chroot", *options, self.name, "--", *args]

    def run(self, *args: str, volumes: dict[Path, str] | None = None, user: str | None = None,
            timeout: float = 600):
        return subprocess.run(self.command(*args, volumes=volumes, user=user),
                              capture_output=True, text=True, timeout=timeout)

    def remove(self) -> None:
        buildah("rm", self.name, check=False)
