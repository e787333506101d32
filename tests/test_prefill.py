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


async def test_a_decode_peer_that_stops_reading_loses_its_connection_and_its_requests(monkeypatch):
    """Write deadline: KV for a peer that takes nothing is not buffered for ever; once a send has
    waited DRAIN_TIMEOUT_S the connection is dropped, with its requests, and every block is free."""
    import hma.transport
    from hma.prefill import PrefillServer
    from hma.transport import connect, serve
    from hma.wire import make_hello

    monkeypatch.setattr(hma.transport, "DRAIN_TIMEOUT_S", 0.5)
    engine = engine_from_hf(tiny_hf_model("Qwen3ForCausalLM"), num_blocks=1024, block_size=4, kv_dtype="fp32")
    server = PrefillServer(engine)
    batches = asyncio.create_task(server.run())
    listener = await serve("127.0.0.1", 0, lambda: make_hello("prefill", "m", "fp32", 4), b"k", server.serve_peer)
    peer = await connect("127.0.0.1", listener.sockets[0].getsockname()[1], make_hello("decode", "m", "fp32", 1), b"k")
    try:
        peer.writer.transport.pause_reading()  # a decode host that stopped reading: its socket fills up
        for i in range(8):  # about 4.6 MB of KV
            await peer.send(RequestBegin(f"r{i}", [1 + t % 250 for t in range(500)], GREEDY, 3, "fp32", 2, 24))
        async with asyncio.timeout(20):  # all taken, then dropped with the connection
            while server.jobs or server.num_running or server.waiting or not server.kv_bytes_sent:
                await asyncio.sleep(0.05)
        assert engine.kv_cache.allocator.num_free == 1024
    finally:
        batches.cancel()
        peer.writer.transport.abort()
        listener.close()


async def test_a_draining_prefill_host_refuses_new_prompts_and_sends_the_queued_ones():
    from hma.prefill import PrefillServer
    from hma.transport import connect, serve
    from hma.wire import BeginReply, make_hello

    engine = engine_from_hf(tiny_hf_model("Qwen3ForCausalLM"), num_blocks=64, block_size=4, kv_dtype="int8")
    server = PrefillServer(engine)
    listener = await serve("127.0.0.1", 0, lambda: make_hello("prefill", "m", "int8", 4), b"k", server.serve_peer)
    peer = await connect("127.0.0.1", listener.sockets[0].getsockname()[1], make_hello("decode", "m", "int8", 4), b"k")
    batches = None
    try:
        await peer.send(RequestBegin("queued", PROMPTS["a"], GREEDY, 3, "int8", 2, 24))
        assert (await peer.recv(timeout=5)).accepted
        drained = asyncio.create_task(server.drain())  # what SIGTERM starts
        await peer.send(RequestBegin("late", PROMPTS["b"], GREEDY, 3, "int8", 2, 24))
        refused = await peer.recv(timeout=5)
        assert isinstance(refused, BeginReply) and not refused.accepted and refused.retryable
        await asyncio.sleep(0.1)
        assert not drained.done()  # the queued prompt is not prefilled yet
        batches = asyncio.create_task(server.run())
        received = [await peer.recv(timeout=10) for _ in range(3 + 2)]  # every layer, first token, end
        assert [type(m) for m in received] == [KVLayer] * 3 + [FirstToken, RequestEnd]
        await asyncio.wait_for(drained, 5)
        assert engine.kv_cache.allocator.num_free == 64
    finally:
        if batches is not None:
            batches.cancel()
        await peer.close()
        listener.close()


def test_a_prompt_with_a_token_id_outside_the_vocabulary_is_refused_not_batched():
    from hma.prefill import PrefillServer

    server = PrefillServer(engine_from_hf(tiny_hf_model("Qwen3ForCausalLM"), kv_dtype="int8"))
    reply = server._begin(RequestBegin("bad", [5, 257], GREEDY, 3, "int8", 2, 24), outbox=None)
    assert not reply.accepted and not reply.retryable and "[0, 257)" in reply.reason and not server.waiting
