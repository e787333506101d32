import asyncio

import pytest
import torch

from hma.transport import HandshakeError, connect, serve
from hma.wire import FirstToken, KVLayer, encode_bytes, make_hello

SECRET = b"s3cret"


async def _server(received: list, secret: bytes = SECRET, fingerprint: str = "model-a", role: str = "decode"):
    async def on_connection(conn):
        try:
            while True:
                received.append(await conn.recv(timeout=5))
        except Exception as exc:  # the test inspects what ended the connection
            received.append(exc)

    server = await serve("127.0.0.1", 0, lambda: make_hello(role, fingerprint, "int8", 16), secret, on_connection)
    return server, server.sockets[0].getsockname()[1]


def _kv_layer() -> KVLayer:
    k = torch.randint(-127, 127, (300, 8, 128), dtype=torch.int8)
    scales = torch.rand(300, 8, 1).half()
    return KVLayer("r1", 3, 0, 300, k, scales, k.flip(0), scales.flip(0))


async def test_authenticated_peers_exchange_kv_frames_bit_exact():
    received = []
    server, port = await _server(received)
    conn = await connect("127.0.0.1", port, make_hello("prefill", "model-a", "fp8", 4), SECRET)
    msg = _kv_layer()
    await conn.send(msg)
    await conn.send(FirstToken("r1", 42))
    assert conn.bytes_sent == len(encode_bytes(msg)) + len(encode_bytes(FirstToken("r1", 42)))
    await conn.close()
    await asyncio.sleep(0.2)
    server.close()
    got = received[0]
    assert torch.equal(got.k, msg.k) and torch.equal(got.v_scales, msg.v_scales)
    assert received[1] == FirstToken("r1", 42)
    assert isinstance(received[2], asyncio.IncompleteReadError)  # clean close ends the loop


async def test_small_frames_of_one_event_loop_turn_go_out_in_one_write_and_in_order():
    received = []
    server, port = await _server(received)
    conn = await connect("127.0.0.1", port, make_hello("prefill", "model-a", "fp8", 4), SECRET)
    writes = []
    original = conn.writer.write
    conn.writer.write = lambda data: (writes.append(len(data)), original(data))[1]
    tokens = [FirstToken(f"r{i}", i) for i in range(10)]
    await asyncio.gather(*(conn.send(t) for t in tokens))  # ten streams, one step's tokens
    await asyncio.sleep(0)
    assert len(writes) == 1  # one system call for all ten frames
    layer = _kv_layer()
    await conn.send(FirstToken("before", 1))
    await conn.send(layer)  # a large frame: what was queued before it goes first
    await conn.close()
    await asyncio.sleep(0.2)
    server.close()
    assert received[:10] == tokens and received[10] == FirstToken("before", 1)
    assert torch.equal(received[11].k, layer.k)


@pytest.mark.parametrize("secret, fingerprint, role, reason", [
    (b"wrong", "model-a", "prefill", "secret"),
    (SECRET, "model-b", "prefill", "fingerprint"),
    (SECRET, "model-a", "decode", "does not talk to"),
])
async def test_mismatched_peers_are_refused_on_both_sides_with_the_reason(secret, fingerprint, role, reason, caplog):
    received = []
    server, port = await _server(received)
    with pytest.raises(HandshakeError, match=reason):
        await connect("127.0.0.1", port, make_hello(role, fingerprint, "fp8", 16), secret)
    await asyncio.sleep(0.1)
    server.close()
    assert received == []  # nothing got past the handshake
    assert any(reason in r.getMessage() for r in caplog.records if "refused" in r.getMessage())


async def test_a_corrupt_frame_drops_only_that_connection():
    received = []
    server, port = await _server(received)
    bad = await connect("127.0.0.1", port, make_hello("prefill", "model-a", "fp8", 16), SECRET)
    frame = bytearray(encode_bytes(FirstToken("r1", 7)))
    frame[-6] ^= 0xFF  # inside the header: the checksum no longer matches
    bad.writer.write(bytes(frame))
    await bad.writer.drain()
    good = await connect("127.0.0.1", port, make_hello("prefill", "model-a", "fp8", 16), SECRET)
    await good.send(FirstToken("r2", 8))
    await asyncio.sleep(0.2)
    with pytest.raises(asyncio.IncompleteReadError):  # the server hung up on the corrupt peer
        await bad.recv(timeout=2)
    await good.close()
    await asyncio.sleep(0.1)
    server.close()
    kinds = [type(r).__name__ for r in received]
    assert "ProtocolError" in kinds and FirstToken("r2", 8) in received


async def test_a_silent_peer_times_out_the_handshake(monkeypatch):
    import hma.transport as transport

    monkeypatch.setattr(transport, "HANDSHAKE_TIMEOUT_S", 0.3)
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never answers
    port = listener.sockets[0].getsockname()[1]
    with pytest.raises(TimeoutError):
        await connect("127.0.0.1", port, make_hello("prefill", "model-a", "fp8", 16), SECRET)
    listener.close()


async def test_a_frame_declaring_a_huge_payload_is_refused_from_its_prefix_alone():
    """The host hangs up on the 18-byte prefix: it neither waits for nor makes room for 1 TiB."""
    from hma.errors import ProtocolError
    from hma.wire import FRAME_PREFIX_SIZE

    received = []
    server, port = await _server(received)
    peer = await connect("127.0.0.1", port, make_hello("prefill", "model-a", "fp8", 16), SECRET)
    prefix = bytearray(encode_bytes(FirstToken("r1", 7))[:FRAME_PREFIX_SIZE])
    prefix[10:18] = (1 << 40).to_bytes(8, "little")  # payload_len
    peer.writer.write(bytes(prefix))
    await peer.writer.drain()
    with pytest.raises(asyncio.IncompleteReadError):
        await peer.recv(timeout=2)
    server.close()
    assert isinstance(received[-1], ProtocolError) and "payload" in str(received[-1])


async def test_a_receiver_that_stops_reading_pushes_back_then_gets_every_frame_intact(monkeypatch):
    """Past STREAM_LIMIT queued bytes the receiver stops reading its socket, so the sender waits in
    drain; once it reads, every frame arrives, and each tensor is still its own after later frames."""
    import hma.frame_reader as frame_reader

    monkeypatch.setattr(frame_reader, "STREAM_LIMIT", 1 << 20)
    scales = torch.ones(512, 8, 1).half()
    frames = [KVLayer("r1", i, 0, 512, torch.full((512, 8, 128), i, dtype=torch.int8), scales,
                      torch.full((512, 8, 128), -i, dtype=torch.int8), scales) for i in range(64)]  # 1 MiB each
    reading, received = asyncio.Event(), []

    async def on_connection(conn):
        await reading.wait()
        for _ in frames:
            received.append(await conn.recv(timeout=5))

    server = await serve("127.0.0.1", 0, lambda: make_hello("decode", "model-a", "int8", 16), SECRET, on_connection)
    conn = await connect("127.0.0.1", server.sockets[0].getsockname()[1],
                         make_hello("prefill", "model-a", "int8", 16), SECRET)
    sending = asyncio.gather(*[conn.send(frame) for frame in frames])
    await asyncio.sleep(0.5)
    assert not sending.done()  # 64 MiB is more than both kernel buffers and STREAM_LIMIT hold
    reading.set()
    await asyncio.wait_for(sending, 10)
    while len(received) < len(frames):
        await asyncio.sleep(0.05)
    await conn.close()
    server.close()
    assert all(torch.equal(got.k, sent.k) and torch.equal(got.v, sent.v) for got, sent in zip(received, frames))


async def test_a_peer_that_dies_mid_frame_ends_recv_with_incomplete_read():
    received = []
    server, port = await _server(received)
    peer = await connect("127.0.0.1", port, make_hello("prefill", "model-a", "fp8", 16), SECRET)
    frame = encode_bytes(_kv_layer())
    peer.writer.write(frame[:len(frame) // 2])
    await peer.writer.drain()
    await peer.close()
    await asyncio.sleep(0.2)
    server.close()
    assert received and isinstance(received[-1], asyncio.IncompleteReadError)
    assert len(received[-1].partial) < received[-1].expected
