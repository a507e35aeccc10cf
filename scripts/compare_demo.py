"""Compare the result files of two `make demo` runs (e.g. before and after a refactor).

    python scripts/compare_demo.py BEFORE_OUT AFTER_OUT [--added-field NAME ...]
                                   [--added-file SUFFIX ...]

Every file of scores/ and hard_scores/ is compared: summary.csv row by row and the JSON files
key by key (the GeoJSON too, and its collection's `properties`), leaving out what differs between
any two runs (`seconds`; `path`, which names the demo folder) and the fields a change adds
(--added-field, repeatable); every other file (patch CSV, heatmap PNG, scores npz) byte for
byte. Files only AFTER has are listed; those whose name
ends with an --added-file suffix (a file kind the change adds) are not a difference. Exit status
1 when anything else differs.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results.layout import SUMMARY_NAME  # noqa: E402 - after the checkout is on the path

VARYING = {"seconds", "path"}   # a run's timing, and the demo folder's own name


def same(a: Path, b: Path, ignored: set[str]) -> bool:
    if a.name == SUMMARY_NAME:
        def rows(path):
            with open(path, newline="") as f:
                return [{k: v for k, v in r.items() if k not in ignored} for r in csv.DictReader(f)]
        return rows(a) == rows(b)
    if a.suffix in (".json", ".geojson"):
        def document(path):
            d = json.loads(path.read_text())
            if not isinstance(d, dict):
                return d
            d = {k: v for k, v in d.items() if k not in ignored}
            if isinstance(d.get("properties"), dict):   # a GeoJSON collection's own properties
                d["properties"] = {k: v for k, v in d["properties"].items() if k not in ignored}
            return d
        return document(a) == document(b)
    return a.read_bytes() == b.read_bytes()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--added-field", action="append", default=[],
                        help="a JSON key or CSV column the change adds (left out)")
    parser.add_argument("--added-file", action="append", default=[],
                        help="the name suffix of a file kind the change adds (e.g. _scores.npz)")
    args = parser.parse_args(argv)
    added = tuple(args.added_file)
    ignored = VARYING | set(args.added_field)
    equal, problems = 0, []
    for sub in ("scores", "hard_scores"):
        files = [{p.relative_to(root / sub) for p in (root / sub).rglob("*") if p.is_file()}
                 for root in (args.before, args.after)]
        new = {p for p in files[1] - files[0] if added and p.name.endswith(added)}
        if new:
            print(f"{sub}: {len(new)} added file(s) ({', '.join(added)})")
        if files[0] != files[1] - new:
            problems.append(f"{sub}: only in one run: {sorted(files[0] ^ (files[1] - new))}")
        for rel in sorted(files[0] & files[1]):
            if same(args.before / sub / rel, args.after / sub / rel, ignored):
                equal += 1
            else:
                problems.append(f"{sub}/{rel} differs")
    print(f"{equal} files equal, {len(problems)} difference(s)")
    for line in problems:
        print(f"  {line}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
