import pytest
import torch

from hma.config import EngineConfig, ModelConfig, qwen3_shape
from hma.errors import RequestTooLargeError
from hma.kv_cache import BlockAllocator, KVCache, blocks_for, bytes_per_block
from hma.kv_formats import KV_FORMATS, SCALE_DTYPE, get_kv_format
from hma.loading import make_kv_cache
from hma.request import Request
from hma.sampling import SamplingParams
from hma.scheduler import Scheduler


def test_allocator_is_all_or_nothing_and_frees_back():
    alloc = BlockAllocator(5)
    ids = alloc.allocate(3)
    assert len(set(ids)) == 3 and alloc.num_free == 2
    with pytest.raises(RequestTooLargeError):
        alloc.allocate(3)
    assert alloc.num_free == 2
    alloc.free(ids)
    assert alloc.num_free == 5


def test_pool_bytes_match_the_budget_arithmetic():
    cfg = qwen3_shape("qwen3-0.6b")
    per_block = bytes_per_block(cfg, 16, get_kv_format("bf16"))
    assert per_block == 2 * 28 * 16 * 8 * 128 * 2
    cache = KVCache(cfg, 3, 16, get_kv_format("bf16"), "meta")
    assert cache.nbytes == 3 * per_block and cache.num_tokens == 48


def _req(i: int, n: int) -> Request:
    return Request(str(i), list(range(n)), SamplingParams(max_tokens=64))


def test_scheduler_preempts_the_newest_and_requeues_it_first():
    alloc = BlockAllocator(6)
    sched = Scheduler(alloc, block_size=4, max_num_seqs=8, max_num_batched_tokens=100)
    a, b, c = _req(0, 8), _req(1, 8), _req(2, 4)
    for r in (a, b, c):
        sched.add(r)
    assert sched.schedule().prefills == [a, b, c]  # 2 + 2 + 1 blocks
    a.output_token_ids.append(1)  # a needs a third block; one is free
    c.output_token_ids += [1] * 4  # c needs a second block; none is left
    out = sched.schedule()
    assert out.decodes == [a, b] and out.preempted == [c] and out.prefills == []
    assert list(sched.waiting) == [c] and not c.block_ids and alloc.num_free == 1
    sched.finish(b, "stop")
    assert alloc.num_free == 3
    assert sched.schedule().prefills == [c]


def test_scheduler_respects_token_budget_and_max_num_seqs():
    sched = Scheduler(BlockAllocator(100), block_size=4, max_num_seqs=2, max_num_batched_tokens=10)
    reqs = [_req(i, 6) for i in range(3)]
    for r in reqs:
        sched.add(r)
    assert sched.schedule().prefills == reqs[:1]   # 6 + 6 > 10 tokens
    assert sched.schedule().prefills == reqs[1:2]  # max_num_seqs=2 now full
    assert sched.schedule().prefills == []


def test_prompt_over_the_token_budget_still_runs_alone():
    sched = Scheduler(BlockAllocator(100), block_size=4, max_num_seqs=8, max_num_batched_tokens=4)
    big = _req(0, 9)
    sched.add(big)
    assert sched.schedule().prefills == [big]
    assert len(big.block_ids) == blocks_for(9, 4) == 3


DEMO_SHAPE = ModelConfig(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64)


@pytest.mark.parametrize("name", list(KV_FORMATS))
def test_each_format_allocates_exactly_its_bytes_per_token(name):
    fmt = get_kv_format(name)
    cache = KVCache(DEMO_SHAPE, 5, 16, fmt, "meta")
    per_token = fmt.bytes_per_token(DEMO_SHAPE.num_key_value_heads, DEMO_SHAPE.head_dim)
    assert cache.nbytes == 5 * 16 * 2 * DEMO_SHAPE.num_hidden_layers * per_token
    assert cache.nbytes == 5 * bytes_per_block(DEMO_SHAPE, 16, fmt)
    layer = cache.layers[0]
    assert layer.k.dtype == fmt.payload_dtype and layer.k_scales.dtype == SCALE_DTYPE


@pytest.mark.parametrize("shape", [DEMO_SHAPE, qwen3_shape("qwen3-4b")], ids=["demo", "qwen3-4b"])
def test_same_budget_holds_more_tokens_in_smaller_formats(shape):
    def tokens(kv_dtype: str) -> int:
        config = EngineConfig(kv_dtype=kv_dtype, kv_memory_gb=0.5, block_size=16)
        return make_kv_cache(shape, config, torch.bfloat16, torch.device("meta")).num_tokens

    bf16 = tokens("bf16")
    assert tokens("fp8") >= 1.9 * bf16 and tokens("int8") >= 1.9 * bf16
    assert tokens("int4") >= 3.0 * bf16
    assert tokens("bfp8") >= 1.75 * bf16  # its float16 exponents cost 2 bytes per 16 values
