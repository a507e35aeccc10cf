"""The training side runs without the serving side, as in the train image.

Dockerfile.train deletes serving/ before it installs milroi, so a single import of serving from
training (even a function-local one, even in a code path only `features` takes) is an
ImportError there. Building the image takes minutes and tens of GB (tests/containers skips
without it); this test gets the same condition in seconds: the venv's python with a
`sitecustomize` that puts a finder first on `sys.meta_path` refusing `serving` and `serving.*`
(ModuleNotFoundError "No module named 'serving'", the image's error), started in an empty
working directory, so only the installed milroi is importable, as in the image.

It then runs what tests/containers/test_train_image.py runs inside the image:
`milroi-train synth` -> `features --weights none` (onnxruntime on the CPU) -> `fit`, tracked in
MLflow (a sqlite store in tmp_path). test_import_contract.py asserts the same rule on the
source; this one catches what an AST cannot see (an import by a computed name, a dependency
that itself imports serving).
"""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PYTHON = sys.executable           # the venv's python: pytest runs in it

BLOCKER = textwrap.dedent('''\
    """Test shim (tests/architecture/test_train_without_serving.py): no `serving` package, as in
    the train image, whose Dockerfile.train deletes serving/ before installing milroi."""
    import importlib.abc
    import sys

    BLOCKED = ("serving",)


    class _NoServing(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname.partition(".")[0] in BLOCKED:
                top = fullname.partition(".")[0]
                raise ModuleNotFoundError(f"No module named {top!r}", name=top)
            return None


    sys.meta_path.insert(0, _NoServing())
    ''')


@pytest.fixture(scope="module")
def train_env(tmp_path_factory) -> dict:
    """cwd (an empty folder) and environment of a train-image-like process."""
    base = tmp_path_factory.mktemp("train_without_serving")
    blocker = base / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    work = base / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "PYTHONSTARTUP")}
    # the image's settings (Dockerfile.train): unbuffered output, matplotlib without a display
    env.update(PYTHONPATH=str(blocker), PYTHONUNBUFFERED="1", MPLBACKEND="Agg",
               PYTHONDONTWRITEBYTECODE="1")
    return {"cwd": work, "env": env}


def run_py(train_env, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, *args], cwd=train_env["cwd"], env=train_env["env"],
                          capture_output=True, text=True, timeout=timeout)


def train(train_env, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    result = run_py(train_env, "-m", "training.cli", *args, timeout=timeout)
    assert result.returncode == 0, (
        f"milroi-train {' '.join(args)} exited {result.returncode} without serving importable:\n"
        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-6000:]}")
    return result


def test_the_shim_blocks_serving(train_env):
    for statement in ("import serving", "import serving.batch", "from serving import engine"):
        result = run_py(train_env, "-c", statement, timeout=120)
        assert result.returncode != 0, f"{statement!r} worked under the shim"
        assert "ModuleNotFoundError: No module named 'serving'" in result.stderr, result.stderr
    # and blocks nothing else: the standard library and third-party packages still import
    ok = run_py(train_env, "-c", "import json, numpy, sitecustomize; "
                                 "print(sitecustomize.__file__)", timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert Path(ok.stdout.strip()).parent.name == "blocker"


def test_the_training_packages_import_from_anywhere(train_env):
    # the train image holds only what `pip install /src` installs (pyproject's packages.find):
    # every package training needs must be in it, not only importable from the checkout
    probe = ("import importlib, sys\n"
             "missing = []\n"
             "for name in ('core', 'wsi', 'results', 'training', 'training.cli', 'milroi'):\n"
             "    try:\n"
             "        importlib.import_module(name)\n"
             "    except ImportError as exc:\n"
             "        missing.append(f'{name}: {exc}')\n"
             "print('\\n'.join(missing)); sys.exit(1 if missing else 0)\n")
    result = run_py(train_env, "-c", probe, timeout=120)
    assert result.returncode == 0, (
        "not importable outside the checkout (is the package listed in pyproject.toml "
        f"[tool.setuptools.packages.find] include?):\n{result.stdout}{result.stderr[-3000:]}")


def test_synth_features_fit_without_serving(train_env):
    work: Path = train_env["cwd"]
    # 4 + 4 slides: `fit --folds 2` splits each fold's training half again (stratified) for
    # early stopping, which needs two slides of each label there; 2 + 2 slides cannot be split
    train(train_env, "synth", str(work / "ds"), "--tumor", "4", "--normal", "4",
          "--size", "1024x1024", "--seed", "1")
    assert (work / "ds" / "reference.csv").is_file()

    train(train_env, "features", str(work / "ds"), "--out", str(work / "feat"),
          "--weights", "none", "--layer", "layer3", "--device", "cpu", "--no-progress")
    h5 = sorted(p.name for p in (work / "feat" / "h5_files").iterdir())
    assert h5 == [f"{kind}_{i:03d}.h5" for kind in ("normal", "tumor") for i in range(1, 5)]

    db = work / "mlflow.db"
    fit = train(train_env, "fit", str(work / "feat"), "--labels", str(work / "ds" / "reference.csv"),
                "--folds", "2", "--epochs", "3", "--seed", "0",
                "--tracking-uri", f"sqlite:///{db}")
    assert "run_id=" in fit.stdout, fit.stdout[-3000:]
    run_id = fit.stdout.rsplit("run_id=", 1)[1].split()[0]
    with sqlite3.connect(db) as con:
        status = con.execute("SELECT status FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
    assert status == ("FINISHED",)
