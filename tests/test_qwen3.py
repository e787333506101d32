import pytest
import torch

from hma.batch import Batch, SeqChunk
from hma.config import ModelConfig
from hma.errors import UnsupportedModelError
from hma.kv_cache import KVCache, blocks_for
from hma.kv_formats import get_kv_format
from tests.helpers import hma_model_from_hf, tiny_hf_model

BLOCK_SIZE = 4
FP32 = get_kv_format("fp32")
PROMPT_LENS = [7, 1, 13, 4]


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _allocate(prompts, total_lens):
    """Disjoint, deliberately shuffled block ids so sequences cross non-adjacent blocks."""
    order = torch.randperm(64, generator=torch.Generator().manual_seed(2)).tolist()
    tables = []
    for n in total_lens:
        need = blocks_for(n, BLOCK_SIZE)
        tables.append(order[:need])
        order = order[need:]
    return tables


@pytest.mark.parametrize("architecture", ["Qwen3ForCausalLM", "LlamaForCausalLM"])
@pytest.mark.parametrize("tie", [False, True])
def test_prefill_then_decode_logits_match_transformers(architecture, tie):
    hf = tiny_hf_model(architecture, tie)
    model = hma_model_from_hf(hf)
    cache = KVCache(model.config, 64, BLOCK_SIZE, FP32, "cpu")
    prompts = _prompts(model.config.vocab_size)
    next_tokens = [[3, 17, 250] for _ in prompts]
    tables = _allocate(prompts, [len(p) + 3 for p in prompts])

    # One flat batch of all prompts, logits at every position.
    chunks = [SeqChunk(p, 0, t, all_logits=True) for p, t in zip(prompts, tables)]
    logits = model(Batch.build(chunks, [], BLOCK_SIZE, "cpu"), cache)
    with torch.no_grad():
        expected = torch.cat([hf(torch.tensor([p])).logits[0] for p in prompts])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)

    # Three decode steps, every sequence at once, each over its blocks.
    seqs = [list(p) for p in prompts]
    for step in range(3):
        decodes = [SeqChunk([nt[step]], len(s), t) for s, nt, t in zip(seqs, next_tokens, tables)]
        logits = model(Batch.build([], decodes, BLOCK_SIZE, "cpu"), cache)
        for s, nt in zip(seqs, next_tokens):
            s.append(nt[step])
        with torch.no_grad():
            expected = torch.stack([hf(torch.tensor([s])).logits[0, -1] for s in seqs])
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_mixed_batch_of_prefills_and_decodes_matches_transformers():
    hf = tiny_hf_model("Qwen3ForCausalLM")
    model = hma_model_from_hf(hf)
    cache = KVCache(model.config, 64, BLOCK_SIZE, FP32, "cpu")
    a, b = _prompts(model.config.vocab_size)[:2]
    ta, tb = _allocate([a, b], [len(a) + 1, len(b)])
    model(Batch.build([SeqChunk(a, 0, ta)], [], BLOCK_SIZE, "cpu"), cache)
    # b is prefilled while a decodes in the same step.
    logits = model(Batch.build([SeqChunk(b, 0, tb)], [SeqChunk([5], len(a), ta)], BLOCK_SIZE, "cpu"), cache)
    with torch.no_grad():
        expected = torch.stack([hf(torch.tensor([b])).logits[0, -1], hf(torch.tensor([a + [5]])).logits[0, -1]])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_other_architectures_are_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="MistralForCausalLM"):
        ModelConfig.from_dict({"architectures": ["MistralForCausalLM"]})


def test_chunk_over_cached_context_matches_transformers():
    """A multi-token chunk after cached tokens (teacher-forced scoring) reads its context from blocks."""
    hf = tiny_hf_model("LlamaForCausalLM")
    model = hma_model_from_hf(hf)
    cache = KVCache(model.config, 64, BLOCK_SIZE, FP32, "cpu")
    seq = _prompts(model.config.vocab_size)[2]  # 13 tokens: 6 cached, then 7 more
    (table,) = _allocate([seq], [len(seq)])
    model(Batch.build([SeqChunk(seq[:6], 0, table)], [], BLOCK_SIZE, "cpu"), cache)
    logits = model(Batch.build([SeqChunk(seq[6:], 6, table, all_logits=True)], [], BLOCK_SIZE, "cpu"), cache)
    with torch.no_grad():
        expected = hf(torch.tensor([seq])).logits[0, 6:]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
