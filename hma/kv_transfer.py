"""KV leaving one paged cache and landing in another, per layer and per token range.

take_layer_kv reads a request's tokens [start, end) of one layer out of the prefill host's cache
as a KVLayer message (raw payload and scales, still quantized); put_layer_kv writes such a message
into the decode host's cache at that request's slots. Blocks are never shipped, only token
ranges, so the two hosts may use different block sizes and layouts. If the decode cache keeps
another format than the sender's, the values are transcoded once on arrival (dequantized, then
quantized into the local format): a decode host accepts every format of the registry.
"""

from __future__ import annotations

import torch

from hma.attention import store_kv, write_kv
from hma.batch import slots_for
from hma.errors import ProtocolError
from hma.kv_cache import KVCache, LayerKV
from hma.kv_formats import KVFormat
from hma.wire import KVLayer


def token_slots(cache: KVCache, block_ids: list[int], start: int, end: int) -> torch.Tensor:
    """Cache slots of a request's tokens [start, end), on the cache's device."""
    return torch.tensor(slots_for(block_ids, start, end, cache.block_size), device=cache.device)


def take_layer_kv(cache: KVCache, layer: int, request_id: str, slots: torch.Tensor, start: int,
                  device: torch.device | str = "cpu", computed_at: float = 0.0) -> KVLayer:
    """One layer of a request's tokens [start, start + len(slots)), copied to device (for sending:
    the host). The slots come from token_slots, made once per request rather than per layer."""
    pools = cache.layers[layer]

    def read(pool: torch.Tensor) -> torch.Tensor:
        return pool.flatten(0, 1)[slots].to(device)  # (num_tokens, kv_heads, dim)

    return KVLayer(request_id, layer, start, start + len(slots), read(pools.k), read(pools.k_scales),
                   read(pools.v), read(pools.v_scales), computed_at)


def put_layer_kv(cache: KVCache, block_ids: list[int], msg: KVLayer, sender: KVFormat) -> None:
    """Writes a received layer into the request's blocks, checking it matches this cache's model."""
    layer = _checked_layer(cache, msg, sender)
    slots = token_slots(cache, block_ids, msg.token_start, msg.token_end)
    if sender.name == cache.format.name:
        store_kv(layer, (msg.k, msg.k_scales, msg.v, msg.v_scales), slots)
        return
    k = sender.dequantize(msg.k.to(cache.device), msg.k_scales.to(cache.device), torch.float32)
    v = sender.dequantize(msg.v.to(cache.device), msg.v_scales.to(cache.device), torch.float32)
    write_kv(layer, k, v, slots)


def _checked_layer(cache: KVCache, msg: KVLayer, sender: KVFormat) -> LayerKV:
    """The target layer, after checking index, dtypes and shapes against the sender's format."""
    if not 0 <= msg.layer < len(cache.layers):
        raise ProtocolError(f"layer {msg.layer} does not exist (the model has {len(cache.layers)})")
    heads, head_dim = cache.num_kv_heads, cache.head_dim
    expected = {"k": (sender.payload_dtype, sender.payload_dim(head_dim)),
                "k_scales": (torch.float16, sender.num_scales(head_dim)),
                "v": (sender.payload_dtype, sender.payload_dim(head_dim)),
                "v_scales": (torch.float16, sender.num_scales(head_dim))}
    num_tokens = msg.token_end - msg.token_start
    for name, (dtype, dim) in expected.items():
        t = getattr(msg, name)
        if t.dtype != dtype or tuple(t.shape) != (num_tokens, heads, dim):
            raise ProtocolError(f"{name} is {t.dtype} {tuple(t.shape)}; {sender.name} KV for this model "
                                f"is {dtype} {(num_tokens, heads, dim)}")
    return cache.layers[msg.layer]
