"""Overlapped decode steps: the engine launches step n + 1 before it reads step n's tokens.

A decode step's host work (scheduling, filling inputs, reading tokens back, stop checks) would
otherwise leave the GPU idle between steps. With overlap the host launches step n + 1, whose
rows take step n's tokens straight from the device, and does step n's bookkeeping while the GPU
runs n + 1. The price is one step of lag: a request that step n's token ends has already been
launched once more; that token is dropped and its blocks are freed only once that step is read.
Only pure greedy decode steps overlap; anything else waits for the launched step first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hma.batch import Batch, SeqChunk
from hma.cuda_graphs import PendingTokens
from hma.kv_cache import KVCache
from hma.qwen3 import Qwen3ForCausalLM
from hma.request import Request


@dataclass(slots=True)
class InFlight:
    """A launched step the host has not read yet."""

    reqs: list[Request]
    tokens: PendingTokens
    held_blocks: list[int] = field(default_factory=list)  # of requests that ended meanwhile

    def holds(self, req: Request) -> bool:
        return any(r is req for r in self.reqs)


class EagerSteps:
    """launch() of DecodeGraphs without graphs (eager CUDA, and the CPU tests of the overlap)."""

    def __init__(self, model: Qwen3ForCausalLM, kv_cache: KVCache) -> None:
        self.model, self.kv_cache = model, kv_cache
        self.tokens: torch.Tensor | None = None  # the last launched step's tokens, on the device

    def launch(self, decodes: list[SeqChunk], feedback: list[int]) -> PendingTokens:
        batch = Batch.build(decodes, [], self.kv_cache.block_size, self.kv_cache.device)
        if self.tokens is not None:
            rows = torch.tensor(feedback, device=batch.input_ids.device)
            batch.input_ids = torch.where(rows >= 0, self.tokens[rows.clamp(min=0)], batch.input_ids)
        else:
            assert max(feedback) < 0, "no earlier step to take tokens from"
        self.tokens = self.model(batch, self.kv_cache).argmax(dim=-1)
        return PendingTokens(self.tokens)  # reading it waits for the step: eager steps gain nothing
