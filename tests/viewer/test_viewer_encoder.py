"""A small timm ViT, random-init, end to end (issue 39): `features --encoder timm:...` on four
slides, `fit`, `export --int8` (fp32 and int8 graphs), `milroi-serve serve`, `milroi-serve score`
through the server and locally at int8, and the viewer live-scoring through that server in
Chromium.

Nothing past `features` is told which encoder it runs: the server, the batch job and the
viewer read the bundle's manifest. The slides (0.243 um/px) are read at 0.486 um/px, from
their level 1, as a 0.5 um/px encoder reads Camelyon16 (the scale contract).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import viewer_testing as vt
from server_testing import free_port, wait_serving

pytestmark = pytest.mark.slow   # a model trained and served of its own

ENCODER = "timm:vit_tiny_patch16_224"
MPP = 0.486
SLIDES = {"normal_a": (51, False), "normal_b": (52, False), "tumor_a": (54, True),
          "tumor_b": (55, True)}
SIZE = (2688, 2240)   # 9-30 tissue tiles at 0.486 um/px
LIVE_SLIDE = "tumor_a"


@dataclass(frozen=True)
class VitModel:
    slides: Path
    features: Path
    bundle: Path
    run_id: str
    tracking_uri: str


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> VitModel:
    from training.cli import main as train_main
    from training.export import export_run
    from training.fit import FitOptions, fit
    from wsi.synth import write_synthetic_slide

    root = tmp_path_factory.mktemp("vit")
    slides = root / "slides"
    slides.mkdir()
    for name, (seed, tumour) in SLIDES.items():
        write_synthetic_slide(slides / f"{name}.tif", *SIZE, seed=seed, tumor=tumour)
    labels = root / "labels.csv"
    labels.write_text("".join(f"{n},{'Tumor' if t else 'Normal'}\n"
                              for n, (_, t) in SLIDES.items()))
    features = root / "features"
    assert train_main(["features", str(slides), "--out", str(features), "--encoder", ENCODER,
                       "--weights", "none", "--mpp", str(MPP), "--backend", "onnxruntime",
                       "--precision", "fp32", "--workers", "2", "--no-progress"]) == 0
    uri = f"sqlite:///{root / 'mlflow.db'}"
    result = fit(features, labels, FitOptions(head="chowder", folds=1, epochs=15, lr=3e-3,
                                              patience=15, val_fraction=0.5, seed=0),
                 tracking_uri=uri, experiment="vit")
    bundle = root / "bundle"
    export_run(result.run_id, "vit-test", tracking_uri=uri, out_dir=bundle, int8=True,
               parity_slide=slides / f"{LIVE_SLIDE}.tif",
               calibration_slides=sorted(slides.glob("*.tif")))
    return VitModel(slides, features, bundle, result.run_id, uri)


def test_the_files_the_run_and_the_bundle_name_the_encoder(vit):
    import mlflow

    with h5py.File(vit.features / "h5_files" / f"{LIVE_SLIDE}.h5") as f:
        assert f.attrs["encoder"] == ENCODER and f.attrs["patch_level"] == 1
        assert f.attrs["target_mpp"] == MPP and f["features"].shape[1] == 192
    params = mlflow.MlflowClient(vit.tracking_uri).get_run(vit.run_id).data.params
    assert params["encoder"] == ENCODER and params["encoder_licence"] == "apache-2.0"
    assert params["feature_dim"] == "192" and params["target_mpp"] == str(MPP)
    manifest = json.loads((vit.bundle / "manifest.json").read_text())
    assert manifest["encoder"]["name"] == ENCODER and manifest["encoder"]["mean"] == [0.5] * 3
    assert manifest["tile_size"] == 224 and manifest["target_mpp"] == MPP
    assert manifest["files"]["backbone_int8"] == "backbone_int8.onnx"
    assert manifest["int8"]["calibration"]["method"] == "dynamic"
    assert manifest["int8"]["agreement"]["cosine_min"] >= 0.99
    assert manifest["parity"]["features"] <= 1e-4


def _patch_scores(out: Path, slide: str) -> dict[tuple[str, str], float]:
    """(x, y) -> score of the slide's patch CSV in a scores folder."""
    from results.layout import OUTPUT_SUFFIXES

    with open(out / slide / f"{slide}{OUTPUT_SUFFIXES['csv']}", newline="") as f:
        return {(r["x"], r["y"]): float(r["score"]) for r in csv.DictReader(f)}


def test_served_scored_and_viewed_with_no_encoder_specific_code(vit, tmp_path, page):
    from serving.cli import main as serve_main

    port = free_port()
    log = tmp_path / "server.log"
    server = vt.Process(["serve", "--model", str(vit.bundle), "--slide-root", str(vit.slides),
                         "--port", str(port), "--provider", "cpu", "--grace", "1"], log)
    try:
        wait_serving(f"127.0.0.1:{port}", server.proc, log)
        from serving.client import ScoringClient

        with ScoringClient(f"127.0.0.1:{port}") as client:   # what it serves, from the manifest
            served = client.get_model()
        assert (served.encoder, served.feature_dim, served.input_mpp) == (ENCODER, 192, MPP)
        remote, local = tmp_path / "remote", tmp_path / "int8"
        assert serve_main(["score", str(vit.slides), "--server", f"127.0.0.1:{port}",
                           "--out", str(remote), "--no-progress"]) == 0
        assert serve_main(["score", str(vit.slides), "--model", str(vit.bundle), "--precision",
                           "int8", "--out", str(local), "--no-progress"]) == 0
        for slide in SLIDES:   # the same tiles; int8 within the export's feature gate
            served, int8 = _patch_scores(remote, slide), _patch_scores(local, slide)
            assert served.keys() == int8.keys() and len(served) >= 5
            diff = np.abs(np.array([served[k] - int8[k] for k in served]))
            assert diff.max() < 0.05, (slide, diff.max())

        port_view = free_port()
        viewer = vt.Process(["view", str(remote), "--slides", str(vit.slides), "--port",
                             str(port_view), "--server", f"127.0.0.1:{port}"],
                            tmp_path / "viewer.log")
        try:
            url = f"http://127.0.0.1:{port_view}"
            vt.wait_http(f"{url}/api/summary", viewer)
            page.goto(f"{url}/slide/{LIVE_SLIDE}")
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            page.click("#score")
            page.wait_for_function("() => window.milroi.liveLog.some(e => e.kind === 'summary')",
                                   timeout=120_000)
            tiles = [e for e in page.evaluate("window.milroi.liveLog") if e["kind"] == "tiles"]
            assert tiles[-1]["painted"] == len(_patch_scores(remote, LIVE_SLIDE))
        finally:
            viewer.stop()
    finally:
        server.stop()
