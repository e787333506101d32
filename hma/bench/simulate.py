"""A discrete-event simulator of a serving deployment replaying a trace: what the cost planner runs.

In: TraceRequests and a Deployment: P prefill and D decode devices (disaggregated), or R colocated
replicas, each with step costs as plain functions of the batch (calibrated elsewhere). Out: one
goodput.RequestRecord per request, so the load generator's metrics and goodput apply unchanged.
The model of the system, kept as small as the real one:
- disaggregated: one FIFO queue of prompts; a free prefill device takes the oldest prompts that fit
  its token budget as one batch; each prefill device has one link, which carries its batches' KV
  one batch after another (pipelined: from the batch's start, the last layer after its end; else
  after its end); the first token reaches the client when the batch's KV has landed. As the real
  decode host does, a prompt reserves its KV room (prompt + output tokens) on the decode device with
  the fewest requests before its prefill starts; with no room anywhere it waits at the queue's head.
- simplification, against the real engine: colocated prompts are admitted without a KV check.
- colocated: requests go to the replica with the fewest requests; as the engine does, a replica's
  step takes the waiting prompts that fit the token budget (less one token per running request)
  together with one token for every running request; it costs the prefill plus the decodes' KV
  reads (the weights are read once) and mixed_s (measured: such engine steps cost more than
  the two parts), and every token in it comes out at its end.
- a decode step advances every running request by one token; requests join between steps.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from hma.bench.goodput import RequestRecord
from hma.bench.traces import TraceRequest


@dataclass(frozen=True, slots=True)
class Deployment:
    """Devices and their step costs. num_prefill = 0 means colocated replicas (num_decode of them)."""

    num_prefill: int
    num_decode: int
    prefill_s: Callable[[list[int]], float]            # prompt lengths of a batch -> seconds
    decode_s: Callable[[list[int]], float]             # context lengths of the running batch -> seconds
    transfer_s: Callable[[int], float] = lambda prompt_len: 0.0  # one prompt's KV over the link, alone
    mixed_s: float = 0.0  # colocated: more seconds for a step that carries prompts and decodes together
    pipelined: bool = True
    num_layers: int = 1
    max_batch_tokens: int = 8192
    max_num_seqs: int = 256
    kv_capacity_tokens: int = 1 << 40                  # per decode device (or replica)


@dataclass(slots=True)
class _Running:
    record: RequestRecord
    context_len: int
    remaining: int  # tokens still to produce
    reserved: int = 0  # KV tokens held on its decode device until it finishes (disaggregated)


@dataclass(slots=True)
class _Decoder:
    """One decode device (or colocated replica): what runs, what waits to join, whether it is mid-step."""

    running: list[_Running] = field(default_factory=list)
    joining: list = field(default_factory=list)        # heap of (ready_at, order, _Running)
    prompts: deque = field(default_factory=deque)      # colocated only: (TraceRequest, record)
    stepping: bool = False
    reserved: int = 0        # KV tokens promised to requests placed here (disaggregated)
    in_prefill: int = 0      # requests placed here whose prefill has not landed yet

    @property
    def load(self) -> int:
        return len(self.running) + len(self.joining) + len(self.prompts) + self.in_prefill

    def used_tokens(self) -> int:
        return sum(r.context_len + r.remaining for r in self.running)


class Simulation:
    """Replays requests through a deployment; run() returns their records in request order."""

    def __init__(self, deployment: Deployment) -> None:
        self.d = deployment
        self.events: list = []  # (time, seq, action)
        self.order = itertools.count()
        self.prompts: deque = deque()  # disaggregated prefill queue: (TraceRequest, record)
        self.prefill_busy = [False] * deployment.num_prefill
        self.link_free = [0.0] * deployment.num_prefill  # when each prefill device's link is idle
        self.decoders = [_Decoder() for _ in range(deployment.num_decode)]

    def at(self, time: float, action: Callable[[float], None]) -> None:
        heapq.heappush(self.events, (time, next(self.order), action))

    def run(self, requests: list[TraceRequest]) -> list[RequestRecord]:
        records = [RequestRecord(prompt_len=r.prompt_len, sent=r.arrival_s) for r in requests]
        for request, record in zip(requests, records):
            self.at(request.arrival_s, lambda now, q=request, rec=record: self._arrive(q, rec, now))
        while self.events:
            now, _, action = heapq.heappop(self.events)
            action(now)
        return records

    def _arrive(self, request: TraceRequest, record: RequestRecord, now: float) -> None:
        if self.d.num_prefill:
            self.prompts.append((request, record))
            self._start_prefills(now)
        else:
            replica = min(self.decoders, key=lambda dec: dec.load)
            replica.prompts.append((request, record))
            self._step(replica, now)

    def _take_batch(self, queue: deque, budget: int, place: Callable[[TraceRequest], _Decoder | None]) -> list:
        """The oldest prompts that fit the token budget (the first always does), each as (request,
        record, the decoder place gives it); stops at the first prompt place has no decoder for."""
        batch, tokens = [], 0
        while queue and len(batch) < self.d.max_num_seqs:
            request, record = queue[0]
            if batch and tokens + request.prompt_len > budget:
                break
            decoder = place(request)
            if decoder is None:
                break
            queue.popleft()
            batch.append((request, record, decoder))
            tokens += request.prompt_len
        return batch

    def _start_prefills(self, now: float) -> None:
        for i in range(self.d.num_prefill):
            if self.prefill_busy[i]:
                continue
            batch = self._take_batch(self.prompts, self.d.max_batch_tokens, self._reserve)
            if not batch:
                return
            self.prefill_busy[i] = True
            end = now + self.d.prefill_s([q.prompt_len for q, *_ in batch])
            self.at(end, lambda t, i=i, b=batch, start=now: self._prefill_done(i, b, start, t))

    def _reserve(self, request: TraceRequest) -> _Decoder | None:
        """The decode device with the fewest requests that has KV room for this one, room taken."""
        need = request.prompt_len + request.output_len
        room = [dec for dec in self.decoders if dec.reserved == 0 or dec.reserved + need <= self.d.kv_capacity_tokens]
        if not room:
            return None
        decoder = min(room, key=lambda dec: dec.load)
        decoder.reserved += need
        decoder.in_prefill += 1
        return decoder

    def _prefill_done(self, device: int, batch: list, start: float, now: float) -> None:
        self.prefill_busy[device] = False
        landed = self._transfer(device, batch, start, now)
        for request, record, decoder in batch:
            record.chunk_times.append(landed)  # the decode host sends the first token once KV lands
            record.output_len = 1
            decoder.in_prefill -= 1
            joiner = _Running(record, request.prompt_len + 1, request.output_len - 1,
                              reserved=request.prompt_len + request.output_len)
            heapq.heappush(decoder.joining, (landed, next(self.order), joiner))
            self.at(landed, lambda t, dec=decoder: self._step(dec, t))
        self._start_prefills(now)

    def _transfer(self, device: int, batch: list, start: float, end: float) -> float:
        """When the batch's KV has all landed: its transfers share the device's link, one batch
        after another; pipelined, they may start with the batch but the last layer leaves at its end."""
        total = sum(self.d.transfer_s(q.prompt_len) for q, *_ in batch)
        begin = max(start if self.d.pipelined else end, self.link_free[device])
        landed = max(begin + total, end + total / self.d.num_layers) if self.d.pipelined else begin + total
        self.link_free[device] = landed
        return landed

    def _step(self, dec: _Decoder, now: float) -> None:
        """Starts dec's next step (decodes, plus waiting prompts on a colocated replica) if it is
        idle and has work."""
        if dec.stepping:
            return
        self._release_finished(dec, now)  # finished ones free their KV first
        self._admit(dec, now)
        self._release_finished(dec, now)  # one-token requests need no step
        prompts = self._take_batch(dec.prompts, self.d.max_batch_tokens - len(dec.running), lambda _: dec)
        if not prompts and not dec.running:
            return
        contexts = [r.context_len for r in dec.running]
        if prompts:
            seconds = self.d.prefill_s([q.prompt_len for q, *_ in prompts])
            if contexts:
                seconds += self.d.decode_s(contexts) - self.d.decode_s([]) + self.d.mixed_s
        else:
            seconds = self.d.decode_s(contexts)
        dec.stepping = True
        self.at(now + seconds, lambda t: self._step_done(dec, prompts, t))

    def _release_finished(self, dec: _Decoder, now: float) -> None:
        done = [r for r in dec.running if r.remaining <= 0]
        if not done:
            return
        dec.running = [r for r in dec.running if r.remaining > 0]
        dec.reserved -= sum(r.reserved for r in done)
        if any(r.reserved for r in done) and self.prompts:
            self._start_prefills(now)  # a prompt may have been waiting for this room

    def _admit(self, dec: _Decoder, now: float) -> None:
        """Moves landed requests into the running batch while max_num_seqs allows (and, colocated,
        KV capacity: disaggregated requests reserved theirs before prefill)."""
        while dec.joining and dec.joining[0][0] <= now and len(dec.running) < self.d.max_num_seqs:
            joiner = dec.joining[0][2]
            room = dec.used_tokens() + joiner.context_len + joiner.remaining <= self.d.kv_capacity_tokens
            if dec.running and not joiner.reserved and not room:
                break
            heapq.heappop(dec.joining)
            dec.running.append(joiner)

    def _step_done(self, dec: _Decoder, prompts: list, now: float) -> None:
        dec.stepping = False
        for r in dec.running:
            r.record.chunk_times.append(now)
            r.record.output_len += 1
            r.context_len += 1
            r.remaining -= 1
        for request, record, _ in prompts:  # colocated: their first token, then they decode here
            record.chunk_times.append(now)
            record.output_len = 1
            joiner = _Running(record, request.prompt_len + 1, request.output_len - 1)
            heapq.heappush(dec.joining, (now, next(self.order), joiner))
        self._step(dec, now)


def simulate(requests: list[TraceRequest], deployment: Deployment) -> list[RequestRecord]:
    """Every request's record (first-token and token times) when the deployment serves the trace."""
    return Simulation(deployment).run(requests)
