"""Matrix-vector products for decode steps of one sequence: y = x @ W.T at the HBM's read rate.

A decode step at batch 1 is bound by reading every weight once. For these one-row shapes cuBLAS
picks split-K kernels plus a reduction. In a CUDA graph of qwen3-4b's 36 layers of four linears
(distinct weights, H200) it read them at 2.92 TB/s; this kernel reads them at 3.63 TB/s (3.55
against 3.92 for qwen3-8b; `python -m hma bench matvec`). Each program owns one to four output
features, about 16 KiB of weights, so even the narrow projections spread over ten programs an
SM. It walks K with plain multiply-adds on the CUDA cores: one row leaves a tensor core nothing
to reuse. A version taking two or four rows at once (one accumulator per row) lost to cuBLAS
(0.91x and 0.58x over the layer chain, a one-off run of a draft of the bench), so steps of more
rows keep F.linear. gated_linear runs SwiGLU's silu(gate) * up in the gate/up product itself,
one launch a layer fewer (1.02x over the layers of qwen3-4b and of qwen3-8b, attention left out).
Like every hma kernel of a step it launches with programmatic dependent launch on Hopper
(kernels.await_inputs). Running the residual add and RMSNorm inside it as well was slower on an
H100 (0.96x over the layers; c601ba8, reverted). Reference: F.linear (and qwen3.silu_and_mul),
which the tests hold the kernel to (on CPU through Triton's interpreter).
"""

from __future__ import annotations

import dataclasses
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


def choose_config(in_features: int, element_size: int, gated: bool = False) -> MatvecConfig:
    """The most weight rows (1, 2 or 4) that fit in PROGRAM_BYTES. Gated, a feature is two rows
    (its gate and its up): at most two features a program, on the same tile (best on an H200 for
    qwen3-4b's gate_up and qwen3-8b's, where one feature a program ran 4% slower)."""
    row_bytes = in_features * element_size
    rows = next((r for r in (4, 2) if r * row_bytes <= PROGRAM_BYTES), 1)
    config = _BY_FEATURES[rows]
    return dataclasses.replace(config, features=min(rows, 2)) if gated else config


@triton.jit
def _load(ptr, mask, EVEN: tl.constexpr):
    """ptr's values as float32, unmasked when EVEN (no tail in K or in the features)."""
    if EVEN:
        return tl.load(ptr).to(tl.float32)
    return tl.load(ptr, mask=mask, other=0).to(tl.float32)


@triton.jit
def _matvec_kernel(x_ptr, w_ptr, y_ptr, out_features, in_features, w_stride,
                   FEATURES: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr, GATED: tl.constexpr,
                   PDL: tl.constexpr = False):
    """y[n] for this program's FEATURES output features n: float32 sums of (FEATURES, BLOCK_K)
    products kept apart until the end, rounded once at the store as cuBLAS rounds. GATED: the
    weight is gate rows over up rows (2 * out_features of them) and y = silu(gate) * up, rounded
    where qwen3.silu_and_mul rounds."""
    kernels.await_inputs(PDL)
    n = tl.program_id(0) * FEATURES + tl.arange(0, FEATURES)
    k = tl.arange(0, BLOCK_K)
    w_at = w_ptr + n.to(tl.int64)[:, None] * w_stride + k[None, :]
    up_at = w_at + out_features.to(tl.int64) * w_stride
    acc = tl.zeros((FEATURES, BLOCK_K), tl.float32)
    acc_up = tl.zeros((FEATURES, BLOCK_K), tl.float32)
    for start in range(0, in_features, BLOCK_K):
        k_ok = start + k < in_features
        w_ok = (n < out_features)[:, None] & k_ok[None, :]
        x = _load(x_ptr + start + k, k_ok, EVEN)[None, :]
        acc += _load(w_at + start, w_ok, EVEN) * x
        if GATED:
            acc_up += _load(up_at + start, w_ok, EVEN) * x
    dtype = y_ptr.dtype.element_ty
    y = tl.sum(acc, axis=1)
    if GATED:
        gate = y.to(dtype).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        y = silu * tl.sum(acc_up, axis=1).to(dtype).to(tl.float32)
    tl.store(y_ptr + n, y.to(dtype), mask=n < out_features)


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes x: one row, unit column strides."""
    return x.dim() == 2 and x.shape[0] == 1 and x.stride(-1) == 1 and weight.stride(-1) == 1


def linear(x: torch.Tensor, weight: torch.Tensor, config: MatvecConfig | None = None) -> torch.Tensor:
    """F.linear(x, weight) for x (rows, in_features), weight (out_features, in_features): through
    the kernel for one row, through F.linear for more."""
    if not fits(x, weight):
        return F.linear(x, weight)
    return _launch(x, weight, False, config)


def gated_linear(x: torch.Tensor, weight: torch.Tensor, config: MatvecConfig | None = None) -> torch.Tensor:
    """qwen3.silu_and_mul(F.linear(x, weight)) for one row x that fits, weight (2 * features,
    in_features) gate rows over up rows: SwiGLU's input to the down projection, in one launch."""
    assert fits(x, weight) and weight.shape[0] % 2 == 0
    return _launch(x, weight, True, config)


def _launch(x: torch.Tensor, weight: torch.Tensor, gated: bool, config: MatvecConfig | None) -> torch.Tensor:
    in_features = x.shape[1]
    out_features = weight.shape[0] // 2 if gated else weight.shape[0]
    config = config or choose_config(in_features, weight.element_size(), gated)
    y = torch.empty(1, out_features, dtype=x.dtype, device=x.device)
    even = in_features % config.block_k == 0 and out_features % config.features == 0
    kernels.triton_launch(
        _matvec_kernel, (triton.cdiv(out_features, config.features),), x, weight, y, out_features, in_features,
        weight.stride(0), FEATURES=config.features, BLOCK_K=config.block_k, EVEN=even, GATED=gated,
        num_warps=config.num_warps)
    return y
