"""Overlapped decode steps (async_scheduling): step n + 1 is launched before the host reads step
n's tokens. On the CPU they run through EagerSteps ("on"); the GPU tests run them through the
CUDA graphs. Every case is held to the plain engine's outputs."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hma.engine import run_to_completion
from hma.kv_cache import BlockAllocator
from hma.request import PENDING, Request
from hma.sampling import SamplingParams
from hma.scheduler import Scheduler
from tests.helpers import engine_from_hf, tiny_hf_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model("Qwen3ForCausalLM")


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 257, (k,), generator=gen).tolist() for k in torch.randint(1, 30, (n,), generator=gen).tolist()]


def _summary(outputs) -> list[tuple]:
    return [(o.token_ids, o.finish_reason, o.outputs[0].stop_reason) for o in outputs]


def _counting_launches(engine) -> list[int]:
    calls = []
    launch = engine.overlap.launch
    engine.overlap.launch = lambda chunks, feedback: calls.append(max(feedback)) or launch(chunks, feedback)
    return calls


def test_overlapped_steps_give_the_plain_engines_outputs(hf):
    prompts = _prompts(10, seed=1)
    free_run = run_to_completion(engine_from_hf(hf), prompts[:1], GREEDY)[0].token_ids
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in (1, 2, 5, 12, 12, 7, 3, 12, 9, 12)]
    params[3] = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[free_run[4]])

    def run(mode: str):
        engine = engine_from_hf(hf, async_scheduling=mode)
        reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        launches = _counting_launches(engine) if engine.overlap else []
        streamed = [out for _ in range(200) if engine.has_unfinished for out in engine.step()]
        assert not engine.has_unfinished and engine.kv_cache.allocator.num_free == 256
        assert all(PENDING not in out.token_ids for out in streamed)
        return [r.output_token_ids for r in reqs], [r.finish_reason for r in reqs], launches

    plain_tokens, plain_reasons, _ = run("off")
    tokens, reasons, launches = run("on")
    assert tokens == plain_tokens and reasons == plain_reasons
    assert len(launches) > 5 and max(launches) >= 0  # steps were launched with device-fed tokens


def test_overlap_under_preemption_matches_the_plain_engine(hf):
    prompts = _prompts(12, seed=3)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    plain = run_to_completion(engine_from_hf(hf, num_blocks=40), prompts, params)
    engine = engine_from_hf(hf, num_blocks=40, async_scheduling="on")
    overlapped = run_to_completion(engine, prompts, params)
    assert sum(o.metrics.num_preemptions for o in overlapped) > 0
    assert _summary(overlapped) == _summary(plain)
    assert engine.kv_cache.allocator.num_free == 40


def test_a_request_ended_while_its_next_step_runs_frees_its_blocks_once_that_step_is_read(hf):
    engine = engine_from_hf(hf, num_blocks=64, async_scheduling="on")
    short = engine.add_request([1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0))
    long = engine.add_request([4, 5, 6], SamplingParams(max_tokens=10, temperature=0.0))
    while not short.is_finished:
        engine.step()
    # short's last token was read while a step holding short was running: its blocks wait for it.
    assert engine._inflight is not None and engine._inflight.holds(short)
    assert len(short.output_token_ids) == 3 and not short.block_ids
    held = len(engine._inflight.held_blocks)
    assert held > 0 and engine.kv_cache.allocator.num_free == 64 - held - len(long.block_ids)
    engine.step()
    assert engine.kv_cache.allocator.num_free == 64 - len(long.block_ids)
    plain = run_to_completion(engine_from_hf(hf), [[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0.0))
    assert short.output_token_ids == plain[0].token_ids


def test_an_abort_while_a_step_runs_loses_nothing_else(hf):
    engine = engine_from_hf(hf, num_blocks=64, async_scheduling="on")
    kept = engine.add_request([7, 8, 9, 10], GREEDY)
    dropped = engine.add_request([11, 12], GREEDY)
    for _ in range(4):
        engine.step()
    assert dropped.output_token_ids[-1] == PENDING
    engine.abort(dropped)
    assert dropped.is_finished and PENDING not in dropped.output_token_ids
    while engine.has_unfinished:
        engine.step()
    assert engine.kv_cache.allocator.num_free == 64
    assert kept.output_token_ids == run_to_completion(engine_from_hf(hf), [[7, 8, 9, 10]], GREEDY)[0].token_ids


def test_sampled_requests_run_plain_steps_beside_greedy_ones(hf):
    prompts = _prompts(4, seed=7)
    params = [GREEDY, SamplingParams(max_tokens=12, temperature=1.0, seed=5)]

    def run(mode: str):
        engine = engine_from_hf(hf, async_scheduling=mode)
        reqs = [engine.add_request(p, params[i % 2]) for i, p in enumerate(prompts)]
        while engine.has_unfinished:
            engine.step()
        return [r.output_token_ids for r in reqs]

    assert run("on") == run("off")


_OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 12), st.integers(1, 10), st.integers(-1, 6)),  # length, max_tokens, stop at
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 4))), min_size=1, max_size=24)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS, seed=st.integers(0, 2**16))
def test_any_interleaving_of_adds_aborts_and_steps_keeps_overlaps_promises(hf, ops, seed):
    """Whatever arrives, ends or is aborted while a step is in flight (in a cache small enough to
    preempt): no PENDING token is ever shown, every block comes back, and each request that was
    not aborted gets exactly its solo run's tokens and finish reason."""
    overlapped = engine_from_hf(hf, num_blocks=24, async_scheduling="on")
    plain = engine_from_hf(hf, num_blocks=64)
    gen = torch.Generator().manual_seed(seed)
    runs, aborted = [], set()

    def step() -> None:
        for out in overlapped.step():
            assert PENDING not in out.token_ids

    for op in ops:
        if op[0] == "add":
            prompt = torch.randint(0, 257, (op[1],), generator=gen).tolist()
            free = SamplingParams(max_tokens=op[2], temperature=0.0)
            solo = run_to_completion(plain, [prompt], free)[0].token_ids
            stop = [solo[op[3]]] if 0 <= op[3] < len(solo) else []  # a stop token it will meet
            params = SamplingParams(max_tokens=op[2], temperature=0.0, stop_token_ids=stop)
            runs.append((overlapped.add_request(prompt, params), run_to_completion(plain, [prompt], params)[0]))
        elif op[0] == "abort" and runs:
            req = runs[op[1] % len(runs)][0]
            if not req.is_finished:
                overlapped.abort(req)
                aborted.add(req.request_id)
        elif op[0] == "step":
            for _ in range(op[1]):
                if overlapped.has_unfinished:
                    step()
    while overlapped.has_unfinished:
        step()
    assert overlapped.kv_cache.allocator.num_free == 24
    for req, solo in runs:
        assert req.is_finished and PENDING not in req.output_token_ids
        if req.request_id not in aborted:
            assert (req.output_token_ids, req.finish_reason) == (solo.token_ids, solo.finish_reason)


def _scheduler(num_blocks: int, max_num_seqs: int = 4, budget: int = 64) -> Scheduler:
    return Scheduler(BlockAllocator(num_blocks), 4, max_num_seqs, budget)


def _running(scheduler: Scheduler, num_tokens: int) -> Request:
    req = Request(str(len(scheduler.running)), list(range(num_tokens)), GREEDY)
    scheduler.add(req)
    scheduler.schedule()
    return req


def test_the_scheduler_is_steady_only_when_its_next_plan_just_grows_each_decode():
    s = _scheduler(num_blocks=4)
    req = _running(s, 7)  # 2 blocks
    assert s.is_steady()
    s.add(Request("w", [1, 2, 3], GREEDY))
    assert not s.is_steady()  # the waiting prompt would be admitted
    s.schedule()
    assert s.is_steady() and len(s.running) == 2
    req.output_token_ids += [1, 1]  # 9 tokens: a third block, and the last one is gone
    s.running[1].output_token_ids += [1, 1]  # 5 tokens: a second block too
    assert not s.is_steady()  # one of them would be preempted


def test_a_waiting_request_that_cannot_be_admitted_leaves_the_scheduler_steady():
    full = _scheduler(num_blocks=16, max_num_seqs=1)
    _running(full, 3)
    full.add(Request("w", [1, 2, 3], GREEDY))
    assert full.is_steady()  # max_num_seqs reached
    over_budget = _scheduler(num_blocks=64, budget=20)
    _running(over_budget, 3)
    over_budget.add(Request("w", list(range(20)), GREEDY))
    assert over_budget.is_steady()  # over the token budget beside a running decode
