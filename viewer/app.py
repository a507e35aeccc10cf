"""`milroi-serve view SCORES_DIR --slides SLIDES_DIR`: the results of `milroi-serve score` in a browser.

    milroi-serve view demo_out/scores --slides demo_out/heldout [--server 127.0.0.1:50077]
                      [--host 127.0.0.1] [--port 8080]

A Starlette app on uvicorn, bound to 127.0.0.1 unless told otherwise. Pages: the slide list
(summary.csv) and one page per slide (OpenSeadragon deep zoom, heatmap, ROIs, hover scores,
downloads, live scoring through --server). Everything the pages need is in this package
(static/, OpenSeadragon vendored from npm by scripts/vendor_openseadragon.sh): no CDN, it works
offline. Slide keys in URLs pass `serving.security.SlideRoots`, as gRPC slide paths do:
`..`, absolute paths and symlinks leading out are 403, an unknown slide is 404. What a page sees
of an error names files relative to SCORES_DIR or the slide folder, never where they lie on this
machine (`ScoresDir.wire_message`); only the log has the full path. Who may reach the viewer
(Host allowlist, optional token) and what its pages may do (CSP): `access`.
"""
from __future__ import annotations

import argparse
import contextlib
import html
import json
import logging
import math
import os
from pathlib import Path
from urllib.parse import quote

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from core.errors import ConfigError, MilroiError, PathDenied, SlideError, SlideNotFound
from serving.client import ScoringClient, add_connection_arguments, client_from_args
from serving.security import read_token
from viewer import access
from viewer.live import LiveScoring
from viewer.results import ScoresDir, heatmap_rgba, legend_stops, png_bytes
from viewer.tiles import TileSource

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
# Patches per live message: small, so the first scores (the server scores a slide's first 8
# tiles alone, serving.pipeline.FIRST_BATCH_TILES) are painted as soon as they exist.
LIVE_CHUNK_SIZE = 8
DOWNLOAD_TYPES = {"csv": "text/csv", "geojson": "application/geo+json",
                  "spatiopath": "application/json", "heatmap": "image/png",
                  "scores": "application/octet-stream"}


class _RevalidatedStaticFiles(StaticFiles):
    """The pages' files, revalidated on each load (ETag -> 304): a new milroi's pages are never
    mixed with the browser's cached copies of the old ones."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def _status(exc: MilroiError) -> int:
    if isinstance(exc, PathDenied):
        return 403
    if isinstance(exc, SlideNotFound):
        return 404
    return 400


async def _milroi_error(request: Request, exc: MilroiError) -> Response:
    """PathDenied -> 403, SlideNotFound -> 404, other milroi errors -> 400; JSON for the API,
    a small page for a browser; paths as the browser named them (the log has the full ones)."""
    status = _status(exc)
    log.info("%s %s: %s: %s", request.method, request.url.path, status, exc)
    message = request.app.state.scores.wire_message(str(exc))
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message, "type": type(exc).__name__}, status)
    title = {403: "Forbidden", 404: "Not found"}.get(status, "Bad request")
    return HTMLResponse(f"<!doctype html><title>{status} {title}</title>"
                        f"<link rel=stylesheet href=/static/viewer.css><main class=errorpage>"
                        f"<h1>{status} {title}</h1><p class=error>{html.escape(message)}</p>"
                        f"<p><a href='/'>slide list</a></main>", status)


def header_safe(message: str, limit: int = 500) -> str:
    """`message` as an HTTP header value: printable ASCII kept, anything else (a Japanese slide
    name, a newline) percent-encoded as UTF-8, so that `decodeURIComponent` gives it back."""
    return quote(message[:limit], safe=" !\"#$&'()*+,-./:;<=>?@[]^_`{|}~")


def parse_threshold(text: str) -> float:
    """The heatmap's threshold: a number in [0, 1] (nan, inf and values outside are refused)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:   # False for nan
        raise ConfigError(f"threshold must be a number in [0, 1], got {text[:40]!r}")
    return value


def create_app(scores_dir: Path, slide_dirs: list[Path], client: ScoringClient | None = None,
               cache_bytes: int | None = None, chunk_size: int = 0,
               allowed_hosts: list[str] | None = None, token: str | None = None) -> Starlette:
    """The app over SCORES_DIR and its slide folders; with `client` (a milroi server), live
    scoring. `allowed_hosts`: the Host names it answers (default: loopback); `token`: the
    token every request needs (default: none)."""
    scores = ScoresDir(scores_dir, slide_dirs)
    tiles = TileSource(**({} if cache_bytes is None else {"cache_bytes": cache_bytes}))
    # Tile rendering gets as many threads as there are cores: more would only queue on the GIL
    # and slow the page's other requests (measured: benchmarks/bench_viewer.py).
    render_slots = anyio.CapacityLimiter(max(2, min(8, os.cpu_count() or 2)))
    live = LiveScoring(client, chunk_size=chunk_size) if client is not None else None

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def slide_page(request: Request) -> Response:
        await run_in_threadpool(scores.row, request.path_params["key"])   # 403 / 404 first
        return FileResponse(STATIC / "slide.html", headers={"Cache-Control": "no-cache"})

    async def summary(request: Request) -> Response:
        rows = await run_in_threadpool(scores.summary)
        # the folder's name only: the page never sees where it lies on this machine
        return JSONResponse({"rows": rows, "live": live is not None, "scores_dir": scores.path.name})

    def slide_info(key: str) -> dict:
        row = scores.row(key)
        info = {"key": key, "row": row, "live": live is not None, "legend": legend_stops(),
                "downloads": {}, "slide_error": "", "deepzoom": None, "rois": [],
                "tile_size": None, "mpp": None}
        for kind in DOWNLOAD_TYPES:
            try:
                scores.output(key, kind)
                info["downloads"][kind] = f"/download/{kind}/{key}"
            except SlideNotFound:
                pass
        try:
            path = scores.slide_file(key)
            dz = tiles.info(path)
            info["deepzoom"] = {"width": dz.width, "height": dz.height, "tile_size": dz.tile_size,
                                "overlap": dz.overlap, "levels": dz.levels}
            info["mpp"] = dz.mpp
            info["slide_error"] = tiles.probe(path)
        except (SlideError, SlideNotFound) as exc:
            info["slide_error"] = str(exc)
        if info["slide_error"]:
            log.info("slide %r: %s", key, info["slide_error"])
            info["slide_error"] = scores.wire_message(info["slide_error"])
        if "spatiopath" in info["downloads"]:
            document = json.loads(scores.output(key, "spatiopath").read_text())
            info["rois"] = document.get("polygons", [])
            info["tile_size"] = document.get("tile_size")
            info["mpp"] = info["mpp"] or document.get("pixel_size_um", {}).get("mpp")
            if info["deepzoom"] is None and document.get("dimensions"):
                w, h = document["dimensions"]
                info["deepzoom"] = {"width": w, "height": h, "tile_size": 254, "overlap": 1,
                                    "levels": 0}
        return info

    async def slide_api(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(slide_info, request.path_params["key"]))

    async def scores_api(request: Request) -> Response:
        loaded = await run_in_threadpool(scores.tile_scores, request.path_params["key"])
        body = await run_in_threadpool(lambda: loaded.json)   # encoded once per table
        return Response(body, media_type="application/json")

    def heatmap_png(key: str, threshold: float) -> bytes:
        table = scores.tile_scores(key).table
        path = scores.slide_file(key)
        try:
            dims = tiles.info(path)
            dimensions = (dims.width, dims.height)
        except SlideError:   # the slide is unreadable now: the grid spans the scored tiles
            dimensions = (int(table.coords[:, 0].max(initial=0)) + table.tile_size,
                          int(table.coords[:, 1].max(initial=0)) + table.tile_size)
        return png_bytes(heatmap_rgba(table, dimensions, threshold))

    async def heatmap_api(request: Request) -> Response:
        threshold = parse_threshold(request.query_params.get("threshold", "0"))
        data = await run_in_threadpool(heatmap_png, request.path_params["key"], threshold)
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-cache"})

    async def tile_api(request: Request) -> Response:
        p = request.path_params
        path = await run_in_threadpool(scores.slide_file, p["key"])
        tile = await anyio.to_thread.run_sync(tiles.tile, path, p["level"], p["col"], p["row"],
                                              limiter=render_slots)
        headers = {"Cache-Control": "max-age=3600"}
        if tile.error:
            log.info("tile %s/%s/%s of %r: %s", p["level"], p["col"], p["row"], p["key"],
                     tile.error)
            headers = {"Cache-Control": "no-store",
                       "X-Milroi-Error": header_safe(scores.wire_message(tile.error))}
        return Response(tile.data, media_type=tile.media_type, headers=headers)

    async def download(request: Request) -> Response:
        kind = request.path_params["kind"]
        if kind not in DOWNLOAD_TYPES:
            raise SlideNotFound(f"no output kind {kind!r} (one of {', '.join(DOWNLOAD_TYPES)})")
        path = await run_in_threadpool(scores.output, request.path_params["key"], kind)
        return FileResponse(path, media_type=DOWNLOAD_TYPES[kind], filename=path.name)

    async def live_api(request: Request) -> Response:
        # The key's own checks first (403, 404), as on every route
        relative = await run_in_threadpool(scores.slide_request_path, request.path_params["key"])
        if live is None:
            return JSONResponse({"error": "start the viewer with --server HOST:PORT to score live"},
                                409)
        return StreamingResponse(live.stream(relative), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def live_cancel(request: Request) -> Response:
        found = live is not None and live.cancel(request.path_params["job"])
        return JSONResponse({"cancelled": found}, 200 if found else 404)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if live is not None:   # cancel the live calls still running, close the channel
            live.close()

    access.register_convertors()
    routes = [
        Route("/", index),
        Route("/slide/{key:slide_key}", slide_page),
        Route("/api/summary", summary),
        Route("/api/slide/{key:slide_key}", slide_api),
        Route("/api/scores/{key:slide_key}", scores_api),
        Route("/api/heatmap/{key:slide_key}", heatmap_api),
        Route("/api/tile/{level:tile_index}/{col:tile_index}/{row:tile_index}/{key:slide_key}",
              tile_api),
        Route("/api/live/{key:slide_key}", live_api),
        Route("/api/live-cancel/{job}", live_cancel, methods=["POST"]),
        Route("/download/{kind}/{key:slide_key}", download),
        Mount("/static", _RevalidatedStaticFiles(directory=STATIC), name="static"),
    ]
    hosts = allowed_hosts if allowed_hosts is not None else list(access.LOOPBACK_HOSTS)
    app = Starlette(routes=routes, exception_handlers={MilroiError: _milroi_error},
                    middleware=access.middleware(hosts, token), lifespan=lifespan)
    app.state.scores, app.state.tiles, app.state.live = scores, tiles, live
    return app


# ---------------------------------------------------------------------------------------------
# `milroi-serve view`


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scores_dir", type=Path, metavar="SCORES_DIR",
                        help="the --out folder of `milroi-serve score` (holds summary.csv)")
    parser.add_argument("--slides", type=Path, action="append", required=True, metavar="SLIDES_DIR",
                        help="folder the slides were scored from (repeat for several)")
    # --server (optional: live scoring; its --slide-root must be the --slides folder),
    # --token-file, --tls-ca, --timeout, --retries: as `milroi-serve client`. --token-file also
    # guards the viewer itself: every browser needs that token (exchanged for a cookie).
    add_connection_arguments(parser, required=False)
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a Host name the viewer answers besides loopback and --host "
                             "(repeat; e.g. the name a reverse proxy forwards); others get 400")
    parser.add_argument("--chunk-size", type=int, default=LIVE_CHUNK_SIZE,
                        help=f"patches per live message (default {LIVE_CHUNK_SIZE}; 0: the "
                             f"server's, its batch size)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    for folder in args.slides:
        if not folder.is_dir():
            raise ConfigError(f"--slides {folder} is not a folder")
    token = read_token(args.token_file) if args.token_file is not None else None
    client = client_from_args(args) if args.server else None
    hosts = access.allowed_hosts(args.host, args.allowed_host)
    app = create_app(args.scores_dir, args.slides, client=client, chunk_size=args.chunk_size,
                     allowed_hosts=hosts, token=token)
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the viewer has no authentication: anyone who reaches %s:%d sees the slides "
                    "(give --token-file)", args.host, args.port)
    if args.host in access.WILDCARD_BINDS and not args.allowed_host:
        log.warning("bound to every interface, but only Host names %s are answered: add "
                    "--allowed-host NAME for the name other machines use", ", ".join(hosts))
    url_host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{url_host}:{args.port}/" + (f"?token={quote(token)}" if token else "")
    print(f"milroi viewer: {url}  ({args.scores_dir}; answers Host {', '.join(hosts)})", flush=True)
    logging.getLogger("viewer").setLevel(logging.INFO)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=2)
    return 0
