"""What a scored slide leaves behind, and the folder that holds it: one owner for both.

layout.py   the results folder: file names (`OUTPUT_SUFFIXES`), summary.csv (`write_summary`,
            `read_summary`), done markers, clean-up after a killed job; the colour map
outputs.py  the files of one scored slide: patch CSV, QuPath GeoJSON, heatmap PNG, Spatiopath
            JSON, and the ROI polygons they share

`results` imports only `core` and `wsi`, and every other package reads or writes a results
folder through it: the batch job (`serving.batch`), the viewer (`viewer`), the
Spatiopath analysis (`spatiopath_analysis.command`), evaluation plots (`training`). No name of the folder
is declared anywhere else (tests/architecture/test_results_names.py).
"""
