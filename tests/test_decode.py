import asyncio
import contextlib
import os
import signal
import time

import pytest

from hma.batch import Batch, SeqChunk
from hma.decode import DecodeServer, KVLanding
from hma.engine import run_to_completion
from hma.kv_cache import KVCache
from hma.kv_formats import get_kv_format
from hma.kv_transfer import take_layer_kv, token_slots
from hma.sampling import SamplingParams
from hma.host import listen_until_stopped
from hma.launch import free_port
from hma.transport import connect, serve
from hma.wire import (Abort, BeginReply, ErrorMessage, FirstToken, FrameDecoder, Generate, RequestBegin, RequestEnd,
                      Tokens, encode_bytes, make_hello)
from tests.helpers import engine_from_hf, hma_model_from_hf, tiny_hf_model

PROMPT = [5, 17, 88, 3, 140, 9, 61, 200, 7, 42, 13]
GREEDY = {"max_tokens": 10, "temperature": 0.0}


def _begin(rid: str = "r1", prompt=PROMPT, sampling=GREEDY) -> RequestBegin:
    return RequestBegin(rid, prompt, sampling, 3, "int8", 2, 24)


def _prefill_messages(hf, rid: str = "r1") -> list:
    """What a prefill host sends: each layer's int8 KV as it finishes, then token and end."""
    model = hma_model_from_hf(hf)
    cache = KVCache(model.config, 8, 4, get_kv_format("int8"), "cpu")
    blocks = [4, 1, 6]
    msgs = []
    on_layer = lambda i: msgs.append(take_layer_kv(cache, i, rid, token_slots(cache, blocks, 0, len(PROMPT)), 0))  # noqa: E731
    logits = model(Batch.build([SeqChunk(PROMPT, 0, blocks)], [], 4, "cpu"), cache, on_layer)
    msgs += [FirstToken(rid, int(logits.argmax())), RequestEnd(rid, len(PROMPT))]
    return [FrameDecoder().feed(encode_bytes(m))[0] for m in msgs]  # through the wire


def test_request_prefilled_elsewhere_decodes_exactly_as_colocated():
    hf = tiny_hf_model("Qwen3ForCausalLM")
    decode = engine_from_hf(hf, num_blocks=32, block_size=16, kv_dtype="int8")
    landing = KVLanding(decode)
    assert landing.begin(_begin()).accepted
    joined = [landing.receive(m) for m in _prefill_messages(hf)]
    assert joined[:-1] == [None] * (len(joined) - 1) and joined[-1].request_id == "r1"
    while decode.has_unfinished:
        decode.step()
    colocated = run_to_completion(engine_from_hf(hf, kv_dtype="int8"), [PROMPT], SamplingParams(**GREEDY))[0]
    assert joined[-1].output_token_ids == colocated.token_ids
    assert decode.kv_cache.allocator.num_free == 32


def test_begin_is_refused_when_blocks_run_out_or_the_model_differs():
    decode = engine_from_hf(tiny_hf_model("Qwen3ForCausalLM"), num_blocks=3, block_size=4, kv_dtype="int8")
    landing = KVLanding(decode)
    short = {"max_tokens": 2}
    assert landing.begin(_begin("a", PROMPT[:8], short)).accepted  # 2 of the 3 blocks
    reply = landing.begin(_begin("b", PROMPT[:8], short))
    assert not reply.accepted and "no free KV blocks" in reply.reason
    assert "max_model_len" in landing.begin(_begin("c", PROMPT[:4])).reason  # 4 + 10 > 12 tokens
    assert "shape" in landing.begin(RequestBegin("d", [1, 2], short, 4, "int8", 2, 24)).reason
    assert "fp5" in landing.begin(RequestBegin("e", [1], short, 3, "fp5", 2, 24)).reason
    assert decode.kv_cache.allocator.num_free == 1


def test_abort_and_a_lost_peer_free_the_blocks_of_their_requests():
    hf = tiny_hf_model("Qwen3ForCausalLM")
    decode = engine_from_hf(hf, num_blocks=16, block_size=4, kv_dtype="int8")
    landing = KVLanding(decode)
    landing.begin(_begin("r1"), peer="p1")
    landing.begin(_begin("r2"), peer="p2")
    landing.begin(_begin("r3"), peer="p1")
    for msg in _prefill_messages(hf, "r1")[:2]:  # two layers landed, then the sender gives up
        landing.receive(msg)
    landing.receive(Abort("r1", "prefill failed"))
    assert decode.kv_cache.allocator.num_free == 16 - 2 * 3
    assert landing.drop_peer("p1") == ["r3"]
    assert decode.kv_cache.allocator.num_free == 16 - 3 and list(landing.pending) == ["r2"]
    assert landing.receive(Abort("r1", "late")) is None  # crossing aborts are harmless


def _hello(role: str):
    return lambda: make_hello(role, "m", "int8" if role != "router" else "none", 4)


async def _prefill_host(on_connection) -> tuple[asyncio.Server, str]:
    """A scripted prefill host on loopback, and the address a Generate names it by."""
    server = await serve("127.0.0.1", 0, _hello("prefill"), b"k", on_connection)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


@contextlib.asynccontextmanager
async def _decode_host(engine, **server_args):
    """A DecodeServer listening on loopback, and a router's connection to it."""
    server = DecodeServer(engine, _hello("decode"), b"k", **server_args)
    server.worker.start()
    listener = await serve("127.0.0.1", 0, _hello("decode"), b"k", server.serve_router)
    router = await connect("127.0.0.1", listener.sockets[0].getsockname()[1], _hello("router")(), b"k")
    try:
        yield server, router
    finally:
        await router.close()
        listener.close()
        server.worker.stop()


async def _all_blocks_free(engine, timeout_s: float = 1.0) -> bool:
    """Whether every block is back within timeout_s (the worker frees them between steps)."""
    allocator = engine.kv_cache.allocator
    deadline = time.monotonic() + timeout_s
    while allocator.num_free != allocator.num_blocks and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return allocator.num_free == allocator.num_blocks


async def test_a_prefill_host_that_goes_silent_fails_the_request_and_frees_its_blocks():
    decode = engine_from_hf(tiny_hf_model("Qwen3ForCausalLM"), num_blocks=16, block_size=4, kv_dtype="int8")
    link_closed = asyncio.Event()

    async def silent_prefill(conn) -> None:  # takes the request, then never sends its KV
        begin = await conn.recv()
        await conn.send(BeginReply(begin.request_id, True))
        with contextlib.suppress(asyncio.IncompleteReadError):
            await conn.recv(timeout=30)
        link_closed.set()  # the decode host gave up on a link that delivered nothing

    prefill, address = await _prefill_host(silent_prefill)
    try:
        async with _decode_host(decode, landing_timeout_s=0.5) as (server, router):
            await router.send(Generate("stuck", PROMPT, GREEDY, address))
            assert (await router.recv(timeout=10)).accepted
            assert decode.kv_cache.allocator.num_free == 16 - 3
            failed = await router.recv(timeout=10)
            assert isinstance(failed, ErrorMessage) and "did not land within 0.5 s" in failed.message
            assert await _all_blocks_free(decode) and not server.landing.pending
            await asyncio.wait_for(link_closed.wait(), 5)  # a stalled stream is closed, not reused
    finally:
        prefill.close()


async def test_losing_one_prefill_peer_fails_only_its_requests_and_at_once():
    """Three prefill hosts: one sends every layer, one breaks off mid-transfer, one closes before
    answering RequestBegin. Only the first request finishes; the others fail within seconds (not
    after a begin or landing timeout) and every block comes back."""
    hf = tiny_hf_model("Qwen3ForCausalLM")
    decode = engine_from_hf(hf, num_blocks=16, block_size=4, kv_dtype="int8")

    def prefill(num_messages: int | None, answers: bool = True):
        async def on_connection(conn) -> None:
            begin = await conn.recv()
            if not answers:
                return  # closes before its BeginReply
            await conn.send(BeginReply(begin.request_id, True))
            for msg in _prefill_messages(hf, begin.request_id)[:num_messages]:
                await conn.send(msg)
            if num_messages is None:
                await asyncio.sleep(30)  # stays connected
        return on_connection

    hosts = [await _prefill_host(handler) for handler in (prefill(None), prefill(2), prefill(0, answers=False))]
    try:
        async with _decode_host(decode, landing_timeout_s=60) as (server, router):
            t0 = time.monotonic()
            for rid, (_, address) in zip(("whole", "broken", "unanswered"), hosts):
                await router.send(Generate(rid, PROMPT, GREEDY, address))
            finished, failed = set(), {}
            while len(finished) + len(failed) < 3:
                msg = await router.recv(timeout=10)
                if isinstance(msg, ErrorMessage):
                    failed[msg.request_id] = msg.message
                elif isinstance(msg, Tokens) and msg.finish_reason is not None:
                    finished.add(msg.request_id)
                else:
                    assert isinstance(msg, (BeginReply, Tokens))
            assert finished == {"whole"} and set(failed) == {"broken", "unanswered"}
            assert "lost the prefill host" in failed["broken"] and "did not take the request" in failed["unanswered"]
            assert time.monotonic() - t0 < 10
            assert await _all_blocks_free(decode) and not server.landing.pending
    finally:
        for host, _ in hosts:
            host.close()


async def test_sigterm_refuses_new_requests_and_finishes_those_in_flight_then_exits():
    hf = tiny_hf_model("Qwen3ForCausalLM")
    decode = engine_from_hf(hf, num_blocks=16, block_size=4, kv_dtype="int8")
    server = DecodeServer(decode, _hello("decode"), b"k")
    server.worker.start()
    release = asyncio.Event()

    async def prefill(conn) -> None:  # takes the request; sends its KV once released
        begin = await conn.recv()
        await conn.send(BeginReply(begin.request_id, True))
        await release.wait()
        for msg in _prefill_messages(hf, begin.request_id):
            await conn.send(msg)
        await asyncio.sleep(30)

    prefill_host, address = await _prefill_host(prefill)
    port = free_port()
    host = asyncio.create_task(listen_until_stopped("127.0.0.1", port, _hello("decode"), b"k", server.serve_router,
                                                    server.drain))
    router = None
    try:
        async with asyncio.timeout(10):
            while router is None:
                try:
                    router = await connect("127.0.0.1", port, _hello("router")(), b"k")
                except OSError:
                    await asyncio.sleep(0.02)
        await router.send(Generate("in-flight", PROMPT, GREEDY, address))
        assert (await router.recv(timeout=10)).accepted
        os.kill(os.getpid(), signal.SIGTERM)  # the host's handler, not the default: it drains
        await asyncio.sleep(0.2)
        await router.send(Generate("late", PROMPT, GREEDY, address))
        refused = await router.recv(timeout=10)
        assert not refused.accepted and refused.retryable and "shutting down" in refused.reason
        assert not host.done()  # still draining
        release.set()
        tokens = []
        while not tokens or tokens[-1].finish_reason is None:
            tokens.append(await router.recv(timeout=10))
            assert isinstance(tokens[-1], Tokens)
        assert sum(len(t.token_ids) for t in tokens) == GREEDY["max_tokens"]
        await asyncio.wait_for(host, 5)  # drained: the host's main returns
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)  # and listens no more
    finally:
        host.cancel()
        if router is not None:
            await router.close()
        prefill_host.close()
        server.worker.stop()


async def test_a_host_takes_sigterm_from_before_its_log_says_it_listens(monkeypatch):
    """The chaos run SIGTERMs a host as soon as its log says it listens: the host's handler must
    be in place by then, or the default one ends the process undrained (exit status -15)."""
    from hma import host as host_module

    real_serve = host_module.serve

    async def serve_then_signal(*args):
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)  # else the kill would end pytest
        server = await real_serve(*args)
        os.kill(os.getpid(), signal.SIGTERM)
        return server

    monkeypatch.setattr(host_module, "serve", serve_then_signal)
    drained = asyncio.Event()

    async def drain() -> None:
        drained.set()

    try:
        await asyncio.wait_for(listen_until_stopped("127.0.0.1", free_port(), _hello("decode"), b"k",
                                                    lambda conn: asyncio.sleep(0), drain), 5)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().remove_signal_handler(sig)
    assert drained.is_set()


async def test_a_prefill_host_that_never_answers_requestbegin_fails_it_within_the_landing_timeout():
    decode = engine_from_hf(tiny_hf_model("Qwen3ForCausalLM"), num_blocks=16, block_size=4, kv_dtype="int8")

    async def mute_prefill(conn) -> None:  # reads RequestBegin, answers nothing, stays connected
        await conn.recv()
        await asyncio.sleep(30)

    prefill, address = await _prefill_host(mute_prefill)
    try:
        async with _decode_host(decode, landing_timeout_s=0.5) as (server, router):
            t0 = time.monotonic()
            await router.send(Generate("unanswered", PROMPT, GREEDY, address))
            failed = await router.recv(timeout=10)
            assert isinstance(failed, ErrorMessage) and time.monotonic() - t0 < 5  # not BEGIN_TIMEOUT_S
            assert failed.message.endswith("did not take the request: TimeoutError")
            assert await _all_blocks_free(decode) and not server.landing.pending
    finally:
        prefill.close()
