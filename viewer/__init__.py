"""`milroi-serve view`: a slide viewer in the browser for scored slides (heatmap, ROIs, live scores).

app.py      the Starlette app and the command
access.py   who may reach it (Host allowlist, optional token) and what its pages may do (CSP)
results.py  SCORES_DIR read for the pages: summary rows, patch tables, heatmap images, files
            (summary.csv and slide lookups once per version of the summary)
tiles.py    deep-zoom tiles from OpenSlide's DeepZoomGenerator, with a bounded cache (a handle
            that failed a read is reopened)
live.py     live scoring: ScoreSlide over gRPC, forwarded to the page as server-sent events
static/     the pages, their script and style, and OpenSeadragon (vendored from npm)
"""
