import pytest
import torch

from hma.engine import run_to_completion
from hma.errors import InvalidRequestError, RequestTooLargeError
from hma.sampling import SamplingParams
from tests.helpers import engine_from_hf, tiny_hf_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def _prompts(n: int, vocab: int = 257, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 30, (n,), generator=gen).tolist()
    return [torch.randint(0, vocab, (k,), generator=gen).tolist() for k in lens]


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model("Qwen3ForCausalLM")


def test_greedy_generation_equals_transformers_generate(hf):
    engine = engine_from_hf(hf)
    prompts = _prompts(5)
    outputs = run_to_completion(engine, prompts, GREEDY)
    for prompt, out in zip(prompts, outputs):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == expected
        assert out.finish_reason == "length"


def test_oversubscribed_pool_preempts_and_every_request_matches_its_solo_run(hf):
    prompts = _prompts(12, seed=3)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    # 40 blocks of 4 tokens: each request alone needs at most 14, all twelve need about 130.
    engine = engine_from_hf(hf, num_blocks=40)
    outputs = run_to_completion(engine, prompts, params)
    preemptions = sum(o.metrics.num_preemptions for o in outputs)
    assert preemptions > 0
    assert engine.kv_cache.allocator.num_free == 40
    for prompt, out in zip(prompts, outputs):
        solo = run_to_completion(engine_from_hf(hf), [prompt], params)[0]
        assert out.token_ids == solo.token_ids
        assert len(out.token_ids) == 24


def test_seeded_sampling_survives_preemption(hf):
    prompts = _prompts(12, seed=4)
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=11)
    crowded = run_to_completion(engine_from_hf(hf, num_blocks=36), prompts, params)
    assert sum(o.metrics.num_preemptions for o in crowded) > 0
    for prompt, out in zip(prompts, crowded):
        assert out.token_ids == run_to_completion(engine_from_hf(hf), [prompt], params)[0].token_ids


def test_stop_token_ids_and_eos_finish_with_stop(hf):
    engine = engine_from_hf(hf)
    prompt = _prompts(1, seed=5)[0]
    free_run = run_to_completion(engine, [prompt], GREEDY)[0].token_ids
    stop_at = free_run[4]
    out = run_to_completion(engine, [prompt], SamplingParams(max_tokens=12, temperature=0.0,
                                                             stop_token_ids=[stop_at]))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    assert out.token_ids == free_run[:free_run.index(stop_at) + 1]
    engine.eos_token_ids = {stop_at}
    assert run_to_completion(engine, [prompt], GREEDY)[0].finish_reason == "stop"
    ignore = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    assert run_to_completion(engine, [prompt], ignore)[0].token_ids == free_run


def test_request_that_can_never_fit_is_refused_at_once(hf):
    engine = engine_from_hf(hf, num_blocks=8)  # 32 tokens in all
    with pytest.raises(RequestTooLargeError, match="max_model_len=32"):
        engine.add_request(list(range(30)), SamplingParams(max_tokens=8))
    assert not engine.has_unfinished


def test_bad_prompts_are_refused(hf):
    engine = engine_from_hf(hf)
    for bad in ([], [257], [-1], {"prompt": "x"}):
        with pytest.raises(InvalidRequestError):
            engine.add_request(bad, GREEDY)
    assert not engine.has_unfinished


def test_blocks_are_freed_as_soon_as_a_request_finishes(hf):
    engine = engine_from_hf(hf, num_blocks=64)
    short = engine.add_request([1, 2, 3], SamplingParams(max_tokens=1, temperature=0.0))
    long = engine.add_request([4, 5, 6], SamplingParams(max_tokens=10, temperature=0.0))
    engine.step()
    assert short.is_finished and not short.block_ids and not long.is_finished
    assert engine.kv_cache.allocator.num_free == 64 - len(long.block_ids)
