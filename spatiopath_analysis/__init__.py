"""`milroi-serve spatiopath`: Spatiopath's spatial statistics on the tumour ROIs of scored slides.

windows.py  the analysis windows: each slide's ROIs (its `<slide>_spatiopath.json`) with a
            margin of the analysis zone, clipped to the tissue, at a working resolution
command.py  the command: scored slides (a results folder) + cells -> per-window Spatiopath
            results, pooled per slide, and a summary.csv

It reads results folders through `results`, cell files through `wsi.cells`, and imports nothing
of the scoring stack (no engine, no server): the optional `spatiopath` package (GPL-3.0) is its
only extra.
"""
