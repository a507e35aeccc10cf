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
