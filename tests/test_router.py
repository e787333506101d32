import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from hma.async_engine import AsyncEngine
from hma.config import EngineConfig
from hma.engine import LLMEngine
from hma.router import Router

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine(demo_model_path):
    return LLMEngine.from_config(EngineConfig(model=str(demo_model_path), device="cpu", kv_memory_gb=0.05))


@pytest.fixture
async def client(engine):
    backend = AsyncEngine(engine)
    backend.start()
    router = Router(backend, engine.tokenizer, "demo")
    async with TestClient(TestServer(router.app())) as client:
        yield client
    backend.stop()


async def _sse(response) -> list:
    events = [line.removeprefix("data: ") for line in (await response.text()).split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_chat_completion_streaming_and_not_agree_and_answer_paris(client):
    body = {"model": "demo", "messages": QUESTION, "max_tokens": 24, "temperature": 0}
    plain = await (await client.post("/v1/chat/completions", json=body)).json()
    text = plain["choices"][0]["message"]["content"]
    assert "Paris" in text and plain["choices"][0]["finish_reason"] == "stop"
    assert plain["usage"]["completion_tokens"] > 0
    stream = await client.post("/v1/chat/completions", json={
        **body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = await _sse(stream)
    deltas = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert deltas == text
    assert chunks[-1]["usage"] == plain["usage"]


async def test_completion_of_text_streams_what_it_returns(client):
    body = {"model": "demo", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
    plain = await (await client.post("/v1/completions", json=body)).json()
    chunks = await _sse(await client.post("/v1/completions", json={**body, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"] == "length"


async def test_streamed_text_arrives_token_by_token_and_stops_where_the_plain_text_does(client):
    body = {"model": "demo", "prompt": "One, two, three, four,", "max_tokens": 16, "temperature": 0}
    counting = (await (await client.post("/v1/completions", json=body)).json())["choices"][0]["text"]
    stop = counting.strip().split()[2]  # a word the greedy run produces, a few tokens in
    body["stop"] = [stop]
    plain = (await (await client.post("/v1/completions", json=body)).json())["choices"][0]
    chunks = await _sse(await client.post("/v1/completions", json={**body, "stream": True}))
    texts = [c["choices"][0]["text"] for c in chunks]
    assert plain["finish_reason"] == "stop" and stop not in plain["text"] and counting.startswith(plain["text"])
    assert "".join(texts) == plain["text"] and sum(bool(t) for t in texts) >= 3  # streamed, not held to the end


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": "gpt-4", "messages": QUESTION}, 404, "model"),
    ({"model": "demo", "messages": QUESTION, "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "demo", "messages": []}, 400, "messages"),
    ({"model": "demo", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": "demo", "prompt": "x " * 9000}, 400, "prompt"),
    ({"model": "demo", "prompt": "hi", "bogus": 1}, 400, "bogus"),
])
async def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, body, status, param):
    path = "/v1/completions" if isinstance(body, bytes) or "prompt" in body else "/v1/chat/completions"
    kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
    response = await client.post(path, **kwargs)
    error = (await response.json())["error"]
    assert response.status == status and error["message"] and error["param"] == param
    ok = await client.post("/v1/completions", json={"model": "demo", "prompt": "Hi", "max_tokens": 2})
    assert ok.status == 200


async def test_models_health_and_metrics(client, engine):
    models = await (await client.get("/v1/models")).json()
    assert models["data"][0]["id"] == "demo" and models["data"][0]["max_model_len"] == engine.max_model_len
    assert (await client.get("/health")).status == 200
    await client.post("/v1/completions", json={"model": "demo", "prompt": "Hi", "max_tokens": 3})
    text = await (await client.get("/metrics")).text()
    assert "hma:time_to_first_token_seconds_count 1" in text and "hma:generation_tokens_total 3" in text


async def test_an_oversized_body_gets_413_and_an_openai_body(client):
    response = await client.post("/v1/completions", data=b"x" * (5 * 1024 * 1024))
    assert response.status == 413 and "over" in (await response.json())["error"]["message"]
