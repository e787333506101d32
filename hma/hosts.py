"""The router's side of the hosts: one authenticated connection per prefill and decode host, kept open
(and reopened when lost), replies sorted by request id, and host choice by outstanding work.

A request: take the prefill host and the decode host with the fewest requests in flight from this
router; send Generate to the decode host, naming the prefill host (with no prefill hosts given, the
decode hosts are colocated replicas that prefill their own prompts: Generate names none). A refusal
for lack of KV blocks moves on to the next decode host; when every one refuses (or none is
connected), the request waits (bounded) until some request ends or a second passes, then tries
again; a permanent refusal or the wait running out is an error. Then tokens stream back from the
decode host as RequestOutputs. A host counts as ready once its handshake and first status query
succeed: hosts listen only when loaded and warm; it leaves the rotation when its connection breaks
or it misses a heartbeat (a status query every HEARTBEAT_S), and rejoins once a new handshake and
query succeed. A request that fails before its first token (a host lost, a KV stream broken, the
prefill host unreachable) is placed again, on hosts it has not failed on first, up to
PLACEMENT_ATTEMPTS times; after a token has streamed, a failure ends it (the router's stream then
ends with an error event).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from hma.errors import HMAError, InvalidRequestError, ServiceUnavailableError, describe
from hma.request import Request, RequestOutput, RequestStatus
from hma.sampling import SamplingParams
from hma.transport import Connection, HandshakeError, connect, for_each_message, parse_address
from hma.wire import Abort, BeginReply, ErrorMessage, Generate, Hello, Message, Query, QueryReply, Tokens

log = logging.getLogger(__name__)

RECONNECT_S = 0.5
QUERY_TIMEOUT_S = 5.0
HEARTBEAT_S = 2.0  # a host that does not answer a status query within QUERY_TIMEOUT_S leaves the rotation
BEGIN_TIMEOUT_S = 60.0  # a decode host answers once the prefill host queued the request
PLACEMENT_TIMEOUT_S = 30.0  # the longest a request waits for KV blocks to free up somewhere
ROOM_POLL_S = 1.0  # a waiting request looks again this often even when no request ended
PLACEMENT_ATTEMPTS = 3  # placements of one request that fails before its first token


@dataclass(slots=True, eq=False)
class HostLink:
    """The router's connection to one host, and what the router has in flight there."""

    role: str
    address: str  # host:port
    conn: Connection | None = None  # set while connected and ready
    status: dict = field(default_factory=dict)  # the first status query's answer
    num_outstanding: int = 0
    replies: dict[str, asyncio.Queue] = field(default_factory=dict)  # request or query id -> its messages

    async def keep_connected(self, hello: Callable[[], Hello], secret: bytes) -> None:
        """Connects, serves the connection until it breaks, and starts again, forever."""
        host, port = parse_address(self.address)
        while True:
            try:
                conn = await connect(host, port, hello(), secret)
            except (OSError, TimeoutError, HandshakeError) as exc:  # connect() raises only these
                log.debug("%s host=%s not reachable yet: %s", self.role, self.address, exc)
                await asyncio.sleep(RECONNECT_S)
                continue
            await self._serve(conn)
            await asyncio.sleep(RECONNECT_S)

    async def _serve(self, conn: Connection) -> None:
        reader = asyncio.create_task(for_each_message(conn, self._sort_reply))
        heartbeat = None
        try:
            self.status = await self.query("status", conn=conn)
            self.conn = conn
            log.info("%s host=%s ready: %s", self.role, self.address, self.status)
            heartbeat = asyncio.create_task(self._heartbeat(conn))
            await asyncio.wait((reader, heartbeat), return_when=asyncio.FIRST_COMPLETED)
            if heartbeat.done():
                heartbeat.result()  # raises why the host stopped answering
        except (HMAError, TimeoutError, OSError) as exc:  # a status query failed or timed out
            log.warning("%s host=%s lost: %s", self.role, self.address, describe(exc))
        finally:
            reader.cancel()
            if heartbeat is not None:
                heartbeat.cancel()
            self.conn = None
            lost = ServiceUnavailableError(f"lost the {self.role} host {self.address}")
            for replies in self.replies.values():
                replies.put_nowait(lost)
            await conn.close()

    async def _heartbeat(self, conn: Connection) -> None:
        """Returns never: raises once a status query goes unanswered (a host stopped, not closed)."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self.query("status", conn=conn)
            except TimeoutError:
                raise ServiceUnavailableError(f"no answer to a status query within {QUERY_TIMEOUT_S:g} s") from None

    def _sort_reply(self, msg: Message) -> None:
        key = msg.query_id if isinstance(msg, QueryReply) else getattr(msg, "request_id", None)
        if key in self.replies:
            self.replies[key].put_nowait(msg)

    async def query(self, what: str, request_id: str = "", conn: Connection | None = None) -> dict:
        """Asks the host for its status or a request's timeline."""
        conn = conn or self.conn
        if conn is None:
            raise ServiceUnavailableError(f"{self.role} host {self.address} is not connected")
        query_id = f"q-{next(_query_ids)}"
        replies = self.replies[query_id] = asyncio.Queue()
        try:
            await conn.send(Query(query_id, what, request_id))
            reply = await asyncio.wait_for(replies.get(), QUERY_TIMEOUT_S)
        finally:
            del self.replies[query_id]
        if isinstance(reply, Exception):
            raise reply
        return reply.data


_query_ids = itertools.count()


class Cluster:
    """Prefill and decode hosts behind one async generate(), the backend of the router."""

    def __init__(self, prefill_addresses: list[str], decode_addresses: list[str],
                 hello: Callable[[], Hello], secret: bytes) -> None:
        if not decode_addresses:
            raise InvalidRequestError("give at least one decode host (and prefill hosts, or none for "
                                      "colocated replicas)")
        self.prefills = [HostLink("prefill", a) for a in prefill_addresses]
        self.decodes = [HostLink("decode", a) for a in decode_addresses]
        self.hello, self.secret = hello, secret
        self.request_ended = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    @property
    def hosts(self) -> list[HostLink]:
        return self.prefills + self.decodes

    def start(self) -> None:
        self.tasks = [asyncio.create_task(h.keep_connected(self.hello, self.secret)) for h in self.hosts]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    @property
    def is_ready(self) -> bool:
        return all(h.conn is not None for h in self.hosts)

    @property
    def max_model_len(self) -> int:
        """The longest request every decode host can hold (0 until one has answered; hosts lost
        since still count, so requests wait for them to rejoin rather than fail at once)."""
        return min((h.status["max_model_len"] for h in self.decodes if h.status), default=0)

    @property
    def vocab_size(self) -> int:
        """Prompt token ids must lie below it (0, so no check, until a decode host has answered)."""
        return min((h.status.get("vocab_size", 0) for h in self.decodes if h.status), default=0)

    async def generate(self, prompt: dict, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Places the request, then yields its output as each batch of tokens arrives. If it fails
        on its way before any token reached the client (a host lost, a KV stream broken), it is
        placed again, up to PLACEMENT_ATTEMPTS times; once tokens have streamed, a failure ends it."""
        req = Request(request_id, list(prompt["prompt_token_ids"]), params)
        failed_on: set[str] = set()  # decode hosts this request failed on: tried last
        for attempt in range(1, PLACEMENT_ATTEMPTS + 1):
            try:
                async for out in self._attempt(req, failed_on):
                    yield out
                return
            except _FailedBeforeFirstToken as failed:
                if attempt == PLACEMENT_ATTEMPTS:
                    raise failed.error from None
                log.warning("request=%s failed before its first token (%s); placing it again", request_id,
                            failed.error)

    async def _attempt(self, req: Request, failed_on: set[str]) -> AsyncIterator[RequestOutput]:
        decode, prefill, replies = await self._place(req, failed_on)
        request_id, named = req.request_id, prefill.address if prefill else None
        try:
            while not req.is_finished:
                msg = await replies.get()
                if prefill is not None:  # the first message ends the prefill host's part
                    prefill.num_outstanding -= 1
                    prefill = None
                try:
                    out = self._advance(req, msg)
                except ServiceUnavailableError as exc:
                    if req.output_token_ids:
                        raise
                    failed_on.update(a for a in (decode.address, named) if a)
                    raise _FailedBeforeFirstToken(exc) from exc
                yield out
        finally:
            if prefill is not None:
                prefill.num_outstanding -= 1
            decode.num_outstanding -= 1
            decode.replies.pop(request_id, None)
            if not req.is_finished and decode.conn is not None:
                await decode.conn.send_quietly(Abort(request_id, "the client went away"))
            self.request_ended.set()

    @staticmethod
    def _advance(req: Request, msg: Message | Exception) -> RequestOutput:
        if isinstance(msg, Exception):
            raise msg
        if isinstance(msg, ErrorMessage):
            raise ServiceUnavailableError(f"the request failed on its way: {msg.message}")
        if not isinstance(msg, Tokens):
            raise ServiceUnavailableError(f"the decode host sent {msg.TYPE} mid-stream")
        now = time.time()
        req.output_token_ids += msg.token_ids
        req.metrics.first_token_time = req.metrics.first_token_time or now
        if msg.finish_reason is not None:
            req.status, req.finish_reason, req.stop_reason = RequestStatus.FINISHED, msg.finish_reason, msg.stop_reason
            req.output_text, req.metrics.finished_time = msg.text, now
        return RequestOutput.of(req)

    async def _place(self, req: Request, avoid: set[str]) -> tuple[HostLink, HostLink | None, asyncio.Queue]:
        """The decode host that accepted the request, its prefill host, and its reply queue. Hosts
        in avoid (the request failed there) come last; a prefill host that fails is added to it."""
        deadline = time.monotonic() + PLACEMENT_TIMEOUT_S
        sampling = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(req.sampling_params).items()}
        while True:
            prefill = _least_loaded(self.prefills, avoid)
            named = prefill.address if prefill else ""  # none: colocated replicas prefill themselves
            decodes = _least_loaded_first(self.decodes, avoid) if prefill or not self.prefills else []
            reasons = [] if decodes else ["no prefill or no decode host is connected"]
            for decode in decodes:
                try:
                    reply, replies = await self._try(decode, prefill, Generate(req.request_id, req.prompt_token_ids,
                                                                               sampling, named))
                except _FailedBeforeFirstToken:
                    avoid.add(named or decode.address)
                    raise
                if reply.accepted:
                    return decode, prefill, replies
                if not reply.retryable:
                    raise ServiceUnavailableError(f"decode host {decode.address} refused the request: {reply.reason}")
                reasons.append(f"{decode.address}: {reply.reason}")
            await self._wait_for_room(deadline, reasons)

    async def _wait_for_room(self, deadline: float, reasons: list[str]) -> None:
        """Returns once a request ends, or after ROOM_POLL_S (a host may have joined meanwhile);
        raises once the request has waited PLACEMENT_TIMEOUT_S in all."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServiceUnavailableError(f"no decode host could take the request within {PLACEMENT_TIMEOUT_S:.0f} s "
                                          f"({'; '.join(reasons)})", retry_after_s=1)
        self.request_ended.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.request_ended.wait(), min(remaining, ROOM_POLL_S))

    async def _try(self, decode: HostLink, prefill: HostLink | None,
                   msg: Generate) -> tuple[BeginReply, asyncio.Queue]:
        """Sends Generate and waits for the decode host's answer; counts the request as in flight
        on both hosts while it is accepted."""
        replies = decode.replies[msg.request_id] = asyncio.Queue()
        decode.num_outstanding += 1
        if prefill is not None:
            prefill.num_outstanding += 1
        try:
            await decode.conn.send(msg)
            reply = await asyncio.wait_for(replies.get(), BEGIN_TIMEOUT_S)
        except (OSError, TimeoutError, AttributeError) as exc:  # AttributeError: conn lost meanwhile
            reply = BeginReply(msg.request_id, False, f"no answer: {describe(exc)}", retryable=True)
        lost_prefill = isinstance(reply, ErrorMessage) and reply.code == ServiceUnavailableError.code
        if isinstance(reply, ErrorMessage):
            reply = BeginReply(msg.request_id, False, reply.message)
        elif isinstance(reply, Exception):
            reply = BeginReply(msg.request_id, False, str(reply), retryable=True)
        if not reply.accepted:
            decode.num_outstanding -= 1
            if prefill is not None:
                prefill.num_outstanding -= 1
            del decode.replies[msg.request_id]
        if lost_prefill:  # the decode host could not reach the prefill host, or it refused for now
            raise _FailedBeforeFirstToken(ServiceUnavailableError(f"the request failed on its way: {reply.reason}"))
        return reply, replies

    async def host_status(self) -> list[tuple[str, dict]]:
        """Each connected host's current status (hosts that do not answer in time are left out)."""
        connected = [h for h in self.hosts if h.conn]
        answers = await asyncio.gather(*(h.query("status") for h in connected), return_exceptions=True)
        return [(f"{h.role}@{h.address}", a) for h, a in zip(connected, answers) if isinstance(a, dict)]

    async def timeline(self, request_id: str) -> dict:
        """A request's per-layer timeline, from whichever decode host served it."""
        for host in self.decodes:
            if host.conn is not None and (found := await host.query("timeline", request_id)):
                return found
        return {}


class _FailedBeforeFirstToken(Exception):
    """A placed request failed before streaming anything: safe to place again."""

    def __init__(self, error: ServiceUnavailableError) -> None:
        super().__init__(str(error))
        self.error = error


def _least_loaded_first(hosts: list[HostLink], avoid: set[str]) -> list[HostLink]:
    """Connected hosts, those the request has not failed on first, each group by requests in flight."""
    return sorted((h for h in hosts if h.conn), key=lambda h: (h.address in avoid, h.num_outstanding))


def _least_loaded(hosts: list[HostLink], avoid: set[str]) -> HostLink | None:
    return next(iter(_least_loaded_first(hosts, avoid)), None)

