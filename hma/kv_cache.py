"""The paged KV cache: per-layer K and V block pools in a KV format, and the block allocator.

Pools per layer, for K and for V alike (deferred dequantization: never a dequantized copy):
  payload (num_blocks, block_size, num_key_value_heads, format.payload_dim(head_dim))
  scales  (num_blocks, block_size, num_key_value_heads, format.num_scales(head_dim)), float16
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
from hma.kv_formats import SCALE_DTYPE, KVFormat

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
              device: torch.device | str) -> LayerKV:
        # Zeros, not garbage: padded block-table entries are read (then masked) by attention.
        def pool(dim: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(num_blocks, block_size, num_kv_heads, dim, dtype=dtype, device=device)

        payload, scales = fmt.payload_dim(head_dim), fmt.num_scales(head_dim)
        return cls(fmt, pool(payload, fmt.payload_dtype), pool(scales, SCALE_DTYPE),
                   pool(payload, fmt.payload_dtype), pool(scales, SCALE_DTYPE))

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.k, self.k_scales, self.v, self.v_scales


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
