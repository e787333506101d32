"""`--model random:SHAPE`: the same weights on every host, a shared fingerprint, token-id prompts only,
and a stream of one chunk per token (what the GPU serving benchmarks rely on)."""

import json

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer

from hma import random_weights
from hma.async_engine import AsyncEngine
from hma.config import QWEN3_SHAPES, EngineConfig
from hma.engine import LLMEngine
from hma.loading import load_model
from hma.errors import InvalidRequestError, UnsupportedModelError
from hma.host import fingerprint_of
from hma.router import Router

MODEL = "random:qwen3-test"


@pytest.fixture(autouse=True)
def tiny_shape(monkeypatch):
    monkeypatch.setitem(QWEN3_SHAPES, "qwen3-test", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2,
                                                         tie_word_embeddings=True))


def _load():
    return load_model(EngineConfig(model=MODEL, device="cpu", max_model_len=256), torch.device("cpu"), torch.float32)


def test_every_host_builds_the_same_weights_and_fingerprint():
    (first, tokenizer, eos), (second, _, _) = _load(), _load()
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert first.embed_tokens.weight.std() > 0.01  # initialised, not left empty
    assert eos == [151_645] and isinstance(tokenizer, random_weights.TokenIdText)
    assert fingerprint_of(MODEL) == random_weights.fingerprint(MODEL)
    QWEN3_SHAPES["qwen3-test"] = {**QWEN3_SHAPES["qwen3-test"], "num_key_value_heads": 4}
    assert fingerprint_of(MODEL) != random_weights.fingerprint("random:qwen3-4b")


def test_an_unknown_shape_and_a_text_prompt_get_clear_errors():
    with pytest.raises(UnsupportedModelError, match="qwen3-4b"):
        random_weights.config_of("random:qwen3-5b")
    with pytest.raises(InvalidRequestError, match="token ids"):
        random_weights.TokenIdText()("hello")
    assert random_weights.TokenIdText().decode([5, 17]) == "<5><17>"


async def test_a_random_model_streams_one_chunk_per_token():
    engine = LLMEngine.from_config(EngineConfig(model=MODEL, device="cpu", kv_memory_gb=0.01, max_model_len=256))
    backend = AsyncEngine(engine)
    backend.start()
    try:
        async with TestClient(TestServer(Router(backend, engine.tokenizer, MODEL).app())) as client:
            body = {"model": MODEL, "prompt": list(range(1000, 1040)), "max_tokens": 6, "ignore_eos": True,
                    "temperature": 0, "stream": True}
            text = await (await client.post("/v1/completions", json=body)).text()
            refused = await client.post("/v1/completions", json={**body, "prompt": "some text"})
            assert refused.status == 400 and "token ids" in (await refused.json())["error"]["message"]
    finally:
        backend.stop()
    chunks = [json.loads(e.removeprefix("data: ")) for e in text.split("\n\n") if e and e != "data: [DONE]"]
    pieces = [c["choices"][0]["text"] for c in chunks]
    assert len(pieces) == 6 and all(p.startswith("<") and p.endswith(">") for p in pieces)
