"""Without --ray nothing imports ray (it is an optional extra; the serve image has no ray)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_commands_without_ray_never_import_it(bundle, slides_dir, tmp_path):
    script = f"""
import json, sys
from serving.cli import main as serve
from training.cli import main as train
codes = [serve(["score", {str(slides_dir)!r}, "--model", {str(bundle)!r},
                "--out", {str(tmp_path / "scores")!r}, "--no-progress"]),
         train(["features", {str(slides_dir)!r}, "--out", {str(tmp_path / "features")!r},
                "--weights", "none", "--layer", "layer3", "--limit-tiles", "2",
                "--no-progress"])]
print(json.dumps({{"codes": codes, "ray": sorted(m for m in sys.modules
                                                 if m == "ray" or m.startswith("ray."))}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [1, 1]  # both ran (broken.svs failed in both)
    assert (tmp_path / "scores" / "synth_normal" / "done.json").exists()
    assert (tmp_path / "features" / "h5_files" / "synth_normal.h5").exists()
    assert result["ray"] == []


def test_unreachable_or_malformed_ray_address_is_one_clear_error(bundle, slides_dir, tmp_path):
    """Fails at once (ray.init alone would retry for minutes), naming the address."""
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    serve = subprocess.run(
        [str(bin_dir / "milroi-serve"), "score", str(slides_dir), "--model", str(bundle),
         "--out", str(tmp_path / "o"), "--ray", "127.0.0.1:1", "--no-progress"],
        capture_output=True, text=True, timeout=60)
    assert serve.returncode != 0
    assert "cannot reach the Ray cluster at '127.0.0.1:1'" in serve.stderr
    assert "Traceback" not in serve.stderr
    train = subprocess.run(
        [str(bin_dir / "milroi-train"), "features", str(slides_dir), "--out",
         str(tmp_path / "f"), "--weights", "none", "--ray", "nowhere", "--no-progress"],
        capture_output=True, text=True, timeout=60)
    assert train.returncode != 0
    assert "--ray 'nowhere': give auto, local, HOST:PORT or ray://HOST:PORT" in train.stderr
    assert not (tmp_path / "o" / "summary.csv").exists()
