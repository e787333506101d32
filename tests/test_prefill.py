import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from hma.decode import KVLanding
from hma.engine import run_to_completion
from hma.kv_cache import KVCache
from hma.kv_formats import get_kv_format
from hma.prefill import PrefillJob, prefill_batch
from hma.sampling import SamplingParams
from hma.wire import FirstToken, KVLayer, RequestBegin, RequestEnd
from tests.helpers import engine_from_hf, hma_model_from_hf, tiny_hf_model

PROMPTS = {"a": [5, 17, 88, 3, 140, 9, 61], "b": [200, 7, 42, 13, 1, 2, 3, 4, 5, 6, 7, 8, 9]}
GREEDY = {"max_tokens": 8, "temperature": 0.0}


def _jobs() -> list[PrefillJob]:
    return [PrefillJob("a", PROMPTS["a"], SamplingParams(**GREEDY), [3, 0]),
            PrefillJob("b", PROMPTS["b"], SamplingParams(**GREEDY), [5, 1, 7, 2])]


@pytest.mark.parametrize("pipeline", [True, False])
def test_each_layer_is_handed_off_as_soon_as_it_is_computed(pipeline):
    model = hma_model_from_hf(tiny_hf_model("Qwen3ForCausalLM"))
    cache = KVCache(model.config, 8, 4, get_kv_format("int8"), "cpu")
    events = []
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda *_, i=i: events.append(("compute", i)))
    prefill_batch(model, cache, _jobs(), lambda m: events.append((m.TYPE, getattr(m, "layer", None))), pipeline)
    last = model.config.num_hidden_layers - 1
    first_handoff = events.index(("KVLayer", 0))
    if pipeline:  # layer 0 leaves before layer 1 is even computed
        assert first_handoff < events.index(("compute", 1))
    else:
        assert first_handoff > events.index(("compute", last))
    assert sum(e[0] == "KVLayer" for e in events) == 2 * (last + 1)
    assert [e[0] for e in events[-4:]] == ["FirstToken", "RequestEnd", "FirstToken", "RequestEnd"]


async def test_batched_prefill_in_a_worker_lands_on_a_decode_engine_as_colocated():
    hf = tiny_hf_model("Qwen3ForCausalLM")
    model = hma_model_from_hf(hf)
    cache = KVCache(model.config, 8, 4, get_kv_format("int8"), "cpu")
    decode = engine_from_hf(hf, num_blocks=32, block_size=16, kv_dtype="int8")
    landing = KVLanding(decode)
    for rid, prompt in PROMPTS.items():
        assert landing.begin(RequestBegin(rid, prompt, GREEDY, 3, "int8", 2, 24)).accepted
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    deliver = lambda m: loop.call_soon_threadsafe(queue.put_nowait, m)  # noqa: E731  (from the worker)
    with ThreadPoolExecutor(1) as worker:
        await loop.run_in_executor(worker, prefill_batch, model, cache, _jobs(), deliver)
    joined = []
    while not queue.empty():
        msg = queue.get_nowait()
        assert isinstance(msg, (KVLayer, FirstToken, RequestEnd))
        joined += [r for r in [landing.receive(msg)] if r is not None]
    assert sorted(r.request_id for r in joined) == ["a", "b"]
    while decode.has_unfinished:
        decode.step()
    for req in joined:
        alone = run_to_completion(engine_from_hf(hf, kv_dtype="int8"), [PROMPTS[req.request_id]],
                                  SamplingParams(**GREEDY))[0]
        assert req.output_token_ids == alone.token_ids
