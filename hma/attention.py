"""Paged attention over the KV cache: the plain PyTorch reference, which runs anywhere.

In: one layer's q, k, v for the flat batch, that layer's pools (LayerKV) and the Batch. The new
K/V are quantized into the cache's format and written to their slots first (deferred
dequantization: the cache holds payload and scales only), then every query attends to its
sequence's cached keys, read back through the block table: prefill sequences causally (query t
sees positions up to context_len + t; a prompt with nothing cached uses its fresh K/V directly),
decode sequences one query each over all their tokens. On CUDA the decode part runs the fused
Triton kernel (kernels.paged_decode_attention), which reads and dequantizes blocks in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hma.batch import Batch
from hma.fusion import gpu_fused
from hma.kv_cache import LayerKV
from hma.kv_formats import KVFormat


def write_kv(cache: LayerKV, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Quantizes each token's K and V (num_tokens, kv_heads, dim) into the pools at its slot."""
    if k.is_cuda:
        from hma import quant_kernels

        if quant_kernels.can_write_kv(cache.format):
            quant_kernels.write_kv(cache, k, v, slot_mapping)  # one kernel, the same bytes
            return
    store_kv(cache, quantize_kv(k, v, cache.format), slot_mapping)


def write_kv_reference(cache: LayerKV, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """write_kv in plain eager PyTorch on any device: what the fused GPU paths are held to."""
    store_kv(cache, quantize_kv.reference(k, v, cache.format), slot_mapping)


@gpu_fused
def quantize_kv(k: torch.Tensor, v: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, ...]:
    """(k payload, k scales, v payload, v scales) in fmt."""
    return (*fmt.quantize(k), *fmt.quantize(v))


def store_kv(cache: LayerKV, tensors: tuple[torch.Tensor, ...], slot_mapping: torch.Tensor) -> None:
    """Copies already-quantized (k, k_scales, v, v_scales), one row per token, to their slots."""
    for pool, t in zip(cache.tensors, tensors):
        # flatten of a contiguous pool is a view, so index_copy_ writes the pool itself
        _copyable(pool).flatten(0, 1).index_copy_(0, slot_mapping, _copyable(t.to(pool.device)))


def _copyable(t: torch.Tensor) -> torch.Tensor:
    """t, or its bytes as uint8 where index_copy_ cannot take its dtype."""
    # index_copy_ has no float8 kernel on the CPU; the same bytes viewed as uint8 copy fine.
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def gather_kv(cache: LayerKV, block_tables: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads whole blocks in table order and dequantizes them: K and V, each
    (num_seqs, max_blocks * block_size, kv_heads, dim)."""
    num_seqs, max_blocks = block_tables.shape

    def read(pool: torch.Tensor) -> torch.Tensor:
        return pool[block_tables].reshape(num_seqs, max_blocks * pool.shape[1], *pool.shape[2:])

    fmt = cache.format
    return (fmt.dequantize(read(cache.k), read(cache.k_scales), dtype),
            fmt.dequantize(read(cache.v), read(cache.v_scales), dtype))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKV,
                    batch: Batch, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: (rows, heads, dim); k, v: (rows, kv_heads, dim), the batch's tokens first: rows past
    them (the piecewise graphs' fixed buffers) are padding that fresh prompts may attend over
    instead of a padded copy, and come back unset. Returns like q (into out, if given)."""
    n = batch.slot_mapping.shape[0]
    write_kv(cache, k[:n], v[:n], batch.slot_mapping)
    if batch.num_prefills == 0:
        decoded = _decode(q[:n], cache, batch.block_tables, batch.seq_lens, scale)
        return decoded if out is None else out[:n].copy_(decoded)
    out = torch.empty_like(q) if out is None else out
    num_prefill_tokens = sum(batch.query_lens[:batch.num_prefills])
    start = 0
    for i in range(batch.num_prefills):
        end = start + batch.query_lens[i]
        if batch.seq_lens_host[i] == batch.query_lens[i]:
            # Nothing cached before this prompt: attend to its fresh K/V (flash-attention eligible).
            out[start:end] = causal_attention(q[start:], k[start:], v[start:], scale, length=end - start)
        else:
            out[start:end] = _prefill_one(q[start:end], cache, batch.block_tables[i],
                                          batch.seq_lens_host[i], scale)
        start = end
    if batch.num_seqs > batch.num_prefills:
        tables = batch.block_tables[batch.num_prefills:]
        out[num_prefill_tokens:n] = _decode(q[num_prefill_tokens:n], cache, tables,
                                            batch.seq_lens[batch.num_prefills:], scale)
    return out


def prefill_bucket(num_tokens: int) -> int:
    """The length a prompt's attention runs at on CUDA: a multiple of 128, 16 lengths per
    doubling past 2,048 tokens, so padding adds at most ~1/8 to attention and ~100 lengths
    cover 40k tokens."""
    step = max(128, (1 << (num_tokens - 1).bit_length()) // 32)
    return -(-num_tokens // step) * step


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     bucket: bool | None = None, length: int | None = None) -> torch.Tensor:
    """One prompt attending causally to itself: its first `length` rows (default: all) of q, k, v
    (rows, heads, dim). On CUDA (or if bucket) it runs padded to prefill_bucket(length): PyTorch's
    cuDNN attention builds a graph for every new shape (~60 ms on an H200, once per shape), and in
    serving nearly every prompt length is new. Padding at the end is exact under the causal mask:
    no real query sees a later key, so rows the caller holds past `length` serve as the padding
    as they are, and only when there are too few is a padded copy made."""
    n = q.shape[0] if length is None else length
    padded = prefill_bucket(n) if (q.is_cuda if bucket is None else bucket) else n
    if q.shape[0] >= padded:
        return _sdpa(q[:padded], k[:padded], v[:padded], scale)[:n]
    q, k, v = (F.pad(t[:n], (0, 0, 0, 0, 0, padded - n)) for t in (q, k, v))
    return _sdpa(q, k, v, scale)[:n]


def warm_up_prefill(num_heads: int, num_kv_heads: int, head_dim: int, max_len: int,
                    dtype: torch.dtype, device: torch.device) -> int:
    """Runs attention once at every bucket up to max_len, so no request pays for building one
    (CUDA only: elsewhere nothing is built per shape). Returns how many lengths it ran."""
    if device.type != "cuda":
        return 0
    lengths = [prefill_bucket(1)]
    while lengths[-1] < max_len:
        lengths.append(prefill_bucket(lengths[-1] + 1))
    for n in lengths:
        q = torch.zeros(n, num_heads, head_dim, dtype=dtype, device=device)
        kv = q[:, :num_kv_heads]
        causal_attention(q, kv, kv, 1.0)
    return len(lengths)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA over (tokens, heads, dim) tensors. CUDA's fused backends need 4-D inputs, and the
    masked one no GQA, so K/V heads are repeated up to the query heads; otherwise SDPA falls
    back to its math backend, which costs prefill half its speed."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, tokens, dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    return out[0].transpose(0, 1)  # (q_len, heads, dim)


def _prefill_one(q: torch.Tensor, cache: LayerKV, block_table: torch.Tensor, seq_len: int,
                 scale: float) -> torch.Tensor:
    """One sequence's new tokens over all its cached tokens (some cached earlier), causal."""
    q_len = q.shape[0]
    keys, values = gather_kv(cache, block_table[None], q.dtype)
    keys, values = keys[0, :seq_len], values[0, :seq_len]  # (seq_len, kv_heads, dim)
    # Query t sits at position seq_len - q_len + t and sees keys up to that position.
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
    mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # (q_len, seq_len)
    return _sdpa(q, keys, values, scale, mask)


def _decode(q: torch.Tensor, cache: LayerKV, block_tables: torch.Tensor, seq_lens: torch.Tensor,
            scale: float) -> torch.Tensor:
    """One query per sequence over its blocks, batched; padding past seq_len is masked."""
    if q.is_cuda:
        # Triton ships with CUDA builds of torch; the CPU never needs it outside the tests.
        from hma.kernels import paged_decode_attention

        return paged_decode_attention(q, cache, block_tables, seq_lens, scale)
    return decode_reference(q, cache, block_tables, seq_lens, scale)


def decode_reference(q: torch.Tensor, cache: LayerKV, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """The plain PyTorch decode attention the fused kernel is held to: gathers and dequantizes
    every block of the table, then attends in float32."""
    num_seqs, num_heads, head_dim = q.shape
    keys, values = gather_kv(cache, block_tables, q.dtype)  # (num_seqs, max_len, kv_heads, dim)
    num_kv_heads = keys.shape[2]
    # Group query heads by the KV head they share (GQA) instead of copying K and V.
    qg = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("bhgd,blhd->bhgl", qg.float(), keys.float()) * scale
    valid = torch.arange(keys.shape[1], device=q.device)[None, :] < seq_lens[:, None]
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bhgl,blhd->bhgd", probs, values.float())
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)
