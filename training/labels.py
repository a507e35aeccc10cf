"""Slide labels: the Camelyon16 `reference.csv` format (`name,Tumor|Normal[,...]`, optional
header) and plain lists of slide names (one per line, or the first CSV column)."""
from __future__ import annotations

import csv
from pathlib import Path

from core.errors import ConfigError

_POSITIVE = {"tumor", "tumour", "1", "positive", "true"}
_NEGATIVE = {"normal", "0", "negative", "false"}


def read_labels(path: str | Path) -> dict[str, int]:
    """Slide name -> 1 (tumour) / 0 (normal) from a Camelyon16-style reference CSV."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"labels file {path} does not exist")
    labels: dict[str, int] = {}
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or not row[0].strip():
                continue
            name, value = row[0].strip(), (row[1].strip().lower() if len(row) > 1 else "")
            if lineno == 1 and value not in _POSITIVE | _NEGATIVE:
                continue  # header line
            if value not in _POSITIVE | _NEGATIVE:
                raise ConfigError(f"labels file {path}, line {lineno}: label {row[1:2]} is neither "
                                  "Tumor nor Normal")
            labels[Path(name).stem] = int(value in _POSITIVE)
    if not labels:
        raise ConfigError(f"labels file {path} lists no slides")
    return labels



def read_slide_names(path: str | None) -> list[str]:
    if not path:
        return []
    if not Path(path).is_file():
        raise ConfigError(f"test slides file {path} does not exist")
    with open(path, newline="") as f:
        return [row[0].strip() for row in csv.reader(f) if row and row[0].strip()]


