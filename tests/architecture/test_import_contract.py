"""The layering of docs/ARCHITECTURE.md, asserted on the source (ast; nothing is imported):

    core  <  wsi  <  results  <  training | serving        (proto stubs `milroi`: serving only)

- core imports only core (third-party packages other than numpy only lazily, inside functions);
- wsi imports core and wsi;
- results (the scored slide's files and the results folder) imports core, wsi and results;
- training imports core, wsi and training, never serving nor the gRPC stubs (the train image
  has no serving/: Dockerfile.train deletes it, test_train_without_serving.py runs it so);
- serving imports core, wsi, serving and the stubs `milroi`, never training (the serve image
  has no torch);
- no module takes part in an import cycle, function-local imports included.

An import anywhere in a module (top level, inside a function, under TYPE_CHECKING) is an edge.
The checker itself is tested on planted trees at the end, so the contract cannot pass vacuously.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from import_graph import (
    ALLOWED,
    SCANNED,
    build_graph,
    command_tables,
    format_cycle,
    import_cycles,
    layer_violations,
    missing_names,
    module_level_third_party,
    top,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def graph():
    return build_graph(REPO)


def _listing(edges) -> str:
    return "\n".join(f"  {e}" for e in edges)


def test_every_package_is_scanned(graph):
    for package in SCANNED:
        assert any(top(m) == package for m in graph.scanned), f"no module of {package}/ found"
    # the generated stubs are resolved against, never scanned
    assert not any(top(m) == "milroi" for m in graph.scanned)
    assert "milroi.v1.scoring_pb2" in graph.modules


@pytest.mark.parametrize("package", SCANNED)
def test_layer_imports_only_what_it_may(graph, package):
    bad = [e for e in layer_violations(graph) if top(e.source) == package]
    assert not bad, (f"{package} may import only {sorted(ALLOWED[package])} of milroi; "
                     f"{len(bad)} import(s) break the layering:\n{_listing(bad)}")


def test_training_never_imports_serving_nor_the_stubs(graph):
    # stated on its own: this is the edge that breaks the train image (no serving/ in it)
    bad = [e for e in graph.edges
           if top(e.source) == "training" and top(e.target) in ("serving", "milroi")]
    assert not bad, "training imports the serving side:\n" + _listing(bad)


def test_serving_never_imports_training(graph):
    bad = [e for e in graph.edges if top(e.source) == "serving" and top(e.target) == "training"]
    assert not bad, "serving imports the training side (torch):\n" + _listing(bad)


def test_no_import_cycles(graph):
    cycles = import_cycles(graph)
    assert not cycles, (f"{len(cycles)} import cycle(s) (function-local imports count):\n"
                        + "\n".join(format_cycle(c) for c in cycles))


def test_internal_imports_name_existing_modules(graph):
    # a moved module (wsi.errors -> core.errors) left behind as an import is found here, before
    # it becomes an ImportError at run time in the one code path that reaches it
    assert not graph.unresolved, ("imports of milroi modules that do not exist:\n"
                                  + _listing(graph.unresolved))


def test_imported_names_exist(graph):
    # `from core.errors import X` where core.errors defines no X: an ImportError the day the
    # statement runs (a lazy import only in the code path that reaches it)
    missing = missing_names(graph)
    assert not missing, ("names imported from milroi modules that do not define them:\n"
                         + "\n".join(f"  {m}" for m in missing))


# `milroi-serve view` and `milroi-serve spatiopath` are commands of the serving console script,
# while their code lives beside serving/ (it reads results folders and, for the viewer, calls a
# server as a client does): the table names them, and no serving module imports them.
COMMAND_TABLE_EXTRA = {"serving": frozenset({"viewer", "spatiopath_analysis"})}


def test_command_tables_respect_the_layers(graph):
    # core.cli.dispatch imports the modules of a COMMANDS table by name (importlib): the table
    # of a console script is an edge of its package as much as an import statement is
    entries = command_tables(graph)
    assert {e.source for e in entries} >= {"training.cli", "serving.cli"}
    bad = [e for e in entries if top(e.target) not in
           ALLOWED[top(e.source)] | COMMAND_TABLE_EXTRA.get(top(e.source), frozenset())]
    missing = [e for e in entries if e.target not in graph.modules]
    assert not bad, "sub-commands of another layer:\n" + _listing(bad)
    assert not missing, "sub-commands naming no module:\n" + _listing(missing)


# The one exception: core.pyfunc's class must subclass mlflow's PythonModel, and must live in core
# because the train install (no serving/) pickles it and the serve install (no training/)
# unpickles it. Only training.mlflow_model and MLflow's model loader import core.pyfunc.
CORE_MODULE_LEVEL_EXCEPTIONS = {("core.pyfunc", "mlflow.pyfunc")}


def test_core_imports_third_party_only_lazily(graph):
    bad = [e for e in module_level_third_party(graph, "core")
           if (e.source, e.target) not in CORE_MODULE_LEVEL_EXCEPTIONS]
    assert not bad, ("core imports third-party packages (other than numpy) at module level; "
                     "import them inside the function that needs them:\n" + _listing(bad))
    # and the exception stays contained: no other milroi module pulls core.pyfunc (and mlflow) in
    importers = {e.source for e in graph.edges if e.target == "core.pyfunc"}
    assert importers <= {"training.mlflow_model"}, f"core.pyfunc imported by {sorted(importers)}"


# -- the checker on planted trees ------------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


PLANTED_DIRS = {"core": "core", "wsi": "wsi", "training": "training", "serving": "serving",
                "milroi": "proto/milroi"}


def _planted(tmp_path: Path, extra: dict[str, str]) -> Path:
    base = {
        "core/__init__.py": "",
        "core/errors.py": "import os\n",
        "wsi/__init__.py": "",
        "wsi/slide.py": "from core.errors import *\n",
        "training/__init__.py": "",
        "serving/__init__.py": "",
        "serving/engine.py": "from core import errors\nfrom wsi.slide import Slide\n",
        "proto/milroi/__init__.py": "",
        "proto/milroi/v1/__init__.py": "",
        "proto/milroi/v1/scoring_pb2.py": "import training.secret\n",   # generated: not scanned
    }
    return _write(tmp_path, {**base, **extra})


def test_checker_passes_a_clean_tree(tmp_path):
    graph = build_graph(_planted(tmp_path, {}), PLANTED_DIRS)
    assert not layer_violations(graph) and not import_cycles(graph) and not graph.unresolved
    assert "milroi.v1.scoring_pb2" not in graph.scanned
    targets = {(e.source, e.target) for e in graph.edges}
    # `from core import errors` is an edge to the module core.errors, not to the package
    assert ("serving.engine", "core.errors") in targets
    assert ("serving.engine", "wsi.slide") in targets


def test_checker_finds_a_planted_violation(tmp_path):
    root = _planted(tmp_path, {
        "training/onnx_backbone.py": (
            "import numpy\n"
            "\n"
            "def session():\n"
            "    from serving.engine import session_options  # lazy: still an edge\n"
            "    return session_options\n"),
        "training/stubs.py": "from milroi.v1 import scoring_pb2\n",
        "wsi/tiles.py": "if True:\n    from training import onnx_backbone\n",
        "wsi/sub/__init__.py": "",
        "wsi/sub/deep.py": "from ..tiles import x\nfrom ...training import y\n",  # relative
        "core/tiling.py": "import wsi.slide\nimport mlflow\n",
        "serving/batch.py": ("def f():\n    import importlib\n"
                             "    importlib.import_module('training.onnx_backbone')\n"),
    })
    graph = build_graph(root, PLANTED_DIRS)
    found = {(e.source, e.target, e.file, e.line) for e in layer_violations(graph)}
    assert found == {
        ("training.onnx_backbone", "serving.engine", "training/onnx_backbone.py", 4),
        ("training.stubs", "milroi.v1.scoring_pb2", "training/stubs.py", 1),
        ("wsi.tiles", "training.onnx_backbone", "wsi/tiles.py", 2),
        ("core.tiling", "wsi.slide", "core/tiling.py", 1),
        ("serving.batch", "training.onnx_backbone", "serving/batch.py", 3),
    }
    lazy = next(e for e in graph.edges if e.source == "training.onnx_backbone")
    assert lazy.lazy and "training/onnx_backbone.py:4" in str(lazy) and "serving.engine" in str(lazy)
    assert [e.target for e in module_level_third_party(graph, "core")] == ["mlflow"]
    # `..tiles` from wsi.sub.deep is wsi.tiles; `...training` leaves the top package (Python
    # refuses it too): reported as dangling, never silently dropped
    assert ("wsi.sub.deep", "wsi.tiles") in {(e.source, e.target) for e in graph.edges}
    assert [(e.source, e.line) for e in graph.unresolved] == [("wsi.sub.deep", 2)]


def test_checker_finds_a_planted_cycle(tmp_path):
    root = _planted(tmp_path, {
        "serving/batch.py": "def run():\n    from serving.ray_batch import backend\n",
        "serving/ray_batch.py": "from serving.pipeline import SlideScorer\n",
        "serving/pipeline.py": "from . import batch\n",                 # relative, to a module
        "serving/server.py": "import serving.pipeline\n",             # into the cycle, not in it
        "wsi/self_loop.py": "import wsi.self_loop\n",
    })
    graph = build_graph(root, PLANTED_DIRS)
    cycles = import_cycles(graph)
    by_members = {frozenset(e.source for e in c): c for c in cycles}
    assert set(by_members) == {frozenset({"serving.batch", "serving.ray_batch", "serving.pipeline"}),
                               frozenset({"wsi.self_loop"})}
    cycle = by_members[frozenset({"serving.batch", "serving.ray_batch", "serving.pipeline"})]
    text = format_cycle(cycle)
    assert "serving/batch.py:2" in text and "serving/ray_batch.py:1" in text
    assert "serving/pipeline.py:1" in text
    # each edge of the cycle ends where the next begins, and the last returns to the first
    assert all(a.target == b.source for a, b in zip(cycle, cycle[1:] + cycle[:1]))


def test_checker_reports_dangling_imports(tmp_path):
    root = _planted(tmp_path, {
        "serving/batch.py": "from wsi.errors import WsiError\nfrom wsi.cli import add\n",
        "serving/ok.py": "from wsi import slide\nfrom core import errors as e\n",
    })
    graph = build_graph(root, PLANTED_DIRS)
    assert sorted((e.target, e.line) for e in graph.unresolved) == [("wsi.cli", 2), ("wsi.errors", 1)]
    # still edges into wsi for the layering check
    assert {e.target for e in graph.edges if e.source == "serving.batch"} == {"wsi"}


def test_checker_reports_missing_names(tmp_path):
    root = _planted(tmp_path, {
        "core/errors.py": ("import os\nclass SlideError(Exception): pass\n"
                           "try:\n    Alias = SlideError\nexcept NameError:\n    pass\n"
                           "if os.name:\n    WINDOWS = False\n"),
        "core/lazy.py": "def __getattr__(name):\n    return name\n",
        "serving/engine.py": (
            "from core.errors import SlideError, Alias, WINDOWS, os\n"
            "from core import errors, tiling\n"            # core.tiling: no such module or name
            "from core.lazy import anything\n"             # module __getattr__: cannot tell
            "def f():\n    from core.errors import ClusterError\n"),
    })
    graph = build_graph(root, PLANTED_DIRS)
    assert sorted((m.edge.file, m.edge.line, m.name) for m in missing_names(graph)) == [
        ("serving/engine.py", 2, "tiling"), ("serving/engine.py", 5, "ClusterError")]
    assert "core.errors has no 'ClusterError'" in str(missing_names(graph)[-1])


def test_checker_keeps_results_below_both_sides(tmp_path):
    """results may import core and wsi only; wsi may not import results."""
    root = _planted(tmp_path, {
        "results/__init__.py": "",
        "results/layout.py": "from core.errors import ConfigError\nfrom wsi.slide import Slide\n",
        "results/outputs.py": "def f():\n    from serving.engine import Engine\n",
        "wsi/grid.py": "from results.layout import SUMMARY_NAME\n",
        "serving/batch.py": "from results.layout import SUMMARY_NAME\n",
    })
    graph = build_graph(root, {**PLANTED_DIRS, "results": "results"})
    found = {(e.source, e.target) for e in layer_violations(graph)}
    assert found == {("results.outputs", "serving.engine"), ("wsi.grid", "results.layout")}


# -- the readers of results folders import no engine -------------------------------------------

# What a client, the viewer or the Spatiopath analysis must never load: the engine and what
# runs models (a viewer user's install need not import onnxruntime, OpenVINO or torch).
ENGINE_MODULES = {"serving.engine", "serving.sessions", "serving.inference", "serving.batcher",
                  "serving.pipeline", "serving.server", "serving.batch",
                  "serving.options", "serving.backends", "core.inference_backends"}
ENGINE_PACKAGES = {"onnxruntime", "openvino", "torch", "torchvision", "tensorrt"}


def reachable(graph, starts) -> tuple[set[str], set[str]]:
    """(milroi modules, third-party top-level packages) that importing `starts` may load,
    function-local imports included."""
    adjacency = graph.adjacency()
    seen, stack = set(), list(starts)
    while stack:
        module = stack.pop()
        if module in seen:
            continue
        seen.add(module)
        stack.extend(adjacency.get(module, ()))
    external = {top(e.target) for e in graph.external if e.source in seen}
    return seen, external


@pytest.mark.parametrize("package", ["viewer", "spatiopath_analysis"])
def test_readers_of_results_import_no_engine(graph, package):
    modules, external = reachable(graph, [m for m in graph.scanned if top(m) == package])
    assert not modules & ENGINE_MODULES, sorted(modules & ENGINE_MODULES)
    assert not external & ENGINE_PACKAGES, sorted(external & ENGINE_PACKAGES)


def test_the_client_imports_no_engine(graph):
    modules, external = reachable(graph, ["serving.client"])
    assert not modules & ENGINE_MODULES, sorted(modules & ENGINE_MODULES)
    assert not external & ENGINE_PACKAGES, sorted(external & ENGINE_PACKAGES)


def test_reachability_finds_a_planted_engine_import(tmp_path):
    root = _planted(tmp_path, {
        "viewer/__init__.py": "",
        "viewer/app.py": "from serving.client import C\n",
        "serving/client.py": "def f():\n    from serving.engine import Engine\n",
        "serving/engine.py": "import onnxruntime\n",
    })
    graph = build_graph(root, {**PLANTED_DIRS, "viewer": "viewer"})
    modules, external = reachable(graph, ["viewer.app"])
    assert "serving.engine" in modules and "onnxruntime" in external
