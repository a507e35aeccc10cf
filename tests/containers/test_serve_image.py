"""The serve image (Dockerfile.serve), built with buildah and exercised with `buildah run`:
(a) the batch job scores a slide folder inside the image, with the same scores as on the host;
(b) the gRPC server runs inside the image and a host client scores a slide through it (chroot
    isolation shares the host network namespace), health check and metrics included;
(c) the image has no torch, runs as a non-root user and carries the docker metadata;
the figures go to the file named by $MILROI_CONTAINER_RESULTS (e.g.
benchmarks/results/containers.json when refreshing the committed figures); a plain test run
only prints them, so `make test` never edits a tracked file.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from batch_testing import read_summary
from containers_support import SERVE_IMAGE, WITH_CUDA, buildah
from server_testing import free_port

pytestmark = pytest.mark.slow

RESULTS = Path(os.environ["MILROI_CONTAINER_RESULTS"]) if os.environ.get(
    "MILROI_CONTAINER_RESULTS") else None
MOUNTS = "/slides", "/models/bundle", "/out"


def read_patches(out: Path, slide: str) -> np.ndarray:
    """x, y, size, score rows of one slide's patch CSV, sorted by (y, x)."""
    [path] = (out / slide).glob("*_patches.csv")
    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, usecols=(0, 1, 2, 3))
    return table[np.lexsort((table[:, 0], table[:, 1]))]


@pytest.fixture(scope="module")
def host_scores(slides, bundle, tmp_path_factory) -> Path:
    """The same batch job on the host (the project's venv): the reference for the image."""
    out = tmp_path_factory.mktemp("host_out")
    result = subprocess.run(
        [str(Path(sys.executable).with_name("milroi-serve")), "score", str(slides), "--model",
         str(bundle), "--out", str(out), "--provider", "cpu", "--no-progress"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_score_folder_in_image(container, slides, bundle, out_dir, host_scores):
    ctr = container()
    start = time.monotonic()
    result = ctr.run("milroi-serve", "score", "/slides", "--model", "/models/bundle",
                     "--out", "/out", "--provider", "cpu", "--no-progress",
                     volumes={slides: "/slides:ro", bundle: "/models/bundle:ro", out_dir: "/out"})
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]

    summary, reference = read_summary(out_dir), read_summary(host_scores)
    assert set(summary) == set(reference) and len(summary) == 2, (summary, reference)
    for slide, row in summary.items():
        assert row["status"] == "ok", row
        assert int(row["tiles"]) == int(reference[slide]["tiles"]) > 0
        assert float(row["score"]) == pytest.approx(float(reference[slide]["score"]), abs=1e-4)
        # paths in the summary are the container's, not the host's
        assert row["path"].startswith("/slides/"), row["path"]
        ours, theirs = read_patches(out_dir, slide), read_patches(host_scores, slide)
        np.testing.assert_array_equal(ours[:, :3], theirs[:, :3])
        np.testing.assert_allclose(ours[:, 3], theirs[:, 3], atol=1e-4)
        written = {p.name for p in (out_dir / slide).iterdir()}
        assert "done.json" in written and any(n.endswith(".geojson") for n in written), written
    # written by the image's user (uid 10001), not root
    assert {p.stat().st_uid for p in out_dir.rglob("*")} == {10001}
    record("score_two_slides_in_image_seconds", round(seconds, 1))


def test_server_in_image_scores_for_a_host_client(container, slides, bundle, out_dir):
    from serving.client import ScoringClient

    port, metrics_port = free_port(), free_port()
    server_ctr, probe_ctr = container(), container()
    volumes = {slides: "/slides:ro", bundle: "/models/bundle:ro"}
    server = subprocess.Popen(
        server_ctr.command("milroi-serve", "serve", "--model", "/models/bundle", "--slide-root",
                           "/slides", "--host", "127.0.0.1", "--port", str(port),
                           "--metrics-port", str(metrics_port), "--provider", "cpu",
                           "--grace", "2", volumes=volumes),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        with ScoringClient(f"127.0.0.1:{port}", timeout=300) as client:
            try:
                client.wait_until_serving(timeout=180)
            except Exception:
                server.kill()
                raise AssertionError(f"server in the image never served:\n"
                                     f"{server.stdout.read()[-3000:]}") from None
            # the host reaches the container's port: one network namespace
            result = client.score_slide_all("a.tif")
        assert result.summary.tile_count == len(result.scores) > 0
        assert np.all((result.scores >= 0) & (result.scores <= 1))

        # the image's HEALTHCHECK command, from another container of the image
        probe = probe_ctr.run("milroi-healthcheck", f"127.0.0.1:{port}", timeout=60)
        assert probe.returncode == 0 and "SERVING" in probe.stdout, probe
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            assert r.status == 200 and b"milroi" in r.read()
    finally:
        os.killpg(server.pid, signal.SIGTERM)   # buildah run's session: the server inside too
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
    # with the server gone the health check fails, with the reason
    probe = probe_ctr.run("milroi-healthcheck", f"127.0.0.1:{port}", timeout=60)
    assert probe.returncode == 1 and "UNAVAILABLE" in probe.stderr, probe

    # same patch scores as the batch job in the image: one engine, one pipeline
    ctr = container()
    batch = ctr.run("milroi-serve", "score", "/slides", "--model", "/models/bundle", "--out",
                    "/out", "--provider", "cpu", "--no-progress",
                    volumes={**volumes, out_dir: "/out"})
    assert batch.returncode == 0, batch.stderr[-3000:]
    table = read_patches(out_dir, "a")
    streamed = np.column_stack([result.coords, result.scores])
    streamed = streamed[np.lexsort((streamed[:, 0], streamed[:, 1]))]
    np.testing.assert_array_equal(streamed[:, :2], table[:, :2])
    np.testing.assert_allclose(streamed[:, 2], table[:, 3], atol=1e-4)


def test_image_has_no_torch_and_runs_as_non_root(container, serve_image):
    ctr = container()
    probe = ctr.run("python3", "-c", "import importlib.util as u, os, onnxruntime as ort; "
                    "print(u.find_spec('torch') is None, u.find_spec('pip') is None, "
                    "os.getuid(), ort.get_available_providers())")
    assert probe.returncode == 0, probe.stderr
    no_torch, no_pip, uid, providers = probe.stdout.split(maxsplit=3)
    assert no_torch == "True", "torch is installed in the serve image"
    assert no_pip == "True", "pip (a build tool) is left in the serve image"
    assert uid == "10001"
    assert "CUDAExecutionProvider" in providers and "CPUExecutionProvider" in providers
    assert ctr.run("milroi-serve", "--help").returncode == 0
    assert ctr.run("sh", "-c", "command -v gcc || command -v cc").returncode != 0, "compiler left"
    fresh = container()   # nothing run in it yet: what the image itself holds
    leftovers = fresh.run("sh", "-c", "ls -d /root/.cache /home/milroi/.cache /src /etc/pip.conf "
                                    "/tmp/* 2>/dev/null", user="root")
    assert leftovers.stdout == "", f"build leftovers in the image: {leftovers.stdout}"

    config = json.loads(buildah("inspect", "--type", "image", SERVE_IMAGE).stdout)["Docker"]["config"]
    assert config["Entrypoint"] == ["milroi-serve"]
    assert config["User"] == "milroi"
    assert {"50051/tcp", "9100/tcp"} <= set(config["ExposedPorts"])
    assert set(config["Volumes"]) == {"/slides", "/models", "/out"}
    assert config["Healthcheck"]["Test"] == ["CMD", "milroi-healthcheck"]

    print(f"\n{SERVE_IMAGE}: {serve_image['size_bytes'] / 2**30:.2f} GiB")
    record("serve_image_tested", {"image": SERVE_IMAGE, "with_cuda": WITH_CUDA,
                                  "size_bytes": serve_image["size_bytes"],
                                  "build_seconds_in_test": round(serve_image["build_seconds"])})


@pytest.mark.skipif(not WITH_CUDA, reason="image built without the CUDA wheels "
                                          "(MILROI_TEST_WITH_CUDA=1 builds it with them)")
def test_cuda_provider_libraries_resolve(container):
    """Without a GPU here, check what `--gpus all` cannot supply: every library the CUDA
    provider links, except the driver's libcuda.so.1 (from the host), is found in the image."""
    ctr = container()
    ldd = ctr.run("sh", "-c", "ldd /opt/venv/lib/python3.11/site-packages/onnxruntime/capi/"
                              "libonnxruntime_providers_cuda.so")
    missing = [line.split()[0] for line in ldd.stdout.splitlines() if "not found" in line]
    assert missing == ["libcuda.so.1"], ldd.stdout
    cudnn = ctr.run("sh", "-c", "for f in /opt/venv/lib/python3.11/site-packages/nvidia/cudnn/"
                                "lib/libcudnn*.so.9; do ldd $f; done")
    missing = {line.split()[0] for line in cudnn.stdout.splitlines() if "not found" in line}
    assert cudnn.returncode == 0 and missing <= {"libcuda.so.1"}, cudnn.stdout


@pytest.mark.skipif(not WITH_CUDA, reason="image built without the CUDA wheels "
                                          "(MILROI_TEST_WITH_CUDA=1 builds it with them)")
def test_gpu_tile_decode_libraries_load(container):
    """The [gpu] extra is in the CUDA image: nvJPEG loads from LD_LIBRARY_PATH, nvImageCodec and
    the CUDA runtime binding import, and without a GPU the decode says why and stays off."""
    ctr = container()
    probe = ctr.run("python3", "-c", "import ctypes; ctypes.CDLL('libnvjpeg.so.13'); "
                                     "from cuda.bindings import runtime; from nvidia import nvimgcodec; "
                                     "from wsi.gpu_decode import gpu_decode_available as a; print(a())")
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert "(False, 'no usable CUDA device" in probe.stdout, probe.stdout


def record(key: str, value) -> None:
    """Print one figure; merge it into $MILROI_CONTAINER_RESULTS when set (atomic rewrite)."""
    print(f"containers figure {key}: {value}")
    if RESULTS is None:
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.setdefault("tests", {})[key] = value
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    tmp.replace(RESULTS)
