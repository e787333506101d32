"""Triton kernels for the decoder layer's elementwise chains, each held by a test to its PyTorch
reference in qwen3.py (on the CPU through Triton's interpreter).

rms_norm (with the residual add before it, or without), norm_and_rotate (Qwen3's per-head q/k
RMSNorm, then RoPE) and silu_and_mul, one kernel each. torch.compile made the same single kernels,
but each call of a compiled function cost the host about 150 us of guards and wrappers (measured
on an H200 with torch.profiler: 145 calls, about 20 ms of a 512-token prefill's 37 ms of host
time for 8 ms of GPU work); a plain launch costs a tenth of that. Decode steps replay CUDA graphs,
where launch costs vanish, so these matter for prefills and for steps that mix prompts in.
Each rounds to the model's dtype where the reference's separate PyTorch ops round.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hma import kernels


@triton.jit(do_not_specialize=["x_stride", "residual_stride"])
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr, x_stride, residual_stride, eps,
                     COLS: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     PDL: tl.constexpr = False):
    """One row: (x + residual, rounded, stored), then weight * (x * rsqrt(mean(x^2) + eps))."""
    kernels.await_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < COLS
    x = tl.load(x_ptr + row * x_stride + c, mask=mask, other=0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * residual_stride + c, mask=mask, other=0
                                        ).to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * COLS + c, x, mask=mask)
    x = x.to(tl.float32)
    normed = (x * tl.math.rsqrt(tl.sum(x * x, axis=0) / COLS + eps)).to(out_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + c, mask=mask, other=0).to(tl.float32)
    tl.store(out_ptr + row * COLS + c, (weight * normed.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """qwen3._rms_norm of x (..., cols)."""
    return _norm_rows(x, None, weight, eps)[1]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qwen3._add_rms_norm: (x + residual, its norm)."""
    return _norm_rows(x, residual, weight, eps)


def _norm_rows(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    cols = x.shape[-1]
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(out) if residual is not None else x2
    res2 = _rows(residual) if residual is not None else x2
    if x2.shape[0]:
        width = triton.next_power_of_2(cols)
        kernels.triton_launch(_rms_norm_kernel, (x2.shape[0],), x2, res2, weight, out, summed, x2.stride(0),
                              res2.stride(0), eps, COLS=cols, BLOCK=width, HAS_RESIDUAL=residual is not None,
                              num_warps=8 if width >= 4096 else 4)
    return summed.view(x.shape), out.view(x.shape)


@triton.jit
def _rotate_heads(x_ptr, out_ptr, token, x_stride, weight_ptr, cos_ptr, sin_ptr, eps,
                  NUM_HEADS: tl.constexpr, HEAD_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  HALF_ROWS: tl.constexpr, HAS_NORM: tl.constexpr):
    """One token's (heads, head_dim) q or k: RMSNorm per head (HAS_NORM), then rotate-half RoPE.
    The halves are loaded apart, so rotate_half is a swap and a sign, not a shuffle."""
    h = tl.arange(0, HEAD_ROWS)[:, None]
    d = tl.arange(0, HALF_ROWS)[None, :]
    half: tl.constexpr = HEAD_DIM // 2
    mask = (h < NUM_HEADS) & (d < half)
    at = x_ptr + token * x_stride + h * HEAD_DIM + d
    dtype = out_ptr.dtype.element_ty
    x1 = tl.load(at, mask=mask, other=0)
    x2 = tl.load(at + half, mask=mask, other=0)
    if HAS_NORM:
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        r = tl.math.rsqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / HEAD_DIM + eps)[:, None]
        w1 = tl.load(weight_ptr + d, mask=d < half, other=0).to(tl.float32)
        w2 = tl.load(weight_ptr + half + d, mask=d < half, other=0).to(tl.float32)
        x1 = (w1 * (a * r).to(dtype).to(tl.float32)).to(dtype)
        x2 = (w2 * (b * r).to(dtype).to(tl.float32)).to(dtype)
    cos1 = tl.load(cos_ptr + token * HEAD_DIM + d, mask=d < half, other=0).to(tl.float32)
    cos2 = tl.load(cos_ptr + token * HEAD_DIM + half + d, mask=d < half, other=0).to(tl.float32)
    sin1 = tl.load(sin_ptr + token * HEAD_DIM + d, mask=d < half, other=0).to(tl.float32)
    sin2 = tl.load(sin_ptr + token * HEAD_DIM + half + d, mask=d < half, other=0).to(tl.float32)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    # x * cos + cat(-x2, x1) * sin, each product rounded as PyTorch rounds it
    out1 = ((a * cos1).to(dtype).to(tl.float32) + (-b * sin1).to(dtype).to(tl.float32)).to(dtype)
    out2 = ((b * cos2).to(dtype).to(tl.float32) + (a * sin2).to(dtype).to(tl.float32)).to(dtype)
    out = out_ptr + token * NUM_HEADS * HEAD_DIM + h * HEAD_DIM + d
    tl.store(out, out1, mask=mask)
    tl.store(out + half, out2, mask=mask)


@triton.jit(do_not_specialize=["q_stride", "k_stride"])
def _norm_and_rotate_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, q_stride, k_stride, q_weight_ptr,
                            k_weight_ptr, cos_ptr, sin_ptr, eps, NUM_HEADS: tl.constexpr,
                            NUM_KV_HEADS: tl.constexpr, Q_ROWS: tl.constexpr, K_ROWS: tl.constexpr,
                            HEAD_DIM: tl.constexpr, HALF_ROWS: tl.constexpr, HAS_NORM: tl.constexpr,
                            PDL: tl.constexpr = False):
    kernels.await_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    _rotate_heads(q_ptr, q_out_ptr, token, q_stride, q_weight_ptr, cos_ptr, sin_ptr, eps, NUM_HEADS, Q_ROWS,
                  HEAD_DIM, HALF_ROWS, HAS_NORM)
    _rotate_heads(k_ptr, k_out_ptr, token, k_stride, k_weight_ptr, cos_ptr, sin_ptr, eps, NUM_KV_HEADS, K_ROWS,
                  HEAD_DIM, HALF_ROWS, HAS_NORM)


def norm_and_rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qwen3.norm_and_rotate: q (tokens, heads, head_dim), k (tokens, kv_heads, head_dim), each with
    its heads contiguous in a token (views of the fused QKV output are); cos/sin (tokens, 1, head_dim)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert q.stride(1) == k.stride(1) == head_dim and q.stride(2) == k.stride(2) == 1
    cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    has_norm = q_weight is not None
    if num_tokens:
        kernels.triton_launch(
            _norm_and_rotate_kernel, (num_tokens,), q, k, q_out, k_out, q.stride(0), k.stride(0),
            q_weight if has_norm else q, k_weight if has_norm else k, cos, sin, eps,
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, Q_ROWS=triton.next_power_of_2(num_heads),
            K_ROWS=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
            HALF_ROWS=triton.next_power_of_2(head_dim // 2), HAS_NORM=has_norm)
    return q_out, k_out


@triton.jit(do_not_specialize=["x_stride"])
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, COLS: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr = False):
    """silu(gate) * up for BLOCK columns of one row: the silu rounded to the dtype, as F.silu's is."""
    kernels.await_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < COLS
    gate = tl.load(x_ptr + row * x_stride + c, mask=mask, other=0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + COLS + c, mask=mask, other=0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * COLS + c, (silu * up).to(dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """qwen3.silu_and_mul: (rows, 2 * cols) -> (rows, cols)."""
    x = _rows(gate_up)
    cols = x.shape[1] // 2
    out = torch.empty(x.shape[0], cols, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(cols))
    if x.shape[0]:
        kernels.triton_launch(_silu_and_mul_kernel, (x.shape[0], triton.cdiv(cols, block)), x, out, x.stride(0),
                              COLS=cols, BLOCK=block)
    return out.view(*gate_up.shape[:-1], cols)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, cols) with unit column stride, copying only if it must."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()
