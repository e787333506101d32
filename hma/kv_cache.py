"""The paged KV cache: per-layer K and V block pools in a KV format, and the block allocator.

Pools per layer, for K and for V alike (deferred dequantization: never a dequantized copy):
  payload (num_blocks, block_size, num_key_value_heads, format.payload_dim(head_dim))
  scales  (num_blocks, block_size, num_key_value_heads, format.num_scales(head_dim)), float16
Those are the shapes every reader and writer indexes. In memory, V's payload of the 8-bit
one-scale formats (fp8, int8) lies head_dim-major within each block, (num_blocks, heads,
head_dim, block_size), as vLLM's paged attention keeps V: attention's p.V sums over tokens, and
the tensor cores take 8-bit values only with the summed axis contiguous (kernels._load_tile), so
V's pool is a permuted view and the kernels address it by its layout. Slots are read and written
through read_slots / write_slots, which index blocks and offsets and so fit either layout.
A block holds block_size consecutive tokens of one sequence; a sequence's block table lists its
blocks in order. Invariant: the scheduler owns every allocation and frees a sequence's blocks the
moment it finishes or is preempted; the cache itself never frees anything.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass

import torch

from hma.config import ModelConfig
from hma.errors import RequestTooLargeError
from hma.kv_formats import SCALE_DTYPE, AbsmaxFormat, CastFormat, KVFormat

log = logging.getLogger(__name__)

CPU_KV_MEMORY_CAP_GB = 1.0  # a CPU default large enough for the demo, small enough for a laptop


def blocks_for(num_tokens: int, block_size: int) -> int:
    """How many blocks num_tokens tokens occupy."""
    return -(-num_tokens // block_size)


class BlockAllocator:
    """A free list of block ids; allocation is all-or-nothing."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Takes n blocks off the free list, or raises if fewer are free."""
        if n > len(self._free):
            raise RequestTooLargeError(f"{n} KV blocks wanted, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)


@dataclass(slots=True)
class LayerKV:
    """One layer's pools: raw payload and scales for K and for V, in one format."""

    format: KVFormat
    k: torch.Tensor
    k_scales: torch.Tensor
    v: torch.Tensor
    v_scales: torch.Tensor

    @classmethod
    def empty(cls, fmt: KVFormat, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
              device: torch.device | str, v_dim_major: bool | None = None) -> LayerKV:
        """Zeroed pools; v_dim_major: V's payload head_dim-major in memory (default: the format's,
        v_dim_major_for; bench attention times both)."""
        # Zeros, not garbage: padded block-table entries are read (then masked) by attention.
        def pool(dim: int, dtype: torch.dtype, dim_major: bool = False) -> torch.Tensor:
            if dim_major:
                return torch.zeros(num_blocks, num_kv_heads, dim, block_size, dtype=dtype,
                                   device=device).permute(0, 3, 1, 2)
            return torch.zeros(num_blocks, block_size, num_kv_heads, dim, dtype=dtype, device=device)

        payload, scales = fmt.payload_dim(head_dim), fmt.num_scales(head_dim)
        v_dim_major = v_dim_major_for(fmt) if v_dim_major is None else v_dim_major
        if v_dim_major and not isinstance(fmt, (AbsmaxFormat, CastFormat)):
            raise ValueError(f"{fmt.name} keeps V token-major: its scales and packing run along head_dim")
        return cls(fmt, pool(payload, fmt.payload_dtype), pool(scales, SCALE_DTYPE),
                   pool(payload, fmt.payload_dtype, v_dim_major), pool(scales, SCALE_DTYPE))

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.k, self.k_scales, self.v, self.v_scales

    @property
    def v_dim_major(self) -> bool:
        """Whether V's payload lies head_dim-major within each block (with one-token blocks the
        two layouts are the same memory, and this says False)."""
        return self.v.stride(-1) != 1


def v_dim_major_for(fmt: KVFormat) -> bool:
    """The V layout a format's pools get: head_dim-major for the 8-bit one-scale formats, whose
    fused attention reads V in the tensor cores' operand order (kernels._load_tile)."""
    return isinstance(fmt, AbsmaxFormat)


def read_slots(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The rows (len(slots), kv_heads, dim) of a pool at those cache slots, as a new tensor."""
    block_size = pool.shape[1]
    return pool[slots // block_size, slots % block_size]


def write_slots(pool: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """pool at those cache slots = rows (len(slots), kv_heads, dim), in the pool's own memory,
    whatever its layout."""
    block_size = pool.shape[1]
    # index_put_ has no float8 kernel on the CPU; the same bytes viewed as uint8 copy fine
    if pool.dtype == torch.float8_e4m3fn:
        pool, rows = pool.view(torch.uint8), rows.view(torch.uint8)
    pool[slots // block_size, slots % block_size] = rows.to(pool.device)


class KVCache:
    """Block pools for every layer in one KV format, on one device, and their allocator."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, fmt: KVFormat,
                 device: torch.device | str) -> None:
        if num_blocks < 1:
            raise RequestTooLargeError(
                f"the KV memory budget holds no block of {block_size} tokens; raise kv_memory_gb")
        self.layers = [LayerKV.empty(fmt, num_blocks, block_size, config.num_key_value_heads,
                                     config.head_dim, device) for _ in range(config.num_hidden_layers)]
        self.format = fmt
        self.device = torch.device(device)
        self.num_kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        log.info("kv cache: %s, %d blocks x %d tokens = %d tokens, %.3f GB", fmt.name, num_blocks,
                 block_size, num_blocks * block_size, self.nbytes / 1e9)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def kv_bytes_per_token(config: ModelConfig, fmt: KVFormat) -> int:
    """K and V of every layer for one token, payload and scales."""
    return 2 * config.num_hidden_layers * fmt.bytes_per_token(config.num_key_value_heads, config.head_dim)


def bytes_per_block(config: ModelConfig, block_size: int, fmt: KVFormat) -> int:
    """K and V of every layer for one block, payload and scales."""
    return block_size * kv_bytes_per_token(config, fmt)


def kv_budget_bytes(device: torch.device, kv_memory_gb: float | None, fraction: float) -> int:
    """The KV budget: the flag in GB, else a fraction of free device memory (or of free RAM)."""
    if kv_memory_gb is not None:
        return int(kv_memory_gb * 1e9)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(min(available * fraction, CPU_KV_MEMORY_CAP_GB * 1e9))
