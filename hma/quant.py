"""8-bit (W8A8) linears for prefill: fp8 and int8 scale weights per output channel and activations
per token; bfp8 gives every 16 values along the reduction dimension one shared exponent.

Weights are quantized once at load and the float weight is dropped; activations on every call.
On CUDA fp8 runs torch._scaled_mm and int8 torch._int_mm; elsewhere `forward_reference` does the
same arithmetic in float, and the tests hold each kernel to it. bfp8 is always that emulation.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from hma.errors import InvalidRequestError
from hma.fusion import gpu_fused

log = logging.getLogger(__name__)

PREFILL_DTYPES = ("bf16", "fp8", "int8", "bfp8")  # "bf16": no quantization, the model's own dtype
QUANT_MODES = PREFILL_DTYPES[1:]

ROW_QMAX = {"fp8": 448.0, "int8": 127.0}  # fp8 is e4m3fn, whose largest finite value is 448
MIN_SCALE = torch.finfo(torch.float32).tiny  # an all-zero row keeps a positive scale, quantizes to 0
BFP8_BLOCK = 16  # values sharing one exponent, consecutive along in_features
BFP8_MANTISSA_MAX = 127
BFP8_EXPONENT_RANGE = (-126, 127)  # 2**e stays a normal float32; smaller blocks round to zero
FP8_TOKEN_MULTIPLE = 16
INT8_TOKEN_MULTIPLE, INT8_MIN_TOKENS = 8, 32  # torch._int_mm rejects 16 rows or fewer


def quantize_rows(x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization: (q, scale (rows, 1) float32) with x ~= q * scale."""
    if mode not in ROW_QMAX:
        raise InvalidRequestError(f"per-row quantization is fp8 or int8, not {mode!r}")
    qmax = ROW_QMAX[mode]
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(MIN_SCALE)  # (rows, 1)
    q = (x / scale).clamp(-qmax, qmax)  # e4m3fn has no inf: past 448 the cast would give NaN
    if mode == "int8":
        return q.round().to(torch.int8), scale
    return q.to(torch.float8_e4m3fn), scale


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bfp8: (mantissa int8 like x, exponent int8 (rows, cols // 16)) with x ~= mantissa * 2**exponent."""
    rows, cols = x.shape
    if cols % BFP8_BLOCK:
        raise InvalidRequestError(f"bfp8 needs in_features divisible by {BFP8_BLOCK}, got {cols}")
    blocks = x.float().reshape(rows, cols // BFP8_BLOCK, BFP8_BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True).clamp_min(MIN_SCALE)  # (rows, num_blocks, 1)
    exponent = torch.ceil(torch.log2(amax / BFP8_MANTISSA_MAX)).clamp(*BFP8_EXPONENT_RANGE)
    # Dividing by a power of two is exact, so rounding the mantissa is the only error.
    mantissa = (blocks / torch.exp2(exponent)).round().clamp(-BFP8_MANTISSA_MAX, BFP8_MANTISSA_MAX)
    return mantissa.to(torch.int8).reshape(rows, cols), exponent.to(torch.int8).squeeze(-1)


def dequantize_blocks(mantissa: torch.Tensor, exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values a bfp8 tensor stands for, in dtype (exact in bf16: mantissas need 7 bits)."""
    rows, cols = mantissa.shape
    blocks = mantissa.float().reshape(rows, -1, BFP8_BLOCK) * torch.exp2(exponent.float()).unsqueeze(-1)
    return blocks.reshape(rows, cols).to(dtype)


class QuantizedLinear(nn.Module):
    """y = x @ W.T with W quantized per output channel at load and x per token on the fly.

    bfp8 quantizes both operands per 16-value block instead. Only the 8-bit weight and its scales
    (fp8, int8) or exponents (bfp8) are kept, as buffers: move the module with .to(device), never
    .to(dtype), which would cast the fp8 weight and float32 scales along with the model.
    """

    def __init__(self, weight: torch.Tensor, mode: str, smooth: torch.Tensor | None = None) -> None:
        super().__init__()
        if mode not in QUANT_MODES:
            raise InvalidRequestError(f"quant mode {mode!r} is not one of {', '.join(QUANT_MODES)} "
                                      "(bf16 means no quantization: keep the float linear)")
        if weight.dim() != 2 or not weight.is_floating_point():
            raise InvalidRequestError(f"weight must be a float (out_features, in_features) matrix, "
                                      f"got {weight.dtype} of shape {tuple(weight.shape)}")
        self.mode = mode
        self.out_features, self.in_features = weight.shape
        weight = weight.detach()
        # SmoothQuant: x @ W.T == (x / s) @ (W * s).T; dividing by s tames outlier input channels.
        self.register_buffer("inv_smooth", None if smooth is None else 1.0 / smooth.float())
        if smooth is not None:
            weight = weight.float() * smooth.float()
        if mode == "bfp8":
            mantissa, exponent = quantize_blocks(weight)
            self.register_buffer("qweight", mantissa)  # (out_features, in_features) int8
            self.register_buffer("weight_exponent", exponent)  # (out_features, in_features // 16) int8
        else:
            qweight, scale = quantize_rows(weight, mode)
            self.register_buffer("qweight", qweight)  # (out_features, in_features) int8 or fp8
            self.register_buffer("weight_scale", scale)  # (out_features, 1) float32

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) in bf16, fp16 or fp32 -> (..., out_features) in x.dtype."""
        x2 = x.reshape(-1, self.in_features)  # (num_tokens, in_features)
        if self.inv_smooth is not None:
            x2 = (x2.float() * self.inv_smooth).to(x.dtype)
        reason = _why_not_fused(x2, self.mode, self.in_features, self.out_features)
        if reason is None:
            y = self._forward_fused(x2)
        else:
            if self.mode != "bfp8":  # bfp8 has no kernel to miss: it is emulated by design
                _warn_reference_path(self.mode, reason)
            y = self.forward_reference(x2)
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized arithmetic in float on any device: x (num_tokens, in_features)."""
        if self.mode == "bfp8":
            # The format's matmul runs on the dequantized values in the activation dtype.
            x_q = dequantize_blocks(*quantize_blocks(x), x.dtype)
            return F.linear(x_q, dequantize_blocks(self.qweight, self.weight_exponent, x.dtype))
        q_x, s_x = quantize_rows(x, self.mode)
        # Sum the 8-bit products first and scale after, as the kernels do: int8 sums stay exact
        # integers in float32 for in_features up to 1040, and fp8 products are exact too.
        y = q_x.float() @ self.qweight.float().t()  # (num_tokens, out_features)
        return (y * (s_x * self.weight_scale.t())).to(x.dtype)

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """torch._scaled_mm (fp8) or torch._int_mm (int8) on CUDA; pads tokens to the kernel's shape."""
        num_tokens = x.shape[0]
        if self.mode == "fp8":
            padded = -(-num_tokens // FP8_TOKEN_MULTIPLE) * FP8_TOKEN_MULTIPLE
        else:
            padded = max(INT8_MIN_TOKENS, -(-num_tokens // INT8_TOKEN_MULTIPLE) * INT8_TOKEN_MULTIPLE)
        if padded != num_tokens:
            x = F.pad(x, (0, 0, 0, padded - num_tokens))  # zero rows quantize to zeros
        q_x, s_x = _quantize_rows_fused(x, self.mode)
        # Both kernels want the weight column-major: .t() of the row-major (out, in) buffer is.
        if self.mode == "fp8":
            # Row-wise scaling may run on CUTLASS, which writes bf16 only; cast after for fp16/fp32.
            y = torch._scaled_mm(q_x, self.qweight.t(), scale_a=s_x, scale_b=self.weight_scale.t(),
                                 out_dtype=torch.bfloat16)
        else:
            y = _scale_int32(torch._int_mm(q_x, self.qweight.t()), s_x, self.weight_scale)
        return y[:num_tokens].to(x.dtype)


def _quantize_rows_fused(x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows in one Triton kernel on CUDA (unfused, the elementwise passes over the
    activations cost more than the 8-bit matmul saves); the reference elsewhere."""
    if not x.is_cuda or x.stride(-1) != 1:
        return quantize_rows(x, mode)
    from hma import quant_kernels

    return quant_kernels.quantize_rows(x, mode, ROW_QMAX[mode], MIN_SCALE)


@gpu_fused
def _scale_int32(y: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """int32 sums times the row and column scales, as float32."""
    return y.float() * (s_x * s_w.t())


def _why_not_fused(x: torch.Tensor, mode: str, in_features: int, out_features: int) -> str | None:
    """None when mode's CUDA kernel can take x, else why forward uses the reference path."""
    if mode == "bfp8":
        return "bfp8 is emulated"
    if not x.is_cuda:
        return f"device={x.device.type}"
    capability = torch.cuda.get_device_capability(x.device)  # cached by torch after the first call
    if mode == "fp8":
        if capability < (8, 9):
            return f"fp8 matmul needs compute capability 8.9+, got {capability}"
        if in_features % 16 or out_features % 16:
            return "torch._scaled_mm needs in_features and out_features divisible by 16"
    else:
        if capability < (7, 5):
            return f"int8 matmul needs compute capability 7.5+, got {capability}"
        if in_features % 8 or out_features % 8:
            return "torch._int_mm needs in_features and out_features divisible by 8"
    return None


@functools.cache  # the cache is what makes the warning one-time per (mode, reason)
def _warn_reference_path(mode: str, reason: str) -> None:
    log.warning("prefill_dtype=%s runs the float reference path (%s): same numerics, no 8-bit speedup",
                mode, reason)


class PhaseLinear(nn.Module):
    """A bias-free linear with its decode weight and, once added, a W8A8 copy for prefill rows.

    Phase-wise quantization: the leading num_prefill_rows of a batch (prefill tokens) run through
    the 8-bit copy, the rest (decode tokens) through the float weight. A prefill host drops the
    float weight and so holds only its own copy; a colocated engine keeps both.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty(out_features, in_features))
        self.prefill: QuantizedLinear | None = None

    def set_prefill_precision(self, mode: str, keep_decode_weight: bool = True,
                              smooth: torch.Tensor | None = None) -> None:
        """Quantizes the loaded weight for prefill ('bf16': prefill rows use the float weight),
        SmoothQuant-scaled if smooth is given; without keep_decode_weight the float weight goes."""
        if self.weight is None:
            raise RuntimeError("the float weight was dropped; reload the model to change precision")
        self.prefill = None if mode == "bf16" else QuantizedLinear(self.weight.data, mode, smooth)
        if not keep_decode_weight and self.prefill is not None:
            self.weight = None

    def float_weight_for(self, num_prefill_rows: int) -> torch.Tensor | None:
        """The float weight if every row of a batch with num_prefill_rows prefill rows runs
        through it (there is no 8-bit copy, or no prefill row), else None."""
        return self.weight if self.prefill is None or num_prefill_rows == 0 else None

    def forward(self, x: torch.Tensor, num_prefill_rows: int) -> torch.Tensor:
        if self.prefill is None:
            return float_linear(x, self.weight)
        if num_prefill_rows == x.shape[0]:
            return self.prefill(x)
        if self.weight is None:
            raise RuntimeError("this model holds only prefill weights; it cannot run decode rows")
        if num_prefill_rows == 0:
            return float_linear(x, self.weight)
        return torch.cat([self.prefill(x[:num_prefill_rows]), float_linear(x[num_prefill_rows:], self.weight)])


def float_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight); on CUDA hma.matvec.linear, which runs a decode step of a few rows
    through its own kernel (it reads the weight faster than cuBLAS's split-K kernels do)."""
    if x.is_cuda and x.dim() == 2:
        from hma import matvec  # Triton ships with CUDA builds of torch, not CPU ones

        return matvec.linear(x, weight)
    return F.linear(x, weight)


def smoothing_factors(input_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel s = amax(|x|)^alpha / amax(|W|)^(1 - alpha): it moves
    outliers from the activations (quantized per token) into the weights (per output channel)."""
    w_amax = weight.detach().float().abs().amax(dim=0).clamp_min(1e-5)  # (in_features,)
    return (input_amax.float().clamp_min(1e-5) ** alpha / w_amax ** (1 - alpha)).clamp_min(1e-5)
