"""Matrix-vector products for decode steps of one sequence: y = x @ W.T at the HBM's read rate.

A decode step at batch 1 is bound by reading every weight once. For these one-row shapes cuBLAS
picks split-K kernels plus a reduction. In a CUDA graph of qwen3-4b's 36 layers of four linears
(distinct weights, H200) it read them at 2.92 TB/s; this kernel reads them at 3.63 TB/s (3.55
against 3.92 for qwen3-8b; `python -m hma bench matvec`). Each program owns one to four output
features, about 16 KiB of weights, so even the narrow projections spread over ten programs an
SM. It walks K with plain multiply-adds on the CUDA cores: one row leaves a tensor core nothing
to reuse. A version taking two or four rows at once (one accumulator per row) lost to cuBLAS
(0.91x and 0.58x over the layer chain, a one-off run of a draft of the bench), so steps of more
rows keep F.linear.
Reference: F.linear, which the tests hold the kernel to (on CPU through Triton's interpreter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hma import kernels

PROGRAM_BYTES = 20 * 1024  # weights a program reads at most (one row of features at least)


@dataclass(frozen=True, slots=True)
class MatvecConfig:
    """A launch: output features per program, K per loop step, warps."""

    features: int
    block_k: int
    num_warps: int


# Best per features-per-program on qwen3-4b's shapes (H200 sweep): each thread holds 8-32 products
# of a step in flight.
_BY_FEATURES = {4: MatvecConfig(4, 512, 2), 2: MatvecConfig(2, 1024, 4), 1: MatvecConfig(1, 512, 2)}


def choose_config(in_features: int, element_size: int) -> MatvecConfig:
    """The most output features (1, 2 or 4) whose weight rows fit in PROGRAM_BYTES."""
    row_bytes = in_features * element_size
    features = next((f for f in (4, 2) if f * row_bytes <= PROGRAM_BYTES), 1)
    return _BY_FEATURES[features]


@triton.jit
def _matvec_kernel(x_ptr, w_ptr, y_ptr, out_features, in_features, w_stride,
                   FEATURES: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    """y[n] for this program's FEATURES output features n: float32 sums of (FEATURES, BLOCK_K)
    products kept apart until the end, rounded once at the store as cuBLAS rounds."""
    n = tl.program_id(0) * FEATURES + tl.arange(0, FEATURES)
    k = tl.arange(0, BLOCK_K)
    w_at = w_ptr + n.to(tl.int64)[:, None] * w_stride + k[None, :]
    acc = tl.zeros((FEATURES, BLOCK_K), tl.float32)
    for start in range(0, in_features, BLOCK_K):
        if EVEN:  # no tail in K or in the features: the loads go unmasked
            w = tl.load(w_at + start)
            x = tl.load(x_ptr + start + k)
        else:
            k_ok = start + k < in_features
            w = tl.load(w_at + start, mask=(n < out_features)[:, None] & k_ok[None, :], other=0)
            x = tl.load(x_ptr + start + k, mask=k_ok, other=0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(y_ptr + n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=n < out_features)


def linear(x: torch.Tensor, weight: torch.Tensor, config: MatvecConfig | None = None) -> torch.Tensor:
    """F.linear(x, weight) for x (rows, in_features), weight (out_features, in_features): through
    the kernel for one row, through F.linear for more."""
    num_rows, in_features = x.shape
    out_features = weight.shape[0]
    if num_rows != 1 or x.stride(-1) != 1 or weight.stride(-1) != 1:
        return F.linear(x, weight)
    config = config or choose_config(in_features, weight.element_size())
    y = torch.empty(1, out_features, dtype=x.dtype, device=x.device)
    even = in_features % config.block_k == 0 and out_features % config.features == 0
    kernels.triton_launch(
        _matvec_kernel, (triton.cdiv(out_features, config.features),), x, weight, y, out_features, in_features,
        weight.stride(0), FEATURES=config.features, BLOCK_K=config.block_k, EVEN=even, num_warps=config.num_warps)
    return y
