"""Wire: every message round-trips bit-exact; corrupt, truncated, oversize and hostile frames fail cleanly."""

from __future__ import annotations

import dataclasses
import random
import struct
import zlib

import msgpack
import pytest
import torch

from hma.errors import ProtocolError
from hma.kv_formats import get_kv_format
from hma.wire import (Generate, Query, QueryReply, Tokens, 
    FRAME_PREFIX_SIZE, MAGIC, MAX_HEADER_BYTES, PROTOCOL_VERSION, Abort, BeginReply,
    ErrorMessage, FirstToken, FrameDecoder, HelloProof, HelloReject, KVLayer, RequestBegin,
    RequestEnd, check_proof, decode_body, encode, encode_bytes, kv_layer_bytes, make_hello, make_proof,
    model_fingerprint, parse_prefix,
)

SECRET = b"correct horse battery staple"
KV_TENSORS = ("k", "k_scales", "v", "v_scales")


def kv_layer(kv_format: str, num_tokens: int = 5, num_kv_heads: int = 2, head_dim: int = 64,
             token_start: int = 3, seed: int = 0) -> KVLayer:
    fmt = get_kv_format(kv_format)
    gen = torch.Generator().manual_seed(seed)
    k, k_scales = fmt.quantize(torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen))
    v, v_scales = fmt.quantize(torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen))
    return KVLayer("req-7", 11, token_start, token_start + num_tokens, k, k_scales, v, v_scales)


HEADER_MESSAGES = [
    make_hello("prefill", "ab" * 32, "int8", 16),
    HelloProof(bytes(range(32))),
    HelloReject("model_fingerprint differs"),
    RequestBegin("req-7", [1, 151_645, 0, 2**32 - 1], {"temperature": 0.7, "stop": ["\n"], "seed": None,
                                                         "logit_bias": {"5": -1.5}}, 28, "fp8", 8, 128),
    RequestBegin("req-8", [], {}, 1, "bf16", 1, 64),
    BeginReply("req-7", True),
    BeginReply("req-7", False, "no free blocks", retryable=True),
    Generate("req-9", [3, 1, 4], {"max_tokens": 8, "stop_token_ids": [2]}, "10.0.0.5:8100"),
    Tokens("req-9", [17, 4]),
    Tokens("req-9", [], "stop", "\n\n", "Paris."),
    Tokens("req-9", [2], "stop", 2, "Paris."),
    Query("q-1", "timeline", "req-9"),
    QueryReply("q-1", {"layers": [[0, 1.5, 1.75]], "kv_format": "int8", "first_token_at": None}),
    FirstToken("req-7", 42, -0.25),
    FirstToken("req-7", 42),
    RequestEnd("req-7", 5),
    Abort("req-7", "client went away"),
    ErrorMessage(None, "protocol_error", "bad frame"),
    ErrorMessage("req-7", "internal_error", "boom"),
]


def decode_one(frame: bytes) -> object:
    messages = FrameDecoder().feed(frame)
    assert len(messages) == 1
    return messages[0]


def assert_same_kv(got: KVLayer, want: KVLayer) -> None:
    assert (got.request_id, got.layer, got.token_start, got.token_end) == (
        want.request_id, want.layer, want.token_start, want.token_end)
    for name in KV_TENSORS:
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g.contiguous().view(torch.uint8), w.contiguous().view(torch.uint8)), name


def raw_frame(header: object, payload: bytes = b"", version: int = PROTOCOL_VERSION) -> bytes:
    """A frame with a correct checksum around any header, valid or not."""
    header_bytes = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    prefix = struct.pack("<4sHIQ", MAGIC, version, len(header_bytes), len(payload))
    return prefix + header_bytes + payload + struct.pack("<I", zlib.crc32(header_bytes + payload))


def header_of(frame: bytes) -> dict:
    header_len, _ = parse_prefix(frame[:FRAME_PREFIX_SIZE])
    return msgpack.unpackb(frame[FRAME_PREFIX_SIZE:FRAME_PREFIX_SIZE + header_len])


def payload_of(frame: bytes) -> bytes:
    header_len, payload_len = parse_prefix(frame[:FRAME_PREFIX_SIZE])
    return frame[FRAME_PREFIX_SIZE + header_len:][:payload_len]


@pytest.mark.parametrize("msg", HEADER_MESSAGES, ids=lambda m: m.TYPE)
def test_header_message_round_trips_equal(msg):
    assert decode_one(encode_bytes(msg)) == msg


@pytest.mark.parametrize("kv_format", ["fp8", "int8", "int4", "bf16", "bfp8"])
def test_kv_layer_round_trips_bit_exact(kv_format):
    msg = kv_layer(kv_format)
    got = decode_one(encode_bytes(msg))
    assert_same_kv(got, msg)
    if kv_format == "bf16":
        assert got.k_scales.shape == (5, 2, 0) and got.k_scales.dtype == torch.float16


def test_kv_layer_with_no_tokens_round_trips():
    assert_same_kv(decode_one(encode_bytes(kv_layer("int8", num_tokens=0))), kv_layer("int8", num_tokens=0))


def test_encode_passes_tensor_memory_through_without_copy():
    msg = kv_layer("int8")
    buffers = encode(msg)
    before = bytes(buffers[2])  # prefix, header, then k
    msg.k[0, 0, 0] += 1
    assert bytes(buffers[2]) != before


def test_decoded_tensors_are_aligned_views_of_a_writable_body_and_copies_of_bytes():
    frame = encode_bytes(kv_layer("fp8"))
    header_len, payload_len = parse_prefix(frame[:FRAME_PREFIX_SIZE])
    body = bytearray(frame[FRAME_PREFIX_SIZE:])
    view_of = decode_body(body, header_len, payload_len)
    copy_of = decode_body(frame[FRAME_PREFIX_SIZE:], header_len, payload_len)  # bytes: read-only
    body[header_len] ^= 0xFF  # k's first byte
    assert view_of.k.view(torch.uint8)[0, 0, 0] != copy_of.k.view(torch.uint8)[0, 0, 0]
    for got in (view_of, copy_of):  # float16 scales start on an even address whatever header_len is
        assert got.k_scales.data_ptr() % 2 == 0 and got.v_scales.data_ptr() % 2 == 0


def test_kv_layer_bytes_counts_the_payload():
    msg = kv_layer("int4")
    assert kv_layer_bytes(msg) == len(payload_of(encode_bytes(msg))) == 2 * 5 * 2 * (32 + 2 * 2 * 2)


def test_byte_by_byte_feed_yields_each_message_once():
    frames = [encode_bytes(HEADER_MESSAGES[3]), encode_bytes(kv_layer("fp8")), encode_bytes(HEADER_MESSAGES[0])]
    decoder, got = FrameDecoder(), []
    for byte in b"".join(frames):
        got += decoder.feed(bytes([byte]))
    assert [m.TYPE for m in got] == ["RequestBegin", "KVLayer", "Hello"]
    assert got[0] == HEADER_MESSAGES[3] and got[2] == HEADER_MESSAGES[0]


def test_several_frames_in_one_feed_and_split_across_feeds():
    stream = b"".join(encode_bytes(m) for m in HEADER_MESSAGES)
    assert FrameDecoder().feed(stream) == HEADER_MESSAGES
    decoder = FrameDecoder()
    cut = len(stream) // 2 + 3
    assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == HEADER_MESSAGES


def test_truncated_frame_waits_without_raising():
    frame = encode_bytes(kv_layer("int8", num_tokens=2))
    for cut in range(len(frame)):
        assert FrameDecoder().feed(frame[:cut]) == []


@pytest.mark.parametrize("where", ["header", "payload", "checksum"])
def test_flipped_bit_fails_the_checksum(where):
    frame = bytearray(encode_bytes(kv_layer("int8")))
    header_len, _ = parse_prefix(bytes(frame[:FRAME_PREFIX_SIZE]))
    index = {"header": FRAME_PREFIX_SIZE + 2, "payload": FRAME_PREFIX_SIZE + header_len + 7,
             "checksum": len(frame) - 1}[where]
    frame[index] ^= 0x10
    with pytest.raises(ProtocolError, match="checksum"):
        FrameDecoder().feed(bytes(frame))


def test_bad_magic_and_bad_version_are_refused():
    frame = encode_bytes(HEADER_MESSAGES[1])
    with pytest.raises(ProtocolError, match="magic"):
        FrameDecoder().feed(b"HTTP" + frame[4:])
    with pytest.raises(ProtocolError, match="version 2"):
        FrameDecoder().feed(raw_frame({"type": "HelloProof", "mac": bytes(32)}, version=2))


def test_oversize_lengths_are_refused_from_the_prefix_alone():
    big_header = struct.pack("<4sHIQ", MAGIC, PROTOCOL_VERSION, MAX_HEADER_BYTES + 1, 0)
    with pytest.raises(ProtocolError, match="header"):
        FrameDecoder().feed(big_header)
    big_payload = struct.pack("<4sHIQ", MAGIC, PROTOCOL_VERSION, 10, 5 << 30)
    with pytest.raises(ProtocolError, match=r"5\.0 GiB payload, limit 1\.0 GiB"):
        FrameDecoder().feed(big_payload)
    kv_prefix = encode_bytes(kv_layer("fp8"))[:FRAME_PREFIX_SIZE]
    with pytest.raises(ProtocolError, match="limit 100 B"):
        FrameDecoder(max_payload_bytes=100).feed(kv_prefix)


def test_decoder_keeps_failing_after_a_bad_frame():
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(b"x" * FRAME_PREFIX_SIZE)
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.feed(encode_bytes(HEADER_MESSAGES[1]))


def _kv_header(**changes: object) -> tuple[dict, bytes]:
    frame = encode_bytes(kv_layer("int8", num_tokens=2))
    return {**header_of(frame), **changes}, payload_of(frame)


BAD_FRAMES = {
    "not msgpack": raw_frame(b"\xc1"),
    "trailing bytes": raw_frame(msgpack.packb({"type": "Abort"}) + b"\x00"),
    "not a map": raw_frame([1, 2, 3]),
    "no type": raw_frame({"reason": "x"}),
    "unknown type": raw_frame({"type": "Pickle", "data": b"cos\nsystem\n"}),
    "missing field": raw_frame({"type": "Abort", "request_id": "r"}),
    "extra field": raw_frame({"type": "Abort", "request_id": "r", "reason": "x", "more": 1}),
    "str version": raw_frame({**header_of(encode_bytes(HEADER_MESSAGES[0])), "version": "1"}),
    "unknown role": raw_frame({**header_of(encode_bytes(HEADER_MESSAGES[0])), "role": "boss"}),
    "short nonce": raw_frame({**header_of(encode_bytes(HEADER_MESSAGES[0])), "nonce": b"1234"}),
    "short mac": raw_frame({"type": "HelloProof", "mac": b"x"}),
    "negative count": raw_frame({"type": "RequestEnd", "request_id": "r", "num_tokens": -1}),
    "bool count": raw_frame({"type": "RequestEnd", "request_id": "r", "num_tokens": True}),
    "int accepted": raw_frame({"type": "BeginReply", "request_id": "r", "accepted": 1, "reason": ""}),
    "long request id": raw_frame({"type": "Abort", "request_id": "r" * 1000, "reason": ""}),
    "ext value": raw_frame({"type": "Abort", "request_id": msgpack.ExtType(1, b"ab"), "reason": ""}),
    "bytes map key": raw_frame({"type": "Abort", b"request_id": "r", "reason": ""}),
    "payload on a header-only type": raw_frame({"type": "Abort", "request_id": "r", "reason": ""}, b"1234"),
    "odd token payload": raw_frame({**header_of(encode_bytes(HEADER_MESSAGES[4]))}, b"123"),
    "int map key": raw_frame({**header_of(encode_bytes(HEADER_MESSAGES[4])), "sampling": {1: 2}}),
    "deep sampling": raw_frame({**header_of(encode_bytes(HEADER_MESSAGES[4])),
                                "sampling": {"a": [[[[[[[[[[1]]]]]]]]]]}}),
    "float64 tensor": raw_frame(*_kv_header(tensors=[["float64", [2, 2, 64]]] * 4)),
    "2-d tensor": raw_frame(*_kv_header(tensors=[["int8", [2, 128]]] * 4)),
    "negative dim": raw_frame(*_kv_header(tensors=[["int8", [2, -2, 64]]] * 4)),
    "end before start": raw_frame(*_kv_header(token_start=5, token_end=4)),
    "token count mismatch": raw_frame(*_kv_header(token_end=100)),
    "payload size mismatch": raw_frame(_kv_header()[0], _kv_header()[1][:-1]),
}


@pytest.mark.parametrize("frame", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_invalid_header_is_a_protocol_error(frame):
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(frame)


def test_encode_refuses_what_the_peer_would_refuse():
    with pytest.raises(ProtocolError, match="sampling"):
        encode(RequestBegin("r", [1], {"stop": ("\n",)}, 1, "fp8", 1, 64))
    with pytest.raises(ProtocolError, match="prompt_token_ids"):
        encode(RequestBegin("r", [-1], {}, 1, "fp8", 1, 64))
    with pytest.raises(ProtocolError, match="tensors"):
        encode(KVLayer("r", 0, 0, 1, *(torch.zeros(1, 1, 4, dtype=torch.float64),) * 4))
    with pytest.raises(ProtocolError, match="header is"):
        encode(HelloReject("x" * MAX_HEADER_BYTES))


def test_proof_passes_only_with_the_secret_for_this_exchange():
    prefill, decode = make_hello("prefill", "f" * 64, "int8", 16), make_hello("decode", "f" * 64, "int8", 16)
    proof = make_proof(SECRET, prefill, decode)
    assert check_proof(SECRET, decode, prefill, proof)
    assert check_proof(SECRET, prefill, decode, make_proof(SECRET, decode, prefill))
    assert not check_proof(b"wrong secret", decode, prefill, proof)
    assert not check_proof(SECRET, decode, prefill, make_proof(b"wrong secret", prefill, decode))
    fresh = make_hello("decode", "f" * 64, "int8", 16)  # another connection: the proof does not replay
    assert not check_proof(SECRET, fresh, prefill, proof)
    tampered = dataclasses.replace(prefill, kv_format="int4")
    assert not check_proof(SECRET, decode, tampered, proof)


def test_proof_cannot_be_reflected_back():
    mine = make_hello("prefill", "f" * 64, "int8", 16)
    assert not check_proof(SECRET, mine, mine, make_proof(SECRET, mine, mine))


def test_make_hello_draws_a_fresh_nonce():
    a, b = make_hello("decode", "f", "fp8", 16), make_hello("decode", "f", "fp8", 16)
    assert len(a.nonce) >= 16 and a.nonce != b.nonce and a.version == PROTOCOL_VERSION


def test_fingerprint_changes_with_a_weight_shape_but_not_with_dict_order():
    config = {"architecture": "Qwen3ForCausalLM", "hidden_size": 64, "head_dim": 16, "eos_token_ids": (1,)}
    shapes = {"embed.weight": (100, 64), "layers.0.q.weight": (64, 64)}
    base = model_fingerprint(config, shapes)
    assert base == model_fingerprint(dict(reversed(config.items())), dict(reversed(shapes.items())))
    assert base == model_fingerprint({**config, "eos_token_ids": (2,)}, shapes)
    assert base != model_fingerprint(config, {**shapes, "layers.0.q.weight": (64, 32)})
    assert base != model_fingerprint({**config, "head_dim": 32}, shapes)


def _outcome(frame: bytes) -> list:
    """What feeding `frame` gives: messages, [] (waiting) or ProtocolError; anything else fails the test."""
    try:
        return FrameDecoder().feed(frame)
    except ProtocolError:
        return []


def test_random_garbage_and_mutations_never_raise_anything_else():
    rng = random.Random(0)
    prefix = struct.pack("<4sH", MAGIC, PROTOCOL_VERSION)
    for _ in range(2000):
        garbage = rng.randbytes(rng.randrange(64))
        assert _outcome(garbage) == [] and _outcome(prefix + garbage) == []
    frames = [encode_bytes(m) for m in HEADER_MESSAGES] + [encode_bytes(kv_layer(f, 2)) for f in ("int4", "bf16")]
    for _ in range(2000):  # one byte changed: the checksum or a length catches it
        frame = bytearray(rng.choice(frames))
        frame[rng.randrange(len(frame))] ^= rng.randrange(1, 256)
        assert _outcome(bytes(frame)) == []


def test_hostile_headers_with_valid_checksums_give_messages_or_protocol_errors():
    rng = random.Random(1)
    frames = [encode_bytes(m) for m in HEADER_MESSAGES] + [encode_bytes(kv_layer("fp8", 2))]
    values = [None, -1, 0, 2**64 - 1, 1.5, True, "", "x" * 300, b"", [], {}, [1, "a"], {"a": {}},
              ["int8", [2, 2, 64]], msgpack.ExtType(5, b"")]
    for _ in range(1500):
        frame = rng.choice(frames)
        header, payload = header_of(frame), payload_of(frame)
        if rng.random() < 0.5:  # a field replaced by a value of some other shape
            header[rng.choice(list(header))] = rng.choice(values)
            body = msgpack.packb(header, use_bin_type=True)
        else:  # the header's bytes mutated under a recomputed checksum
            body = bytearray(msgpack.packb(header, use_bin_type=True))
            body[rng.randrange(len(body))] = rng.randrange(256)
            body = bytes(body)
        for msg in _outcome(raw_frame(body, payload)):
            assert type(msg).TYPE in {m.TYPE for m in HEADER_MESSAGES} | {"KVLayer"}
