"""The container tests' images, built in the background while the rest of the suite runs.

A cold build on CI's 2 CPUs is ~2.5 min (serve) and ~4 min (train), most of it pip downloads and
vfs layer copies rather than CPU. Built one after the other in the fixtures, they added ~6.5 min
to the suite; started when collection ends (conftest.py) and run while the other test folders
run, they overlap them. conftest.py moves the container tests to the end of the run, and each
fixture waits on its own build's end (an Event), never on a time.

What a build would have done in the fixture it still does, in the same order: tools first
(ensure_tools; exit 3 = cannot be done here, a skip), then the serve image, then the train image
when the disk can hold it (else a skip saying so). Each result keeps the script's output for the
failure message.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

from containers_support import BASE_IMAGE, NO_TOOLS, SCRIPTS, SERVE_IMAGE, WITH_CUDA, buildah

TRAIN_IMAGE = "localhost/milroi-train:latest"
TRAIN_BUILD_NEED_GIB = 34   # build_images.sh's measured peak for the train image
TIMEOUTS = {"tools": 900, "serve": 1800, "train": 2400}


@dataclass(frozen=True)
class BuildResult:
    """How one step ended: `skip` says why it could not be done here (not a failure)."""
    name: str
    returncode: int | None
    output: str
    seconds: float
    skip: str | None = None

    def check(self) -> None:
        assert self.returncode == 0, f"{self.name} failed (exit {self.returncode}):\n{self.output[-5000:]}"


class ImageBuilds:
    """Steps run in order in one background thread: "tools", then the images wanted."""

    def __init__(self, images: list[str]):
        self.steps = ["tools", *images]
        self._done = {step: threading.Event() for step in self.steps}
        self._results: dict[str, BuildResult] = {}
        self._process: subprocess.Popen | None = None
        self._stopping = False
        self._lock = threading.Lock()
        # the scripts' build figures: $MILROI_CONTAINER_RESULTS when set, else a scratch file
        # (a test run never edits the committed benchmarks/results/containers.json)
        self.figures = os.environ.get("MILROI_CONTAINER_RESULTS") or os.path.join(
            tempfile.mkdtemp(prefix="milroi-image-figures-"), "containers.json")
        self._thread = threading.Thread(target=self._run, name="image-builds", daemon=True)

    def start(self) -> ImageBuilds:
        self._thread.start()
        return self

    def result(self, step: str) -> BuildResult:
        """The step's result, once it has ended (each subprocess has its own timeout)."""
        self._done[step].wait()
        return self._results[step]

    def stop(self) -> None:
        """At the session's end: a build still running (a run stopped early) is killed with its
        process group, not left behind writing layers."""
        with self._lock:
            self._stopping = True
            process = self._process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)

    # -- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        why = "the build thread ended first"
        try:
            tools = self._script(
                "tools", ["bash", "-c", f"source {SCRIPTS / 'common.sh'} && ensure_tools"], {})
            if tools.returncode == NO_TOOLS:
                tools = BuildResult("tools", tools.returncode, tools.output, tools.seconds,
                                    skip=f"cannot install buildah/debootstrap: {tools.output.strip()}")
            self._finish(tools)
            for image in self.steps[1:]:
                if tools.returncode != 0:
                    self._finish(BuildResult(image, None, "tools missing", 0.0,
                                             skip=tools.skip or "buildah/debootstrap missing"))
                elif image == "serve":
                    self._finish(self._script("serve", ["bash", str(SCRIPTS / "build_images.sh"), "serve"],
                                              {"SERVE_IMAGE": SERVE_IMAGE, "BASE_IMAGE": BASE_IMAGE,
                                               "WITH_CUDA": "1" if WITH_CUDA else "0"}))
                else:
                    self._finish(self._train())
        except Exception as exc:  # noqa: BLE001 - reported to each waiting fixture below
            why = f"the build thread failed: {exc!r}"
        finally:   # whatever happened, nobody waits forever
            for step in self.steps:
                if not self._done[step].is_set():
                    self._finish(BuildResult(step, None, why, 0.0))

    def _train(self) -> BuildResult:
        root = buildah("info", "--format", "{{.store.GraphRoot}}").stdout.strip()
        os.makedirs(root, exist_ok=True)
        free = shutil.disk_usage(root).free
        if free < TRAIN_BUILD_NEED_GIB * 2**30:
            return BuildResult("train", None, "", 0.0, skip=(
                f"building {TRAIN_IMAGE} needs ~{TRAIN_BUILD_NEED_GIB} GiB free in {root} "
                f"(buildah vfs), {free / 2**30:.1f} GiB are"))
        return self._script("train", ["bash", str(SCRIPTS / "build_images.sh"), "train"],
                            {"TRAIN_IMAGE": TRAIN_IMAGE, "BASE_IMAGE": BASE_IMAGE})

    def _script(self, step: str, command: list[str], env: dict[str, str]) -> BuildResult:
        start = time.monotonic()
        with self._lock:
            if self._stopping:
                return BuildResult(step, None, "the session ended first", 0.0)
            # its own process group: stop() kills buildah's children too
            self._process = subprocess.Popen(
                command, env=dict(os.environ, BENCH_JSON=self.figures, **env),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True)
        try:
            output, _ = self._process.communicate(timeout=TIMEOUTS[step])
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            output, _ = self._process.communicate()
            output += f"\n[timed out after {TIMEOUTS[step]} s]"
        return BuildResult(step, self._process.returncode, output, time.monotonic() - start)

    def _finish(self, result: BuildResult) -> None:
        self._results[result.name] = result
        self._done[result.name].set()
