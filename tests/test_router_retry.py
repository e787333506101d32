"""The router's Cluster against scripted decode hosts over the real transport: a request that fails
before its first token is placed again on another host; one that fails after streaming is not."""

from __future__ import annotations

import asyncio


from hma.errors import ServiceUnavailableError
from hma.hosts import Cluster
from hma.sampling import SamplingParams
from hma.transport import for_each_message, serve
from hma.wire import BeginReply, ErrorMessage, Generate, Query, QueryReply, Tokens, make_hello

SECRET, FINGERPRINT = b"test-secret", "f" * 64
STATUS = {"max_model_len": 64, "num_free_blocks": 10, "num_blocks": 10, "running": 0, "waiting": 0}


def scripted_decode(script: list[str], seen: list[str]):
    """A decode host that answers status queries, accepts each Generate, then plays `script`:
    'token' streams one token, 'fail' sends an ErrorMessage, 'finish' ends the request."""
    async def on_connection(conn) -> None:
        while True:
            try:
                msg = await conn.recv(timeout=None)
            except asyncio.IncompleteReadError:
                return  # the router left
            if isinstance(msg, Query):
                await conn.send(QueryReply(msg.query_id, STATUS))
            elif isinstance(msg, Generate):
                seen.append(msg.request_id)
                await conn.send(BeginReply(msg.request_id, True))
                for step in script:
                    if step == "token":
                        await conn.send(Tokens(msg.request_id, [5]))
                    elif step == "fail":
                        await conn.send(ErrorMessage(msg.request_id, "service_unavailable", "KV stream broke"))
                    else:
                        await conn.send(Tokens(msg.request_id, [6], "length", None, "done"))
    return on_connection


async def _run(scripts: list[list[str]]) -> tuple[list, list[list[str]], Exception | None]:
    seen = [[] for _ in scripts]
    servers = [await serve("127.0.0.1", 0, lambda: make_hello("decode", FINGERPRINT, "fp8", 16), SECRET,
                           scripted_decode(script, log)) for script, log in zip(scripts, seen)]
    addresses = [f"127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers]
    cluster = Cluster([], addresses, lambda: make_hello("router", FINGERPRINT, "none", 1), SECRET)
    cluster.start()
    outputs, error = [], None
    try:
        while not cluster.is_ready:
            await asyncio.sleep(0.02)
        async for out in cluster.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2), "req-1"):
            outputs.append(out)
    except ServiceUnavailableError as exc:
        error = exc
    finally:
        await cluster.stop()
        for server in servers:
            server.close()
    return outputs, seen, error


async def test_a_failure_before_the_first_token_is_placed_again_on_another_host():
    outputs, seen, error = await _run([["fail"], ["token", "finish"]])
    assert error is None and outputs[-1].finished and outputs[-1].outputs[0].token_ids == [5, 6]
    assert seen == [["req-1"], ["req-1"]]  # once on each host


async def test_a_failure_after_a_streamed_token_ends_the_request_with_the_error():
    outputs, seen, error = await _run([["token", "fail"], ["token", "finish"]])
    assert len(outputs) == 1 and outputs[0].outputs[0].token_ids == [5]
    assert isinstance(error, ServiceUnavailableError) and "KV stream broke" in str(error)
    assert seen == [["req-1"], []]  # the client had a token already: not tried again


async def test_placements_stop_after_the_last_attempt():
    outputs, seen, error = await _run([["fail"], ["fail"]])
    assert outputs == [] and isinstance(error, ServiceUnavailableError)
    assert sum(len(s) for s in seen) == 3  # PLACEMENT_ATTEMPTS


def _each_message(handle):
    """A scripted host's on_connection: handle(conn, msg) for each message until the router leaves."""
    return lambda conn: for_each_message(conn, lambda msg: handle(conn, msg))


def _hello(role: str):
    return lambda: make_hello(role, FINGERPRINT, "fp8" if role != "router" else "none", 16)


async def test_a_host_that_stops_answering_leaves_the_rotation_and_rejoins(monkeypatch):
    import hma.hosts

    monkeypatch.setattr(hma.hosts, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(hma.hosts, "QUERY_TIMEOUT_S", 0.3)
    monkeypatch.setattr(hma.hosts, "RECONNECT_S", 0.05)
    answering = asyncio.Event()
    answering.set()

    async def answer(conn, msg) -> None:  # connected all along; answers status queries only while `answering`
        if isinstance(msg, Query) and answering.is_set():
            await conn.send(QueryReply(msg.query_id, STATUS))

    server = await serve("127.0.0.1", 0, _hello("decode"), SECRET, _each_message(answer))
    cluster = Cluster([], [f"127.0.0.1:{server.sockets[0].getsockname()[1]}"], _hello("router"), SECRET)
    cluster.start()

    async def until(condition) -> None:
        async with asyncio.timeout(5):
            while not condition():
                await asyncio.sleep(0.02)

    try:
        await until(lambda: cluster.is_ready)
        answering.clear()  # a stopped host: the connection stays open, nothing answers
        await until(lambda: not cluster.is_ready)
        answering.set()
        await until(lambda: cluster.is_ready)  # back in the rotation after a new handshake and query
    finally:
        await cluster.stop()
        server.close()


async def test_a_request_whose_prefill_host_fails_is_placed_again_with_the_other_prefill_host():
    async def prefill(conn, msg) -> None:  # answers the router's status queries
        await conn.send(QueryReply(msg.query_id, STATUS))

    named = []

    async def decode(conn, msg) -> None:  # cannot reach the first prefill host; serves with the second
        if isinstance(msg, Query):
            return await conn.send(QueryReply(msg.query_id, STATUS))
        named.append(msg.prefill_host)
        if len(named) == 1:
            await conn.send(ErrorMessage(msg.request_id, "service_unavailable", "prefill host unreachable"))
        else:
            await conn.send(BeginReply(msg.request_id, True))
            await conn.send(Tokens(msg.request_id, [6], "length", None, "done"))

    servers = [await serve("127.0.0.1", 0, _hello("prefill"), SECRET, _each_message(prefill)) for _ in range(2)]
    servers.append(await serve("127.0.0.1", 0, _hello("decode"), SECRET, _each_message(decode)))
    first, second, decoder = (f"127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers)
    cluster = Cluster([first, second], [decoder], _hello("router"), SECRET)
    cluster.start()
    try:
        while not cluster.is_ready:
            await asyncio.sleep(0.02)
        outputs = [out async for out in cluster.generate({"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=1),
                                                         "req-1")]
        assert outputs[-1].finished and named == [first, second]
    finally:
        await cluster.stop()
        for server in servers:
            server.close()
