"""Prefill host, first part: one batched prefill whose layers are handed off as they finish.

prefill_batch runs the model (in a worker thread: the model never runs on the event loop) over a
flat batch of prompts; the moment layer i is done it takes every request's quantized KV of that
layer out of the cache and hands it to `deliver`, so sending layer i overlaps computing layer
i+1 (the compute-transfer pipeline). With pipeline=False all layers go after the last one, for
comparison. Then each request's first token and RequestEnd follow. The caller owns the blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hma.batch import Batch, SeqChunk
from hma.kv_cache import KVCache
from hma.kv_transfer import take_layer_kv
from hma.qwen3 import Qwen3ForCausalLM
from hma.sampling import SamplingParams, make_generator, sample
from hma.wire import FirstToken, KVLayer, Message, RequestEnd


@dataclass(slots=True)
class PrefillJob:
    """One prompt to prefill, with the blocks it may use on this host."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    block_ids: list[int]


def prefill_batch(model: Qwen3ForCausalLM, cache: KVCache, jobs: list[PrefillJob],
                  deliver: Callable[[Message], None], pipeline: bool = True) -> None:
    """Prefills jobs in one batch; deliver receives every KVLayer, then FirstToken and RequestEnd."""
    chunks = [SeqChunk(j.prompt_token_ids, 0, j.block_ids) for j in jobs]
    batch = Batch.build(chunks, [], cache.block_size, cache.device)
    held: list[KVLayer] = []

    def on_layer(layer: int) -> None:
        for job in jobs:
            msg = take_layer_kv(cache, layer, job.request_id, job.block_ids, 0, len(job.prompt_token_ids))
            if pipeline:
                deliver(msg)
            else:
                held.append(msg)

    logits = model(batch, cache, on_layer)
    for msg in held:
        deliver(msg)
    generators = [make_generator(j.params.seed, logits.device) for j in jobs]
    tokens = sample(logits, [j.params for j in jobs], generators)
    for job, token in zip(jobs, tokens):
        deliver(FirstToken(job.request_id, token))
        deliver(RequestEnd(job.request_id, len(job.prompt_token_ids)))
