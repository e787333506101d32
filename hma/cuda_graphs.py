"""Decode steps replayed as CUDA graphs: one graph per batch-size bucket over static buffers.

A decode step launches hundreds of small kernels; launched one by one from Python they take
10x the GPU time they cover. Captured once per bucket, a step is one graph launch. In: the
decode chunks of a step (one token each). Out: float32 logits, one row per chunk. A step's
inputs are written into pinned host arrays and copied to the device in two copies; the graphs
read them through fixed views. Graphs are captured on first use (the decode host's warm-up).
Padding rows (a batch of 5 runs the bucket of 8) have length 0, so attention skips them, and
write their K/V to a block this runner owns (the engine leaves it out of max_model_len).
Only pure decode steps run here; prefill and mixed steps run eagerly. Each graph also takes its
step's greedy tokens and can feed them to the next step on the device (launch), which lets the
engine start step n + 1 before the host has seen step n's tokens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from hma.batch import Batch, SeqChunk
from hma.kv_cache import KVCache, blocks_for
from hma.qwen3 import Qwen3ForCausalLM

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
WARMUP_RUNS = 2  # the first runs compile Triton kernels and size cuBLAS workspaces
SCALARS = ("ids", "positions", "slots", "seq_lens", "feedback")  # one input row each


@dataclass(slots=True)
class PendingTokens:
    """A launched step's greedy tokens, on their way to a pinned host buffer."""

    host: torch.Tensor
    done: torch.cuda.Event | None = None  # None: the tokens are there already (CPU)

    def result(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()


class DecodeGraphs:
    """Captured decode steps for batch sizes up to max_num_seqs and lengths up to max_model_len."""

    def __init__(self, model: Qwen3ForCausalLM, kv_cache: KVCache, max_num_seqs: int,
                 max_model_len: int) -> None:
        self.model, self.kv_cache = model, kv_cache
        self.block_size = kv_cache.block_size
        self.max_blocks = blocks_for(max_model_len, self.block_size)
        self.buckets = [b for b in BUCKETS if b < max_num_seqs] + [max_num_seqs]
        # Padding rows write their K/V here: a block no sequence can ever be given.
        self.pad_block = kv_cache.allocator.allocate(1)[0]
        largest = self.buckets[-1]
        # Rows of SCALARS and block tables: pinned on the host, filled through numpy views,
        # mirrored on the device where the graphs read them. Two sets, used in turn: with
        # overlapped steps, step n's upload may still be queued while the host fills step n + 1.
        pinned = kv_cache.device.type == "cuda"  # (False only in the CPU tests of the host side)
        self.host_scalars = torch.zeros(2, len(SCALARS), largest, dtype=torch.long, pin_memory=pinned)
        self.host_tables = torch.zeros(2, largest, self.max_blocks, dtype=torch.long, pin_memory=pinned)
        self.host_tokens = torch.zeros(2, largest, dtype=torch.long, pin_memory=pinned)
        self.turn = 0
        # Per set and row: the block list it was last filled from and how many entries of it.
        self.written: list[list[tuple[list[int] | None, int]]] = [[(None, 0)] * largest for _ in range(2)]
        device = kv_cache.device
        self.device_scalars = torch.zeros_like(self.host_scalars[0], device=device)
        self.device_tables = torch.zeros_like(self.host_tables[0], device=device)
        # Each step leaves its greedy tokens here; the next step's rows whose "feedback" is a row
        # index take their input id from it, so a step can launch before the host has read them.
        self.tokens = torch.zeros(largest, dtype=torch.long, device=device)
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Batch, torch.Tensor]] = {}

    def capture(self) -> None:
        """Captures every bucket, largest first so the smaller graphs reuse its memory pool."""
        t0 = time.perf_counter()
        pool = None
        for size in reversed(self.buckets):
            batch = self._static_batch(size)
            self._fill([], [], size)
            self._upload(size)
            for _ in range(WARMUP_RUNS):
                self._step(batch, size)
            torch.cuda.synchronize(self.kv_cache.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._step(batch, size)
            pool = graph.pool()
            # The batch stays referenced: a graph replays raw addresses, so every tensor it reads
            # (logits_indices included) must outlive it.
            self.graphs[size] = (graph, batch, logits)
        log.info("captured decode CUDA graphs for batch sizes %s in %.1f s", self.buckets,
                 time.perf_counter() - t0)

    def can_run(self, decodes: list[SeqChunk]) -> bool:
        """True when a graph fits this many sequences of these lengths."""
        return (0 < len(decodes) <= self.buckets[-1]
                and max(len(c.block_ids) for c in decodes) <= self.max_blocks)

    def run(self, decodes: list[SeqChunk]) -> torch.Tensor:
        """Logits (len(decodes), vocab) of one decode step, by replaying the smallest bucket that fits."""
        return self._replay(decodes, [-1] * len(decodes))[:len(decodes)]

    def launch(self, decodes: list[SeqChunk], feedback: list[int]) -> PendingTokens:
        """Starts one greedy decode step without waiting for it. feedback[i] >= 0: row i's input
        id is row feedback[i] of the previous step's tokens (its chunk's token id is ignored).
        At most one launched step may be unread when the next is launched (two input sets)."""
        self._replay(decodes, feedback)
        host = self.host_tokens[self.turn, :len(decodes)]
        host.copy_(self.tokens[:len(decodes)], non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return PendingTokens(host, done)

    def replay_uploaded(self, num_seqs: int) -> None:
        """Replays num_seqs's bucket on the inputs the last step uploaded, and nothing else: a
        step's GPU work without its host side, which is what benchmarks time it by."""
        self.graphs[self._bucket(num_seqs)][0].replay()

    def _bucket(self, num_seqs: int) -> int:
        return next(b for b in self.buckets if b >= num_seqs)

    def _replay(self, decodes: list[SeqChunk], feedback: list[int]) -> torch.Tensor:
        """Fills the next input set, uploads it, replays the smallest bucket; its logits buffer."""
        if not self.graphs:
            self.capture()
        size = self._bucket(len(decodes))
        self.turn ^= 1
        self._fill(decodes, feedback, size)
        self._upload(size)
        graph, _, logits = self.graphs[size]
        graph.replay()
        return logits

    def _step(self, batch: Batch, size: int) -> torch.Tensor:
        """What a graph runs: input ids (fed back or from the host), the model, greedy tokens."""
        self._feed(size)
        logits = self.model(batch, self.kv_cache)
        self.tokens[:size].copy_(logits.argmax(dim=-1))
        return logits

    def _feed(self, size: int) -> None:
        ids, feedback = self.device_scalars[0, :size], self.device_scalars[4, :size]
        torch.where(feedback >= 0, self.tokens[feedback.clamp(min=0)], ids, out=self.input_ids[:size])

    def _fill(self, decodes: list[SeqChunk], feedback: list[int], size: int) -> None:
        """Writes the step's inputs into this turn's pinned host rows; rows past the chunks are
        padding. Safe to overwrite: this turn's last upload belongs to a step already read.
        Column-wise in numpy, not row by row: at 64 rows a Python loop over them took 0.25 ms on
        the CPU machine, most of a step's host time."""
        n, bs = len(decodes), self.block_size
        scalars, tables = self.host_scalars[self.turn].numpy(), self.host_tables[self.turn].numpy()
        self._fill_tables(decodes, tables)
        pos = np.fromiter((c.context_len for c in decodes), np.int64, n)
        scalars[0, :n] = [c.token_ids[0] if fed < 0 else 0 for c, fed in zip(decodes, feedback)]
        scalars[1, :n] = pos
        scalars[2, :n] = tables[np.arange(n), pos // bs] * bs + pos % bs  # the slot each new token fills
        scalars[3, :n] = pos + 1
        scalars[4, :n] = feedback
        scalars[:, n:size] = [[0], [0], [self.pad_block * bs], [0], [-1]]

    def _fill_tables(self, decodes: list[SeqChunk], tables: np.ndarray) -> None:
        """Block table rows of this turn's host set, writing only what changed. A sequence's
        block list only grows in place (SeqChunk.block_ids), so a row that held the same list two
        steps ago needs just its new blocks: rewriting every row cost 0.3 ms a step at 64 x 4,096
        tokens. Entries past a sequence's blocks stay stale: attention reads only seq_len tokens."""
        written = self.written[self.turn]
        for i, chunk in enumerate(decodes):
            blocks = chunk.block_ids
            held, count = written[i]
            start = count if held is blocks and count <= len(blocks) else 0
            if start < len(blocks):
                tables[i, start:len(blocks)] = blocks[start:]
            written[i] = (blocks, len(blocks))

    def _upload(self, size: int) -> None:
        self.device_scalars.copy_(self.host_scalars[self.turn], non_blocking=True)
        self.device_tables[:size].copy_(self.host_tables[self.turn, :size], non_blocking=True)

    def _static_batch(self, size: int) -> Batch:
        """A Batch whose tensors are views of the device inputs' first `size` rows."""
        _, positions, slots, seq_lens, _ = self.device_scalars[:, :size]
        return Batch(input_ids=self.input_ids[:size], positions=positions, slot_mapping=slots,
                     block_tables=self.device_tables[:size], seq_lens=seq_lens,
                     logits_indices=torch.arange(size, device=positions.device),
                     query_lens=[1] * size, seq_lens_host=[],  # host lengths serve prefills only
                     num_prefills=0, num_prefill_precision_tokens=0)
