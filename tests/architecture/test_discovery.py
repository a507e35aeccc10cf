"""What counts as a slide in a folder (wsi.discovery), and how open_slide treats folders.

One tree in tmp_path holds every case discovery must tell apart: a real Aperio slide (copied
from tests/data), one without an extension (found by its content), a damaged file with a slide
extension (a slide: opening it is what reports the damage), a text file (skipped), hidden files
and folders (ignored), an output folder (excluded) and a DICOM WSI folder, whose .dcm files
are ONE slide named by the folder.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from core.errors import ConfigError, MilroiError, SlideError
from wsi.discovery import dicom_files, find_slide, find_slides, slide_name
from wsi.slide import open_slide

DATA = Path(__file__).resolve().parents[1] / "data"
SVS = DATA / "CMU-1-Small-Region.svs"

# The DICOM file preamble (PS3.10 7.1): 128 bytes, then "DICM", then the file meta elements.
# pydicom is not a dependency of milroi; discovery goes by the .dcm extension, so the preamble
# and a truncated (0002,0000) group-length element are enough for a file that is "a DICOM file
# OpenSlide cannot read".
DICOM_PREAMBLE = b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00"
DICOM_FILES = ("level0.dcm", "level1.dcm", "label.dcm")


def write_fake_dicom_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, name in enumerate(DICOM_FILES):
        (folder / name).write_bytes(DICOM_PREAMBLE + bytes([i]) * 16)
    return folder


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "slides"
    (root / "aperio").mkdir(parents=True)
    shutil.copy(SVS, root / "aperio" / SVS.name)
    shutil.copy(SVS, root / "aperio" / "no_extension")          # found by OpenSlide's detect
    (root / "junk.tif").write_bytes(b"not a tiff at all" * 10)     # slide extension: a slide
    (root / "notes.txt").write_text("case notes, not a slide\n")  # skipped
    (root / "README").write_text("no extension, not a slide\n")   # skipped (detect says no)
    (root / ".partial.svs").write_bytes(b"half written")          # hidden: ignored
    (root / ".cache").mkdir()
    shutil.copy(SVS, root / ".cache" / "copy.svs")                 # in a hidden folder: ignored
    (root / "out" / "CMU-1-Small-Region").mkdir(parents=True)      # an output folder: excluded
    (root / "out" / "CMU-1-Small-Region" / "heatmap.tif").write_bytes(b"II*\0")
    (root / "out" / "summary.csv").write_text("slide,status\n")
    write_fake_dicom_folder(root / "dicom_slide")
    return root


def rel(paths, root):
    return sorted(p.relative_to(root).as_posix() for p in paths)


def test_find_slides_tells_every_case_apart(tree):
    found = find_slides(tree, exclude=tree / "out")
    assert rel(found.slides, tree) == ["aperio/CMU-1-Small-Region.svs", "aperio/no_extension",
                                       "dicom_slide", "junk.tif"]
    assert found.slides == sorted(found.slides)
    assert rel(found.skipped, tree) == ["README", "notes.txt"]


def test_excluded_folder_is_searched_without_exclude(tree):
    found = find_slides(tree)
    assert "out/CMU-1-Small-Region/heatmap.tif" in rel(found.slides, tree)
    assert "out/summary.csv" in rel(found.skipped, tree)
    # hidden files stay out either way
    assert not any(part.startswith(".") for p in found.slides + found.skipped
                   for part in p.relative_to(tree).parts)


def test_dicom_folder_is_one_slide_named_by_the_folder(tree):
    folder = tree / "dicom_slide"
    slides = find_slides(tree, exclude=tree / "out").slides
    dicom = [p for p in slides if folder == p or folder in p.parents]
    assert dicom == [folder]                         # the folder, not one slide per .dcm file
    assert slide_name(folder) == "dicom_slide"
    assert find_slide(tree, "dicom_slide") == folder
    assert [p.name for p in dicom_files(folder)] == sorted(DICOM_FILES)


def test_dicom_folder_alone(tmp_path):
    folder = write_fake_dicom_folder(tmp_path / "dicom_slide")
    found = find_slides(folder)
    # searched itself, the folder is the slide (its files are not separate slides)
    assert found.slides == [folder] and found.skipped == []


def test_slide_names_and_lookup(tree):
    assert slide_name(tree / "aperio" / SVS.name) == "CMU-1-Small-Region"
    assert slide_name(tree / "junk.tif") == "junk"
    assert find_slide(tree, "CMU-1-Small-Region") == tree / "aperio" / SVS.name
    assert find_slide(tree, "junk") == tree / "junk.tif"
    assert find_slide(tree, "notes") is None                      # skipped files are no slides
    assert find_slide(tree, "partial") is None and find_slide(tree, ".partial") is None
    assert find_slide(tree, "nothing") is None


def test_find_slides_of_a_missing_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        find_slides(tmp_path / "absent")
    (tmp_path / "file.svs").write_bytes(b"x")
    with pytest.raises(ConfigError, match="is not a directory"):
        find_slides(tmp_path / "file.svs")


def test_open_slide_on_a_fake_dicom_folder_names_the_folder(tree):
    folder = tree / "dicom_slide"
    with pytest.raises(SlideError) as info:
        open_slide(folder)
    err = info.value
    assert err.path == str(folder)
    assert str(err).startswith(f"cannot read slide {folder}: ")
    assert "is a directory" not in str(err)       # opened as a DICOM series, and refused as one


def test_open_slide_on_an_empty_folder_is_a_directory_error(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(SlideError, match="is a directory") as info:
        open_slide(folder)
    assert info.value.path == str(folder)
    assert isinstance(info.value, MilroiError)


def test_discovered_real_slides_open(tree):
    # the two found by extension and by content are the same real slide
    for path in (tree / "aperio" / SVS.name, tree / "aperio" / "no_extension"):
        with open_slide(path) as slide:
            assert slide.dimensions == (2220, 2967)
    with pytest.raises(SlideError, match="junk.tif"):
        open_slide(tree / "junk.tif")
