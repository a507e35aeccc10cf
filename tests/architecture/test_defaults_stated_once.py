"""Each shared default is stated once: the tile size, the minimum tissue fraction, the pixel size,
the decision thresholds and the MLflow tracking URI live in core/ and are referenced everywhere
else, so two copies can never drift apart again.

Read from the source with `ast` (docstrings and comments do not count):
- the literals 224 (tile size), 0.243 (Camelyon16 um/px) and "sqlite:///mlflow.db" appear only
  in the module that owns them;
- a function parameter or an argparse `--flag` named for one of these settings never has a
  literal default: it is None ("the model's", "resolve later") or a name imported from its owner.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "wsi", "training", "serving")

# (type, value) -> the module that states it (typed: 224.0 or a "224" string is another thing)
OWNED_LITERALS = {(int, 224): "core/tiling.py", (float, 0.243): "core/tiling.py",
                  (str, "sqlite:///mlflow.db"): "core/tracking.py"}
# A published model's own input size is a fact of that model, not milroi's default: the encoder
# registry states its ViTs' pretraining crop once (training.encoders.VIT_INPUT_PX).
MODEL_FACTS = {("training/encoders.py", 224): 1}
# Parameters (function arguments and argparse destinations) that carry a shared default.
SHARED_SETTINGS = {"tile_size", "min_tissue", "threshold", "slide_threshold", "roi_threshold",
                   "tracking_uri",
                   "fallback_mpp", "target_mpp"}
# The modules where those defaults are stated.
OWNERS = {"core/tiling.py", "core/bundle.py", "core/tracking.py"}


def _sources() -> list[Path]:
    return [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]


def _literal(node: ast.expr | None) -> bool:
    """A number or string written out (not None, not a name or attribute)."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return isinstance(node, ast.Constant) and node.value is not None \
        and not isinstance(node.value, bool)


def literal_copies(tree: ast.AST, rel: str) -> list[str]:
    found = []
    allowed = dict(MODEL_FACTS)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            owner = OWNED_LITERALS.get((type(node.value), node.value))
            if owner is not None and owner != rel:
                if allowed.get((rel, node.value), 0) > 0:   # the one statement of a model fact
                    allowed[(rel, node.value)] -= 1
                    continue
                found.append(f"{rel}:{node.lineno}: literal {node.value!r} (stated in {owner})")
    return found


def literal_defaults(tree: ast.AST, rel: str) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = [*args.posonlyargs, *args.args]
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            for arg, default in pairs:
                if arg.arg in SHARED_SETTINGS and _literal(default):
                    found.append(f"{rel}:{default.lineno}: {node.name}({arg.arg}="
                                 f"{ast.unparse(default)})")
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            # dataclass fields of a class other than the owner's
            if node.target.id in SHARED_SETTINGS and _literal(node.value):
                found.append(f"{rel}:{node.lineno}: field {node.target.id} = "
                             f"{ast.unparse(node.value)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "add_argument"):
            flags = [a.value for a in node.args if isinstance(a, ast.Constant)
                     and isinstance(a.value, str) and a.value.startswith("--")]
            dest = next((k.value.value for k in node.keywords if k.arg == "dest"), None)
            names = {f[2:].replace("-", "_") for f in flags} | ({dest} if dest else set())
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            if names & SHARED_SETTINGS and _literal(default):
                found.append(f"{rel}:{node.lineno}: {'/'.join(flags)} default="
                             f"{ast.unparse(default)}")
    return found


def scan(files: list[Path], root: Path) -> list[str]:
    problems = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        problems += literal_copies(tree, rel)
        if rel not in OWNERS:
            problems += literal_defaults(tree, rel)
    return problems


def test_shared_defaults_are_stated_once():
    problems = scan(_sources(), ROOT)
    assert not problems, "defaults stated outside their owner:\n" + "\n".join(problems)


def test_the_scan_finds_planted_copies(tmp_path):
    """The checker itself: each kind of copy in a planted tree is reported."""
    (tmp_path / "serving").mkdir()
    planted = tmp_path / "serving" / "copy.py"
    planted.write_text('''"""A docstring may say 224 and sqlite:///mlflow.db."""
import argparse

TILE = 224


def score(slide, min_tissue=0.25, *, roi_threshold=0.5, tracking_uri=None):
    return slide


def configure(parser: argparse.ArgumentParser):
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--min-tissue", type=float, default=None)
''')
    problems = scan([planted], tmp_path)
    assert any("copy.py:4: literal 224" in p for p in problems)
    assert any("score(min_tissue=0.25)" in p for p in problems)
    assert any("score(roi_threshold=0.5)" in p for p in problems)
    assert any("--tile-size default=224" in p for p in problems)
    assert any("--tracking-uri default='sqlite:///mlflow.db'" in p for p in problems)
    assert not any("tracking_uri=None" in p or "--min-tissue" in p for p in problems)
    assert not any(":1:" in p for p in problems)   # the docstring does not count


@pytest.mark.parametrize("rel", sorted(OWNERS))
def test_owners_exist(rel):
    assert (ROOT / rel).is_file()
