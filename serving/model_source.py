"""Where the served model comes from, and how a newly promoted version replaces it.

`--model` is one of
- `models:/NAME@ALIAS`   an MLflow registered model alias (followed: re-read every poll interval),
- `models:/NAME/VERSION` a pinned registry version,
- a bundle folder        version = short content digest of its files (re-hashed every poll).

Registry access is plain MlflowClient on any tracking URI (`--tracking-uri`, else
MLFLOW_TRACKING_URI, else the embedded `sqlite:///mlflow.db`: core.tracking): `get_model_version_by_alias` /
`get_model_version`, then the version's `source` is downloaded with
`mlflow.artifacts.download_artifacts` into a temporary folder, which is removed once the ONNX
sessions are built (onnxruntime keeps the graphs in memory). The source is the MLflow pyfunc model
`milroi-train export` logs (the bundle is its artifact `bundle/`, core.bundle.find_bundle); the
server reads the bundle files themselves, not the pyfunc. Their sha256 must equal the version's
`bundle_digest` tag, recorded at registration: files changed since are refused (BundleError) and
the current model keeps serving.

Swaps are atomic and lose no request: the poller loads the new version in its own thread while
the old one serves; then the reference `current` is replaced under a lock. Every request takes a
`lease()` of the model current when it starts and keeps it to its end, so a stream that began on
version 1 finishes on version 1; the old engine is closed when its last lease is returned.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from core.bundle import DIGEST_TAG, BundleManifest, bundle_digest, find_bundle
from core.errors import BundleError, ModelNotReady, RegistryError
from core.tracking import ModelUri, mlflow_client, resolve_tracking_uri, version_artifact_uri
from results.scored import ModelRef
from serving.engine import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed --model value."""

    uri: str
    name: str | None = None       # registry model name
    alias: str | None = None
    version: str | None = None    # pinned registry version
    folder: Path | None = None    # local bundle

    @classmethod
    def parse(cls, uri: str) -> ModelSpec:
        if ModelUri.is_model_uri(uri):
            parsed = ModelUri.parse(uri)
            return cls(uri, parsed.name, parsed.alias, parsed.version)
        folder = Path(uri)
        BundleManifest.read(folder)   # a clear error now rather than at the first poll
        return cls(uri, folder=folder)

    @property
    def follows(self) -> bool:
        """Whether polling can change the version (alias or folder, not a pinned version)."""
        return self.version is None


class LoadedModel:
    """An engine plus the count of requests using it; closed when retired and unused."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.ref: ModelRef = engine.model
        self._lock = threading.Lock()
        self._leases = 0
        self._retired = False

    def acquire(self) -> None:
        with self._lock:
            self._leases += 1

    def release(self) -> None:
        with self._lock:
            self._leases -= 1
            close = self._retired and self._leases == 0
        if close:
            self._close()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            close = self._leases == 0
        if close:
            self._close()

    def _close(self) -> None:
        log.info("model %s version %s retired", self.ref.name, self.ref.version)
        self.engine.close(wait=False)

    @property
    def leases(self) -> int:
        return self._leases


def _check_digest(bundle: Path, location: str, ref: ModelRef, expected: str | None) -> None:
    """BundleError unless the bundle's files are the ones registered (their recorded digest)."""
    if expected is None:
        log.warning("model %s version %s has no %s tag (registered before milroi recorded it): "
                    "its files are not checked", ref.name, ref.version, DIGEST_TAG)
        return
    found = bundle_digest(bundle, length=len(expected))
    if found != expected:
        raise BundleError(location, f"model {ref.name} version {ref.version}: the files differ from "
                                  f"those registered ({DIGEST_TAG} {expected[:12]}..., files "
                                  f"{found[:12]}...); not loading them")


class ModelSource:
    """Loads the model of a ModelSpec, follows it, and hands out leases of the current one."""

    def __init__(self, spec: ModelSpec | str, engine_factory: Callable[[Path, ModelRef], Engine],
                 *, tracking_uri: str | None = None, poll_interval: float = 30.0,
                 on_change: Callable[[LoadedModel], None] | None = None,
                 on_error: Callable[[Exception], None] | None = None):
        self.spec = ModelSpec.parse(spec) if isinstance(spec, str) else spec
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.poll_interval = float(poll_interval)
        self._factory = engine_factory
        self._on_change = on_change
        self._on_error = on_error
        self._lock = threading.Lock()
        self._current: LoadedModel | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- resolution --------------------------------------------------------------------------
    def resolve(self) -> tuple[ModelRef, str, str | None]:
        """The ModelRef the spec names now, where its bundle is (folder or artifact URI), and the
        digest its files must have (a registry version's `bundle_digest` tag; None for a folder
        or a version registered without one)."""
        spec = self.spec
        if spec.folder is not None:
            manifest = BundleManifest.read(spec.folder)
            return (ModelRef(manifest.name, bundle_digest(spec.folder),
                             run_id=manifest.run_id or ""), str(spec.folder), None)
        from mlflow.exceptions import MlflowException

        client = mlflow_client(self.tracking_uri)
        try:
            if spec.alias:
                mv = client.get_model_version_by_alias(spec.name, spec.alias)
            else:
                mv = client.get_model_version(spec.name, spec.version)
            location = version_artifact_uri(client, mv)
        except MlflowException as exc:
            raise RegistryError(f"{spec.uri} at {self.tracking_uri}: {exc.message}") from None
        return (ModelRef(spec.name, str(mv.version), spec.alias or "", mv.run_id or ""), location,
                (mv.tags or {}).get(DIGEST_TAG))

    def _load(self, ref: ModelRef, location: str, digest: str | None = None) -> LoadedModel:
        if self.spec.folder is not None:
            return LoadedModel(self._factory(Path(location), ref))
        import mlflow.artifacts

        tmp = tempfile.mkdtemp(prefix=f"milroi-{ref.name}-{ref.version}-")
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp,
                                                            tracking_uri=self.tracking_uri))
            bundle = find_bundle(local)
            _check_digest(bundle, location, ref, digest)
            return LoadedModel(self._factory(bundle, ref))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)   # sessions hold the graphs in memory now

    def refresh(self) -> bool:
        """Load the version the spec names now if it differs from the current; True if swapped."""
        ref, location, digest = self.resolve()
        current = self._current
        if current is not None and current.ref.version == ref.version:
            return False
        log.info("loading model %s version %s from %s", ref.name, ref.version, location)
        loaded = self._load(ref, location, digest)
        with self._lock:
            previous, self._current = self._current, loaded
        if previous is not None:
            log.info("model %s: version %s -> %s", ref.name, previous.ref.version, ref.version)
            previous.retire()
        if self._on_change:
            self._on_change(loaded)
        return True

    # -- serving -----------------------------------------------------------------------------
    @property
    def current(self) -> LoadedModel | None:
        return self._current

    @contextlib.contextmanager
    def lease(self) -> Iterator[LoadedModel]:
        """The current model, kept alive (not closed by a swap) until the block ends."""
        with self._lock:
            model = self._current
            if model is None:
                raise ModelNotReady("no model is loaded yet")
            model.acquire()
        try:
            yield model
        finally:
            model.release()

    def start(self) -> None:
        """Load in the background (first load, then polls); the server is UNAVAILABLE until then."""
        self._thread = threading.Thread(target=self._poll_loop, name="model-poll", daemon=True)
        self._thread.start()

    def _poll_loop(self) -> None:
        first = True
        while first or (self.spec.follows and not self._stop.wait(self.poll_interval)):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - a failed poll keeps the current model
                log.error("model %s: %s", self.spec.uri, exc)
                if self._on_error:
                    self._on_error(exc)
                if first and self._current is None:
                    # keep retrying the first load at the poll interval
                    if self._stop.wait(self.poll_interval):
                        return
                    continue
            first = False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            current, self._current = self._current, None
        if current is not None:
            current.retire()
