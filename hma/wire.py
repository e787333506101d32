"""Frames and messages between hosts: the bytes of every message, and nothing about sockets.

One frame per message; integers little-endian (every supported host is), offsets in bytes:

  0   magic        4            b"HMAF"
  4   version      2   u16      PROTOCOL_VERSION
  6   header_len   4   u32      <= MAX_HEADER_BYTES
  10  payload_len  8   u64      <= the reader's max_payload_bytes
  18  header       header_len   msgpack map {"type": TYPE, field: value, ...}, plain values only
  ..  payload      payload_len  KVLayer: k | k_scales | v | v_scales, each row-major, raw bytes
                                RequestBegin, Generate: prompt_token_ids as u32; others: empty
  ..  checksum     4   u32      zlib.crc32(header + payload)

A reader takes FRAME_PREFIX_SIZE bytes, calls parse_prefix (which refuses a bad frame before
anything is allocated), reads header_len + payload_len + CHECKSUM_SIZE more and calls decode_body.
encode's payload buffers alias the sender's tensors: keep them unchanged until written. Decoded
tensors are views of the body they were decoded from (copies only where it is read-only or a
tensor would start misaligned): a reader gives every frame a buffer of its own, never reused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import msgpack
import numpy as np
import torch

from hma.errors import ProtocolError

PROTOCOL_VERSION = 1
MAGIC = b"HMAF"
_PREFIX = struct.Struct("<4sHIQ")
_CHECKSUM = struct.Struct("<I")
FRAME_PREFIX_SIZE = _PREFIX.size  # 18
CHECKSUM_SIZE = _CHECKSUM.size  # 4
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30
MAX_PROMPT_TOKENS = 1 << 20
MAX_ID_LEN = 256  # request ids, names and fingerprints; free text is bounded by the header alone
NONCE_BYTES = 16
MAX_NONCE_BYTES = 256
ROLES = ("prefill", "decode", "router")
MAX_DIM = (1 << 31) - 1
_MAX_NESTING = 8  # of sampling values
_PROOF_LABEL = b"hma-hello-proof-v1"
KV_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int8, torch.uint8)}


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame each side sends; `nonce` is fresh random bytes the peer's proof must cover."""

    TYPE: ClassVar[str] = "Hello"
    version: int
    role: str  # one of ROLES
    model_fingerprint: str
    kv_format: str
    block_size: int
    nonce: bytes


@dataclass(frozen=True, slots=True)
class HelloProof:
    """make_proof's HMAC-SHA256: the sender knows the shared secret, for this connection."""

    TYPE: ClassVar[str] = "HelloProof"
    mac: bytes


@dataclass(frozen=True, slots=True)
class HelloReject:
    """The handshake failed; the sender closes the connection after this frame."""

    TYPE: ClassVar[str] = "HelloReject"
    reason: str


@dataclass(frozen=True, slots=True)
class RequestBegin:
    """Prefill announces a request whose KV follows, layer by layer."""

    TYPE: ClassVar[str] = "RequestBegin"
    request_id: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]  # plain msgpack values: None, bool, int, float, str, bytes, list, dict
    num_layers: int
    kv_format: str
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True, slots=True)
class Generate:
    """Router asks a decode host to serve a request, prefilled by the prefill host it names
    (none: the decode host is a colocated replica and prefills it itself)."""

    TYPE: ClassVar[str] = "Generate"
    request_id: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]
    prefill_host: str  # "host:port", or "" for a colocated replica


@dataclass(frozen=True, slots=True)
class BeginReply:
    """Decode accepts a request (its blocks are reserved) or refuses it with a reason."""

    TYPE: ClassVar[str] = "BeginReply"
    request_id: str
    accepted: bool
    reason: str = ""
    retryable: bool = False  # refused for now (no free blocks), not for good


# eq=False: tensors have no single truth value; compare fields in tests instead
@dataclass(frozen=True, slots=True, eq=False)
class KVLayer:
    """One layer's K and V for tokens [token_start, token_end); each (num_tokens, num_kv_heads, X)."""

    TYPE: ClassVar[str] = "KVLayer"
    request_id: str
    layer: int
    token_start: int
    token_end: int
    k: torch.Tensor = field(repr=False)  # payload dtype of the kv_format
    k_scales: torch.Tensor = field(repr=False)  # float16; (..., 0) for unquantized formats
    v: torch.Tensor = field(repr=False)
    v_scales: torch.Tensor = field(repr=False)
    computed_at: float = 0.0  # sender's time.time() when the layer was computed (for timelines)


@dataclass(frozen=True, slots=True)
class FirstToken:
    """Prefill's sampled first token, so decode can stream it before the KV lands."""

    TYPE: ClassVar[str] = "FirstToken"
    request_id: str
    token_id: int
    logprob: float | None = None


@dataclass(frozen=True, slots=True)
class Tokens:
    """Decode streams a request's new tokens to the router; the last carries finish and text."""

    TYPE: ClassVar[str] = "Tokens"
    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""  # the finished text (stop strings cut); the router detokenizes partial text


@dataclass(frozen=True, slots=True)
class Query:
    """Router asks a host for its status ("status") or one request's timeline ("timeline")."""

    TYPE: ClassVar[str] = "Query"
    query_id: str
    what: str
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class QueryReply:
    """A host's answer to a Query: plain values only."""

    TYPE: ClassVar[str] = "QueryReply"
    query_id: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RequestEnd:
    """Prefill has sent every layer of the request's `num_tokens` tokens."""

    TYPE: ClassVar[str] = "RequestEnd"
    request_id: str
    num_tokens: int


@dataclass(frozen=True, slots=True)
class Abort:
    """Either side gives up a request; the other frees what it holds for it."""

    TYPE: ClassVar[str] = "Abort"
    request_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """An HMAError crossing hosts: its code and message, with the request it hit if any."""

    TYPE: ClassVar[str] = "ErrorMessage"
    request_id: str | None
    code: str
    message: str


Message = (Hello | HelloProof | HelloReject | RequestBegin | Generate | BeginReply | KVLayer | FirstToken
           | Tokens | Query | QueryReply | RequestEnd | Abort | ErrorMessage)
_KV_TENSORS = ("k", "k_scales", "v", "v_scales")  # payload order

# ---- header fields: (what the value must be, the check) per type; encode and decode share them

_Check = tuple[str, Callable[[Any], bool]]


def _int(lo: int = 0) -> _Check:
    return f"an int >= {lo}", lambda v: type(v) is int and lo <= v < (1 << 63)


def _str(max_len: int = MAX_ID_LEN, choices: tuple[str, ...] = ()) -> _Check:
    if choices:
        return f"one of {', '.join(choices)}", lambda v: type(v) is str and v in choices
    return f"a str of at most {max_len} chars", lambda v: type(v) is str and len(v) <= max_len


def _bytes(min_len: int, max_len: int) -> _Check:
    wanted = f"exactly {min_len} bytes" if min_len == max_len else f"{min_len} to {max_len} bytes"
    return wanted, lambda v: type(v) is bytes and min_len <= len(v) <= max_len


def _is_plain(value: Any, depth: int = 0) -> bool:
    """A value msgpack round-trips unchanged: no tuples, sets, ext types; map keys are str."""
    if value is None or type(value) in (bool, float, str, bytes):
        return True
    if type(value) is int:
        return -(1 << 63) <= value < (1 << 64)
    if depth >= _MAX_NESTING:
        return False
    if type(value) is list:
        return all(_is_plain(x, depth + 1) for x in value)
    if type(value) is dict:
        return all(type(k) is str and _is_plain(x, depth + 1) for k, x in value.items())
    return False


def _is_tensor_specs(v: Any) -> bool:
    return type(v) is list and len(v) == 4 and all(
        type(s) is list and len(s) == 2 and type(s[0]) is str and s[0] in KV_DTYPES
        and type(s[1]) is list and len(s[1]) == 3
        and all(type(d) is int and 0 <= d <= MAX_DIM for d in s[1]) for s in v)


_ID = _str()
_TEXT = _str(MAX_HEADER_BYTES)
_BOOL = ("a bool", lambda v: type(v) is bool)
_PLAIN_MAP = ("a map of str to plain values", lambda v: type(v) is dict and _is_plain(v))
_TOKEN_IDS = ("a list of ints in [0, 2**32)", lambda v: type(v) is list and len(v) <= MAX_HEADER_BYTES
              and all(type(t) is int and 0 <= t < (1 << 32) for t in v))
_SCHEMAS: dict[type, dict[str, _Check]] = {
    Hello: {"version": _int(), "role": _str(choices=ROLES), "model_fingerprint": _ID,
            "kv_format": _ID, "block_size": _int(1), "nonce": _bytes(NONCE_BYTES, MAX_NONCE_BYTES)},
    HelloProof: {"mac": _bytes(32, 32)},
    HelloReject: {"reason": _TEXT},
    # prompt_token_ids travel in the payload: 1M of them would not fit in MAX_HEADER_BYTES
    RequestBegin: {"request_id": _ID, "sampling": _PLAIN_MAP,
                   "num_layers": _int(1), "kv_format": _ID, "num_kv_heads": _int(1), "head_dim": _int(1)},
    Generate: {"request_id": _ID, "sampling": _PLAIN_MAP, "prefill_host": _ID},
    BeginReply: {"request_id": _ID, "accepted": _BOOL, "reason": _TEXT, "retryable": _BOOL},
    KVLayer: {"request_id": _ID, "layer": _int(), "token_start": _int(), "token_end": _int(),
              "computed_at": ("a float", lambda v: type(v) is float),
              "tensors": (f"4 [dtype, [num_tokens, num_kv_heads, X]] with dtype in {', '.join(KV_DTYPES)}",
                          _is_tensor_specs)},
    FirstToken: {"request_id": _ID, "token_id": _int(),
                 "logprob": ("a float or None", lambda v: v is None or type(v) is float)},
    Tokens: {"request_id": _ID, "token_ids": _TOKEN_IDS,
             "finish_reason": ("None or " + _ID[0], lambda v: v is None or _ID[1](v)),
             "stop_reason": ("None, an int or a str", lambda v: v is None or type(v) in (int, str) and _is_plain(v)),
             "text": _TEXT},
    Query: {"query_id": _ID, "what": _ID, "request_id": _ID},
    QueryReply: {"query_id": _ID, "data": _PLAIN_MAP},
    RequestEnd: {"request_id": _ID, "num_tokens": _int()},
    Abort: {"request_id": _ID, "reason": _TEXT},
    ErrorMessage: {"request_id": ("None or " + _ID[0], lambda v: v is None or _ID[1](v)),
                   "code": _ID, "message": _TEXT},
}
_TYPES: dict[str, type] = {cls.TYPE: cls for cls in _SCHEMAS}


def _check_header(header: Any, payload_len: int) -> type:
    """The message class `header` describes; ProtocolError unless every field and the payload fit it."""
    if type(header) is not dict or type(header.get("type")) is not str:
        raise ProtocolError("frame header must be a msgpack map with a str 'type'")
    cls = _TYPES.get(header["type"])
    if cls is None:
        raise ProtocolError(f"unknown message type {header['type']!r:.80}")
    schema = _SCHEMAS[cls]
    if header.keys() - {"type"} != schema.keys():
        got = sorted(str(k) for k in header if k != "type")
        raise ProtocolError(f"{cls.TYPE} header has fields {got}, expected {sorted(schema)}")
    for name, (wanted, is_ok) in schema.items():
        if not is_ok(header[name]):
            raise ProtocolError(f"{cls.TYPE}.{name} must be {wanted}; got {header[name]!r:.80}")
    if cls is KVLayer:
        _check_kv_layer(header, payload_len)
    elif cls in (RequestBegin, Generate):
        if payload_len % 4 or payload_len // 4 > MAX_PROMPT_TOKENS:
            raise ProtocolError(f"{cls.TYPE} payload of {payload_len} bytes is not at most "
                                f"{MAX_PROMPT_TOKENS} u32 token ids")
    elif payload_len:
        raise ProtocolError(f"{cls.TYPE} carries no payload; frame declares {payload_len} bytes")
    return cls


def _check_kv_layer(header: dict[str, Any], payload_len: int) -> None:
    start, end, specs = header["token_start"], header["token_end"], header["tensors"]
    if end < start:
        raise ProtocolError(f"KVLayer token_end={end} is before token_start={start}")
    num_kv_heads = specs[0][1][1]
    for name, (_, shape) in zip(_KV_TENSORS, specs):
        if shape[0] != end - start or shape[1] != num_kv_heads:
            raise ProtocolError(f"KVLayer.{name} shape {shape} does not fit tokens [{start}, {end}) "
                                f"and the {num_kv_heads} kv heads of k")
    declared = sum(math.prod(shape) * KV_DTYPES[dtype].itemsize for dtype, shape in specs)
    if declared != payload_len:
        raise ProtocolError(f"KVLayer tensors declare {declared} bytes, frame payload is {payload_len}")


# ---- encode


def encode(msg: Message) -> list[bytes | memoryview]:
    """The frame's buffers, to write in order; large payloads are byte views of msg's own memory."""
    header, payload = _header_and_payload(msg)
    payload_len = sum(buf.nbytes for buf in payload)
    _check_header(header, payload_len)  # refuse here what the peer would refuse
    header_bytes = msgpack.packb(header, use_bin_type=True)
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ProtocolError(f"{msg.TYPE} header is {len(header_bytes)} bytes, limit {MAX_HEADER_BYTES}")
    crc = zlib.crc32(header_bytes)
    for buf in payload:
        crc = zlib.crc32(buf, crc)
    prefix = _PREFIX.pack(MAGIC, PROTOCOL_VERSION, len(header_bytes), payload_len)
    return [prefix, header_bytes, *payload, _CHECKSUM.pack(crc)]


def encode_bytes(msg: Message) -> bytes:
    """The whole frame as one bytes object (copies the payload; for tests and small messages)."""
    return b"".join(encode(msg))


def _header_and_payload(msg: Message) -> tuple[dict[str, Any], list[memoryview]]:
    schema = _SCHEMAS.get(type(msg))
    if schema is None:
        raise ProtocolError(f"{type(msg).__name__} is not a wire message")
    header = {"type": msg.TYPE, **{name: getattr(msg, name) for name in schema if name != "tensors"}}
    if isinstance(msg, KVLayer):
        tensors = [getattr(msg, name) for name in _KV_TENSORS]
        header["tensors"] = [[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in tensors]
        return header, [_tensor_bytes(t) for t in tensors]
    if isinstance(msg, (RequestBegin, Generate)):
        return header, [_token_bytes(msg.prompt_token_ids)]
    return header, []


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    # numpy over a uint8 view: a buffer on the tensor's own memory (fp8 and bf16 included), no copy
    flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def _token_bytes(token_ids: list[int]) -> memoryview:
    if not (type(token_ids) is list and len(token_ids) <= MAX_PROMPT_TOKENS
            and all(type(t) is int and 0 <= t < (1 << 32) for t in token_ids)):
        raise ProtocolError(f"prompt_token_ids must be a list of at most "
                            f"{MAX_PROMPT_TOKENS} ints in [0, 2**32)")
    return memoryview(np.asarray(token_ids, dtype="<u4")).cast("B")  # bytes, so len() counts bytes


# ---- decode


def parse_prefix(prefix: bytes, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> tuple[int, int]:
    """(header_len, payload_len) of a frame, from its first FRAME_PREFIX_SIZE bytes alone."""
    if len(prefix) != FRAME_PREFIX_SIZE:
        raise ProtocolError(f"frame prefix is {len(prefix)} bytes, expected {FRAME_PREFIX_SIZE}")
    magic, version, header_len, payload_len = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r}, expected {MAGIC!r}: not an HMA peer, "
                            "or the stream lost its place")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"peer speaks frame version {version}, this host {PROTOCOL_VERSION}")
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame declares {_human(header_len)} header, limit {_human(MAX_HEADER_BYTES)}")
    if payload_len > max_payload_bytes:
        raise ProtocolError(f"frame declares {_human(payload_len)} payload, limit {_human(max_payload_bytes)}")
    return header_len, payload_len


def decode_body(body: bytes | bytearray | memoryview, header_len: int, payload_len: int) -> Message:
    """The message in `body` (header + payload + checksum), checked field by field."""
    view = memoryview(body).cast("B")
    if view.nbytes != header_len + payload_len + CHECKSUM_SIZE:
        raise ProtocolError(f"frame body is {view.nbytes} bytes, prefix declares "
                            f"{header_len} + {payload_len} + {CHECKSUM_SIZE}")
    (crc,) = _CHECKSUM.unpack(view[-CHECKSUM_SIZE:])
    if zlib.crc32(view[:-CHECKSUM_SIZE]) != crc:
        raise ProtocolError("frame checksum mismatch: corrupted in transit, or the stream lost its place")
    try:
        # max_*_len default to the header's length (<= MAX_HEADER_BYTES); ext types are refused
        header = msgpack.unpackb(view[:header_len], raw=False, strict_map_key=True, max_ext_len=0)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ProtocolError(f"frame header is not valid msgpack: {type(e).__name__} {e}") from e
    cls = _check_header(header, payload_len)
    return _message_from(cls, header, view[header_len:header_len + payload_len])


def _message_from(cls: type, header: dict[str, Any], payload: memoryview) -> Message:
    fields = {name: value for name, value in header.items() if name != "type"}
    if cls is KVLayer:
        offset = 0
        for name, (dtype, shape) in zip(_KV_TENSORS, fields.pop("tensors")):
            fields[name], offset = _tensor_from(payload, offset, KV_DTYPES[dtype], shape)
    elif cls in (RequestBegin, Generate):
        fields["prompt_token_ids"] = np.frombuffer(payload, dtype="<u4").tolist()
    return cls(**fields)


def _tensor_from(payload: memoryview, offset: int, dtype: torch.dtype, shape: list[int]
                 ) -> tuple[torch.Tensor, int]:
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype), offset  # frombuffer refuses empty buffers
    if payload.readonly:  # bytes: a writable copy, as tensors elsewhere are
        raw = torch.frombuffer(bytearray(payload[offset:offset + nbytes]), dtype=torch.uint8)
    else:  # a view: no copy, and the tensor keeps the frame's buffer alive
        raw = torch.frombuffer(payload, dtype=torch.uint8, count=nbytes, offset=offset)
        if raw.data_ptr() % dtype.itemsize:
            raw = raw.clone()  # kernels and device copies want each element aligned
    return raw.view(dtype).reshape(shape), offset + nbytes


class FrameDecoder:
    """Bytes in, messages out, across any split of the stream; for tests and simple readers.

    Holds at most what it was fed and allocates nothing from declared lengths. The first bad
    frame raises ProtocolError (messages decoded earlier in that call are dropped with it) and
    every later feed raises too: past a bad frame the stream has no trustworthy boundaries.
    """

    def __init__(self, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self.max_payload_bytes = max_payload_bytes
        self._buf = bytearray()
        self._lengths: tuple[int, int] | None = None  # (header_len, payload_len) once the prefix is in
        self._failed = False

    def feed(self, data: bytes) -> list[Message]:
        """The messages `data` completes, in order; [] while a frame is still incomplete."""
        if self._failed:
            raise ProtocolError("stream already failed a frame check; open a new connection")
        self._buf += data
        messages = []
        try:
            while (msg := self._next_message()) is not None:
                messages.append(msg)
        except ProtocolError:
            self._failed = True
            raise
        return messages

    def _next_message(self) -> Message | None:
        if self._lengths is None:
            if len(self._buf) < FRAME_PREFIX_SIZE:
                return None
            self._lengths = parse_prefix(bytes(self._buf[:FRAME_PREFIX_SIZE]), self.max_payload_bytes)
            del self._buf[:FRAME_PREFIX_SIZE]
        header_len, payload_len = self._lengths
        body_len = header_len + payload_len + CHECKSUM_SIZE
        if len(self._buf) < body_len:
            return None
        body = self._buf[:body_len]  # a copy, so _buf stays free to shrink
        del self._buf[:body_len]
        self._lengths = None
        return decode_body(body, header_len, payload_len)


# ---- handshake and helpers
#
# Run by transport.py; both sides do the same, in this order:
#   1. send make_hello(...) and read the peer's Hello; a mismatch in version, role, model_fingerprint,
#      kv_format or block_size -> send HelloReject and close.
#   2. send HelloProof(make_proof(secret, mine, peer)). The MAC covers the nonce the PEER just chose,
#      so it proves we hold the secret now and is worthless on any other connection (no replay).
#   3. read the peer's HelloProof; unless check_proof(secret, mine, peer, proof) -> HelloReject, close.
# Each side thus proves itself to the other (mutual). This authenticates the peer, not later frames:
# there is no encryption or per-frame MAC, so run it on a trusted network or inside a tunnel.


def make_hello(role: str, model_fingerprint: str, kv_format: str, block_size: int) -> Hello:
    """This side's Hello with a fresh random nonce; make a new one for every connection."""
    return Hello(PROTOCOL_VERSION, role, model_fingerprint, kv_format, block_size, os.urandom(NONCE_BYTES))


def make_proof(secret: bytes, my_hello: Hello, peer_hello: Hello) -> bytes:
    """HMAC-SHA256, keyed by `secret`, over the peer's nonce and both Hellos (mine first)."""
    signed = msgpack.packb([_PROOF_LABEL, peer_hello.nonce, _hello_fields(my_hello),
                            _hello_fields(peer_hello)], use_bin_type=True)
    return hmac.new(secret, signed, hashlib.sha256).digest()


def check_proof(secret: bytes, my_hello: Hello, peer_hello: Hello, proof: bytes) -> bool:
    """True when `proof` is the peer's make_proof(secret, peer_hello, my_hello), covering my nonce."""
    if my_hello.role == peer_hello.role or my_hello.nonce == peer_hello.nonce:
        return False  # a peer echoing my own Hello could otherwise echo my own proof back to me
    return hmac.compare_digest(proof, make_proof(secret, peer_hello, my_hello))


def _hello_fields(hello: Hello) -> list[Any]:
    # the canonical form: field values in schema order, msgpack-encoded inside make_proof
    return [getattr(hello, name) for name in _SCHEMAS[Hello]]


FINGERPRINT_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size",
                      "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                      "rms_norm_eps", "rope_theta", "tie_word_embeddings")


def model_fingerprint(config: dict[str, Any], weight_shapes: dict[str, tuple[int, ...]]) -> str:
    """sha256 hex of the model's dimensions and weight shapes: hosts sharing KV must agree on it.

    `config` is dataclasses.asdict(ModelConfig) on both sides (Hugging Face names); fields outside
    FINGERPRINT_FIELDS, such as eos ids or context length, do not change the KV.
    """
    canonical = {
        "config": {name: config.get(name) for name in FINGERPRINT_FIELDS},
        "weights": sorted([name, [int(d) for d in shape]] for name, shape in weight_shapes.items()),
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def kv_layer_bytes(msg: KVLayer) -> int:
    """Payload bytes of a KVLayer frame: its four tensors' raw bytes."""
    return sum(t.numel() * t.element_size() for t in (msg.k, msg.k_scales, msg.v, msg.v_scales))


def _human(num_bytes: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= size:
            return f"{num_bytes / size:.1f} {unit}"
    return f"{num_bytes} B"
