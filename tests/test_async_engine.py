import asyncio

import pytest

from hma import async_engine
from hma.async_engine import AsyncEngine
from hma.engine import run_to_completion
from hma.errors import RequestTooLargeError
from hma.sampling import SamplingParams
from tests.helpers import engine_from_hf, tiny_hf_model

PROMPTS = [[5, 17, 88, 3], [140, 9, 61, 200, 7, 42, 13], [1], [2, 3, 5, 7, 11, 13, 17, 19, 23]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model("LlamaForCausalLM")


async def _collect(engine: AsyncEngine, prompt, params=GREEDY) -> list:
    return [out async for out in engine.generate(prompt, params)]


@pytest.mark.parametrize("overlap", ["off", "on"])
async def test_concurrent_requests_stream_the_same_tokens_as_offline(hf, overlap):
    engine = AsyncEngine(engine_from_hf(hf, num_blocks=64, async_scheduling=overlap))
    engine.start()
    try:
        streams = await asyncio.gather(*(_collect(engine, p) for p in PROMPTS))
    finally:
        engine.stop()
    expected = run_to_completion(engine_from_hf(hf), PROMPTS, GREEDY)
    for stream, want in zip(streams, expected):
        assert [len(o.token_ids) for o in stream] == list(range(1, 13))  # one output per step
        assert stream[-1].finished and stream[-1].token_ids == want.token_ids


async def test_a_step_wakes_the_event_loop_once_for_all_its_outputs(hf, monkeypatch):
    loop, wakeups = asyncio.get_running_loop(), []
    original = loop.call_soon_threadsafe

    def counting(callback, *args, **kwargs):
        wakeups.append((callback, args))
        return original(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    engine = AsyncEngine(engine_from_hf(hf, num_blocks=64))
    engine.start()
    try:
        streams = await asyncio.gather(*(_collect(engine, p) for p in PROMPTS))
    finally:
        engine.stop()
    deliveries = [len(args[0]) for callback, args in wakeups if callback is async_engine._deliver]
    assert sum(deliveries) == sum(len(s) for s in streams) == 4 * 12
    assert len(deliveries) <= 12 + len(PROMPTS)  # one a step (prompts may join a step apart), not one an output


@pytest.mark.parametrize("overlap", ["off", "on"])
async def test_a_caller_that_stops_listening_frees_its_blocks(hf, overlap):
    core = engine_from_hf(hf, num_blocks=64, async_scheduling=overlap)
    engine = AsyncEngine(core)
    engine.start()
    try:
        stream = engine.generate(PROMPTS[1], SamplingParams(max_tokens=200, temperature=0.0))
        first = await stream.__anext__()
        assert not first.finished
        await stream.aclose()  # the client went away
        for _ in range(100):
            if core.kv_cache.allocator.num_free == 64 and not core.has_unfinished:
                break
            await asyncio.sleep(0.02)
        assert core.kv_cache.allocator.num_free == 64 and not core.has_unfinished
        with pytest.raises(RequestTooLargeError):  # refusals reach the caller; the engine goes on
            await _collect(engine, list(range(250)), SamplingParams(max_tokens=8))
        assert (await _collect(engine, PROMPTS[0]))[-1].finished
    finally:
        engine.stop()
