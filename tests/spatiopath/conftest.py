"""Fixtures of the Spatiopath tests: small synthetic slides (wsi.synth) whose result files are
written by milroi's own writer (`results.outputs.write_slide_outputs`, the code `milroi-serve score`
runs) and the cells of the nuclei drawn on them (`wsi.synth.write_synthetic_cells`).

The fast tests take the tile scores from the drawn tumour (each tile's tumour fraction): the
ROIs are then where the tumour is, so a cell pattern placed around the tumour is one around the
ROIs. The slow test scores a slide with a real model instead (test_spatiopath_scored.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest

SIZE = (2048, 2048)        # 0.5 mm square, ~90 tissue tiles, a tumour nest of ~90 um radius
ANALYSIS_ZONE_UM = 100.0   # a margin of ~410 px: one window of < 2048 px, seconds of engine
BAND_UM = 50.0             # synthetic immune cells: enriched in / excluded from this band


def write_oracle_scores(slide_path: Path, truth, out: Path) -> Path:
    """What `milroi-serve score` writes into OUT/<slide>/ for this slide (done.json included),
    with each tile's drawn tumour fraction as its score."""
    import json

    from results.outputs import write_slide_outputs
    from wsi.annotations import tile_tumor_fraction
    from wsi.grid import tiles_for_slide
    from wsi.slide import open_slide

    with open_slide(slide_path) as slide:
        _, grid = tiles_for_slide(slide)
        scores = tile_tumor_fraction(truth.region, grid.coords, grid.tile_size)
        folder = out / slide.name
        write_slide_outputs(folder, slide, grid.coords, scores, grid.tile_size, 0.5)
    (folder / "done.json").write_text(json.dumps({"slide": slide.name, "status": "ok",
                                                  "path": str(slide_path)}))
    return folder


@pytest.fixture(scope="session")
def scored(tmp_path_factory):
    """A tumour slide and a normal slide, scored (oracle) into SCORES/, and their truths."""
    from wsi.synth import write_synthetic_slide

    root = tmp_path_factory.mktemp("spatiopath")
    slides, scores = root / "slides", root / "scores"
    slides.mkdir()
    truths = {"tumor_a": write_synthetic_slide(slides / "tumor_a.tif", *SIZE, seed=21, tumor=True),
              "normal_a": write_synthetic_slide(slides / "normal_a.tif", *SIZE, seed=22, tumor=False)}
    for name, truth in truths.items():
        write_oracle_scores(slides / f"{name}.tif", truth, scores)
    return {"root": root, "slides": slides, "scores": scores, "truths": truths}
