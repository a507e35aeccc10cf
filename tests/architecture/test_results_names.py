"""The results folder has one owner: no name of it (summary.csv, done.json, the output files'
suffixes) is declared outside `results.layout`. Asserted on the source (ast: string constants,
f-string parts; docstrings and prose are not declarations), and the checker is tested on a
planted file so that the rule cannot pass vacuously."""
from __future__ import annotations

import ast
from pathlib import Path

from results.layout import DONE_MARKER, OUTPUT_SUFFIXES, SUMMARY_NAME

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "wsi", "results", "training", "serving", "benchmarks", "scripts")
OWNER = REPO / "results" / "layout.py"
# A constant equal to one of these declares a name of the folder; so does an f-string that
# builds a file name ending in one. ".geojson" alone is also the extension of QuPath cell
# files that `milroi-serve spatiopath` reads, so only f-string file names count for it.
EXACT = {SUMMARY_NAME, DONE_MARKER} | {s for s in OUTPUT_SUFFIXES.values() if s != ".geojson"}
ENDINGS = {SUMMARY_NAME, DONE_MARKER, *OUTPUT_SUFFIXES.values()}


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def declarations(path: Path) -> list[tuple[int, str]]:
    """(line, text) of each string in `path` that declares a name of the results folder."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _docstrings(tree)
    in_fstring = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr)
                  for part in node.values}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in skip:
            continue
        text = node.value
        if text in EXACT or (id(node) in in_fstring and text.endswith(tuple(ENDINGS))):
            found.append((node.lineno, node.col_offset, text))
    return [(line, text) for line, _, text in sorted(found)]


def scan(root: Path, packages=PACKAGES, owner: Path = OWNER) -> list[str]:
    found = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if path == owner or "__pycache__" in path.parts:
                continue
            found += [f"{path.relative_to(root)}:{line}: {text!r}" for line, text in declarations(path)]
    return found


def test_no_name_of_the_results_folder_is_declared_twice():
    found = scan(REPO)
    assert not found, ("names of the results folder belong to results.layout (import them from "
                       "there):\n" + "\n".join(found))


def test_the_checker_finds_planted_names(tmp_path):
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "planted.py").write_text(
        '"""Writes OUT/summary.csv and <slide>_patches.csv (prose: fine)."""\n'
        'SUMMARY = "summary.csv"\n'
        'def f(out, name):\n'
        '    help_text = "the folder with summary.csv in it"\n'
        '    return out / f"{name}_patches.csv", out / f"{name}.geojson", "done.json"\n')
    found = scan(tmp_path, packages=("serving",), owner=tmp_path / "none.py")
    assert found == ["serving/planted.py:2: 'summary.csv'", "serving/planted.py:5: '_patches.csv'",
                     "serving/planted.py:5: '.geojson'", "serving/planted.py:5: 'done.json'"]
