"""Paths on the wire: every error a client gets names the slide by the path it sent (relative to
its slide root), never by the server's absolute path; the server's log keeps the absolute path.

Real servers (in process, and `milroi-serve serve` as a subprocess) on real bad files: the
docs/errors.md inputs, plus a truncated slide in a subfolder, a link to it inside the root, and
a slide root configured through a symlink (so the root has two spellings).
"""
from __future__ import annotations

import csv
import logging
import os
import shutil
from pathlib import Path

import grpc
import pytest

from milroi.v1 import scoring_pb2 as pb
from milroi.v1 import scoring_pb2_grpc as pb_grpc

Code = grpc.StatusCode

# (path the client sends, status); those answered with a SlideError start "cannot read slide P: "
BAD_ROOT_REQUESTS = [
    ("empty.svs", Code.INVALID_ARGUMENT), ("truncated.tif", Code.INVALID_ARGUMENT),
    ("text.svs", Code.INVALID_ARGUMENT), ("plain.png", Code.INVALID_ARGUMENT),
    ("stripped.tif", Code.INVALID_ARGUMENT), ("huge_claim.tif", Code.INVALID_ARGUMENT),
    ("no_pyramid_huge.tif", Code.INVALID_ARGUMENT), ("broken.svs", Code.INVALID_ARGUMENT),
    (".", Code.INVALID_ARGUMENT), ("missing.tif", Code.NOT_FOUND),
    ("../good/s0.tif", Code.PERMISSION_DENIED), ("/etc/passwd", Code.PERMISSION_DENIED),
    ("escape.tif", Code.PERMISSION_DENIED), ("linked_dir/secret.tif", Code.PERMISSION_DENIED),
]
WIRE_ROOT_REQUESTS = [
    ("sub/deeper/truncated.tif", Code.INVALID_ARGUMENT),
    ("./sub/deeper/truncated.tif", Code.INVALID_ARGUMENT),
    ("alias.tif", Code.INVALID_ARGUMENT),          # a link inside the root to the file above
    ("sub/deeper", Code.INVALID_ARGUMENT),         # a folder
    ("sub/missing.tif", Code.NOT_FOUND),
]
SLIDE_ERRORS = {"empty.svs", "truncated.tif", "text.svs", "plain.png", "stripped.tif",
                "huge_claim.tif", "no_pyramid_huge.tif", "broken.svs", ".",
                "sub/deeper/truncated.tif", "./sub/deeper/truncated.tif", "alias.tif",
                "sub/deeper"}


@pytest.fixture(scope="module")
def wire_root(tmp_path_factory, bad_root) -> tuple[Path, Path]:
    """(the root as configured: a symlink, the folder it points to) holding a truncated slide
    two folders down and a link to it."""
    real = tmp_path_factory.mktemp("wire_real")
    (real / "sub" / "deeper").mkdir(parents=True)
    shutil.copy(bad_root / "truncated.tif", real / "sub" / "deeper" / "truncated.tif")
    os.symlink(real / "sub" / "deeper" / "truncated.tif", real / "alias.tif")
    configured = tmp_path_factory.mktemp("wire_link") / "slides"
    os.symlink(real, configured)
    return configured, real


@pytest.fixture(scope="module")
def two_root_server(bad_root, wire_root, bundle):
    from hardening_helpers import InProcessServer

    from serving.server import ServerConfig

    server = InProcessServer(ServerConfig(
        model=str(bundle), slide_roots=[str(bad_root), str(wire_root[0])], port=0, batch_size=8,
        provider="cpu", grace=0))
    yield server
    server.stop()


def _details(stub, path: str, timeout: float = 60) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path=path), timeout=timeout))
    return info.value.code(), info.value.details()


def _server_spellings(*roots: Path) -> list[str]:
    """Every way the server may spell a root: as given and resolved."""
    return sorted({str(r) for r in roots} | {str(r.resolve()) for r in roots})


@pytest.mark.parametrize("path,code", BAD_ROOT_REQUESTS + WIRE_ROOT_REQUESTS)
def test_error_names_the_requested_path_never_the_server_path(two_root_server, bad_root,
                                                              wire_root, caplog, path, code):
    stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(two_root_server.address))
    with caplog.at_level(logging.INFO, logger="serving.server"):
        got, details = _details(stub, path)
    assert got == code, details
    for root in _server_spellings(bad_root, *wire_root):
        assert root not in details, details
    assert path in details
    if path in SLIDE_ERRORS:
        assert details.startswith(f"cannot read slide {path}: "), details
    if path in {"sub/deeper/truncated.tif", "alias.tif"}:
        # The log has the file where the server found it.
        assert str(wire_root[1] / "sub" / "deeper" / "truncated.tif") in caplog.text


def test_corrupt_tiles_mid_stream_name_the_requested_path(two_root_server, bad_root):
    """An error raised while tiles are read, after the header, in the reader threads."""
    stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(two_root_server.address))
    code, details = _details(stub, "corrupt_tiles.tif", timeout=120)
    assert code == Code.INVALID_ARGUMENT
    assert details.startswith("cannot read slide corrupt_tiles.tif: ") and "tile" in details
    for root in _server_spellings(bad_root):
        assert root not in details, details


def test_serve_process_client_and_batch_see_relative_paths(serve_process, bundle, wire_root,
                                                           tmp_path, capsys):
    """`milroi-serve serve` as a process: the Python client, `client score` and `score
    --server` (its summary.csv) all get `sub/deeper/truncated.tif`; the server log has the
    absolute path."""
    from serving.cli import main as serve_main
    from serving.client import ScoringClient, ScoringError

    configured, real = wire_root
    server = serve_process(["--model", str(bundle), "--slide-root", str(configured)])
    relative = "sub/deeper/truncated.tif"
    absolute = str(real / relative)
    spellings = _server_spellings(configured, real)

    with ScoringClient(server.address, timeout=60) as client, \
            pytest.raises(ScoringError) as err:
        client.score_slide_all(relative)
    assert err.value.code == Code.INVALID_ARGUMENT
    assert err.value.message.startswith(f"cannot read slide {relative}: ")
    assert not any(root in str(err.value) for root in spellings), str(err.value)

    assert serve_main(["client", "score", relative, "--server", server.address]) == 1
    printed = capsys.readouterr().err
    assert f"cannot read slide {relative}: " in printed
    assert not any(root in printed for root in spellings), printed

    # The batch job through the server, on a local copy of the folder: its failed row.
    local = tmp_path / "local"
    shutil.copytree(real, local, symlinks=True)
    (local / "alias.tif").unlink()
    out = tmp_path / "out"
    assert serve_main(["score", str(local), "--server", server.address, "--out", str(out),
                       "--no-progress"]) == 1
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["status"] for row in rows] == ["failed"]
    assert f"cannot read slide {relative}: " in rows[0]["error"]
    assert not any(root in rows[0]["error"] for root in spellings), rows[0]["error"]
    capsys.readouterr()

    log = server.log_path.read_text(errors="replace")
    assert absolute in log
