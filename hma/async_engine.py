"""Drives an LLMEngine from asyncio: the step loop in a worker thread, outputs back through queues.

The worker thread owns the engine (model, cache, scheduler): the event loop only sends it
commands (add, abort, or any function to run between steps, such as landing a KV layer) through a
thread-safe inbox, in order, and receives each request's outputs on that request's OutputStream,
so the loop never blocks on compute. A caller that stops listening (client gone, task cancelled)
aborts its request, which frees its blocks in the next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from hma.engine import LLMEngine, Prompt
from hma.errors import HMAError
from hma.request import Request, RequestOutput
from hma.sampling import SamplingParams

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # how long an idle worker waits for a command before looking again


@dataclass(slots=True)
class OutputStream:
    """Where one request's outputs (or the error that ended it) go, from the worker to the loop."""

    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    request: Request | None = None

    def put(self, item: RequestOutput | Exception) -> None:
        """Thread-safe: called by the worker."""
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while True:
            out = await self.outputs.get()
            if isinstance(out, Exception):
                raise out
            yield out
            if out.finished:
                return


class AsyncEngine:
    """An engine in its own thread, with async generate()."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, OutputStream] = {}  # worker thread only
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hma-engine", daemon=True)
        self._ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model.config.vocab_size

    @property
    def is_ready(self) -> bool:
        return self._thread.is_alive()

    def status(self) -> dict:
        """The engine's load and KV cache (read from the loop: a snapshot, not a lock)."""
        scheduler, cache = self.engine.scheduler, self.engine.kv_cache
        # CUDA graphs hold one block for their padding rows for good: not a request's, not a leak
        return {"running": len(scheduler.running), "waiting": len(scheduler.waiting),
                "num_blocks": cache.num_blocks, "num_free_blocks": cache.allocator.num_free,
                "num_reserved_blocks": int(self.engine.graphs is not None),
                "kv_format": cache.format.name, "max_model_len": self.engine.max_model_len,
                "vocab_size": self.vocab_size}

    async def host_status(self) -> list[tuple[str, dict]]:
        """This engine's status, named as a host (the router's /metrics asks every backend)."""
        return [("local", self.status())]

    async def timeline(self, request_id: str) -> dict:
        """No KV moves between hosts here, so no request has a transfer timeline."""
        return {}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    async def generate(self, prompt: Prompt, params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's output after every step it advances; the last one is finished."""
        request_id = request_id or f"async-{next(self._ids)}"
        stream = OutputStream()
        self._inbox.put(("add", request_id, prompt, params, stream))
        finished = False
        try:
            async for out in stream:
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Runs fn(*args) in the worker thread between steps, after every earlier command."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", fn, args, future))
        return future

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """submit, awaited."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    # -- worker thread only: for functions run through submit()

    def watch(self, request_id: str, stream: OutputStream) -> None:
        """Routes the outputs of a request that will join later (add_prefilled) to stream."""
        self._streams[request_id] = stream

    def joined(self, req: Request) -> None:
        """A watched request joined the engine with its first token: that is its first output."""
        stream = self._streams[req.request_id]
        stream.request = req
        self._emit(RequestOutput.of(req))

    def fail(self, request_id: str, error: HMAError) -> None:
        """Ends a watched request's stream with an error."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put(error)

    # -- the worker loop

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take_commands(block=not self.engine.has_unfinished)
            if self.engine.has_unfinished:
                self._emit(*self.engine.step())

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
            while True:
                self._apply(command)
                command = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _apply(self, command: tuple) -> None:
        kind, *args = command
        if kind == "call":
            fn, fn_args, future = args
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*fn_args))
                except Exception as exc:  # noqa: BLE001 - handed to whoever awaits the future
                    future.set_exception(exc)
        elif kind == "abort":
            stream = self._streams.pop(args[0], None)
            if stream is not None and stream.request is not None:
                self.engine.abort(stream.request)
        else:
            self._add(*args)

    def _add(self, request_id: str, prompt: Prompt, params: SamplingParams, stream: OutputStream) -> None:
        try:
            stream.request = self.engine.add_request(prompt, params, request_id)
            self._streams[request_id] = stream
        except HMAError as exc:  # refused: the caller gets the error, nothing was queued
            stream.put(exc)

    def _emit(self, *outs: RequestOutput) -> None:
        """Hands a step's outputs to their streams, waking each event loop once for all of them
        (a wake-up writes to the loop's self-pipe: about 6 us here, 64 of them a step at batch 64)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[OutputStream, RequestOutput]]] = {}
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted while the step ran
            if out.finished:
                del self._streams[out.request_id]
            by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, delivered in by_loop.items():
            loop.call_soon_threadsafe(_deliver, delivered)


def _deliver(delivered: list[tuple[OutputStream, RequestOutput]]) -> None:
    for stream, out in delivered:
        stream.outputs.put_nowait(out)
