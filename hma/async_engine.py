"""Drives an LLMEngine from asyncio: the step loop in a worker thread, outputs back through queues.

The worker thread owns the engine (model, cache, scheduler): the event loop only sends it
commands (add, abort) through a thread-safe inbox and receives each request's outputs on that
request's asyncio.Queue, so the loop never blocks on compute. A caller that stops listening
(client gone, task cancelled) aborts its request, which frees its blocks in the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from hma.engine import LLMEngine, Prompt
from hma.errors import HMAError
from hma.request import Request, RequestOutput
from hma.sampling import SamplingParams

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # how long an idle worker waits for a command before looking again


@dataclass(slots=True)
class _Stream:
    """Where one request's outputs go."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    request: Request | None = None


class AsyncEngine:
    """An engine in its own thread, with async generate()."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hma-engine", daemon=True)
        self._ids = itertools.count()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    async def generate(self, prompt: Prompt, params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's output after every step it advances; the last one is finished."""
        request_id = request_id or f"async-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._inbox.put(("add", request_id, prompt, params, stream))
        finished = False
        try:
            while not finished:
                out = await stream.outputs.get()
                if isinstance(out, Exception):
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._inbox.put(("abort", request_id))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take_commands(block=not self.engine.has_unfinished)
            if self.engine.has_unfinished:
                self._step()

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
            while True:
                self._apply(command)
                command = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            stream = self._streams.pop(command[1], None)
            if stream is not None and stream.request is not None:
                self.engine.abort(stream.request)
            return
        _, request_id, prompt, params, stream = command
        try:
            stream.request = self.engine.add_request(prompt, params, request_id)
            self._streams[request_id] = stream
        except HMAError as exc:  # refused: the caller gets the error, nothing was queued
            stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, exc)

    def _step(self) -> None:
        for out in self.engine.step():
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted while the step ran
            if out.finished:
                del self._streams[out.request_id]
            stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, out)
