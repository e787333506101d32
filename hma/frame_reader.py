"""FrameReader: the protocol that receives a connection's frames, each into a buffer of its own.

asyncio's StreamReader copies every received byte twice more (into its buffer, then out of it);
here the socket writes each frame's body straight into a buffer allocated for that frame alone,
so the tensors wire.decode_body makes are views of it. transport.py builds connections on it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable

import numpy as np

from hma.errors import ProtocolError
from hma.wire import CHECKSUM_SIZE, FRAME_PREFIX_SIZE, parse_prefix

STREAM_LIMIT = 8 << 20  # bytes of received frames waiting for recv() before the socket is paused
# np.empty's memory starts 16-aligned (malloc's guarantee), enough for every KV dtype: payloads
# placed on it need no aligning copy in wire.decode_body (which checks, and copies if not)
PAYLOAD_ALIGN = 16
SCRATCH_BYTES = 64 << 10  # read between large bodies: many small frames a recv, not two recvs each


class FrameReader(asyncio.StreamReaderProtocol, asyncio.BufferedProtocol):
    """A connection's protocol: the socket writes each frame's body straight into a buffer
    allocated for that frame alone (get_buffer), so a large frame is not copied after recv_into.

    Between bodies the socket fills a small scratch buffer, which may hold many small frames and
    the start of a large one; those bytes are copied out, the rest of the large body is not.
    A StreamReaderProtocol without a StreamReader, so StreamWriter's drain and close work on it
    unchanged; being a BufferedProtocol too makes the transport call get_buffer, not data_received.
    Complete frames queue for next_frame(); past STREAM_LIMIT queued bytes the socket is paused.
    A bad prefix, EOF or a lost connection ends the queue: next_frame() raises it once drained.
    """

    def __init__(self, max_payload_bytes: int,
                 on_connected: Callable[[FrameReader, asyncio.StreamWriter], Awaitable[None]] | None = None) -> None:
        # StreamReaderProtocol calls back with (its reader, writer); ours has no reader but this
        super().__init__(None, on_connected and (lambda _, writer: on_connected(self, writer)))
        self.max_payload_bytes = max_payload_bytes
        self._scratch = memoryview(bytearray(SCRATCH_BYTES))
        self._scratch_len = 0
        self._body: memoryview | None = None  # the large frame being read straight from the socket
        self._body_lengths = (0, 0)  # its (header_len, payload_len)
        self._filled = 0  # bytes of _body received so far
        self._frames: collections.deque[tuple[memoryview, int, int]] = collections.deque()
        self._queued_bytes = 0
        self._end: BaseException | None = None  # what next_frame raises once the queue is empty
        self._waiter: asyncio.Future | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._body is None:
            return self._scratch[self._scratch_len:]
        return self._body[self._filled:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._body is None:
            self._scratch_len += nbytes
            self._split_scratch()
            return
        self._filled += nbytes
        if self._filled == self._body.nbytes:
            self._queue(self._body, *self._body_lengths)
            self._body = None

    def _split_scratch(self) -> None:
        """Queues every frame the scratch holds; a frame it holds only the start of becomes _body."""
        data, pos = self._scratch[:self._scratch_len], 0
        while data.nbytes - pos >= FRAME_PREFIX_SIZE:
            try:  # the limits, before anything is allocated
                header_len, payload_len = parse_prefix(data[pos:pos + FRAME_PREFIX_SIZE], self.max_payload_bytes)
            except ProtocolError as exc:
                self._transport.pause_reading()  # past a bad prefix the stream has no boundaries
                self._finish(exc)
                return
            pos += FRAME_PREFIX_SIZE
            body = _frame_buffer(header_len, payload_len)
            taken = min(body.nbytes, data.nbytes - pos)
            body[:taken] = data[pos:pos + taken]
            pos += taken
            if taken < body.nbytes:  # the scratch is used up; the rest comes straight from the socket
                self._body, self._body_lengths, self._filled = body, (header_len, payload_len), taken
                break
            self._queue(body, header_len, payload_len)
        rest = bytes(data[pos:])  # part of the next prefix (under 18 bytes), or nothing
        self._scratch[:len(rest)] = rest
        self._scratch_len = len(rest)

    def _queue(self, body: memoryview, header_len: int, payload_len: int) -> None:
        self._frames.append((body, header_len, payload_len))
        self._queued_bytes += body.nbytes
        if self._queued_bytes > STREAM_LIMIT:
            self._transport.pause_reading()  # back-pressure: recv() is not keeping up
        self._wake()

    def eof_received(self) -> bool:
        self._finish(self._incomplete())
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or self._incomplete())
        super().connection_lost(exc)

    def _incomplete(self) -> asyncio.IncompleteReadError:
        """The stream ended here: inside a body, a prefix, or (partial == b"") between frames."""
        if self._body is not None:
            return asyncio.IncompleteReadError(bytes(self._body[:self._filled]), self._body.nbytes)
        return asyncio.IncompleteReadError(bytes(self._scratch[:self._scratch_len]), FRAME_PREFIX_SIZE)

    def _finish(self, end: BaseException) -> None:
        if self._end is None:
            self._end = end
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_frame(self) -> tuple[memoryview, int, int]:
        """(body, header_len, payload_len) of the next frame; body is its own buffer, never reused.
        Raises what ended the stream (ProtocolError, IncompleteReadError, OSError) once drained."""
        if self._waiter is not None:
            raise RuntimeError("next_frame() called while another task is waiting for a frame")
        while not self._frames:
            if self._end is not None:
                raise self._end
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        frame = self._frames.popleft()
        was_over = self._queued_bytes > STREAM_LIMIT
        self._queued_bytes -= frame[0].nbytes
        if was_over and self._queued_bytes <= STREAM_LIMIT and self._end is None:
            self._transport.resume_reading()  # undoes _queue's pause, and only that one
        return frame


def _frame_buffer(header_len: int, payload_len: int) -> memoryview:
    """A new body buffer whose payload starts PAYLOAD_ALIGN-aligned; not zeroed: the socket fills it."""
    pad = -header_len % PAYLOAD_ALIGN
    return memoryview(np.empty(pad + header_len + payload_len + CHECKSUM_SIZE, dtype=np.uint8))[pad:]
