"""Steps that carry prompts, replayed as CUDA graphs of everything but attention.

A 512-token prefill of Qwen3-4B is about 8 ms of GPU work that took the host 27 ms to issue:
per layer a dozen launches from Python, each costing the host more than its kernel costs the
GPU. Attention is the one part whose work follows the sequences (their lengths, what is already
cached) rather than the number of tokens, so, as vLLM's piecewise graphs do, each layer is
captured as two graphs at a padded token count: the part before attention (norm, QKV, QK-norm,
RoPE) and the part after it (output projection, norm, MLP). Attention runs eagerly between them,
writes the batch's K/V to the cache as always, and uses the bucket's rows past a prompt as the
padding its attention runs at (exact under the causal mask) instead of a padded copy.

In: any Batch of up to max_tokens tokens (prompts, or prompts and decodes). Out: the logits
model.forward gives. Fixed buffers carry the hidden state, residual stream, q/k/v and attention
output from piece to piece; rows past the batch's tokens hold stale values that no real row
reads (every op outside attention works row by row). A bucket's graphs are captured on first use
(warm-up captures all of them); changing the prefill precision drops them. On the CPU the pieces
run eagerly over the same buffers: that is how the tests check the data flow without a GPU.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable

import torch

from hma.batch import Batch
from hma.kv_cache import KVCache
from hma.quant import PhaseLinear

log = logging.getLogger(__name__)

SMALL_BUCKETS = (16, 32, 64)  # fp8 matmuls take multiples of 16 rows
BUCKET_STEP = 128


def bucket_sizes(max_tokens: int) -> list[int]:
    """Token counts a graph set is captured at: 16, 32, 64, then multiples of 128, up to the
    first that holds max_tokens (padding costs at most 127 rows of matmul)."""
    sizes = []
    for size in itertools.chain(SMALL_BUCKETS, itertools.count(BUCKET_STEP, BUCKET_STEP)):
        sizes.append(size)
        if size >= max_tokens:
            return sizes


class PiecewiseGraphs:
    """Per token-count bucket: one graph for the embedding and two per decoder layer."""

    def __init__(self, model, max_tokens: int) -> None:
        self.model = model
        self.max_tokens = max_tokens
        self.buckets = bucket_sizes(max_tokens)
        c, weight = model.config, model.embed_tokens.weight
        rows, heads, kv_heads, dim = self.buckets[-1], c.num_attention_heads, c.num_key_value_heads, c.head_dim

        def buffer(*shape: int, dtype: torch.dtype = weight.dtype) -> torch.Tensor:
            return torch.zeros(rows, *shape, dtype=dtype, device=weight.device)

        self.ids, self.positions = buffer(dtype=torch.long), buffer(dtype=torch.long)
        self.x, self.residual = buffer(c.hidden_size), buffer(c.hidden_size)
        self.cos, self.sin = buffer(1, dim), buffer(1, dim)
        self.q, self.attn = buffer(heads, dim), buffer(heads, dim)
        self.k, self.v = buffer(kv_heads, dim), buffer(kv_heads, dim)
        self.pieces: dict[int, list[Callable[[], None]]] = {}
        self.pool = None
        self._quantized: bool | None = None

    def reset(self) -> None:
        """Drops every captured graph (they read the weights they were captured with)."""
        self.pieces.clear()
        self.pool = None
        self._quantized = None

    def can_run(self, batch: Batch) -> bool:
        """True for batches that carry a prompt (decode-only steps replay hma.cuda_graphs, which
        capture model.forward whole), of up to max_tokens tokens, whose rows all run in one
        precision: the pieces run every row, padding included, through the same weights."""
        if batch.num_prefills == 0 or batch.input_ids.shape[0] > self.max_tokens:
            return False
        if self._quantized is None:
            self._quantized = any(m.prefill is not None for m in self.model.modules() if isinstance(m, PhaseLinear))
        return not self._quantized or batch.num_prefill_precision_tokens == batch.input_ids.shape[0]

    def capture(self) -> None:
        """Captures every bucket, largest first, so the smaller ones reuse its memory pool."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            for size in reversed(self.buckets):
                if size not in self.pieces:
                    self._capture(size)
        log.info("captured piecewise graphs for %d token counts up to %d in %.1f s", len(self.buckets),
                 self.buckets[-1], time.perf_counter() - t0)

    def forward(self, batch: Batch, kv_cache: KVCache, on_layer: Callable[[int], None] | None) -> torch.Tensor:
        """model.forward(batch, kv_cache, on_layer) through the smallest bucket that holds it."""
        n = batch.input_ids.shape[0]
        size = next(b for b in self.buckets if b >= n)
        embed, *layer_pieces = self.pieces.get(size) or self._capture(size)
        self.ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        embed()
        for i, (layer, cache) in enumerate(zip(self.model.layers, kv_cache.layers)):
            before, after = layer_pieces[2 * i:2 * i + 2]
            before()
            # the bucket's rows, not just the batch's: its padding rows pad the prompts' attention
            layer.self_attn.attend(self.q[:size], self.k[:size], self.v[:size], batch, cache, out=self.attn[:size])
            after()
            if on_layer is not None:
                on_layer(i)
        return self.model.logits(self.x, self.residual, batch.logits_indices)

    def _capture(self, size: int) -> list[Callable[[], None]]:
        """The bucket's pieces in running order: graph replays on CUDA, the plain functions elsewhere."""
        fns = [lambda: self._embed(size)]
        for i, layer in enumerate(self.model.layers):
            fns += [lambda layer=layer, first=i == 0: self._before(layer, first, size),
                    lambda layer=layer: self._after(layer, size)]
        if self.x.is_cuda:
            for fn in fns:  # the first runs compile Triton kernels and size cuBLAS workspaces
                fn()
            torch.cuda.synchronize(self.x.device)
            fns = [self._graph(fn) for fn in fns]
        self.pieces[size] = fns
        return fns

    def _graph(self, fn: Callable[[], None]) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        self.pool = graph.pool()
        return graph.replay

    def _embed(self, size: int) -> None:
        x, (cos, sin) = self.model.embed(self.ids[:size], self.positions[:size])
        self.x[:size].copy_(x)
        self.cos[:size].copy_(cos)
        self.sin[:size].copy_(sin)

    def _before(self, layer, first: bool, size: int) -> None:
        residual = None if first else self.residual[:size]
        rope = self.cos[:size], self.sin[:size]
        residual, q, k, v = layer.before_attention(self.x[:size], residual, rope, size)
        for buffer, t in ((self.residual, residual), (self.q, q), (self.k, k), (self.v, v)):
            buffer[:size].copy_(t)

    def _after(self, layer, size: int) -> None:
        x, residual = layer.after_attention(self.attn[:size], self.residual[:size], size)
        self.x[:size].copy_(x)
        self.residual[:size].copy_(residual)
