"""The router's guards: API keys (401 with an OpenAI body), and a bounded queue of requests waiting for
their first token (503 with Retry-After past it; the queue drains back to zero)."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from hma.random_weights import TokenIdText
from hma.request import Request, RequestOutput, RequestStatus
from hma.router import Router, api_keys

BODY = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 1}


class GatedBackend:
    """Holds every request before its first token until `gate` opens, then finishes it."""

    max_model_len = 64
    vocab_size = 100
    is_ready = True

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.waiting = 0

    async def generate(self, prompt: dict, params, request_id: str):
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        req = Request(request_id, list(prompt["prompt_token_ids"]), params)
        req.output_token_ids, req.status, req.finish_reason = [7], RequestStatus.FINISHED, "length"
        req.metrics.first_token_time = req.metrics.finished_time = time.time()
        yield RequestOutput.of(req)

    async def host_status(self) -> list:
        return []


@pytest.fixture
async def gated():
    backend = GatedBackend()
    router = Router(backend, TokenIdText(), "m", api_keys=("k1", "k2"), max_queued=3)
    async with TestClient(TestServer(router.app())) as client:
        yield client, backend, router


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic k1", "Bearer", "bearer k1x"])
async def test_without_a_valid_key_v1_answers_401_with_an_openai_body(gated, header):
    client, backend, _ = gated
    headers = {"Authorization": header} if header else {}
    response = await client.post("/v1/completions", json=BODY, headers=headers)
    assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    error = (await response.json())["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
    assert (await client.get("/v1/models", headers=headers)).status == 401
    assert backend.waiting == 0  # refused before it reached the backend


async def test_any_of_the_keys_opens_v1_and_health_needs_none(gated):
    client, backend, _ = gated
    backend.gate.set()
    for key in ("k1", "k2"):
        response = await client.post("/v1/completions", json=BODY, headers={"Authorization": f"bearer {key}"})
        assert response.status == 200
    assert (await client.get("/health")).status == 200 and (await client.get("/metrics")).status == 200


async def test_field_limits_answer_400_before_the_backend_sees_the_request(gated):
    client, backend, _ = gated
    auth = {"Authorization": "Bearer k1"}
    backend.gate.set()
    for fields, param in [({"prompt": [1, 100]}, "prompt"), ({"stop": ["x" * 2000]}, "stop"),
                          ({"stop_token_ids": list(range(300))}, "stop_token_ids"), ({"n": 3}, "n"),
                          ({"max_tokens": 64}, "prompt")]:  # 2 prompt tokens + 64 > max_model_len
        response = await client.post("/v1/completions", json={**BODY, **fields}, headers=auth)
        error = (await response.json())["error"]
        assert response.status == 400 and error["param"] == param and error["type"] == "invalid_request_error"
    assert (await client.post("/v1/completions", json={**BODY, "prompt": [1, 99]}, headers=auth)).status == 200


async def test_past_the_queue_bound_requests_get_503_with_retry_after_and_the_rest_complete(gated):
    client, backend, router = gated
    auth = {"Authorization": "Bearer k1"}
    held = [asyncio.create_task(client.post("/v1/completions", json=BODY, headers=auth)) for _ in range(3)]
    while backend.waiting < 3:
        await asyncio.sleep(0.01)
    refused = await client.post("/v1/completions", json={**BODY, "stream": True}, headers=auth)
    assert refused.status == 503 and refused.headers["Retry-After"] == "1"
    assert (await refused.json())["error"]["code"] == "service_unavailable"
    backend.gate.set()
    assert [r.status for r in await asyncio.gather(*held)] == [200, 200, 200]
    assert router.num_queued == 0
    assert (await client.post("/v1/completions", json=BODY, headers=auth)).status == 200


async def _hold_one(client, backend, key: str = "k1") -> asyncio.Task:
    """Sends one request and returns once the backend holds it before its first token."""
    task = asyncio.create_task(client.post("/v1/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}))
    while backend.waiting < 1:
        await asyncio.sleep(0.01)
    return task


async def test_a_client_that_leaves_while_queued_frees_its_place(gated):
    client, backend, router = gated
    (await _hold_one(client, backend, "k2")).cancel()
    for _ in range(200):
        if router.num_queued == 0:
            break
        await asyncio.sleep(0.01)
    assert router.num_queued == 0 and backend.waiting == 0


def test_keys_come_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.setenv("HMA_API_KEY", "a, b")
    assert api_keys(None) == ("a", "b") and api_keys("c") == ("c",) and api_keys("") == ()
    monkeypatch.delenv("HMA_API_KEY")
    assert api_keys(None) == ()


async def test_draining_refuses_new_requests_and_waits_for_those_in_flight(gated):
    client, backend, router = gated
    held = await _hold_one(client, backend)
    drain = asyncio.create_task(router.drain(timeout_s=30))
    await asyncio.sleep(0.1)
    assert not drain.done()  # one request is still in flight
    refused = await client.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer k1"})
    assert refused.status == 503 and "shutting down" in (await refused.json())["error"]["message"]
    assert (await client.get("/health")).status == 503
    backend.gate.set()
    assert (await held).status == 200  # the request in flight finished
    await asyncio.wait_for(drain, 5)
    assert router.num_in_flight == 0


async def test_draining_gives_up_after_its_timeout(gated):
    client, backend, router = gated
    held = await _hold_one(client, backend)
    await asyncio.wait_for(router.drain(timeout_s=0.2), 5)  # returns although one is still held
    assert router.num_in_flight == 1
    backend.gate.set()
    assert (await held).status == 200
