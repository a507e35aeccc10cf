"""Fixtures every test folder may use (folder conftests can override them)."""
from __future__ import annotations

import pytest
from mlflow_testing import running_mlflow_server


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
