"""What counts as a slide in a folder: one answer for `features`, `fit`, `score` and `camelyon16`.

A slide is
- a file with the extension of a format OpenSlide reads (`SLIDE_SUFFIXES`), even when it turns out
  to be damaged: opening it then gives a SlideError that the command reports and counts, rather
  than a slide skipped without a word;
- any other file whose content OpenSlide recognises (`OpenSlide.detect_format`);
- a DICOM WSI folder: the `.dcm` files of one series (one per pyramid level, plus label and
  overview images) are one slide, named by their folder, never one slide per file.

Hidden files and folders (a leading dot: partial writes, editor files) are never slides, and
an output folder inside the searched one can be left out (`exclude`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import ConfigError

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs",
                            ".svslide", ".bif", ".dcm", ".czi"})
DICOM_SUFFIX = ".dcm"


@dataclass
class Discovery:
    """The slides under a folder (sorted) and the files that are not slides."""

    slides: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


def slide_name(path: str | os.PathLike) -> str:
    """The name of a slide: its file name without the extension, or its DICOM folder's name."""
    path = Path(path)
    return path.name if path.is_dir() else path.stem


def _detected_format(path: Path) -> str | None:
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - an unreadable file is not something we can call a slide
        return None


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def find_slides(root: str | os.PathLike, exclude: str | os.PathLike | None = None) -> Discovery:
    """Every slide under `root`, recursively, sorted; files under `exclude` are left out."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"slide folder {root} is not a directory")
    excluded = Path(exclude).resolve() if exclude is not None else None
    found = Discovery()
    dicom_folders: set[Path] = set()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if _hidden(path, root):
            continue
        if excluded is not None and (path.resolve() == excluded or excluded in path.resolve().parents):
            continue
        suffix = path.suffix.lower()
        detected = None if suffix in SLIDE_SUFFIXES else _detected_format(path)
        if suffix == DICOM_SUFFIX or detected == "dicom":
            dicom_folders.add(path.parent)
        elif suffix in SLIDE_SUFFIXES or detected:
            found.slides.append(path)
        else:
            found.skipped.append(path)
    found.slides = sorted(found.slides + sorted(dicom_folders))
    return found


def find_slide(root: str | os.PathLike, name: str) -> Path | None:
    """The slide called `name` (`slide_name`) under `root`, if there is one."""
    return next((p for p in find_slides(root).slides if slide_name(p) == name), None)


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files of a DICOM WSI folder, sorted (empty when it holds none)."""
    folder = Path(folder)
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    return [p for p in files
            if p.suffix.lower() == DICOM_SUFFIX or _detected_format(p) == "dicom"]
