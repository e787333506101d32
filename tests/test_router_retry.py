"""The router's Cluster against scripted decode hosts over the real transport: a request that fails
before its first token is placed again on another host; one that fails after streaming is not."""

from __future__ import annotations

import asyncio


from hma.errors import ServiceUnavailableError
from hma.hosts import Cluster
from hma.sampling import SamplingParams
from hma.transport import serve
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
