"""The import graph of milroi's own modules, read from the source with `ast` (nothing is imported).

Used by test_import_contract.py, which asserts the layering of docs/ARCHITECTURE.md on it:

    core  <  wsi  <  training | serving        (proto stubs `milroi`: serving only)

Every `import` / `from ... import` statement of a module is an edge, wherever it stands: at the
top, inside a function (a lazy import), under `if TYPE_CHECKING:` or in a `try`. So is
`importlib.import_module("literal")`. `from x import y` is an edge to the module `x.y` when
there is one, else to `x` (y is then a name defined in x); relative imports are resolved
against the importing module's package. An edge to a parent package is not implied: importing
`a.b.c` runs `a/__init__.py`, but milroi's package `__init__`s import nothing, and counting them
would only add false cycles through `__init__`.
"""
from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The top-level packages of milroi and the folders they live in (relative to the repository).
PACKAGE_DIRS = {"core": "core", "wsi": "wsi", "results": "results", "training": "training",
                "serving": "serving", "viewer": "viewer",
                "spatiopath_analysis": "spatiopath_analysis", "milroi": "proto/milroi"}
# The packages whose files are scanned; `milroi` holds only the generated gRPC stubs.
SCANNED = ("core", "wsi", "results", "training", "serving", "viewer", "spatiopath_analysis")

# What each layer may import of milroi (itself included).
ALLOWED = {
    "core": frozenset({"core"}),
    "wsi": frozenset({"core", "wsi"}),
    "results": frozenset({"core", "wsi", "results"}),   # the scored slide's files and folder
    "training": frozenset({"core", "wsi", "results", "training"}),
    "serving": frozenset({"core", "wsi", "results", "serving", "milroi"}),
    # readers of results folders; the viewer scores live as a gRPC client (serving.client)
    "viewer": frozenset({"core", "wsi", "results", "serving", "viewer"}),
    "spatiopath_analysis": frozenset({"core", "wsi", "results", "spatiopath_analysis"}),
}

GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py")


@dataclass(frozen=True)
class Edge:
    """`source` imports `target` at `file`:`line`; `lazy` when the statement is inside a function
    or under `if TYPE_CHECKING:` (not run when `source` is imported)."""

    source: str
    target: str
    file: str
    line: int
    statement: str
    lazy: bool = False

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.source} -> {self.target}  ({self.statement})"


@dataclass
class ImportGraph:
    root: Path
    modules: dict[str, Path] = field(default_factory=dict)     # every known milroi module
    scanned: set[str] = field(default_factory=set)             # modules whose source was read
    edges: list[Edge] = field(default_factory=list)            # milroi-internal edges only
    external: list[Edge] = field(default_factory=list)         # edges to third-party/stdlib
    unresolved: list[Edge] = field(default_factory=list)       # milroi names that are no module

    def adjacency(self) -> dict[str, set[str]]:
        adj: dict[str, set[str]] = {m: set() for m in self.scanned}
        for e in self.edges:
            adj.setdefault(e.source, set()).add(e.target)
            adj.setdefault(e.target, set())
        return adj


def top(module: str) -> str:
    return module.partition(".")[0]


def _module_name(package: str, package_dir: Path, path: Path) -> str:
    parts = list(path.relative_to(package_dir).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def is_generated(path: Path) -> bool:
    return path.name.endswith(GENERATED_SUFFIXES)


def index_modules(root: Path, package_dirs: dict[str, str] = PACKAGE_DIRS) -> dict[str, Path]:
    """Every module of the packages (name -> file), generated stubs included (for resolution)."""
    modules: dict[str, Path] = {}
    for package, rel in package_dirs.items():
        package_dir = root / rel
        if not package_dir.is_dir():
            continue
        for path in sorted(package_dir.rglob("*.py")):
            if any(part.startswith(".") or part == "__pycache__"
                   for part in path.relative_to(package_dir).parts):
                continue
            modules[_module_name(package, package_dir, path)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def iter_imports(tree: ast.AST) -> Iterator[tuple[ast.AST, bool]]:
    """Every import node of a module with whether it is lazy (in a function or TYPE_CHECKING)."""
    def walk(node: ast.AST, lazy: bool) -> Iterator[tuple[ast.AST, bool]]:
        for child in ast.iter_child_nodes(node):
            child_lazy = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                    ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, lazy
            elif (isinstance(child, ast.Call) and _is_import_module_call(child)):
                yield child, lazy
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                        yield stmt, True
                    yield from walk(stmt, True)
                for stmt in child.orelse:
                    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                        yield stmt, lazy
                    yield from walk(stmt, lazy)
                continue
            yield from walk(child, child_lazy)
    yield from walk(tree, False)


def _is_import_module_call(call: ast.Call) -> bool:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return (name in ("import_module", "__import__") and bool(call.args)
            and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str))


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str | None:
    """The absolute name of `from .{level}name import ...` in `module` (None: beyond the top)."""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 >= len(parts):
        return None
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """`name` if it is a module, else its longest prefix that is one (`import a.b.attr`)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def build_graph(root: str | Path, package_dirs: dict[str, str] = PACKAGE_DIRS,
                scanned: Iterable[str] = SCANNED) -> ImportGraph:
    root = Path(root)
    graph = ImportGraph(root, modules=index_modules(root, package_dirs))
    internal = set(package_dirs)
    for module, path in sorted(graph.modules.items()):
        if top(module) not in scanned or is_generated(path):
            continue
        graph.scanned.add(module)
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node, lazy in iter_imports(tree):
            statement = ast.unparse(node)
            candidates: list[str] = []        # fully qualified names this statement imports
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.Call):
                candidates = [node.args[0].value]
            else:  # ImportFrom
                if node.level:
                    base = _resolve_relative(module, is_package, node.level, node.module)
                    if base is None:
                        graph.unresolved.append(Edge(module, "." * node.level + (node.module or ""),
                                                     rel, node.lineno, statement, lazy))
                        continue
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    candidates.append(sub if alias.name != "*" and sub in graph.modules else base)
            for name in dict.fromkeys(candidates):
                edge_args = (rel, node.lineno, statement, lazy)
                if top(name) not in internal:
                    graph.external.append(Edge(module, name, *edge_args))
                    continue
                if name in graph.modules:
                    target = name
                else:
                    # e.g. `from wsi.errors import X` with no wsi/errors.py: a dangling import;
                    # still an edge between layers, recorded against what does exist of it
                    graph.unresolved.append(Edge(module, name, *edge_args))
                    target = _resolve(name, graph.modules) or top(name)
                graph.edges.append(Edge(module, target, *edge_args))
    return graph


# -- the rules -------------------------------------------------------------------------------
def layer_violations(graph: ImportGraph, allowed: dict[str, frozenset[str]] = ALLOWED) -> list[Edge]:
    """Edges from a layer to a milroi package it may not import."""
    return [e for e in graph.edges
            if top(e.source) in allowed and top(e.target) not in allowed[top(e.source)]]


def strongly_connected_components(adj: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit); components in no particular order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(adj):
        if start in index:
            continue
        work = [(start, iter(sorted(adj[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(adj.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def import_cycles(graph: ImportGraph) -> list[list[Edge]]:
    """One concrete cycle (as its edges, with file:line) per strongly connected component of
    more than one module, and per module that imports itself."""
    adj = graph.adjacency()
    first_edge: dict[tuple[str, str], Edge] = {}
    for e in graph.edges:
        first_edge.setdefault((e.source, e.target), e)
    cycles: list[list[Edge]] = []
    for component in strongly_connected_components(adj):
        members = set(component)
        start = component[0]
        if len(component) == 1 and start not in adj.get(start, ()):
            continue
        # shortest path start -> ... -> start inside the component (BFS)
        parents: dict[str, str] = {}
        frontier, seen, found = [start], {start}, None
        while frontier and found is None:
            nxt = []
            for node in frontier:
                for child in sorted(adj[node]):
                    if child == start:
                        found = node
                        break
                    if child in members and child not in seen:
                        seen.add(child)
                        parents[child] = node
                        nxt.append(child)
                if found is not None:
                    break
            frontier = nxt
        path = [found]
        while path[-1] != start:
            path.append(parents[path[-1]])
        path.reverse()                        # start ... found
        path.append(start)
        cycles.append([first_edge[(a, b)] for a, b in zip(path, path[1:])])
    return cycles


def format_cycle(cycle: list[Edge]) -> str:
    chain = " -> ".join([cycle[0].source, *(e.target for e in cycle)])
    return "cycle " + chain + "\n" + "\n".join(f"    {e}" for e in cycle)


def module_level_third_party(graph: ImportGraph, package: str,
                             allowed_top: frozenset[str] = frozenset({"numpy"})) -> list[Edge]:
    """Non-lazy imports of `package` that are neither stdlib, milroi, nor in `allowed_top`."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    return [e for e in graph.external
            if top(e.source) == package and not e.lazy
            and top(e.target) not in stdlib and top(e.target) not in allowed_top]


def command_tables(graph: ImportGraph, table: str = "COMMANDS") -> list[Edge]:
    """The modules named in the sub-command tables (`COMMANDS = {"x": ("pkg.mod", "help")}`) of
    the scanned modules, as edges: core.cli.dispatch imports them by name (importlib)."""
    found: list[Edge] = []
    for module in sorted(graph.scanned):
        path = graph.modules[module]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, ast.AnnAssign) else [])
            if not any(isinstance(t, ast.Name) and t.id == table for t in targets):
                continue
            if not isinstance(node.value, ast.Dict):
                continue
            for value in node.value.values:
                if (isinstance(value, ast.Tuple) and value.elts and isinstance(value.elts[0], ast.Constant)
                        and isinstance(value.elts[0].value, str)):
                    found.append(Edge(module, value.elts[0].value, path.relative_to(graph.root).as_posix(),
                                      value.lineno, ast.unparse(value), lazy=True))
    return found


# -- names imported from milroi modules ------------------------------------------------------
def defined_names(tree: ast.Module) -> set[str] | None:
    """The names a module defines at its top level (through if/try/with/for blocks too), or
    None when that cannot be known from the source (`import *`, a module `__getattr__`)."""
    names: set[str] = set()

    def targets(node: ast.AST) -> Iterator[str]:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                yield sub.id

    def visit(body: list[ast.stmt]) -> bool:
        for stmt in body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if stmt.name == "__getattr__":
                    return False
                names.add(stmt.name)
            elif isinstance(stmt, ast.Import):
                names.update(a.asname or a.name.partition(".")[0] for a in stmt.names)
            elif isinstance(stmt, ast.ImportFrom):
                if any(a.name == "*" for a in stmt.names):
                    return False
                names.update(a.asname or a.name for a in stmt.names)
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for target in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]):
                    names.update(targets(target))
            elif isinstance(stmt, (ast.For, ast.AsyncFor, ast.With, ast.AsyncWith)):
                for target in ([stmt.target] if isinstance(stmt, (ast.For, ast.AsyncFor))
                               else [i.optional_vars for i in stmt.items if i.optional_vars]):
                    names.update(targets(target))
            if isinstance(stmt, (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With,
                                 ast.AsyncWith, ast.Try)) or type(stmt).__name__ == "TryStar":
                for block in ("body", "orelse", "finalbody"):
                    if not visit(getattr(stmt, block, [])):
                        return False
                for handler in getattr(stmt, "handlers", []):
                    if handler.name:
                        names.add(handler.name)
                    if not visit(handler.body):
                        return False
        return True

    return names if visit(tree.body) else None


@dataclass(frozen=True)
class MissingName:
    edge: Edge
    name: str

    def __str__(self) -> str:
        return (f"{self.edge.file}:{self.edge.line}: {self.edge.target} has no {self.name!r}  "
                f"({self.edge.statement})")


def missing_names(graph: ImportGraph) -> list[MissingName]:
    """`from X import name` of a milroi module X that defines no `name` (nor has a submodule
    of that name): an ImportError when the statement runs."""
    cache: dict[str, set[str] | None] = {}
    missing: list[MissingName] = []
    for module in sorted(graph.scanned):
        path = graph.modules[module]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        for node, lazy in iter_imports(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                    else node.module)
            if base is None or base not in graph.modules:
                continue                    # dangling module: graph.unresolved reports it
            if base not in cache:
                cache[base] = defined_names(ast.parse(graph.modules[base].read_text(encoding="utf-8")))
            defined = cache[base]
            if defined is None:
                continue
            for alias in node.names:
                if alias.name == "*" or alias.name in defined or f"{base}.{alias.name}" in graph.modules:
                    continue
                edge = Edge(module, base, path.relative_to(graph.root).as_posix(), node.lineno,
                            ast.unparse(node), lazy)
                missing.append(MissingName(edge, alias.name))
    return missing
