"""Fixtures of the load, fault and bad-input tests: real bundle, real slides, real servers.

- `bundle`: ResNet-50 (random init, seed 0, layer3) + CHOWDER exported by
  training.export.export_bundle, once per session;
- `good_root`: eight small wsi.synth slides (different seeds, some with tumour), one per
  concurrent client;
- `bad_root`: the bad inputs of docs/errors.md next to one good slide (see `write_bad_files`);
- `big_root`: one slide of ~150 tissue tiles (long enough to cancel or drain mid-stream);
- `bad_root_server`: one in-process server on `bad_root` per test module;
- `reference_scores`: the in-process SlideScorer summary of every good slide;
- `make_in_process_server`: a grpc.aio ScoringServer in an event-loop thread of this process
  (its engine stats and metrics are readable directly);
- `serve_process`: `milroi-serve serve` as a subprocess (SIGTERM, RSS), stopped at the end.
Everything listens on 127.0.0.1 only. Writers and server classes: hardening_helpers.py.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hardening_helpers import (
    GOOD_SIZE,
    GOOD_SLIDES,
    InProcessServer,
    ServeProcess,
    write_bad_files,
    write_corrupt_tiles_slide,
    write_single_level_tiff,
)
from slide_testing import write_blank_slide


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    from bundle_testing import export_test_bundle

    return export_test_bundle(tmp_path_factory.mktemp("bundle") / "chowder", "hardening")


@pytest.fixture(scope="session")
def good_root(tmp_path_factory) -> Path:
    from wsi.synth import write_synthetic_slide

    root = tmp_path_factory.mktemp("good")
    for i, name in enumerate(GOOD_SLIDES):
        write_synthetic_slide(root / name, *GOOD_SIZE, seed=100 + i, tumor=i % 2 == 1)
    return root


@pytest.fixture(scope="session")
def bad_root(tmp_path_factory, good_root, big_root) -> Path:
    """Bad inputs + a good slide, a blank one, a single-level one, a link out of the root."""
    root = tmp_path_factory.mktemp("bad")
    write_bad_files(root, good_root / "s0.tif")
    write_corrupt_tiles_slide(root / "corrupt_tiles.tif", big_root / "big.tif")
    shutil.copy(good_root / "s0.tif", root / "good.tif")
    write_blank_slide(root / "blank.tif")
    write_single_level_tiff(root / "single_level.tif", good_root / "s0.tif")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copy(good_root / "s1.tif", outside / "secret.tif")
    os.symlink(outside / "secret.tif", root / "escape.tif")
    os.symlink(outside, root / "linked_dir")
    return root


@pytest.fixture(scope="session")
def reference_scores(bundle, good_root):
    """In-process SlideSummary of every good slide (what every server stream must equal)."""
    from serving.engine import Engine
    from serving.pipeline import SlideScorer

    with Engine(bundle, provider="cpu", batch_size=8) as engine:
        scorer = SlideScorer(engine)
        return {name: scorer.score_slide(good_root / name) for name in GOOD_SLIDES}


@pytest.fixture(scope="module")
def bad_root_server(bad_root, bundle):
    """One in-process server on `bad_root` per module: bad requests must not need a fresh one."""
    from serving.server import ServerConfig

    server = InProcessServer(ServerConfig(model=str(bundle), slide_roots=[str(bad_root)], port=0,
                                          batch_size=8, provider="cpu", grace=0))
    yield server
    server.stop()


@pytest.fixture
def make_in_process_server(bundle):
    from serving.server import ServerConfig

    servers = []

    def make(roots, **overrides) -> InProcessServer:
        options = dict(model=str(bundle), slide_roots=[str(r) for r in roots], port=0,
                       batch_size=8, provider="cpu", grace=0)
        options.update(overrides)
        servers.append(InProcessServer(ServerConfig(**options)))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def serve_process(tmp_path):
    processes = []

    def start(args: list[str]) -> ServeProcess:
        processes.append(ServeProcess(args, tmp_path / f"serve{len(processes)}.log"))
        processes[-1].wait_serving()
        return processes[-1]

    yield start
    for process in processes:
        process.stop()


@pytest.fixture(scope="session")
def big_root(tmp_path_factory) -> Path:
    """A slide of ~150 tissue tiles: long enough to cancel or drain in the middle."""
    from wsi.synth import write_synthetic_slide

    root = tmp_path_factory.mktemp("big")
    write_synthetic_slide(root / "big.tif", 3072, 2560, seed=7, tumor=True)
    return root
