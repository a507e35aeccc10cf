"""camelyon16: layout checks, the project split, and the whole protocol on a tiny synthetic layout."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from core.errors import MilroiError
from training.camelyon16 import read_layout, training_split


def _touch_layout(root: Path, n_normal: int, n_tumor: int, n_test: int) -> None:
    for sub in ("training/normal", "training/tumor", "testing/images"):
        (root / sub).mkdir(parents=True)
    for i in range(1, n_normal + 1):
        (root / "training/normal" / f"normal_{i:03d}.tif").write_bytes(b"")
    for i in range(1, n_tumor + 1):
        (root / "training/tumor" / f"tumor_{i:03d}.tif").write_bytes(b"")
    rows = []
    for i in range(1, n_test + 1):
        (root / "testing/images" / f"test_{i:03d}.tif").write_bytes(b"")
        rows.append([f"test_{i:03d}", "Tumor", "Macro"] if i % 2 else [f"test_{i:03d}", "Normal"])
    with open(root / "testing/reference.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_layout_and_project_split(tmp_path):
    _touch_layout(tmp_path, 160, 111, 4)
    layout = read_layout(tmp_path)
    assert len(layout.normal) == 160 and len(layout.tumor) == 111 and len(layout.test) == 4
    split = training_split(layout, "project", seed=0)
    assert sum(split.values()) == 60 and len(split) == 120
    assert split == training_split(layout, "project", seed=0)  # seeded
    assert split != training_split(layout, "project", seed=1)
    full = training_split(layout, "full")
    assert len(full) == 271 and sum(full.values()) == 111


def test_layout_errors_name_the_missing_part(tmp_path):
    with pytest.raises(MilroiError, match="training/normal/ is missing"):
        read_layout(tmp_path)
    _touch_layout(tmp_path, 1, 1, 1)
    (tmp_path / "testing/reference.csv").unlink()
    with pytest.raises(MilroiError, match="testing/reference.csv is missing"):
        read_layout(tmp_path)


@pytest.mark.slow
def test_protocol_end_to_end_on_tiny_synthetic_layout(tmp_path, capsys):
    synth = pytest.importorskip("wsi.synth")
    pytest.importorskip("wsi.grid")
    from training.cli import main as train_main
    from training.labels import read_labels

    raw = tmp_path / "raw"
    synth.make_dataset(raw, n_tumor=5, n_normal=5, size=(2048, 2048), seed=3)
    labels = read_labels(next(raw.rglob("reference.csv")))
    slides = {p.stem: p for p in raw.rglob("*.tif")}
    xmls = {p.stem: p for p in raw.rglob("*.xml")}
    root = tmp_path / "CAMELYON16"
    for sub in ("training/normal", "training/tumor", "training/lesion_annotations",
                "testing/images", "testing/lesion_annotations"):
        (root / sub).mkdir(parents=True)
    tumours = sorted(n for n, y in labels.items() if y)
    normals = sorted(n for n, y in labels.items() if not y)
    reference = []
    for i, name in enumerate(tumours + normals):
        tumour = labels[name] == 1
        is_test = (tumours.index(name) if tumour else normals.index(name)) >= 3
        if is_test:
            new = f"test_{len(reference) + 1:03d}"
            shutil.copy(slides[name], root / "testing/images" / f"{new}.tif")
            reference.append([new, "Tumor", "Macro"] if tumour else [new, "Normal"])
            if tumour:
                shutil.copy(xmls[name], root / "testing/lesion_annotations" / f"{new}.xml")
        else:
            kind = "tumor" if tumour else "normal"
            shutil.copy(slides[name], root / f"training/{kind}" / f"{kind}_{i:03d}.tif")
            if tumour and name in xmls:
                shutil.copy(xmls[name], root / "training/lesion_annotations" / f"{kind}_{i:03d}.xml")
    with open(root / "testing/reference.csv", "w", newline="") as f:
        csv.writer(f).writerows(reference)

    out = tmp_path / "out"
    rc = train_main(["camelyon16", str(root), "--out", str(out), "--weights", "none",
                     "--layer", "layer3", "--limit-tiles", "12", "--folds", "2", "--epochs", "5",
                     "--bootstrap", "50", "--workers", "1", "--device", "cpu"])
    assert rc == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("run_id=")
    summary = json.loads((out / "camelyon16.json").read_text())
    assert summary["train_slides"] == 6 and summary["train_tumor"] == 3
    assert summary["test_slides"] == 4
    assert 0.0 <= summary["test"]["slide"]["auc"] <= 1.0
    assert "froc" in summary["test"] and summary["test"]["froc"]["n_lesions"] >= 1
    assert len(list((out / "features" / "h5_files").glob("*.h5"))) == 10


def _options(module) -> set[str]:
    import argparse

    parser = argparse.ArgumentParser()
    module.configure_parser(parser)
    return {flag for action in parser._actions for flag in action.option_strings
            if flag.startswith("--")}


def test_camelyon16_has_every_option_of_the_steps_it_runs():
    """features, fit and evaluate declare their options once; camelyon16 reuses the groups, so
    none can drift (it once lacked --threads). What the layout decides is left out."""
    from training import camelyon16, evaluate, features, fit

    from_layout = {"--out", "--labels", "--features", "--annotations", "--test-slides",
                   "--slides", "--run-name", "--no-log", "--no-progress", "--help"}
    steps = _options(features) | _options(fit) | _options(evaluate)
    missing = steps - from_layout - _options(camelyon16)
    assert not missing, f"camelyon16 lacks {sorted(missing)}"
    assert {"--threads", "--fallback-mpp", "--ray", "--head-config", "--roi-threshold"} <= \
        _options(camelyon16)
