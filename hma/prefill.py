"""Prefill host: queued prompts run in batches, and each layer's KV leaves as soon as it is computed.

Decode hosts connect and send RequestBegin; each accepted prompt waits in a FIFO queue. The batch
loop takes queued prompts under the token budget (and the blocks they need), and runs
prefill_batch in the model thread (never on the event loop). The moment layer i is done, every
request's quantized KV of layer i is handed to the sender of the connection it came from, so
sending layer i overlaps computing layer i+1 (the compute-transfer pipeline; --no-pipeline holds
all layers until the last). On CUDA the copy to host memory runs on a side stream into pinned
buffers, and a copier thread delivers each layer once its copy is done, so the model thread
never waits. Invariant: a batch's blocks are freed only after every copy out of them finished.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from hma.batch import Batch, SeqChunk
from hma.config import EngineConfig, HostConfig
from hma.engine import LLMEngine, warm_up_prompts
from hma.errors import HMAError, ProtocolError, describe
from hma.host import DEFAULT_PORTS, listen_until_stopped, load_engine, phase, resolve_secret
from hma.kv_cache import KVCache, blocks_for
from hma.kv_transfer import take_layer_kv, token_slots
from hma.qwen3 import Qwen3ForCausalLM
from hma.sampling import SamplingParams, make_generator, sample
from hma.transport import Connection, for_each_message
from hma.wire import (Abort, BeginReply, ErrorMessage, FirstToken, KVLayer, Message, Query, QueryReply,
                      RequestBegin, RequestEnd)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PrefillJob:
    """One prompt to prefill, with the blocks it may use on this host and where its KV goes."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    block_ids: list[int] = field(default_factory=list)
    outbox: asyncio.Queue | None = None  # the sender of the decode host that asked for it


def prefill_batch(model: Qwen3ForCausalLM, cache: KVCache, jobs: list[PrefillJob],
                  deliver: Callable[[Message], None], pipeline: bool = True) -> None:
    """Prefills jobs in one batch; deliver receives every KVLayer, then FirstToken and RequestEnd."""
    chunks = [SeqChunk(j.prompt_token_ids, 0, j.block_ids) for j in jobs]
    batch = Batch.build(chunks, [], cache.block_size, cache.device)
    slots = [token_slots(cache, j.block_ids, 0, len(j.prompt_token_ids)) for j in jobs]
    held: list[KVLayer] = []
    copier = HostCopier(deliver if pipeline else held.append, cache.device)

    def on_layer(layer: int) -> None:
        now = time.time()
        for job, job_slots in zip(jobs, slots):
            copier.copy(lambda device: take_layer_kv(cache, layer, job.request_id, job_slots, 0, device, now))

    try:
        logits = model(batch, cache, on_layer)
    finally:
        copier.close()  # every copy out of the batch's blocks is done before they can be reused
    for msg in held:
        deliver(msg)
    generators = [make_generator(j.params.seed, logits.device) for j in jobs]
    tokens = sample(logits, [j.params for j in jobs], generators)
    for job, token in zip(jobs, tokens):
        deliver(FirstToken(job.request_id, token))
        deliver(RequestEnd(job.request_id, len(job.prompt_token_ids)))


class HostCopier:
    """Moves layers' KV to host memory. On CPU: at once. On CUDA: on a side stream into pinned
    memory, after an event marks the layer written; a thread waits for each copy, then delivers."""

    def __init__(self, deliver: Callable[[KVLayer], None], device: torch.device) -> None:
        self.deliver = deliver
        self.is_cuda = torch.device(device).type == "cuda"
        if self.is_cuda:
            self.stream = torch.cuda.Stream(device)
            self.done: queue.Queue = queue.Queue()
            self.thread = threading.Thread(target=self._deliver_when_copied, name="hma-d2h", daemon=True)
            self.thread.start()

    def copy(self, take: Callable[[str | torch.device], KVLayer]) -> None:
        """take(device) reads one layer's KV onto device."""
        if not self.is_cuda:
            self.deliver(take("cpu"))
            return
        written = torch.cuda.Event()
        written.record()  # on the compute stream, after the layer's K/V writes
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(written)
            on_gpu = take(self.stream.device)
            on_host = KVLayer(on_gpu.request_id, on_gpu.layer, on_gpu.token_start, on_gpu.token_end,
                              *(_pinned_copy(t) for t in (on_gpu.k, on_gpu.k_scales, on_gpu.v, on_gpu.v_scales)),
                              on_gpu.computed_at)
            copied = torch.cuda.Event()
            copied.record()
        self.done.put((copied, on_host, on_gpu))  # on_gpu stays alive until its copy is done

    def _deliver_when_copied(self) -> None:
        while (item := self.done.get()) is not None:
            copied, on_host, _ = item
            copied.synchronize()
            self.deliver(on_host)

    def close(self) -> None:
        if self.is_cuda:
            self.done.put(None)
            self.thread.join()


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


class PrefillServer:
    """Admits RequestBegin from decode hosts, prefills in batches, streams KV back to each."""

    def __init__(self, engine: LLMEngine, pipeline: bool = True) -> None:
        self.model, self.cache, self.config = engine.model, engine.kv_cache, engine.config
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model.config.vocab_size
        self.pipeline = pipeline
        self.waiting: deque[PrefillJob] = deque()
        self.jobs: dict[str, PrefillJob] = {}  # waiting or running; an aborted job leaves at once
        self.num_running = 0
        self.kv_bytes_sent = 0
        self.has_work = asyncio.Event()
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="hma-prefill")
        self.draining = False  # SIGTERM: new prompts are refused for now, queued ones still run

    async def drain(self) -> None:
        """Refuses new prompts (retryable: decode hosts ask another prefill host); returns once
        every queued and running prompt's KV has been sent."""
        self.draining = True
        while self.jobs or self.num_running:
            await asyncio.sleep(0.05)

    async def serve_peer(self, conn: Connection) -> None:
        """Serves one decode host (or the router's queries) until it leaves or breaks; its queued
        and running requests are then dropped."""
        outbox: asyncio.Queue = asyncio.Queue()
        sender = asyncio.create_task(self._send_loop(conn, outbox))

        def handle(msg: Message) -> None:
            if isinstance(msg, RequestBegin):
                outbox.put_nowait(self._begin(msg, outbox))
            elif isinstance(msg, Abort):
                self._drop(msg.request_id, msg.reason)
            elif isinstance(msg, Query):
                outbox.put_nowait(QueryReply(msg.query_id, self.status()))
            else:
                raise ProtocolError(f"a prefill host is not sent {msg.TYPE}")

        try:
            await for_each_message(conn, handle)
        finally:
            sender.cancel()
            for job in [j for j in self.jobs.values() if j.outbox is outbox]:
                self._drop(job.request_id, f"lost decode peer {conn.peer_name}")

    def _begin(self, msg: RequestBegin, outbox: asyncio.Queue) -> BeginReply:
        """Queues a prompt, or refuses one this host can never prefill."""
        need = blocks_for(len(msg.prompt_token_ids), self.cache.block_size)
        if self.draining:
            return BeginReply(msg.request_id, False, "this prefill host is shutting down", retryable=True)
        if msg.request_id in self.jobs:
            return BeginReply(msg.request_id, False, f"request {msg.request_id} is already here")
        if msg.kv_format != self.cache.format.name:
            return BeginReply(msg.request_id, False, f"this prefill host sends {self.cache.format.name} KV, "
                              f"not {msg.kv_format}")
        if not msg.prompt_token_ids or len(msg.prompt_token_ids) > self.max_model_len or need > self.cache.num_blocks:
            return BeginReply(msg.request_id, False, f"a prompt of {len(msg.prompt_token_ids)} tokens does not "
                              f"fit this prefill host (max_model_len={self.max_model_len})")
        if max(msg.prompt_token_ids) >= self.vocab_size:  # it would fail every prompt batched with it
            return BeginReply(msg.request_id, False, f"prompt token ids must lie in [0, {self.vocab_size})")
        try:
            params = SamplingParams(**msg.sampling)
        except (TypeError, HMAError) as exc:
            return BeginReply(msg.request_id, False, f"bad sampling parameters: {exc}")
        job = PrefillJob(msg.request_id, list(msg.prompt_token_ids), params, outbox=outbox)
        self.jobs[job.request_id] = job
        self.waiting.append(job)
        self.has_work.set()
        return BeginReply(msg.request_id, True)

    def _drop(self, request_id: str, reason: str) -> None:
        job = self.jobs.pop(request_id, None)
        if job is not None:
            log.info("aborted request_id=%s reason=%s", request_id, reason)

    async def _send_loop(self, conn: Connection, outbox: asyncio.Queue) -> None:
        """Sends in order; drops what belongs to requests aborted meanwhile."""
        while True:
            msg = await outbox.get()
            request_id = getattr(msg, "request_id", None)
            if isinstance(msg, (KVLayer, FirstToken, RequestEnd, ErrorMessage)) and request_id not in self.jobs:
                continue
            if isinstance(msg, (RequestEnd, ErrorMessage)):
                del self.jobs[request_id]
            before = conn.bytes_sent
            try:
                await conn.send(msg)
            except (OSError, TimeoutError) as exc:  # TimeoutError: the write deadline (DRAIN_TIMEOUT_S)
                log.warning("send failed peer=%s reason=%s", conn.peer_name, describe(exc))
                conn.abort()  # the reader sees it and drops the peer's requests
                return
            if isinstance(msg, KVLayer):
                self.kv_bytes_sent += conn.bytes_sent - before

    async def run(self) -> None:
        """The batch loop: take queued prompts, prefill them in the model thread, repeat."""
        loop = asyncio.get_running_loop()
        while True:
            await self.has_work.wait()
            jobs = self._take_batch()
            if not jobs:
                self.has_work.clear()
                continue
            self.num_running = len(jobs)
            t0 = time.perf_counter()
            try:
                await loop.run_in_executor(self.model_thread, self._prefill, jobs, loop)
            finally:
                for job in jobs:
                    self.cache.allocator.free(job.block_ids)
                self.num_running = 0
            log.debug("prefilled requests=%d tokens=%d seconds=%.3f", len(jobs),
                      sum(len(j.prompt_token_ids) for j in jobs), time.perf_counter() - t0)

    def _take_batch(self) -> list[PrefillJob]:
        """Oldest first, under the token budget and the free blocks (the first always fits: it
        was checked against the whole cache, and nothing else holds blocks between batches)."""
        jobs, num_tokens = [], 0
        allocator = self.cache.allocator
        while self.waiting:
            job = self.waiting[0]
            if job.request_id not in self.jobs:  # aborted while queued
                self.waiting.popleft()
                continue
            need = blocks_for(len(job.prompt_token_ids), self.cache.block_size)
            fits = num_tokens + len(job.prompt_token_ids) <= self.config.max_num_batched_tokens
            if jobs and (not fits or not allocator.can_allocate(need) or len(jobs) >= self.config.max_num_seqs):
                break
            job.block_ids = allocator.allocate(need)
            jobs.append(self.waiting.popleft())
            num_tokens += len(job.prompt_token_ids)
        return jobs

    def _prefill(self, jobs: list[PrefillJob], loop: asyncio.AbstractEventLoop) -> None:
        """Model thread: runs the batch; every message goes back to the loop, to its job's sender."""
        def deliver(msg: Message) -> None:
            loop.call_soon_threadsafe(self._route, msg)

        try:
            prefill_batch(self.model, self.cache, jobs, deliver, self.pipeline)
        except Exception as exc:  # noqa: BLE001 - reported to every decode host in the batch
            log.exception("prefill failed requests=%s", [j.request_id for j in jobs])
            for job in jobs:
                deliver(ErrorMessage(job.request_id, "prefill_failed", f"prefill failed: {exc}"))

    def _route(self, msg: Message) -> None:
        job = self.jobs.get(msg.request_id)
        if job is not None:
            job.outbox.put_nowait(msg)

    def status(self) -> dict:
        allocator = self.cache.allocator
        return {"role": "prefill", "waiting": len(self.waiting), "running": self.num_running,
                "num_blocks": self.cache.num_blocks, "num_free_blocks": allocator.num_free,
                "kv_format": self.cache.format.name, "kv_bytes_sent": self.kv_bytes_sent,
                "max_model_len": self.max_model_len}


def warm_up(server: PrefillServer) -> None:
    """One tiny prefill and, on CUDA, attention at every prompt-length bucket, so the first
    requests do not pay for lazy initialisation."""
    job = PrefillJob("warm-up", [1, 2, 3, 4], SamplingParams(max_tokens=1))
    job.block_ids = server.cache.allocator.allocate(1)
    try:
        prefill_batch(server.model, server.cache, [job], lambda msg: None, server.pipeline)
    finally:
        server.cache.allocator.free(job.block_ids)
    warm_up_prompts(server.model, server.max_model_len)


async def serve_prefill(engine_config: EngineConfig, host_config: HostConfig) -> None:
    """The prefill host's main: load, warm up, then serve decode hosts until stopped."""
    secret = resolve_secret(host_config.secret)
    engine, hello = load_engine(engine_config, "prefill")
    server = PrefillServer(engine, host_config.pipeline)
    with phase("warm-up"):
        warm_up(server)
    batches = asyncio.create_task(server.run())
    try:
        await listen_until_stopped(host_config.host, host_config.port or DEFAULT_PORTS["prefill"], hello,
                                   secret, server.serve_peer, server.drain)
    finally:
        batches.cancel()
