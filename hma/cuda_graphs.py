"""Decode steps replayed as CUDA graphs: one graph per batch-size bucket over static buffers.

A decode step launches hundreds of small kernels; launched one by one from Python they take
10x the GPU time they cover. Captured once per bucket, a step is one graph launch. In: the
decode chunks of a step (one token each). Out: float32 logits, one row per chunk. A step's
inputs are written into pinned host arrays and copied to the device in two copies; the graphs
read them through fixed views. Graphs are captured on first use (the decode host's warm-up).
Padding rows (a batch of 5 runs the bucket of 8) have length 0, so attention skips them, and
write their K/V to a block this runner owns (the engine leaves it out of max_model_len).
Only pure decode steps run here; prefill and mixed steps run eagerly.
"""

from __future__ import annotations

import logging
import time

import torch

from hma.batch import Batch, SeqChunk
from hma.kv_cache import KVCache, blocks_for
from hma.qwen3 import Qwen3ForCausalLM

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
WARMUP_RUNS = 2  # the first runs compile Triton kernels and size cuBLAS workspaces


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
        # Scalar rows (ids, positions, slots, seq_lens) and block tables: pinned on the host,
        # filled through numpy views, mirrored on the device where the graphs read them.
        pinned = kv_cache.device.type == "cuda"  # (False only in the CPU tests of the host side)
        self.host_scalars = torch.zeros(4, largest, dtype=torch.long, pin_memory=pinned)
        self.host_tables = torch.zeros(largest, self.max_blocks, dtype=torch.long, pin_memory=pinned)
        self.scalars, self.tables = self.host_scalars.numpy(), self.host_tables.numpy()
        device = kv_cache.device
        self.device_scalars = torch.zeros_like(self.host_scalars, device=device)
        self.device_tables = torch.zeros_like(self.host_tables, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Batch, torch.Tensor]] = {}

    def capture(self) -> None:
        """Captures every bucket, largest first so the smaller graphs reuse its memory pool."""
        t0 = time.perf_counter()
        pool = None
        for size in reversed(self.buckets):
            batch = self._static_batch(size)
            self._fill([], size)
            self._upload(size)
            for _ in range(WARMUP_RUNS):
                self.model(batch, self.kv_cache)
            torch.cuda.synchronize(self.kv_cache.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model(batch, self.kv_cache)
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
        if not self.graphs:
            self.capture()
        size = next(b for b in self.buckets if b >= len(decodes))
        self._fill(decodes, size)
        self._upload(size)
        graph, _, logits = self.graphs[size]
        graph.replay()
        return logits[:len(decodes)]

    def _fill(self, decodes: list[SeqChunk], size: int) -> None:
        """Writes the step's inputs into the pinned host rows; rows past the chunks are padding.
        Safe to overwrite: every step ends in a sync (its sampled tokens reach the host)."""
        bs = self.block_size
        for i, chunk in enumerate(decodes):
            pos = chunk.context_len
            slot = chunk.block_ids[pos // bs] * bs + pos % bs
            self.scalars[:, i] = (chunk.token_ids[0], pos, slot, pos + 1)
            # Entries past the sequence's blocks stay stale: attention reads only seq_len tokens.
            self.tables[i, :len(chunk.block_ids)] = chunk.block_ids
        self.scalars[:, len(decodes):size] = [[0], [0], [self.pad_block * bs], [0]]

    def _upload(self, size: int) -> None:
        self.device_scalars.copy_(self.host_scalars, non_blocking=True)
        self.device_tables[:size].copy_(self.host_tables[:size], non_blocking=True)

    def _static_batch(self, size: int) -> Batch:
        """A Batch whose tensors are views of the device inputs' first `size` rows."""
        ids, positions, slots, seq_lens = self.device_scalars[:, :size]
        return Batch(input_ids=ids, positions=positions, slot_mapping=slots,
                     block_tables=self.device_tables[:size], seq_lens=seq_lens,
                     logits_indices=torch.arange(size, device=ids.device),
                     query_lens=[1] * size, seq_lens_host=[],  # host lengths serve prefills only
                     num_prefills=0, num_prefill_precision_tokens=0)
