"""The /v1 shapes: bodies parse or fail with the right param, responses and SSE frames are exact."""

from __future__ import annotations

import json
import random

import pytest

from hma.api import (
    CHAT_FIELDS, COMPLETION_FIELDS, SSE_DONE, chat_chunk, chat_response, completion_chunk,
    completion_response, error_body, models_response, parse_chat_request,
    parse_completion_request, sse_error, sse_event, usage, usage_chunk,
)
from hma.errors import HMAError, InvalidRequestError, ModelNotFoundError
from hma.sampling import SamplingParams

MODEL = "demo"


def completion(**fields: object) -> dict:
    return {"model": MODEL, "prompt": "Hello", **fields}


def chat(**fields: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}


def test_minimal_completion_gets_openai_defaults():
    request = parse_completion_request(completion(), MODEL)
    assert (request.prompt, request.max_tokens, request.is_chat) == ("Hello", 16, False)
    assert request.sampling_params(16) == SamplingParams(max_tokens=16, temperature=1.0, top_p=1.0, top_k=-1)


def test_full_completion_parses_into_sampling_params():
    body = completion(prompt=[[1, 2, 3]], max_tokens=5, temperature=0.5, top_p=0.9, top_k=40, seed=7,
                      stop=["\n", "END"], stop_token_ids=[2], ignore_eos=True, stream=True,
                      stream_options={"include_usage": True}, n=1, user="u", logprobs=None,
                      echo=False, best_of=1, logit_bias={}, presence_penalty=0, frequency_penalty=0.0)
    request = parse_completion_request(body, MODEL)
    assert request.prompt == [1, 2, 3]
    assert (request.stream, request.include_usage) == (True, True)
    assert request.sampling_params(5) == SamplingParams(
        max_tokens=5, temperature=0.5, top_p=0.9, top_k=40, seed=7, stop=["\n", "END"],
        stop_token_ids=[2], ignore_eos=True)


def test_prompt_forms_and_null_fields_mean_absent():
    assert parse_completion_request(completion(prompt=["a b"]), MODEL).prompt == "a b"
    assert parse_completion_request(completion(prompt=[4, 5]), MODEL).prompt == [4, 5]
    request = parse_completion_request(completion(max_tokens=None, temperature=None, stop=None), MODEL)
    assert (request.max_tokens, request.temperature, request.stop) == (16, 1.0, [])
    assert parse_completion_request(completion(stop="x"), MODEL).stop == ["x"]


def test_top_k_zero_and_tiny_temperature_mean_off_and_greedy():
    request = parse_completion_request(completion(top_k=0, temperature=1e-300), MODEL)
    params = request.sampling_params(4)
    assert (params.top_k, params.temperature, params.is_greedy) == (-1, 0.0, True)


def test_chat_parses_messages_and_joins_text_parts():
    body = chat(messages=[{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": [{"type": "text", "text": "a"},
                                                       {"type": "text", "text": "b"}], "name": "x"}])
    request = parse_chat_request(body, MODEL)
    assert request.messages == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "a\nb"}]
    assert (request.is_chat, request.prompt, request.max_tokens) == (True, None, None)


def test_chat_max_completion_tokens_wins_over_max_tokens():
    assert parse_chat_request(chat(max_tokens=9), MODEL).max_tokens == 9
    assert parse_chat_request(chat(max_tokens=9, max_completion_tokens=3), MODEL).max_tokens == 3


@pytest.mark.parametrize("body", [[], [completion()], "x", None, 3, 1.5, True])
def test_body_that_is_not_an_object_is_rejected(body):
    with pytest.raises(InvalidRequestError) as info:
        parse_completion_request(body, MODEL)
    assert info.value.param is None and info.value.status == 400


@pytest.mark.parametrize("fields, param", [
    ({"model": None}, "model"),
    ({"model": 3}, "model"),
    ({"prompt": None}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": [1, True]}, "prompt"),
    ({"prompt": {"text": "a"}}, "prompt"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 10.0}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 10**400}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"seed": 2**64}, "seed"),
    ({"n": 2}, "n"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"stream": "yes"}, "stream"),
    ({"stop": 3}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": [str(i) for i in range(17)]}, "stop"),
    ({"stop": ["x" * 1025]}, "stop"),
    ({"stop_token_ids": list(range(257))}, "stop_token_ids"),
    ({"stop_token_ids": [1.0]}, "stop_token_ids"),
    ({"stop_token_ids": 0}, "stop_token_ids"),
    ({"logprobs": 5}, "logprobs"),
    ({"echo": True}, "echo"),
    ({"best_of": 2}, "best_of"),
    ({"best_of": True}, "best_of"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"user": 5}, "user"),
    ({"temprature": 0}, "temprature"),
])
def test_hostile_completion_field_names_its_param(fields, param):
    with pytest.raises(InvalidRequestError) as info:
        parse_completion_request(completion(**fields), MODEL)
    assert info.value.param == param and info.value.status == 400


@pytest.mark.parametrize("fields, param", [
    ({"messages": []}, "messages"),
    ({"messages": None}, "messages"),
    ({"messages": "Hi"}, "messages"),
    ({"messages": ["Hi"]}, "messages[0]"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, "messages[0].role"),
    ({"messages": [{"role": ["user"], "content": "Hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "a", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"logprobs": True}, "logprobs"),
    ({"prompt": "Hi"}, "prompt"),
])
def test_hostile_chat_field_names_its_param(fields, param):
    with pytest.raises(InvalidRequestError) as info:
        parse_chat_request(chat(**fields), MODEL)
    assert info.value.param == param


def test_wrong_model_is_404_model_not_found():
    with pytest.raises(ModelNotFoundError) as info:
        parse_chat_request(chat(model="gpt-4"), MODEL)
    status, body = error_body(info.value)
    assert status == 404
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    assert body["error"]["type"] == "invalid_request_error"


def test_unknown_fields_are_ignored_when_not_strict():
    body = completion(temprature=0, stream=True, stream_options={"include_usage": True, "extra": 1})
    request = parse_completion_request(body, MODEL, strict=False)
    assert (request.temperature, request.include_usage) == (1.0, True)


def test_n_two_says_only_one_is_supported():
    with pytest.raises(InvalidRequestError, match="only n=1"):
        parse_completion_request(completion(n=2), MODEL)


def test_error_body_for_invalid_request():
    status, body = error_body(InvalidRequestError("'top_p' must be in (0, 1]", param="top_p"))
    assert status == 400
    assert body == {"error": {"message": "'top_p' must be in (0, 1]", "type": "invalid_request_error",
                              "param": "top_p", "code": "invalid_request_error"}}


def test_error_body_hides_unexpected_exceptions():
    status, body = error_body(KeyError("/secret/path.py line 12"))
    assert status == 500
    assert body["error"]["type"] == "internal_error" and "secret" not in json.dumps(body)


@pytest.mark.parametrize("status, kind", [(401, "authentication_error"), (503, "service_unavailable"),
                                          (413, "invalid_request_error"), (502, "internal_error")])
def test_error_type_follows_status(status, kind):
    error = type("E", (HMAError,), {"status": status, "code": "c"})("m")
    expected = {"error": {"message": "m", "type": kind, "param": None, "code": "c"}}
    assert error_body(error) == (status, expected)


def test_usage_adds_up():
    assert usage(7, 5) == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


def test_completion_and_chat_responses():
    done = completion_response("cmpl-1", MODEL, 100, "hi", "length", 3, 2)
    assert done == {"id": "cmpl-1", "object": "text_completion", "created": 100, "model": MODEL,
                    "choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    done = chat_response("chatcmpl-1", MODEL, 100, "hi", "stop", 3, 2)
    assert done["object"] == "chat.completion"
    assert done["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                "logprobs": None, "finish_reason": "stop"}]


def test_streaming_chunk_shapes():
    chunk = completion_chunk("cmpl-1", MODEL, 100, "a", None)
    assert chunk["object"] == "text_completion" and "usage" not in chunk
    assert chunk["choices"] == [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None}]
    first = chat_chunk("chatcmpl-1", MODEL, 100, {"role": "assistant", "content": ""}, None)
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = usage_chunk("chatcmpl-1", MODEL, 100, 3, 4, is_chat=True)
    assert (last["object"], last["choices"]) == ("chat.completion.chunk", [])
    assert last["usage"]["total_tokens"] == 7
    assert usage_chunk("cmpl-1", MODEL, 100, 3, 4, is_chat=False)["object"] == "text_completion"


def test_sse_framing_is_exact():
    assert sse_event({"a": 1, "b": "é"}) == b'data: {"a":1,"b":"\\u00e9"}\n\n'
    assert SSE_DONE == b"data: [DONE]\n\n"
    frame = sse_error(InvalidRequestError("bad", param="n"))
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert json.loads(frame[6:])["error"]["param"] == "n"


def test_models_response():
    assert models_response(MODEL, 100, 4096) == {"object": "list", "data": [
        {"id": MODEL, "object": "model", "created": 100, "owned_by": "hma", "max_model_len": 4096}]}


def _random_json(rng: random.Random, depth: int = 0) -> object:
    leaves = [None, True, False, 0, 1, -1, 2, 16, 10**30, -(10**30), 0.0, 0.5, 1.5, -0.5, 1e308,
              float("nan"), float("inf"), "", "x", "user", "text", MODEL, "\ud800", "system"]
    kind = rng.randrange(4 if depth < 3 else 1)
    if kind == 0:
        return rng.choice(leaves)
    if kind == 1:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 2:
        keys = ["role", "content", "type", "text", "include_usage", "name", "x"]
        return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [rng.randrange(-2, 100) for _ in range(rng.randrange(3))]


def test_random_bodies_parse_or_raise_a_4xx_hma_error():
    rng = random.Random(0)
    keys = sorted(COMPLETION_FIELDS | CHAT_FIELDS) + ["zzz", ""]
    outcomes = {"parsed": 0, "rejected": 0}
    for i in range(3000):
        body = {key: _random_json(rng) for key in rng.sample(keys, rng.randrange(6))}
        if rng.random() < 0.8:
            body["model"] = MODEL
        if i % 2:
            body.setdefault("prompt", "Hi")
        else:
            body.setdefault("messages", [{"role": "user", "content": "x"}])
        parse = parse_completion_request if i % 2 else parse_chat_request
        try:
            request = parse(body if rng.random() < 0.98 else _random_json(rng), MODEL, strict=i % 3 != 0)
        except HMAError as e:
            assert 400 <= error_body(e)[0] < 500
            sse_error(e)  # any field name the client sent must frame
            outcomes["rejected"] += 1
            continue
        request.sampling_params(request.max_tokens or 1)  # what parses, the engine accepts
        outcomes["parsed"] += 1
    assert outcomes["parsed"] > 100 and outcomes["rejected"] > 100
