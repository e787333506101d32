"""Decode host: KV lands in blocks, requests join decode batching, tokens stream to the router.

One request: the router sends Generate, naming a prefill host. The decode host allocates the
prompt's blocks at once (or refuses, so the router places it elsewhere), asks that prefill host
for the prompt with RequestBegin on its connection to it (opened on first use), and writes each
arriving KVLayer straight into the blocks. Once every layer, the first token and RequestEnd are
in, the request joins the engine's running batch and its tokens stream back to the router.
Invariant: KVLanding owns a request's blocks until it hands the request to the scheduler, which
owns them from then on; an Abort, a failed prefill or the loss of the peer feeding a request frees
its blocks at once and ends that request with an error, never a hang or a silent re-prefill; a
link that delivers nothing for a whole landing (or begin) timeout has stalled and is closed.
Everything that touches the engine (landing included) runs in the AsyncEngine's worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from hma.async_engine import AsyncEngine, OutputStream
from hma.config import EngineConfig, HostConfig
from hma.engine import LLMEngine, warm_up
from hma.errors import HMAError, InvalidRequestError, ProtocolError, ServiceUnavailableError, describe
from hma.host import DEFAULT_PORTS, listen_until_stopped, load_engine, phase, resolve_secret
from hma.kv_cache import blocks_for
from hma.kv_formats import KVFormat, get_kv_format
from hma.kv_transfer import put_layer_kv
from hma.request import Request, RequestOutput
from hma.sampling import SamplingParams
from hma.transport import Connection, HandshakeError, connect, for_each_message, parse_address
from hma.wire import (Abort, BeginReply, ErrorMessage, FirstToken, Generate, Hello, KVLayer, Message, Query,
                      QueryReply, RequestBegin, RequestEnd, Tokens, kv_layer_bytes)

log = logging.getLogger(__name__)

BEGIN_TIMEOUT_S = 30.0  # for the prefill host to take (queue) a request; at most the landing timeout
MAX_TIMELINES = 1024  # per-request timelines kept for /debug/timeline


@dataclass(slots=True)
class Landing:
    """A request whose KV is arriving."""

    request: Request
    sender_format: KVFormat
    peer: str | None
    layers: set[int] = field(default_factory=set)
    first_token: int | None = None
    ended: bool = False


class KVLanding:
    """Receives prefill's messages for one engine; hands complete requests to its scheduler."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.pending: dict[str, Landing] = {}

    def begin(self, msg: RequestBegin, peer: str | None = None) -> BeginReply:
        """Allocates the prompt's blocks, or refuses with the reason."""
        try:
            fmt, params = self._check_begin(msg)
        except HMAError as exc:
            log.info("refused request_id=%s reason=%s", msg.request_id, exc)
            return BeginReply(msg.request_id, False, str(exc))
        allocator = self.engine.kv_cache.allocator
        need = blocks_for(len(msg.prompt_token_ids), self.engine.kv_cache.block_size)
        if not allocator.can_allocate(need):
            return BeginReply(msg.request_id, False, f"no free KV blocks: {need} needed, {allocator.num_free} free",
                              retryable=True)
        req = Request(msg.request_id, list(msg.prompt_token_ids), params, block_ids=allocator.allocate(need))
        self.pending[msg.request_id] = Landing(req, fmt, peer)
        return BeginReply(msg.request_id, True)

    def _check_begin(self, msg: RequestBegin) -> tuple[KVFormat, SamplingParams]:
        config = self.engine.model.config
        if msg.request_id in self.pending:
            raise ProtocolError(f"request {msg.request_id} is already landing")
        if (msg.num_layers, msg.num_kv_heads, msg.head_dim) != (
                config.num_hidden_layers, config.num_key_value_heads, config.head_dim):
            raise ProtocolError("the KV shape does not match this host's model")
        fmt = get_kv_format(msg.kv_format)
        try:
            params = SamplingParams(**msg.sampling)
        except TypeError as exc:
            raise ProtocolError(f"bad sampling parameters: {exc}") from None
        if len(msg.prompt_token_ids) + params.max_tokens > self.engine.max_model_len:
            raise ProtocolError(f"prompt + max_tokens exceeds max_model_len={self.engine.max_model_len}")
        return fmt, params

    def receive(self, msg: KVLayer | FirstToken | RequestEnd | Abort) -> Request | None:
        """Lands one message; returns the request if it just joined decode batching."""
        landing = self.pending.get(msg.request_id)
        if landing is None:
            if isinstance(msg, Abort):
                return None  # already gone: aborts may cross in flight
            raise ProtocolError(f"{msg.TYPE} for request {msg.request_id}, which is not landing here")
        if isinstance(msg, Abort):
            self.drop(msg.request_id, msg.reason)
            return None
        if isinstance(msg, KVLayer):
            put_layer_kv(self.engine.kv_cache, landing.request.block_ids, msg, landing.sender_format)
            if msg.token_end == len(landing.request.prompt_token_ids):
                landing.layers.add(msg.layer)
        elif isinstance(msg, FirstToken):
            landing.first_token = msg.token_id
        else:
            landing.ended = True
        return self._join_if_complete(landing)

    def _join_if_complete(self, landing: Landing) -> Request | None:
        num_layers = self.engine.model.config.num_hidden_layers
        if not (landing.ended and landing.first_token is not None and len(landing.layers) == num_layers):
            return None
        del self.pending[landing.request.request_id]
        self.engine.add_prefilled(landing.request, landing.first_token)
        return landing.request

    def drop_peer(self, peer: str) -> list[str]:
        """A prefill peer vanished: every request it was feeding is aborted and its blocks freed."""
        gone = [rid for rid, landing in self.pending.items() if landing.peer == peer]
        for rid in gone:
            self.drop(rid, f"lost prefill peer {peer}")
        return gone

    def drop(self, request_id: str, reason: str) -> None:
        """Frees a landing request's blocks; a request not (or no longer) landing is left alone."""
        landing = self.pending.pop(request_id, None)
        if landing is None:
            return
        self.engine.kv_cache.allocator.free(landing.request.block_ids)
        landing.request.block_ids = []
        log.info("aborted request_id=%s reason=%s", request_id, reason)


class DecodeServer:
    """Serves routers' Generate requests; pulls each prompt's KV from the prefill host it names, or,
    named none, prefills it here (a colocated replica: the memory-homogeneous baseline)."""

    def __init__(self, engine: LLMEngine, hello: Callable[[], Hello], secret: bytes,
                 landing_timeout_s: float = 120.0) -> None:
        self.worker = AsyncEngine(engine)
        self.landing_timeout_s = landing_timeout_s
        self.landing = KVLanding(engine)  # worker thread only
        self.hello, self.secret = hello, secret
        self.links: dict[str, asyncio.Task] = {}  # prefill "host:port" -> its (opening) Connection
        self.link_readers: set[asyncio.Task] = set()
        # request id -> (the prefill link asked, the future of its BeginReply)
        self.begin_replies: dict[str, tuple[Connection, asyncio.Future]] = {}
        self.timelines: OrderedDict[str, dict] = OrderedDict()
        self.kv_bytes_received = 0
        self.num_requests_finished = 0
        self.in_flight: set[asyncio.Task] = set()  # every router's requests being served
        self.draining = False  # SIGTERM: new requests are refused for now, those in flight finish

    async def drain(self) -> None:
        """Refuses new requests (retryable: routers place them elsewhere); returns once the
        requests in flight have ended."""
        self.draining = True
        while self.in_flight:
            await asyncio.sleep(0.05)

    async def serve_router(self, conn: Connection) -> None:
        """Serves one router until it leaves or breaks; its requests in flight are then aborted."""
        if conn.peer.role != "router":
            log.warning("dropping peer=%s reason=only routers connect to a decode host", conn.peer_name)
            return
        requests: dict[str, asyncio.Task] = {}

        async def handle(msg: Message) -> None:
            if isinstance(msg, Generate) and self.draining:
                await conn.send(BeginReply(msg.request_id, False, "this decode host is shutting down", retryable=True))
            elif isinstance(msg, Generate) and msg.request_id not in requests:
                task = requests[msg.request_id] = asyncio.create_task(self._serve_request(conn, msg))
                self.in_flight.add(task)
                task.add_done_callback(self.in_flight.discard)
                task.add_done_callback(lambda _, rid=msg.request_id: requests.pop(rid, None))
            elif isinstance(msg, Abort):
                if msg.request_id in requests:
                    requests[msg.request_id].cancel()
            elif isinstance(msg, Query):
                await conn.send(QueryReply(msg.query_id, self._answer(msg)))
            else:
                raise ProtocolError(f"a decode host is not sent {msg.TYPE} (or a duplicate request id)")

        try:
            await for_each_message(conn, handle)
        finally:
            for task in list(requests.values()):
                task.cancel()

    async def _serve_request(self, conn: Connection, msg: Generate) -> None:
        """One request, begin to end: place its KV, stream its tokens; abort whatever is left."""
        if not msg.prefill_host:
            return await self._serve_colocated(conn, msg)
        rid, stream, link, finished = msg.request_id, OutputStream(), None, False
        try:
            link = await self._link(msg.prefill_host)
            reply = await self._begin(link, msg, stream)
            await conn.send(reply)
            if reply.accepted:
                await self._stream_tokens(conn, rid, stream, link)
                finished = True
                self.num_requests_finished += 1
        except HMAError as exc:
            log.info("failed request_id=%s reason=%s", rid, exc)
            await conn.send_quietly(ErrorMessage(rid, exc.code, str(exc)))
        finally:
            if not finished:
                self.worker.submit(self.landing.drop, rid, "aborted")
                self.worker.abort(rid)
                if link is not None and not link.writer.is_closing():
                    await link.send_quietly(Abort(rid, "aborted by the decode host"))

    async def _serve_colocated(self, conn: Connection, msg: Generate) -> None:
        """A colocated replica's request: this engine prefills and decodes it, as `serve` does."""
        num_sent, finished = 0, False
        try:
            try:
                params = SamplingParams(**msg.sampling)
            except TypeError as exc:
                raise ProtocolError(f"bad sampling parameters: {exc}") from None
            await conn.send(BeginReply(msg.request_id, True))
            async for out in self.worker.generate({"prompt_token_ids": list(msg.prompt_token_ids)}, params,
                                                  msg.request_id):
                num_sent = await _send_tokens(conn, out, num_sent)
            finished = True
            self.num_requests_finished += 1
        except HMAError as exc:
            log.info("failed request_id=%s reason=%s", msg.request_id, exc)
            await conn.send_quietly(ErrorMessage(msg.request_id, exc.code, str(exc)))
        except OSError as exc:  # the router's connection broke: its reader ends the rest
            log.info("failed request_id=%s reason=%s", msg.request_id, exc)
        finally:
            if not finished:
                self.worker.abort(msg.request_id)  # explicit, as the disaggregated path does

    async def _stream_tokens(self, conn: Connection, request_id: str, stream: OutputStream,
                             link: Connection) -> None:
        """Forwards outputs as Tokens; a request whose KV has not landed in time fails (no hang)."""
        num_sent, outputs, received = 0, aiter(stream), link.bytes_received
        while True:
            try:
                out = await (asyncio.wait_for(anext(outputs), self.landing_timeout_s) if num_sent == 0
                             else anext(outputs))
            except StopAsyncIteration:
                return
            except TimeoutError:
                _close_if_stalled(link, received, request_id)
                raise ServiceUnavailableError(f"the KV of request {request_id} did not land within "
                                              f"{self.landing_timeout_s:g} s") from None
            num_sent = await _send_tokens(conn, out, num_sent)

    async def _begin(self, link: Connection, msg: Generate, stream: OutputStream) -> BeginReply:
        """Reserves blocks here, then asks the prefill host; a refusal from either frees them."""
        config = self.worker.engine.model.config
        begin = RequestBegin(msg.request_id, msg.prompt_token_ids, msg.sampling, config.num_hidden_layers,
                             link.peer.kv_format, config.num_key_value_heads, config.head_dim)
        reply = await self.worker.call(self._reserve, begin, link.peer_name, stream)
        if not reply.accepted:
            return reply
        self._start_timeline(begin, link)
        waiter = asyncio.get_running_loop().create_future()
        self.begin_replies[msg.request_id] = (link, waiter)
        received = link.bytes_received
        try:
            if link.writer.is_closing():  # its reader, which fails the waiters of a lost link, is done
                raise ConnectionError(f"lost the connection to {link.peer_name}")
            await link.send(begin)
            reply = await asyncio.wait_for(waiter, min(BEGIN_TIMEOUT_S, self.landing_timeout_s))
        except (OSError, TimeoutError) as exc:
            _close_if_stalled(link, received, msg.request_id)
            raise ServiceUnavailableError(f"prefill host {link.peer_name} did not take the request: "
                                          f"{describe(exc)}") from None
        finally:
            self.begin_replies.pop(msg.request_id, None)
        if not reply.accepted and reply.retryable:  # e.g. draining: another prefill host may take it
            raise ServiceUnavailableError(f"prefill host {link.peer_name} refused the request for now: {reply.reason}")
        return reply  # a refusal is cleaned up by _serve_request's finally

    def _reserve(self, begin: RequestBegin, peer: str, stream: OutputStream) -> BeginReply:
        """Worker thread: allocates the prompt's blocks and routes the request's outputs to stream."""
        reply = self.landing.begin(begin, peer)
        if reply.accepted:
            self.worker.watch(begin.request_id, stream)
        return reply

    async def _link(self, address: str) -> Connection:
        """The connection to a prefill host, opened (and authenticated) on first use."""
        task = self.links.get(address)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self.links[address] = asyncio.ensure_future(self._open_link(address))
        try:
            return await asyncio.shield(task)
        except (OSError, TimeoutError, HandshakeError, InvalidRequestError) as exc:
            raise ServiceUnavailableError(f"prefill host {address} is unreachable: "
                                          f"{describe(exc)}") from None

    async def _open_link(self, address: str) -> Connection:
        conn = await connect(*parse_address(address), self.hello(), self.secret)
        log.info("connected prefill host=%s kv_format=%s", address, conn.peer.kv_format)
        reader = asyncio.create_task(self._read_link(conn, address))
        self.link_readers.add(reader)
        reader.add_done_callback(self.link_readers.discard)
        return conn

    async def _read_link(self, conn: Connection, address: str) -> None:
        """Lands what one prefill host sends; if it breaks, every request it fed fails and frees."""
        def handle(msg: Message) -> None:
            if isinstance(msg, BeginReply):
                link, waiter = self.begin_replies.get(msg.request_id, (None, None))
                if link is conn and not waiter.done():
                    waiter.set_result(msg)
            elif isinstance(msg, (KVLayer, FirstToken, RequestEnd, Abort)):
                self._record(msg, conn.last_frame_bytes)
                self.worker.submit(self._land, msg)
            elif isinstance(msg, ErrorMessage) and msg.request_id is not None:
                self.worker.submit(self._fail, msg.request_id, ServiceUnavailableError(msg.message))
            else:
                raise ProtocolError(f"a prefill host does not send {msg.TYPE}")

        try:
            await for_each_message(conn, handle)
        finally:
            if self.links.get(address) is not None and self.links[address].done():
                del self.links[address]
            await conn.close()
            for link, waiter in self.begin_replies.values():  # asked, not answered: no answer will come
                if link is conn and not waiter.done():
                    waiter.set_exception(ConnectionError(f"lost the connection to {conn.peer_name}"))
            self.worker.submit(self._drop_peer, conn.peer_name)

    # -- worker thread

    def _land(self, msg: KVLayer | FirstToken | RequestEnd | Abort) -> None:
        try:
            req = self.landing.receive(msg)
        except ProtocolError as exc:  # this request's stream is bad; the connection's framing is fine
            self._fail(msg.request_id, exc)
            return
        if req is not None:
            self.worker.joined(req)

    def _fail(self, request_id: str, error: HMAError) -> None:
        self.landing.drop(request_id, str(error))
        self.worker.fail(request_id, error)

    def _drop_peer(self, peer: str) -> None:
        for rid in self.landing.drop_peer(peer):
            self.worker.fail(rid, ServiceUnavailableError(f"lost the prefill host {peer} mid-transfer"))

    # -- timelines and status (event loop)

    def _start_timeline(self, begin: RequestBegin, link: Connection) -> None:
        self.timelines[begin.request_id] = {
            "request_id": begin.request_id, "prefill_host": link.peer_name, "kv_format": begin.kv_format,
            "num_prompt_tokens": len(begin.prompt_token_ids), "begin_at": time.time(), "layers": [],
            "kv_payload_bytes": 0, "kv_frame_bytes": 0, "first_token_at": None}
        while len(self.timelines) > MAX_TIMELINES:
            self.timelines.popitem(last=False)

    def _record(self, msg: Message, frame_bytes: int) -> None:
        timeline = self.timelines.get(msg.request_id)
        if isinstance(msg, KVLayer):
            self.kv_bytes_received += frame_bytes
            if timeline is not None:
                timeline["layers"].append([msg.layer, msg.computed_at, time.time()])
                timeline["kv_payload_bytes"] += kv_layer_bytes(msg)
                timeline["kv_frame_bytes"] += frame_bytes
        elif isinstance(msg, FirstToken) and timeline is not None:
            timeline["first_token_at"] = time.time()

    def _answer(self, query: Query) -> dict:
        if query.what == "timeline":
            return self.timelines.get(query.request_id, {})
        status = self.worker.status()
        return {**status, "role": "decode", "waiting": status["waiting"] + len(self.landing.pending),
                "kv_bytes_received": self.kv_bytes_received, "num_requests_finished": self.num_requests_finished}


def _close_if_stalled(link: Connection, received_before: int, request_id: str) -> None:
    """A link that owed this request frames and delivered none in a whole timeout has stalled:
    closing it fails what else it fed (its reader does that), and the next request opens a new one."""
    if link.bytes_received == received_before and not link.writer.is_closing():
        log.warning("closing stalled link peer=%s request_id=%s", link.peer_name, request_id)
        link.abort()


async def _send_tokens(conn: Connection, out: RequestOutput, num_sent: int) -> int:
    """Sends the tokens of out past the first num_sent (and, when finished, the reason and text)."""
    done = out.finished
    await conn.send(Tokens(out.request_id, out.token_ids[num_sent:], out.finish_reason if done else None,
                           out.outputs[0].stop_reason if done else None, out.text if done else ""))
    return len(out.token_ids)


async def serve_decode(engine_config: EngineConfig, host_config: HostConfig) -> None:
    """The decode host's main: load, warm up, then serve routers until stopped."""
    secret = resolve_secret(host_config.secret)
    engine, hello = load_engine(engine_config, "decode")
    with phase("warm-up"):
        warm_up(engine)
    server = DecodeServer(engine, hello, secret, host_config.landing_timeout_s)
    server.worker.start()
    try:
        await listen_until_stopped(host_config.host, host_config.port or DEFAULT_PORTS["decode"], hello,
                                   secret, server.serve_router, server.drain)
    finally:
        server.worker.stop()
