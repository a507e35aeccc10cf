"""The server loads a registered version only if its files are the ones registered.

A real `mlflow server` (sqlite, proxied local artifacts); the versions are registered by the
product's own training.export.register_bundle; ModelSource is the server's model follower with
the real serving Engine. A version whose files were changed in the artifact store after
registration (by hand, or as an export used to rewrite them) is refused with a clear error and
the model loaded before keeps serving; restored files load again.
"""
from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
from mlflow_testing import register_bundle, running_mlflow_server

from core.bundle import DIGEST_TAG, bundle_digest
from core.errors import BundleError

NAME = "milroi"
URI = f"models:/{NAME}@champion"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """(tracking URI, the server's artifact root on disk)."""
    root = tmp_path_factory.mktemp("mlflow_digest")
    with running_mlflow_server(root) as uri:
        yield uri, root / "artifacts"


def _source(uri):
    from serving.engine import Engine
    from serving.model_source import ModelSource

    return ModelSource(URI, lambda path, ref: Engine(path, provider="cpu", batch_size=4, model=ref),
                       tracking_uri=uri)


def _stored_manifest(client, artifacts, version):
    """manifest.json of a version as it lies in the server's artifact store."""
    model_id = re.search(r"/models/(m-[0-9a-f]+)/", client.get_model_version(NAME, version).source)[1]
    (path,) = artifacts.rglob(f"{model_id}/artifacts/artifacts/bundle/manifest.json")
    return path


@pytest.mark.slow
def test_changed_files_are_refused_and_the_previous_model_kept(registry, chowder_bundle):
    from mlflow import MlflowClient

    uri, artifacts = registry
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    v1 = register_bundle(client, NAME, chowder_bundle, experiment="digest")
    v2 = register_bundle(client, NAME, chowder_bundle, experiment="digest")
    assert client.get_model_version(NAME, v2).tags[DIGEST_TAG] == bundle_digest(chowder_bundle,
                                                                                 length=64)
    client.set_registered_model_alias(NAME, "champion", v1)
    source = _source(uri)
    tiles = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), np.uint8)
    try:
        assert source.refresh() and source.current.ref.version == v1

        # version 2's manifest is edited in the store after registration
        manifest_path = _stored_manifest(client, artifacts, v2)
        original = manifest_path.read_bytes()
        manifest_path.write_text(json.dumps({**json.loads(original), "slide_threshold": 0.0}))
        client.set_registered_model_alias(NAME, "champion", v2)
        with pytest.raises(BundleError, match=f"version {v2}: the files differ from those "
                                              f"registered \\({DIGEST_TAG} [0-9a-f]{{12}}"):
            source.refresh()
        assert source.current.ref.version == v1          # the previous model keeps serving
        with source.lease() as model:
            assert model.engine.score(tiles)["patch_scores"].shape == (2,)

        # the registered bytes back: version 2 loads
        manifest_path.write_bytes(original)
        assert source.refresh() and source.current.ref.version == v2
    finally:
        source.stop()


def test_a_version_without_a_digest_loads_with_a_warning(registry, chowder_bundle, caplog):
    """Versions registered before the digest (the bundle as plain run artifacts) still load."""
    from mlflow import MlflowClient

    from training.runs import ensure_experiment

    uri, _ = registry
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = client.create_run(ensure_experiment(uri, "digest")).info.run_id
    client.log_artifacts(run_id, str(chowder_bundle), artifact_path="bundle")
    if not client.search_registered_models(f"name = '{NAME}'"):
        client.create_registered_model(NAME)
    old = client.create_model_version(
        NAME, source=f"{client.get_run(run_id).info.artifact_uri}/bundle", run_id=run_id).version
    client.set_registered_model_alias(NAME, "champion", old)
    source = _source(uri)
    try:
        with caplog.at_level(logging.WARNING, logger="serving.model_source"):
            assert source.refresh() and source.current.ref.version == str(old)
        assert f"has no {DIGEST_TAG} tag" in caplog.text
    finally:
        source.stop()
