"""Triton kernels that quantize into storage, each held by a test to its PyTorch reference.

write_kv: each token's K and V quantized into its cache slot in one kernel (plain casts, fp8,
int8, int4), byte for byte what attention.write_kv_reference stores: every division is IEEE
(div_rn) and every rounding explicit, since the cache's bytes must not depend on the device.
quantize_rows: an 8-bit prefill linear's activations, one row per program (quant.quantize_rows).
Launched through kernels.triton_launch, the seam the tests compile for a GPU they do not have.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hma import kernels
from hma.kernels import CAST, INT4, family
from hma.kv_cache import LayerKV
from hma.kv_formats import AbsmaxFormat, CastFormat, Int4Format, KVFormat


@triton.jit
def _to_half(x, UP: tl.constexpr):
    """float32 x rounded to float16 towards +inf (UP) or -inf, within float16's finite range:
    kv_formats._to_scale_dtype, bit for bit (round to nearest, then one step if on the wrong side)."""
    x = tl.minimum(tl.maximum(x, -65504.0), 65504.0)
    h = x.to(tl.float16)
    bits = h.to(tl.int16, bitcast=True)
    if UP:
        wrong = h.to(tl.float32) < x
        step = tl.where(bits == 0, 1, tl.where(h > 0, bits + 1, bits - 1))  # +0 steps to the least positive
    else:
        wrong = h.to(tl.float32) > x
        step = tl.where(bits == 0, -32767, tl.where(h > 0, bits - 1, bits + 1))  # to the least negative
    return tl.where(wrong, step.to(tl.int16).to(tl.float16, bitcast=True), h)


@triton.jit
def _round_half_even(q):
    """q rounded to the nearest integer, ties to even, as torch.round does (exact for |q| < 2**22:
    adding 1.5 * 2**23 leaves no fraction bits, and float32 addition rounds ties to even)."""
    return (q + 12582912.0) - 12582912.0


@triton.jit
def _quantize_store(x_ptr, x_stride, pool_ptr, scales_ptr, token, slot, NUM_KV_HEADS: tl.constexpr,
                    HEAD_DIM: tl.constexpr, HEAD_ROWS: tl.constexpr, DIM_ROWS: tl.constexpr,
                    KIND: tl.constexpr, QMAX: tl.constexpr, ROUND: tl.constexpr):
    """One token's (heads, head_dim) K or V, quantized as kv_formats does it, into its slot."""
    h = tl.arange(0, HEAD_ROWS)
    d = tl.arange(0, DIM_ROWS)
    mask = (h < NUM_KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    x = tl.load(x_ptr + token * x_stride + h[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0)
    at = (slot * NUM_KV_HEADS + h)[:, None] * HEAD_DIM + d[None, :]
    if KIND == CAST:
        tl.store(pool_ptr + at, x.to(pool_ptr.dtype.element_ty), mask=mask)
    else:
        # scale = amax / qmax rounded up to float16, at least 2**-24: AbsmaxFormat.quantize, bit for bit.
        x = x.to(tl.float32)
        scale = tl.maximum(_to_half(tl.math.div_rn(tl.max(tl.abs(x), axis=1), QMAX), True), 2.0**-24)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale.to(tl.float32)[:, None]), -QMAX), QMAX)
        if ROUND:
            q = _round_half_even(q)
        tl.store(pool_ptr + at, q.to(pool_ptr.dtype.element_ty), mask=mask)
        tl.store(scales_ptr + slot * NUM_KV_HEADS + h, scale, mask=h < NUM_KV_HEADS)


@triton.jit
def _quantize_store_int4(x_ptr, x_stride, pool_ptr, scales_ptr, token, slot, NUM_KV_HEADS: tl.constexpr,
                         HEAD_DIM: tl.constexpr, HEAD_ROWS: tl.constexpr, DIM_ROWS: tl.constexpr,
                         GROUP: tl.constexpr):
    """One token's K or V in Int4Format: per group of GROUP values a float16 minimum (rounded
    down) and step (span / 15, rounded up), values round((x - min) / step) packed two a byte."""
    h = tl.arange(0, HEAD_ROWS)
    d = tl.arange(0, DIM_ROWS)
    mask = (h < NUM_KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    x = tl.load(x_ptr + token * x_stride + h[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0).to(tl.float32)
    groups = tl.reshape(x, (HEAD_ROWS, DIM_ROWS // GROUP, GROUP))
    in_group = tl.reshape(mask, (HEAD_ROWS, DIM_ROWS // GROUP, GROUP))
    low = _to_half(tl.min(tl.where(in_group, groups, float("inf")), axis=2), False)
    high = tl.max(tl.where(in_group, groups, float("-inf")), axis=2)
    step = tl.maximum(_to_half(tl.math.div_rn(high - low.to(tl.float32), 15.0), True), 2.0**-24)
    q = tl.math.div_rn(groups - low.to(tl.float32)[:, :, None], step.to(tl.float32)[:, :, None])
    q = tl.minimum(tl.maximum(_round_half_even(q), 0.0), 15.0).to(tl.uint8)
    even, odd = tl.split(tl.reshape(q, (HEAD_ROWS, DIM_ROWS // 2, 2)))
    j = tl.arange(0, DIM_ROWS // 2)
    row = slot * NUM_KV_HEADS + h
    tl.store(pool_ptr + row[:, None] * (HEAD_DIM // 2) + j[None, :], even | (odd << 4),
             mask=(h < NUM_KV_HEADS)[:, None] & (j < HEAD_DIM // 2)[None, :])
    g = tl.arange(0, DIM_ROWS // GROUP)
    at = row[:, None] * (2 * (HEAD_DIM // GROUP)) + g[None, :]
    group_ok = (h < NUM_KV_HEADS)[:, None] & (g < HEAD_DIM // GROUP)[None, :]
    tl.store(scales_ptr + at, step, mask=group_ok)
    tl.store(scales_ptr + at + HEAD_DIM // GROUP, low, mask=group_ok)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_stride, v_stride, slots_ptr, k_pool, k_scales, v_pool, v_scales,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_ROWS: tl.constexpr,
                     DIM_ROWS: tl.constexpr, KIND: tl.constexpr, QMAX: tl.constexpr, ROUND: tl.constexpr,
                     GROUP: tl.constexpr, PDL: tl.constexpr = False):
    kernels.await_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)  # token * stride passes 2**31 for long prompts of wide models
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if KIND == INT4:
        _quantize_store_int4(k_ptr, k_stride, k_pool, k_scales, token, slot, NUM_KV_HEADS, HEAD_DIM, HEAD_ROWS,
                             DIM_ROWS, GROUP)
        _quantize_store_int4(v_ptr, v_stride, v_pool, v_scales, token, slot, NUM_KV_HEADS, HEAD_DIM, HEAD_ROWS,
                             DIM_ROWS, GROUP)
    else:
        _quantize_store(k_ptr, k_stride, k_pool, k_scales, token, slot, NUM_KV_HEADS, HEAD_DIM, HEAD_ROWS,
                        DIM_ROWS, KIND, QMAX, ROUND)
        _quantize_store(v_ptr, v_stride, v_pool, v_scales, token, slot, NUM_KV_HEADS, HEAD_DIM, HEAD_ROWS,
                        DIM_ROWS, KIND, QMAX, ROUND)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, cols, x_stride, QMAX: tl.constexpr, MIN_SCALE: tl.constexpr,
                          ROUND: tl.constexpr, COLS: tl.constexpr, PDL: tl.constexpr = False):
    """One row, in one pass: its absmax scale, then every value divided by it, clamped, cast."""
    kernels.await_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, COLS)
    mask = c < cols
    x = tl.load(x_ptr + row * x_stride + c, mask=mask, other=0).to(tl.float32)
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=0), QMAX), MIN_SCALE)
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -QMAX), QMAX)
    if ROUND:
        q = _round_half_even(q)
    tl.store(q_ptr + row * cols + c, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_rows(x: torch.Tensor, mode: str, qmax: float, min_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """quant.quantize_rows for a (rows, cols) activation in one kernel: (q, scale (rows, 1) float32).
    A compiled PyTorch version reads each row twice (amax, then divide), and at prefill sizes that
    second pass costs about a third of the 8-bit matmul it feeds."""
    rows, cols = x.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn if mode == "fp8" else torch.int8, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    width = triton.next_power_of_2(cols)
    kernels.triton_launch(_quantize_rows_kernel, (rows,), x, q, scale, cols, x.stride(0), QMAX=qmax,
                          MIN_SCALE=min_scale, ROUND=mode == "int8", COLS=width,
                          num_warps=8 if width >= 4096 else 4)
    return q, scale


def can_write_kv(fmt: KVFormat) -> bool:
    """write_kv handles plain casts, one-scale (fp8, int8) formats and int4; bfp8 takes the PyTorch
    path (its divisions by powers of two are exact however they are compiled)."""
    return isinstance(fmt, (CastFormat, AbsmaxFormat, Int4Format))


def write_kv(cache: LayerKV, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Quantizes each token's K and V (num_tokens, kv_heads, head_dim) into its slot of the pools,
    in one kernel: attention.write_kv's reference arithmetic, bit for bit."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    fmt = cache.format
    assert can_write_kv(fmt) and k.stride(1) == v.stride(1) == head_dim and k.stride(2) == v.stride(2) == 1
    kind, group = family(fmt)
    kernels.triton_launch(
        _store_kv_kernel, (num_tokens,), k, v, k.stride(0), v.stride(0), slot_mapping,
        cache.k, cache.k_scales, cache.v, cache.v_scales, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEAD_ROWS=triton.next_power_of_2(num_kv_heads), DIM_ROWS=triton.next_power_of_2(head_dim),
        KIND=kind, QMAX=getattr(fmt, "qmax", 0.0), ROUND=not fmt.payload_dtype.is_floating_point, GROUP=group)
