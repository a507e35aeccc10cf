"""`milroi-serve`: score slides with an exported bundle, as a gRPC server or a batch job."""
from __future__ import annotations

from core.cli import dispatch

COMMANDS = {
    "serve": ("serving.server", "gRPC server streaming per-patch tumour scores"),
    "score": ("serving.batch", "score every slide of a folder (in process or through a server)"),
    "client": ("serving.client", "score one slide through a running server"),
    # the two below live beside serving/ (viewer/, spatiopath_analysis/): they read results
    # folders and, for live scoring, call a server as any client does
    "spatiopath": ("spatiopath_analysis.command",
                   "analyse scored slides' tumour ROIs and cells with Spatiopath"),
    "view": ("viewer.app", "slide viewer in the browser: heatmap, ROIs, live scoring"),
}


def main(argv=None) -> int:
    return dispatch("milroi-serve", __doc__.strip(), COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
