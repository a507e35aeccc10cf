"""Fixtures every test folder may use (folder conftests can override them)."""
from __future__ import annotations

import os

import pytest
from mlflow_testing import running_mlflow_server

# `make test` runs the suite on pytest-xdist workers (`-n 2 --dist loadscope
# --no-loadscope-reorder`, Makefile), with each test folder as one scope (FolderScheduling): a
# folder runs whole on one worker, so its session fixtures (trained bundles, scored folders,
# MLflow servers, images) are still built once. A worker takes the next folder when it is free;
# the folders go out longest first so that no long one starts last. Minutes of worker time per
# folder in a fresh-clone run on the 2-core host (2026-12-07, two workers): containers 13.1
# (7.3 of them waiting on the image builds: layer copies and pip, little CPU), training_mil
# 7.2, hardening 4.9, training_model 3.8, serving 3.4, serving_batch 3.2, ray 3.1, bench 2.7,
# wsi 1.9, the rest under 1. The containers folder leads: its worker waits on the builds while
# the other computes (a third worker made the run slower: 27.5 against 26.0 min).
FOLDERS_LONGEST_FIRST = ["containers", "training_mil", "hardening", "training_model", "serving",
                         "serving_batch", "ray", "bench", "wsi", "spatiopath", "viewer",
                         "architecture", "wsi_data", "gpu_decode"]


def _folder(nodeid: str) -> str:
    """The test folder of a node id ("tests/wsi/test_x.py::test_y" -> "wsi")."""
    parts = nodeid.split("::")[0].split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "tests" else ""


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return    # one process: the order of the files, containers last (containers/conftest.py)
    rank = {name: i for i, name in enumerate(FOLDERS_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_folder(item.nodeid), len(rank)))   # stable per folder


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadscope` with the test folder as the scope (xdist's own scopes are modules;
    its `xdist_group` marks no longer reach the node ids under pytest 9)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FolderScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _folder(nodeid) or nodeid

    return FolderScheduling(config, log)


@pytest.fixture
def mlflow_server(tmp_path):
    """A fresh `mlflow server` (own sqlite registry and artifacts) for one test; yields its URI.
    tests/training_model overrides it with one server per session."""
    with running_mlflow_server(tmp_path / "mlflow") as uri:
        yield uri


@pytest.fixture(autouse=True)
def isolated_tracking_uri():
    """Every test starts without $MLFLOW_TRACKING_URI and leaves none behind: the commands take
    the tracking URI from it (core.tracking), and mlflow.set_tracking_uri writes it process-wide,
    so one test's (dead) MLflow server would otherwise become the next test's store."""
    import os

    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if saved is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(autouse=True, scope="session")
def session_backend_cache(tmp_path_factory):
    """The measured backend choices (core.inference_backends) of this test session, in a folder
    of its own: tests never read or write the user's ~/.cache/milroi, and the servers the tests
    start (which inherit the environment) reuse the session's measurements."""
    import os

    saved = os.environ.get("MILROI_CACHE_DIR")
    os.environ["MILROI_CACHE_DIR"] = str(tmp_path_factory.mktemp("milroi-cache"))
    yield
    if saved is None:
        os.environ.pop("MILROI_CACHE_DIR", None)
    else:
        os.environ["MILROI_CACHE_DIR"] = saved

