"""The shared contracts of core.errors and core.tracking.

- every error type pickles (a Ray actor's or worker process's error arrives on the driver as
  the same type with the same message) and is a MilroiError (the CLI's one-line report, the
  batch job's `failed` row, the server's status mapping all catch that);
- the MLflow tracking URI: the flag, else $MLFLOW_TRACKING_URI, else the default;
- the one grammar of model URIs: models:/NAME@ALIAS and models:/NAME/VERSION.
"""
from __future__ import annotations

import inspect
import pickle

import pytest

import core.errors as errors
from core.errors import MilroiError, RegistryError, RequestError
from core.tracking import DEFAULT_TRACKING_URI, TRACKING_URI_ENV, ModelUri, resolve_tracking_uri

ERROR_TYPES = sorted((cls for _, cls in inspect.getmembers(errors, inspect.isclass)
                      if issubclass(cls, BaseException) and cls.__module__ == errors.__name__
                      and not cls.__name__.startswith("_")),   # public types only
                     key=lambda cls: cls.__name__)

# Constructor arguments of the types that take more than a message.
ARGS = {
    "SlideError": ("a.svs", "corrupt"),
    "SlideMissing": ("a.svs",),
    "BundleError": ("b/", "no manifest.json"),
}


def make(cls):
    return cls(*ARGS.get(cls.__name__, (f"a {cls.__name__} message",)))


def test_the_module_defines_the_documented_types():
    names = {cls.__name__ for cls in ERROR_TYPES}
    assert names >= {"MilroiError", "ConfigError", "SlideError", "SlideMissing", "BundleError",
                     "ExportError", "RegistryError", "RequestError", "PathDenied",
                     "SlideNotFound", "Busy", "ModelNotReady", "Cancelled", "AuthError"}


@pytest.mark.parametrize("cls", ERROR_TYPES, ids=lambda cls: cls.__name__)
def test_error_is_a_milroi_error(cls):
    assert issubclass(cls, MilroiError)


@pytest.mark.parametrize("cls", ERROR_TYPES, ids=lambda cls: cls.__name__)
def test_error_pickles_to_the_same_type_and_message(cls):
    err = make(cls)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(err, protocol=protocol))
        assert type(back) is cls
        assert str(back) == str(err)
        assert back.args == err.args
        assert vars(back) == vars(err)       # path / cause attributes survive too


@pytest.mark.parametrize("cls", ERROR_TYPES, ids=lambda cls: cls.__name__)
def test_error_pickles_when_raised_and_chained(cls):
    # what crosses a process boundary is an exception that was raised, with a traceback
    try:
        try:
            raise OSError("underlying")
        except OSError as cause:
            raise make(cls) from cause
    except MilroiError as err:
        back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and str(back) == str(make(cls))


def test_slide_and_bundle_messages():
    assert str(errors.SlideError("a.svs", "corrupt")) == "cannot read slide a.svs: corrupt"
    missing = errors.SlideMissing("a.svs")
    assert isinstance(missing, errors.SlideError)
    assert (missing.path, missing.cause) == ("a.svs", "no such file")
    assert str(missing) == "cannot read slide a.svs: no such file"
    bundle = errors.BundleError("b/", "no manifest.json")
    assert (bundle.path, bundle.cause) == ("b/", "no manifest.json")
    assert str(bundle) == "cannot load model bundle b/: no manifest.json"


def test_path_like_arguments_are_kept_as_strings(tmp_path):
    err = errors.SlideError(tmp_path / "a.svs", "corrupt")
    assert err.path == str(tmp_path / "a.svs")
    assert pickle.loads(pickle.dumps(err)).path == err.path


@pytest.mark.parametrize("name", ["PathDenied", "SlideNotFound", "Busy", "ModelNotReady",
                                  "Cancelled"])
def test_request_errors(name):
    assert issubclass(getattr(errors, name), RequestError)


# -- the tracking URI ------------------------------------------------------------------------
def test_tracking_uri_flag_wins_over_env_and_default(monkeypatch):
    monkeypatch.setenv(TRACKING_URI_ENV, "http://env:5000")
    assert resolve_tracking_uri("http://flag:5000") == "http://flag:5000"
    assert resolve_tracking_uri("http://flag:5000", default="sqlite:///other.db") == "http://flag:5000"


def test_tracking_uri_env_wins_over_default(monkeypatch):
    monkeypatch.setenv(TRACKING_URI_ENV, "http://env:5000")
    assert resolve_tracking_uri(None) == "http://env:5000"
    assert resolve_tracking_uri() == "http://env:5000"
    assert resolve_tracking_uri(None, default="sqlite:///other.db") == "http://env:5000"


def test_tracking_uri_default(monkeypatch):
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    assert resolve_tracking_uri(None) == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    assert resolve_tracking_uri(None, default="sqlite:///other.db") == "sqlite:///other.db"
    # an empty flag or variable is no choice: the next one in line is used
    monkeypatch.setenv(TRACKING_URI_ENV, "")
    assert resolve_tracking_uri("") == DEFAULT_TRACKING_URI


# -- model URIs ------------------------------------------------------------------------------
def test_model_uri_alias():
    uri = ModelUri.parse("models:/n@a")
    assert (uri.name, uri.alias, uri.version) == ("n", "a", None)
    assert str(uri) == "models:/n@a"


def test_model_uri_version():
    uri = ModelUri.parse("models:/n/3")
    assert (uri.name, uri.alias, uri.version) == ("n", None, "3")
    assert str(uri) == "models:/n/3"


def test_model_uri_realistic_names():
    assert ModelUri.parse("models:/milroi@champion") == ModelUri("milroi", alias="champion")
    assert ModelUri.parse("models:/milroi-chowder_v2/12").version == "12"


@pytest.mark.parametrize("text", ["models:/n@a/b", "models:/n/x", "foo", "models:/", "models:/n",
                                  "models:/n@", "models:/n/", "models:/n/3/4", "models:n@a",
                                  "models:/n@a@b", "/path/to/bundle", ""])
def test_bad_model_uris(text):
    with pytest.raises(RegistryError, match="not a model URI"):
        ModelUri.parse(text)


def test_model_uri_errors_are_registry_errors_that_pickle():
    with pytest.raises(RegistryError) as info:
        ModelUri.parse("models:/n/x")
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is RegistryError and str(back) == str(info.value)
    assert "'models:/n/x'" in str(info.value)


def test_is_model_uri():
    assert ModelUri.is_model_uri("models:/n@a")
    assert not ModelUri.is_model_uri("bundle/")
