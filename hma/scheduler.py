"""Continuous batching: which requests run in the next step, under block and token budgets.

Each step first gives every running sequence the block its next token needs, preempting the
newest sequence when none is free (its blocks are freed, it goes back to the front of the
queue and is recomputed later); then, if nothing was preempted, admits waiting requests while
blocks, the token budget and max_num_seqs allow. The scheduler owns every block allocation.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from hma.kv_cache import BlockAllocator, blocks_for
from hma.request import Request, RequestStatus

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SchedulerOutput:
    """The requests of one step: prefills (whole sequences) first, then decodes (one token each)."""

    prefills: list[Request] = field(default_factory=list)
    decodes: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    """Waiting and running queues over one block allocator."""

    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest admitted first

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def add_running(self, req: Request) -> None:
        """Takes over a request that arrives holding its prompt's blocks (prefilled elsewhere)."""
        req.status = RequestStatus.RUNNING
        req.metrics.first_scheduled_time = req.metrics.first_scheduled_time or time.time()
        self.running.append(req)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def is_steady(self) -> bool:
        """True when the next plan can only grow the running sequences by one token each: the
        blocks they need are free and no waiting request would be admitted (overlapped steps
        launch before the host has read the tokens that preempting or admitting depend on)."""
        need = sum(blocks_for(r.num_tokens, self.block_size) - len(r.block_ids) for r in self.running)
        if not self.allocator.can_allocate(need):
            return False
        if not self.waiting or len(self.running) >= self.max_num_seqs:
            return True
        prompt = self.waiting[0].num_tokens
        if self.running and prompt > self.max_num_batched_tokens - len(self.running):
            return True  # over the token budget beside running decodes: it waits either way
        return not self.allocator.can_allocate(need + blocks_for(prompt, self.block_size))

    def schedule(self) -> SchedulerOutput:
        """Plans one step; every request it returns holds the blocks its tokens need."""
        out = SchedulerOutput()
        self._schedule_decodes(out)
        if not out.preempted:
            self._admit_waiting(out)
        return out

    def _schedule_decodes(self, out: SchedulerOutput) -> None:
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if self._grow(req, out):
                out.decodes.append(req)

    def _grow(self, req: Request, out: SchedulerOutput) -> bool:
        """Gives req the blocks for all its tokens, preempting newer sequences; False if req itself went."""
        need = blocks_for(req.num_tokens, self.block_size) - len(req.block_ids)
        while not self.allocator.can_allocate(need):
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        req.block_ids += self.allocator.allocate(need)
        return True

    def _preempt(self, req: Request) -> None:
        log.debug("preempt request_id=%s tokens=%d blocks=%d", req.request_id, req.num_tokens,
                  len(req.block_ids))
        self.running.remove(req)
        self.allocator.free(req.block_ids)
        req.block_ids = []
        req.status = RequestStatus.WAITING
        req.metrics.num_preemptions += 1
        self.waiting.appendleft(req)

    def _admit_waiting(self, out: SchedulerOutput) -> None:
        budget = self.max_num_batched_tokens - len(out.decodes)
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            # A prompt longer than the whole budget still runs when it would run alone.
            if req.num_tokens > budget and (out.prefills or out.decodes):
                break
            need = blocks_for(req.num_tokens, self.block_size)
            if not self.allocator.can_allocate(need):
                break
            self.waiting.popleft()
            req.block_ids = self.allocator.allocate(need)
            req.status = RequestStatus.RUNNING
            req.metrics.first_scheduled_time = req.metrics.first_scheduled_time or time.time()
            self.running.append(req)
            out.prefills.append(req)
            budget -= req.num_tokens

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """Ends a request and frees its blocks at once."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.allocator.free(req.block_ids)
        req.block_ids = []
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        req.metrics.finished_time = time.time()
