"""Property-based: thousands of generated request bodies and byte strings. A body gets a 200 or a
4xx with an OpenAI error body, never a 5xx or a crash; bytes on the wire become messages or a
ProtocolError, never another exception, and nothing is allocated from a declared size that the
limits refuse."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hma.errors import ProtocolError
from hma.random_weights import TokenIdText
from hma.request import Request, RequestOutput, RequestStatus
from hma.router import Router
from hma.frame_reader import FrameReader
from hma.wire import (FRAME_PREFIX_SIZE, FrameDecoder, Generate, KVLayer, Tokens, decode_body,
                      encode_bytes)

MODEL = "m"
MAX_MODEL_LEN = 64


class EchoBackend:
    """Finishes every request at once with one token; counts what is running (must end at 0)."""

    max_model_len = MAX_MODEL_LEN
    vocab_size = 1000
    is_ready = True

    def __init__(self) -> None:
        self.running = 0

    async def generate(self, prompt: dict, params, request_id: str):
        self.running += 1
        try:
            req = Request(request_id, list(prompt["prompt_token_ids"]), params)
            req.output_token_ids, req.status, req.finish_reason = [7], RequestStatus.FINISHED, "length"
            req.metrics.first_token_time = req.metrics.finished_time = time.time()
            yield RequestOutput.of(req)
        finally:
            self.running -= 1

    async def host_status(self) -> list:
        return []


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=20))
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10),
                                                                                             inner, max_size=4),
                     max_leaves=12)
_token_ids = st.lists(st.integers(-5, 2**40), max_size=80)
_field_values = {
    "model": st.sampled_from([MODEL, "other", 3, None]),
    "prompt": st.one_of(_token_ids, st.text(max_size=30), st.lists(_token_ids, max_size=2), _json),
    "messages": st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                                          "content": st.one_of(st.text(max_size=20), _json)}),
                                   max_size=3), _json),
    "max_tokens": st.one_of(st.integers(-3, 2**40), _scalars), "temperature": st.one_of(st.floats(), _scalars),
    "top_p": st.one_of(st.floats(), _scalars), "top_k": st.one_of(st.integers(-3, 10**9), _scalars),
    "n": st.one_of(st.integers(-1, 3), _scalars), "stream": _scalars, "stop": st.one_of(_json, st.text(max_size=5)),
    "stream_options": _json, "seed": st.one_of(st.integers(-2**70, 2**70), _scalars), "logprobs": _json,
    "ignore_eos": _scalars, "stop_token_ids": st.one_of(_token_ids, _json), "unknown_field": _json,
}
_valid = st.fixed_dictionaries(
    {"model": st.just(MODEL), "prompt": st.lists(st.integers(0, 1000), min_size=1, max_size=40)},
    optional={"max_tokens": st.integers(1, 20), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
              "top_k": st.integers(-1, 50), "stream": st.booleans(), "seed": st.integers(0, 2**31),
              "stop": st.lists(st.text(max_size=3), max_size=2), "ignore_eos": st.booleans(),
              "stream_options": st.just({"include_usage": True})})


@st.composite
def _one_field_wrong(draw) -> dict:
    """A valid body with one field replaced (or added) by anything."""
    name = draw(st.sampled_from(sorted(_field_values)))
    return {**draw(_valid), name: draw(_field_values[name])}


_bodies = st.one_of(_valid, _one_field_wrong(), st.fixed_dictionaries({}, optional=_field_values), _json,
                    st.binary(max_size=200))


def _encoded(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


@pytest.fixture(scope="module")
def http():
    """One router over the echo backend and a client for it, reused by every generated example."""
    loop = asyncio.new_event_loop()
    backend = EchoBackend()
    client = TestClient(TestServer(Router(backend, TokenIdText(), MODEL).app()), loop=loop)
    loop.run_until_complete(client.start_server())
    yield loop, client, backend
    loop.run_until_complete(client.close())
    loop.close()


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_every_generated_body_gets_a_200_or_a_4xx_with_an_openai_error(http, body, path):
    loop, client, backend = http

    async def post():
        response = await client.post(path, data=_encoded(body), headers={"Content-Type": "application/json"})
        return response.status, await response.read()

    status, raw = loop.run_until_complete(post())
    assert status == 200 or 400 <= status < 500, (status, raw[:300])
    if status != 200:
        error = json.loads(raw)["error"]
        assert error["message"] and error["type"] and error["code"]
    assert backend.running == 0  # nothing left behind


def _valid_frames() -> list[bytes]:
    k = torch.arange(2 * 2 * 4, dtype=torch.int8).reshape(2, 2, 4)
    scales = torch.ones(2, 2, 1, dtype=torch.float16)
    return [encode_bytes(KVLayer("r", 0, 0, 2, k, scales, k, scales, 1.0)),
            encode_bytes(Generate("r", [1, 2, 3], {"max_tokens": 2}, "127.0.0.1:1")),
            encode_bytes(Tokens("r", [5], None, None, ""))]


@settings(max_examples=3000, deadline=None)
@given(data=st.binary(max_size=400), splits=st.lists(st.integers(0, 400), max_size=4))
def test_random_bytes_become_messages_or_a_protocol_error(data, splits):
    _feed_in_pieces(data, splits)


@settings(max_examples=3000, deadline=None)
@given(which=st.integers(0, 2), position=st.integers(0, 10**6), value=st.integers(0, 255),
       cut=st.integers(0, 10**6), splits=st.lists(st.integers(0, 400), max_size=4))
def test_corrupted_or_truncated_frames_never_pass_as_something_else(which, position, value, cut, splits):
    frame = _valid_frames()[which]
    corrupt = bytearray(frame)
    corrupt[position % len(frame)] = value
    messages = _feed_in_pieces(bytes(corrupt), splits)
    if bytes(corrupt) != frame and messages:
        # a changed byte can only pass where the checksum cannot see it: nowhere in a frame
        pytest.fail(f"a frame with byte {position % len(frame)} changed decoded as {messages}")
    truncated = frame[:cut % len(frame)]
    assert _feed_in_pieces(truncated, splits) == []  # incomplete: waits for more, decodes nothing


def _feed_in_pieces(data: bytes, splits: list[int]) -> list:
    """The messages both parsers make of data arriving in these pieces, [] on a ProtocolError:
    wire.FrameDecoder and the FrameReader that connections receive through, which must agree."""
    cuts = sorted({min(s, len(data)) for s in splits} | {0, len(data)})
    pieces = [data[start:end] for start, end in zip(cuts, cuts[1:])]
    decoder, messages = FrameDecoder(max_payload_bytes=1 << 16), []
    try:
        for piece in pieces:
            messages += decoder.feed(piece)
    except ProtocolError:
        messages = []
    read = asyncio.run(_read_in_pieces(pieces))
    assert [encode_bytes(m) for m in read] == [encode_bytes(m) for m in messages]  # (tensors compare by bytes)
    return messages


class _Socket(asyncio.BaseTransport):
    """What FrameReader needs of a transport when no socket is behind it."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


async def _read_in_pieces(pieces: list[bytes]) -> list:
    """FrameReader fed as a socket would feed it (get_buffer, buffer_updated), then EOF."""
    reader = FrameReader(max_payload_bytes=1 << 16)
    reader.connection_made(_Socket())
    for piece in pieces:
        while piece:
            buffer = reader.get_buffer(-1)
            n = min(len(buffer), len(piece))
            buffer[:n], piece = piece[:n], piece[n:]
            reader.buffer_updated(n)
    reader.eof_received()
    messages = []
    try:
        while True:
            body, header_len, payload_len = await reader.next_frame()
            messages.append(decode_body(body, header_len, payload_len))
    except asyncio.IncompleteReadError:  # the end of the stream, inside a frame or between frames
        return messages
    except ProtocolError:
        return []


def test_a_declared_size_over_the_limit_is_refused_from_the_prefix_alone():
    frame = _valid_frames()[0]
    decoder = FrameDecoder(max_payload_bytes=8)  # smaller than the frame's payload
    with pytest.raises(ProtocolError, match="payload"):
        decoder.feed(frame[:FRAME_PREFIX_SIZE])  # nothing beyond the prefix was needed to refuse it
