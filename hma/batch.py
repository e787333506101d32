"""Batch: the flat token batch one forward step runs over, and everything attention needs to find
each sequence's KV in the paged cache.

Layout: sequences are concatenated without padding. The first `num_prefills` sequences may bring
many new tokens (a prompt, a recomputed sequence, a scored continuation); the rest are decodes
bringing exactly one token. Token t of sequence i sits at position `context_len_i + t` and writes
its K/V to slot `block_ids[pos // block_size] * block_size + pos % block_size`. Phase-wise
quantization splits the same rows differently: the leading `num_prefill_precision_tokens` run
through the prefill-precision weights, the rest through the float (decode) weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def slots_for(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat cache slots of token positions [start, end) of a sequence laid over block_ids."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


@dataclass(slots=True)
class SeqChunk:
    """One sequence's share of a step: the tokens to compute, where they start, its blocks."""

    token_ids: list[int]
    context_len: int        # tokens already in the cache before this step
    # Covers context_len + len(token_ids) tokens. A sequence's list only grows in place; one given
    # other blocks gets a new list (DecodeGraphs rewrites a table row only when its list changes).
    block_ids: list[int]
    all_logits: bool = False  # logits for every token (scoring), not just the last
    prefill_precision: bool = True  # run through the prefill-precision weights (prefill chunks only)


@dataclass(slots=True)
class Batch:
    """Tensors for one forward step; host-side lists are kept to avoid device syncs."""

    input_ids: torch.Tensor       # (num_tokens,)
    positions: torch.Tensor       # (num_tokens,)
    slot_mapping: torch.Tensor    # (num_tokens,) flat cache slot each token's K/V goes to
    block_tables: torch.Tensor    # (num_seqs, max_blocks) padded with 0
    seq_lens: torch.Tensor        # (num_seqs,) tokens in the cache after this step
    logits_indices: torch.Tensor  # (num_logits,) rows of the flat batch to turn into logits
    query_lens: list[int]
    seq_lens_host: list[int]
    num_prefills: int
    num_prefill_precision_tokens: int  # the leading tokens that run in the prefill precision

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @classmethod
    def build(cls, prefills: list[SeqChunk], decodes: list[SeqChunk], block_size: int,
              device: torch.device | str) -> Batch:
        """Flattens prefill chunks then decode chunks (each decode brings one token)."""
        assert all(len(c.token_ids) == 1 for c in decodes), "a decode brings exactly one token"
        flags = [c.prefill_precision for c in prefills]
        assert flags == sorted(flags, reverse=True), "prefill-precision chunks come first"
        chunks = prefills + decodes
        ids, pos, slots, logits_idx = [], [], [], []
        for chunk in chunks:
            start = len(ids)
            n = len(chunk.token_ids)
            ids += chunk.token_ids
            pos += range(chunk.context_len, chunk.context_len + n)
            slots += slots_for(chunk.block_ids, chunk.context_len, chunk.context_len + n, block_size)
            logits_idx += range(start, start + n) if chunk.all_logits else [start + n - 1]
        width = max(len(c.block_ids) for c in chunks)
        tables = [c.block_ids + [0] * (width - len(c.block_ids)) for c in chunks]
        seq_lens = [c.context_len + len(c.token_ids) for c in chunks]

        def tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

        return cls(input_ids=tensor(ids), positions=tensor(pos), slot_mapping=tensor(slots),
                   block_tables=tensor(tables), seq_lens=tensor(seq_lens),
                   logits_indices=tensor(logits_idx),
                   query_lens=[len(c.token_ids) for c in chunks], seq_lens_host=seq_lens,
                   num_prefills=len(prefills),
                   num_prefill_precision_tokens=sum(len(c.token_ids) for c in prefills if c.prefill_precision))
