"""KV formats: how one K or V vector of head_dim values rests in blocks and travels, as (payload, scales).

quantize maps x (..., head_dim) of float32/bfloat16/float16 to payload (..., payload_dim) and scales
(..., num_scales) of float16; dequantize, called inside attention, maps them back. The layout below is
fixed by the format's name and head_dim alone, so hosts of different vendors agree byte for byte.
Per (token, head), elements in order, each in its dtype's little-endian IEEE or two's-complement form:

  name  payload                                    scales (float16)                      value
  fp32  head_dim x float32                         none                                  p
  fp16  head_dim x float16                         none                                  p
  bf16  head_dim x bfloat16                        none                                  p
  fp8   head_dim x float8_e4m3fn in [-448, 448]    [s], s = amax / 448                   p[i] * s
  int8  head_dim x int8 in [-127, 127]             [s], s = amax / 127                   p[i] * s
  int4  head_dim/2 x uint8: byte j holds element   [s_0..s_G-1, m_0..m_G-1], G = head_dim/32
        2j in bits 0-3 and 2j+1 in bits 4-7        s_g = (max_g - m_g) / 15, m_g = min_g  q[i] * s_g + m_g
  bfp8  head_dim x int8 mantissa in [-127, 127]    [2**e_0..2**e_B-1], B = head_dim/16
                                                   e_b = ceil(log2(amax_b / 127))        p[i] * 2**e_b

amax, min and max run over the vector, 32-value group g = i // 32 or 16-value block b = i // 16. Every
scale is rounded to float16 before the division (up, and int4's m_g down, so no value leaves the payload
range; the payload is clamped to it besides) and floored at 2**-24, so all-zero vectors stay zero.
Scales cap at float16's finite maximum, so values saturate past 6.5e4 (int4's m_g), 4e6 (bfp8), 8e6 (int8).
bfp8's shared exponent is one int8 on Tenstorrent-class devices; here it travels as the exact float16
2**e (e in -24..15), and bytes_per_token counts those 2 bytes, because that is what is stored and sent.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from hma.errors import InvalidRequestError

SCALE_DTYPE = torch.float16
MIN_SCALE = 2.0**-24  # smallest positive float16: keeps zero vectors free of 0/0
MAX_SCALE = torch.finfo(SCALE_DTYPE).max
MAX_POW2_SCALE = 2.0**15  # largest power of two float16 holds


def _to_scale_dtype(s: torch.Tensor, direction: float) -> torch.Tensor:
    """Round float32 `s` to SCALE_DTYPE towards `direction` (+inf or -inf), clamped to its finite range."""
    s = s.clamp(-MAX_SCALE, MAX_SCALE)
    s16 = s.to(SCALE_DTYPE)
    # round-to-nearest may land on the wrong side; one step of nextafter fixes it exactly
    wrong_side = (s16.float() < s) if direction > 0 else (s16.float() > s)
    return torch.where(wrong_side, torch.nextafter(s16, torch.full_like(s16, direction)), s16)


def _pow2_at_least(y: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= y, computed exactly via frexp (log2 can round the wrong way)."""
    y = y.clamp(MIN_SCALE, MAX_POW2_SCALE)
    mantissa, exponent = torch.frexp(y)  # y = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)  # y is itself a power of two
    return torch.ldexp(torch.ones_like(y), exponent)


@dataclass(frozen=True, slots=True)
class KVFormat(abc.ABC):
    """One way to store K or V: sizes per (token, head) and the quantize/dequantize pair."""

    name: str
    payload_dtype: torch.dtype

    def payload_dim(self, head_dim: int) -> int:
        """Payload elements per (token, head)."""
        self._check_head_dim(head_dim)
        return head_dim

    @abc.abstractmethod
    def num_scales(self, head_dim: int) -> int:
        """SCALE_DTYPE elements per (token, head); 0 for unquantized formats."""

    def bytes_per_token(self, num_kv_heads: int, head_dim: int) -> int:
        """Bytes of ONE of K or V, one layer, one token: payload plus scales."""
        payload = self.payload_dim(head_dim) * self.payload_dtype.itemsize
        return num_kv_heads * (payload + self.num_scales(head_dim) * SCALE_DTYPE.itemsize)

    @abc.abstractmethod
    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., head_dim) -> payload (..., payload_dim), scales (..., num_scales)."""

    @abc.abstractmethod
    def dequantize(self, payload: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """payload (..., payload_dim), scales (..., num_scales) -> x (..., head_dim) as `dtype`."""

    @property
    def is_quantized(self) -> bool:
        """True when the payload needs its scales to mean anything."""
        return True

    def _check_head_dim(self, head_dim: int, multiple: int = 1) -> None:
        if head_dim <= 0 or head_dim % multiple:
            raise InvalidRequestError(
                f"kv_format={self.name} needs head_dim a positive multiple of {multiple}; got {head_dim}"
            )


@dataclass(frozen=True, slots=True)
class CastFormat(KVFormat):
    """Unquantized: the payload is x cast to payload_dtype, scales are empty."""

    def num_scales(self, head_dim: int) -> int:
        self._check_head_dim(head_dim)
        return 0

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scales = x.new_empty(*x.shape[:-1], 0, dtype=SCALE_DTYPE)
        return x.to(self.payload_dtype), scales

    def dequantize(self, payload: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return payload.to(dtype)

    @property
    def is_quantized(self) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class AbsmaxFormat(KVFormat):
    """Symmetric, one scale per (token, head): p = x / s with s = amax / qmax."""

    qmax: float = 127.0

    def num_scales(self, head_dim: int) -> int:
        self._check_head_dim(head_dim)
        return 1

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_head_dim(x.shape[-1])
        x = x.float()
        scale = _to_scale_dtype(x.abs().amax(-1, keepdim=True) / self.qmax, float("inf"))
        scale = scale.clamp_min(MIN_SCALE)  # (..., 1)
        p = (x / scale.float()).clamp(-self.qmax, self.qmax)
        if not self.payload_dtype.is_floating_point:
            p = p.round()  # float8 rounds to nearest in the cast; integers need it here
        return p.to(self.payload_dtype), scale

    def dequantize(self, payload: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (payload.float() * scales.float()).to(dtype)


@dataclass(frozen=True, slots=True)
class Int4Format(KVFormat):
    """Asymmetric 4-bit, scale and minimum per group of 32; two values per byte, even one low."""

    group_size: int = 32

    def payload_dim(self, head_dim: int) -> int:
        self._check_head_dim(head_dim, self.group_size)
        return head_dim // 2

    def num_scales(self, head_dim: int) -> int:
        self._check_head_dim(head_dim, self.group_size)
        return 2 * (head_dim // self.group_size)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_head_dim(x.shape[-1], self.group_size)
        groups = x.float().unflatten(-1, (-1, self.group_size))  # (..., num_groups, group_size)
        low = _to_scale_dtype(groups.amin(-1), float("-inf"))  # (..., num_groups)
        span = groups.amax(-1) - low.float()
        scale = _to_scale_dtype(span / 15, float("inf")).clamp_min(MIN_SCALE)
        q = ((groups - low.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 15)
        q = q.to(torch.uint8).flatten(-2)  # (..., head_dim)
        payload = q[..., 0::2] | (q[..., 1::2] << 4)  # (..., head_dim // 2)
        return payload, torch.cat([scale, low], dim=-1)

    def dequantize(self, payload: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        q = torch.stack([payload & 0x0F, payload >> 4], dim=-1).flatten(-2)  # (..., head_dim)
        scale, low = scales.float().chunk(2, dim=-1)  # each (..., num_groups)
        groups = q.float().unflatten(-1, (-1, self.group_size)) * scale[..., None] + low[..., None]
        return groups.flatten(-2).to(dtype)


@dataclass(frozen=True, slots=True)
class BlockFloatFormat(KVFormat):
    """Block floating point: blocks of 16 share a power-of-two step, each value an int8 mantissa."""

    block_size: int = 16

    def num_scales(self, head_dim: int) -> int:
        self._check_head_dim(head_dim, self.block_size)
        return head_dim // self.block_size

    def payload_dim(self, head_dim: int) -> int:
        self._check_head_dim(head_dim, self.block_size)
        return head_dim

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_head_dim(x.shape[-1], self.block_size)
        blocks = x.float().unflatten(-1, (-1, self.block_size))  # (..., num_blocks, block_size)
        # step >= amax / 127, so no mantissa overflows; a power of two, so x / step is exact
        step = _pow2_at_least(blocks.abs().amax(-1) / 127)  # (..., num_blocks)
        mantissa = (blocks / step[..., None]).round().clamp(-127, 127)
        return mantissa.to(torch.int8).flatten(-2), step.to(SCALE_DTYPE)

    def dequantize(self, payload: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        blocks = payload.float().unflatten(-1, (-1, self.block_size)) * scales.float()[..., None]
        return blocks.flatten(-2).to(dtype)


KV_FORMATS: dict[str, KVFormat] = {
    f.name: f
    for f in (
        CastFormat("fp32", torch.float32),
        CastFormat("fp16", torch.float16),
        CastFormat("bf16", torch.bfloat16),
        AbsmaxFormat("fp8", torch.float8_e4m3fn, qmax=448.0),
        AbsmaxFormat("int8", torch.int8, qmax=127.0),
        Int4Format("int4", torch.uint8),
        BlockFloatFormat("bfp8", torch.int8),
    )
}


def get_kv_format(name: str) -> KVFormat:
    """The registered format called `name`."""
    try:
        return KV_FORMATS[name]
    except KeyError:
        known = ", ".join(KV_FORMATS)
        raise InvalidRequestError(f"unknown kv_format={name!r}; choose one of {known}") from None
