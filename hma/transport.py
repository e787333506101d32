"""asyncio TCP between hosts: the authenticated handshake, then frames both ways on one Connection.

Handshake, both sides at once: send Hello; read the peer's Hello and check it (protocol version,
model fingerprint, a role this side talks to); send HelloProof over the peer's nonce; read and
check the peer's proof. Any mismatch is answered with HelloReject and the connection closed,
so both sides log the same reason. Every read and drain has a timeout; a frame that fails to
decode ends its connection (the stream can no longer be trusted), never the process.
Frames are received by FrameReader (frame_reader.py), into a buffer of their own each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from hma.errors import HMAError, InvalidRequestError, ProtocolError, describe
from hma.frame_reader import FrameReader
from hma.wire import (DEFAULT_MAX_PAYLOAD_BYTES, FRAME_PREFIX_SIZE, PROTOCOL_VERSION, Hello, HelloProof,
                      HelloReject, Message, check_proof, decode_body, encode, make_proof)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
HANDSHAKE_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0    # a KV stream silent this long is dead
DRAIN_TIMEOUT_S = 60.0   # a peer that stops reading this long is dead (back-pressure bound)
SMALL_FRAME_BYTES = 64 << 10  # frames up to this size go to the socket as one buffer

# Who may talk to whom: a prefill host pushes KV to decode hosts; the router talks to both.
PEERS = {"prefill": {"decode", "router"}, "decode": {"prefill", "router"}, "router": {"prefill", "decode"}}


class HandshakeError(HMAError):
    """The peer is not one this host may talk to: wrong secret, model, version or role."""

    status = 502
    code = "handshake_failed"


@dataclass(slots=True)
class Connection:
    """One authenticated TCP connection carrying wire frames."""

    reader: FrameReader
    writer: asyncio.StreamWriter
    peer: Hello
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    bytes_sent: int = 0
    bytes_received: int = 0
    last_frame_bytes: int = 0  # size of the frame recv() returned last, framing included

    peer_name: str = ""  # role@host:port, fixed at connect time (the socket forgets it once closed)
    unsent: list[bytes] = field(default_factory=list)  # small frames queued in this turn of the event loop

    def __post_init__(self) -> None:
        host, port = (self.writer.get_extra_info("peername") or ("?", 0))[:2]
        self.peer_name = f"{self.peer.role}@{host}:{port}"

    async def send(self, msg: Message) -> None:
        """Writes one frame, then waits while the peer's buffer is full (back-pressure). Small
        frames sent in the same turn of the event loop reach the socket in one write at its end:
        a decode step streams one frame per request, and each write is a system call (about 66 us
        a send on this project's CPU machine)."""
        buffers = encode(msg)
        size = sum(memoryview(b).nbytes for b in buffers)
        # every write before the first await, so frames of concurrent senders never interleave
        if size <= SMALL_FRAME_BYTES:
            if not self.unsent:
                asyncio.get_running_loop().call_soon(self._flush)
            self.unsent.append(b"".join(buffers))  # one buffer; the join copies little
        else:  # one write per buffer: writelines would join them, one more copy of the whole frame
            self._flush()  # the small frames queued before it go first
            for buf in buffers:
                self.writer.write(buf)
        self.bytes_sent += size
        await _drain(self.writer)

    def _flush(self) -> None:
        if self.unsent:
            self.writer.write(b"".join(self.unsent))
            self.unsent.clear()

    async def send_quietly(self, msg: Message) -> None:
        """Best effort, for aborts and errors: the peer may be gone already (its reader says so)."""
        try:
            await self.send(msg)
        except (OSError, TimeoutError) as exc:
            log.debug("could not send %s to peer=%s: %s", msg.TYPE, self.peer_name, exc)

    async def recv(self, timeout: float | None = READ_TIMEOUT_S) -> Message:
        """Reads one frame; raises ProtocolError (bad frame), TimeoutError or IncompleteReadError."""
        msg, self.last_frame_bytes = await asyncio.wait_for(_recv(self.reader), timeout)
        self.bytes_received += self.last_frame_bytes
        return msg

    def abort(self) -> None:
        """Drops the connection at once, unsent bytes included: close() would wait for a peer that
        stopped reading to take them, and its reader would never see the end."""
        self.writer.transport.abort()

    async def close(self) -> None:
        self._flush()
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        except (OSError, TimeoutError):
            pass  # the peer is gone already; nothing is left to release


async def for_each_message(conn: Connection, handle: Callable[[Message], Awaitable[None] | None]) -> None:
    """Hands each message to handle (awaited if it returns an awaitable) until the peer leaves or
    breaks, which is logged with the reason. No read timeout: idle peers are normal."""
    try:
        while True:
            pending = handle(await conn.recv(timeout=None))
            if pending is not None:
                await pending
    except asyncio.IncompleteReadError:
        log.info("peer=%s closed its connection", conn.peer_name)
    except (HMAError, TimeoutError, OSError) as exc:
        log.warning("dropping peer=%s reason=%s", conn.peer_name, describe(exc))


async def _send(writer: asyncio.StreamWriter, msg: Message) -> None:
    """Writes one frame at once (the handshake's, before there is a Connection)."""
    writer.write(b"".join(encode(msg)))
    await _drain(writer)


async def _drain(writer: asyncio.StreamWriter) -> None:
    """Waits while the peer's buffer is full, at most DRAIN_TIMEOUT_S. Below the low-water mark
    writing is not paused, so drain returns at once (or raises for a lost connection) and needs
    no timeout, whose task and timer would cost more than the write (one per streamed token)."""
    transport = writer.transport
    if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[0]:
        await writer.drain()
    else:
        await asyncio.wait_for(writer.drain(), DRAIN_TIMEOUT_S)


async def _recv(reader: FrameReader) -> tuple[Message, int]:
    """One message and its frame's size in bytes."""
    body, header_len, payload_len = await reader.next_frame()
    return decode_body(body, header_len, payload_len), FRAME_PREFIX_SIZE + body.nbytes


async def handshake(reader: FrameReader, writer: asyncio.StreamWriter, hello: Hello,
                    secret: bytes) -> Connection:
    """Runs the mutual HMAC handshake; returns the Connection or raises HandshakeError."""
    async def exchange() -> Hello:
        await _send(writer, hello)
        peer = await _expect(reader, Hello)
        reason = _incompatibility(hello, peer)
        if reason:
            await _reject(writer, reason)
        await _send(writer, HelloProof(make_proof(secret, hello, peer)))
        proof = await _expect(reader, HelloProof)
        if not check_proof(secret, hello, peer, proof.mac):
            await _reject(writer, "the peer's proof does not match: a different shared secret")
        return peer

    peer = await asyncio.wait_for(exchange(), HANDSHAKE_TIMEOUT_S)
    return Connection(reader, writer, peer, reader.max_payload_bytes)


async def _expect(reader: FrameReader, kind: type) -> Message:
    msg, _ = await _recv(reader)
    if isinstance(msg, HelloReject):
        raise HandshakeError(f"the peer refused us: {msg.reason}")
    if not isinstance(msg, kind):
        raise HandshakeError(f"expected {kind.TYPE} during the handshake, got {msg.TYPE}")
    return msg


async def _reject(writer: asyncio.StreamWriter, reason: str) -> None:
    """Tells the peer why, then raises so the caller closes the connection."""
    try:
        await _send(writer, HelloReject(reason))
    except (OSError, TimeoutError):
        pass  # the peer may have hung up first; our own error below still says why
    raise HandshakeError(reason)


def _incompatibility(mine: Hello, peer: Hello) -> str:
    """Why this peer cannot be served, or '' if it can. KV formats and block sizes may differ:
    KV travels per token range in a format named by the sender, which every decode host reads."""
    if peer.version != PROTOCOL_VERSION:
        return f"protocol version {peer.version}, this host speaks {PROTOCOL_VERSION}"
    if peer.role not in PEERS[mine.role]:
        return f"a {mine.role} host does not talk to a {peer.role} host"
    if peer.model_fingerprint != mine.model_fingerprint:
        return (f"model fingerprint {peer.model_fingerprint[:12]} differs from this host's "
                f"{mine.model_fingerprint[:12]}: the hosts serve different models")
    return ""


def parse_address(address: str) -> tuple[str, int]:
    """("host", port) from "host:port"; InvalidRequestError names the bad address."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidRequestError(f"host address {address!r} is not host:port")
    return host, int(port)


async def connect(host: str, port: int, hello: Hello, secret: bytes,
                  max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Connection:
    """Opens and authenticates a connection; raises OSError, TimeoutError or HandshakeError (so
    callers that retry catch three types), closing the socket if the handshake fails."""
    loop = asyncio.get_running_loop()
    transport, reader = await asyncio.wait_for(
        loop.create_connection(lambda: FrameReader(max_payload_bytes), host, port), CONNECT_TIMEOUT_S)
    writer = asyncio.StreamWriter(transport, reader, None, loop)
    try:
        return await handshake(reader, writer, hello, secret)
    except (asyncio.IncompleteReadError, ProtocolError) as exc:  # a peer that dies or garbles mid-handshake
        writer.close()
        raise HandshakeError(f"the handshake broke off: {exc}") from None
    except BaseException:
        writer.close()
        raise


async def serve(host: str, port: int, hello_factory: Callable[[], Hello], secret: bytes,
                on_connection: Callable[[Connection], Awaitable[None]],
                max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> asyncio.Server:
    """Listens; each accepted peer is authenticated, then handed to on_connection, and its
    socket is closed when on_connection returns or fails, whatever the reason."""
    async def accept(reader: FrameReader, writer: asyncio.StreamWriter) -> None:
        address = writer.get_extra_info("peername")
        try:
            conn = await handshake(reader, writer, hello_factory(), secret)
        except (HandshakeError, ProtocolError, TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
            log.warning("refused peer=%s reason=%s", address, describe(exc))
            writer.close()
            return
        log.info("connected peer=%s", conn.peer_name)
        try:
            await on_connection(conn)
        except asyncio.CancelledError:
            log.info("closing peer=%s: this host is stopping", conn.peer_name)  # not an error
        finally:
            await conn.close()

    return await asyncio.get_running_loop().create_server(lambda: FrameReader(max_payload_bytes, accept), host, port)
