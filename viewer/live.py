"""Live scoring: the viewer backend calls ScoreSlide on a milroi gRPC server and forwards the
stream to the page as server-sent events.

    event: job      {"job": id}                 (first, so that the page can cancel it)
    event: header   the SlideHeader             (size, tile size, tile count, model)
    event: tiles    {"offset", "x", "y", "score", "artefact"} per PatchScores chunk, as it arrives
    event: summary  SlideSummary.to_dict()      (slide score, label, ROI polygons, timings)
    event: failed   {"message", "code"}         (the call failed; "error" is EventSource's own)
    event: cancelled {}                         (cancelled by the page)

The synchronous `serving.client` stream runs in a worker thread and hands its messages to the
event loop through an asyncio queue. Cancelling (the page's cancel button, or the page going away)
cancels the gRPC call, which stops the server's work on the slide.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict

from core.errors import MilroiError
from serving.client import ScoringClient, ScoringError, SlideScoringStream

log = logging.getLogger(__name__)

_END = object()


def sse(event: str, data: dict) -> bytes:
    """One server-sent event: JSON data on one line (numpy arrays as lists, NaN as null)."""
    text = json.dumps(_nan_to_none(data), separators=(",", ":"), allow_nan=False)
    return f"event: {event}\ndata: {text}\n\n".encode()


def _nan_to_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    if hasattr(value, "tolist"):
        return _nan_to_none(value.tolist())
    return value


class LiveJob:
    """One ScoreSlide call forwarded to one page."""

    def __init__(self, client: ScoringClient, slide_path: str, loop: asyncio.AbstractEventLoop,
                 chunk_size: int = 0):
        self.id = uuid.uuid4().hex
        self.client, self.slide_path, self.chunk_size = client, slide_path, chunk_size
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self._stream: SlideScoringStream | None = None
        self._lock = threading.Lock()

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def run(self) -> None:
        """The gRPC side, in a worker thread: every message becomes an event in the queue."""
        try:
            stream = self.client.score_slide(self.slide_path, chunk_size=self.chunk_size)
            with self._lock:
                self._stream = stream
                if self.cancelled.is_set():   # cancelled while the header was on its way
                    stream.cancel()
            self._put(("header", asdict(stream.header)))
            for chunk in stream:
                self._put(("tiles", {"offset": chunk.offset, "x": chunk.coords[:, 0],
                                     "y": chunk.coords[:, 1],
                                     "score": [round(float(s), 6) for s in chunk.scores],
                                     "artefact": chunk.flags}))
            self._put(("summary", stream.summary.to_dict()))
        except ScoringError as exc:
            if self.cancelled.is_set():
                self._put(("cancelled", {}))
            else:
                self._put(("failed", {"message": exc.message, "code": exc.code.name}))
        except MilroiError as exc:
            self._put(("failed", {"message": str(exc), "code": type(exc).__name__}))
        except Exception as exc:  # noqa: BLE001 - the page gets every failure as an event
            log.exception("live scoring of %s failed", self.slide_path)
            self._put(("failed", {"message": f"{type(exc).__name__}: {exc}", "code": "INTERNAL"}))
        finally:
            self._put(_END)

    def cancel(self) -> None:
        """Cancel the gRPC call: the server stops reading and scoring the slide."""
        self.cancelled.set()
        with self._lock:
            if self._stream is not None:
                self._stream.cancel()

    async def events(self) -> AsyncIterator[bytes]:
        yield sse("job", {"job": self.id})
        while True:
            item = await self.queue.get()
            if item is _END:
                return
            yield sse(*item)


class LiveScoring:
    """The gRPC client of the viewer and its running jobs (by id, for the cancel button)."""

    def __init__(self, client: ScoringClient, chunk_size: int = 0):
        self.client = client
        self.chunk_size = chunk_size
        self.jobs: dict[str, LiveJob] = {}

    def close(self) -> None:
        for job in list(self.jobs.values()):
            job.cancel()
        self.client.close()

    async def stream(self, slide_path: str) -> AsyncIterator[bytes]:
        """The SSE body of one live score; cancels the call when the page goes away."""
        job = LiveJob(self.client, slide_path, asyncio.get_running_loop(), self.chunk_size)
        self.jobs[job.id] = job
        thread = threading.Thread(target=job.run, name=f"live-{job.id[:8]}", daemon=True)
        thread.start()
        finished = False
        try:
            async for event in job.events():
                yield event
            finished = True
        finally:   # the end of the stream, or the page closed the connection
            if not finished:
                log.info("live scoring of %s: the page went away, cancelling", slide_path)
            job.cancel()
            self.jobs.pop(job.id, None)

    def cancel(self, job_id: str) -> bool:
        job = self.jobs.get(job_id)
        if job is None:
            return False
        job.cancel()
        return True
