"""Fixtures of the serving tests: real bundles (training.export), real slides, a real server.

- `chowder_bundle`: a ResNet-50 (random init, seed 0) + Chowder head exported by
  training.export.export_bundle, once per session (~15 s on 2 CPUs);
- `slide_root`: a folder with small JPEG-tiled pyramidal TIFF slides written with tifffile
  (tissue ellipse with H&E colours, 0.25 um/px in the resolution tags), a slide without tissue,
  the corrupt real slide tests/data/broken.svs, a text file, and a symlink that leaves the root;
- `make_server`: an in-process grpc.aio ScoringServer on a free loopback port, in its own event
  loop thread, stopped at the end of the test.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import tifffile

DATA = Path(__file__).resolve().parents[1] / "data"
SLIDE_MPP = 0.25


def write_tiff_slide(path: Path, width: int = 1792, height: int = 1344, seed: int = 0,
                     tissue: bool = True, mpp: float = SLIDE_MPP) -> Path:
    """A small pyramidal generic TIFF (JPEG tiles 256 px, 3 levels) OpenSlide reads."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.full((height, width, 3), 242, np.uint8)
    if tissue:
        inside = (((xx - width / 2) / (width * 0.38)) ** 2
                  + ((yy - height / 2) / (height * 0.36)) ** 2) <= 1
        pink, purple = np.array([225, 160, 195], np.float32), np.array([120, 70, 160], np.float32)
        nuclei = (rng.random((height // 8 + 1, width // 8 + 1)) < 0.25)
        nuclei = nuclei.repeat(8, 0).repeat(8, 1)[:height, :width]
        colour = np.where(nuclei[..., None], purple, pink) + rng.normal(0, 8, (height, width, 3))
        image[inside] = np.clip(colour[inside], 0, 255).astype(np.uint8)
    px_per_cm = 10_000 / mpp
    with tifffile.TiffWriter(path) as tif:
        level = image
        for i in range(3):
            tif.write(level, tile=(256, 256), compression="jpeg", photometric="rgb",
                      resolution=(px_per_cm / 2**i, px_per_cm / 2**i), resolutionunit="CENTIMETER",
                      subfiletype=0 if i == 0 else 1)
            level = level[::2, ::2]
    return path


def export_test_bundle(out: Path, kind: str = "chowder", head_seed: int = 0, **config):
    """Export ResNet-50 (random init) + a MIL head; returns (bundle path, backbone, head)."""
    import torch

    from training.backbone import build_backbone
    from training.export import export_bundle
    from training.heads import build_head

    backbone = build_backbone("none", layer="pool", seed=0)
    torch.manual_seed(head_seed)
    head = build_head({"kind": kind, "in_dim": backbone.feature_dim, **config}).eval()
    export_bundle(out, backbone, head, overwrite=True)
    return out, backbone, head


@pytest.fixture(scope="session")
def chowder_export(tmp_path_factory):
    return export_test_bundle(tmp_path_factory.mktemp("bundles") / "chowder")


@pytest.fixture(scope="session")
def chowder_bundle(chowder_export) -> Path:
    return chowder_export[0]


@pytest.fixture(scope="session")
def slide_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slides")
    write_tiff_slide(root / "slide.tiff", seed=0)
    (root / "sub").mkdir()
    write_tiff_slide(root / "sub" / "other.tiff", width=1344, height=1120, seed=1)
    write_tiff_slide(root / "big.tiff", width=3584, height=2688, seed=3)   # ~80 tiles
    write_tiff_slide(root / "blank.tiff", width=1024, height=768, tissue=False)
    shutil.copy(DATA / "broken.svs", root / "broken.svs")
    (root / "notes.txt").write_text("not a slide\n")
    outside = tmp_path_factory.mktemp("outside")
    write_tiff_slide(outside / "secret.tiff", width=1024, height=768, seed=2)
    os.symlink(outside / "secret.tiff", root / "escape.tiff")
    return root


class RunningServer:
    """A ScoringServer running in its own event loop thread."""

    def __init__(self, config):
        from serving.server import ScoringServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(self._build(ScoringServer, config))
        self.port = self.call(self.server.start())
        self.address = f"127.0.0.1:{self.port}"

    @staticmethod
    async def _build(cls, config):
        return cls(config)

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_ready(self, timeout: float = 120) -> None:
        self.call(asyncio.wait_for(self.server.ready.wait(), timeout), timeout + 5)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def stop(self, grace: float = 0) -> None:
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def make_server(slide_root, chowder_bundle):
    from serving.server import ServerConfig

    servers = []

    def make(wait: bool = True, **overrides) -> RunningServer:
        options = dict(model=str(chowder_bundle), slide_roots=[str(slide_root)], port=0,
                       batch_size=8, provider="cpu", grace=0)
        options.update(overrides)
        server = RunningServer(ServerConfig(**options))
        servers.append(server)
        if wait:
            server.wait_ready()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def free_port() -> int:
    from server_testing import free_port

    return free_port()
