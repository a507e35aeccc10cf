"""Where MLflow is, and how a registered model is named: shared by every command of both sides.

- `resolve_tracking_uri(flag)`: the `--tracking-uri` flag, else `$MLFLOW_TRACKING_URI`, else the
  sqlite store in the working directory (MLflow's own precedence, with milroi's default). The
  registry is always the same store (`mlflow_client`).
- `ModelUri.parse("models:/NAME@ALIAS" | "models:/NAME/VERSION")`: the one grammar of the model
  URIs `export`, `promote`, `serve` and `score` take.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from core.errors import RegistryError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"   # artifacts beside it in ./mlartifacts
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"

# MLflow's own rules: a registered model name has no "/", an alias neither "/" nor "@".
_LOGGED_MODEL_URI = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)$")   # MLflow 3 logged model
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def resolve_tracking_uri(flag: str | None = None, default: str = DEFAULT_TRACKING_URI) -> str:
    """The tracking URI a command uses: `flag`, else $MLFLOW_TRACKING_URI, else `default`."""
    return flag or os.environ.get(TRACKING_URI_ENV) or default


def mlflow_client(tracking_uri: str | None = None):
    """An MlflowClient whose tracking and registry stores are both the resolved URI."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def tracking_uri_help() -> str:
    return (f"MLflow tracking and registry URI (default ${TRACKING_URI_ENV}, else "
            f"{DEFAULT_TRACKING_URI} with artifacts in ./mlartifacts)")


@dataclass(frozen=True)
class ModelUri:
    """A parsed `models:/NAME@ALIAS` (follows the alias) or `models:/NAME/VERSION` (pinned)."""

    name: str
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, uri: str) -> ModelUri:
        match = _MODEL_URI.match(uri)
        if not match:
            raise RegistryError(f"not a model URI: {uri!r} (expected models:/NAME@ALIAS or "
                                f"models:/NAME/VERSION)")
        return cls(match["name"], match["alias"], match["version"])

    @staticmethod
    def is_model_uri(text: str) -> bool:
        return text.startswith("models:/")

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def version_artifact_uri(client, version) -> str:
    """Where a registered ModelVersion's files are: its source, or for a source `models:/<id>`
    (an MLflow logged model, what `milroi-train export` registers) that model's artifact
    location. Resolved through `client`: mlflow's own download of a `models:/` URI looks it up
    on the process-wide registry, not on the tracking URI it is given."""
    source = version.source
    match = _LOGGED_MODEL_URI.match(source or "")
    if match:   # (ModelVersion.model_id is not filled in by every store: read the source)
        return client.get_logged_model(match["model_id"]).artifact_location
    return source
