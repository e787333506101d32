"""Decode host, first part: KV lands in blocks and requests join decode batching.

RequestBegin allocates the request's blocks at once (or is refused, so the router can place it
elsewhere); each KVLayer is written straight into them; once every layer, the first token and
RequestEnd have arrived the request joins the engine's running batch. Invariant: KVLanding owns a
request's blocks until it hands the request to the scheduler, which owns them from then on; an
Abort, or the loss of the peer feeding a request, frees its blocks at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from hma.engine import LLMEngine
from hma.errors import HMAError, ProtocolError
from hma.transport import Connection
from hma.kv_cache import blocks_for
from hma.kv_formats import KVFormat, get_kv_format
from hma.kv_transfer import put_layer_kv
from hma.request import Request
from hma.sampling import SamplingParams
from hma.wire import Abort, BeginReply, FirstToken, KVLayer, RequestBegin, RequestEnd

log = logging.getLogger(__name__)


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
            return BeginReply(msg.request_id, False, f"no free KV blocks: {need} needed, {allocator.num_free} free")
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
        params = SamplingParams(**msg.sampling)
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
            self._drop(msg.request_id, msg.reason)
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
            self._drop(rid, f"lost prefill peer {peer}")
        return gone

    def _drop(self, request_id: str, reason: str) -> None:
        landing = self.pending.pop(request_id)
        self.engine.kv_cache.allocator.free(landing.request.block_ids)
        landing.request.block_ids = []
        log.info("aborted request_id=%s reason=%s", request_id, reason)


async def serve_prefill_peer(landing: KVLanding, conn: Connection) -> None:
    """Lands everything one prefill peer sends until it leaves or breaks; whatever it was still
    feeding is then aborted and freed, and every other peer's requests carry on. (The caller
    keeps the engine step from running while this writes: both touch the cache and allocator.)"""
    peer = conn.peer_name
    try:
        while True:
            msg = await conn.recv()
            if isinstance(msg, RequestBegin):
                await conn.send(landing.begin(msg, peer))
            elif isinstance(msg, (KVLayer, FirstToken, RequestEnd, Abort)):
                landing.receive(msg)
            else:
                raise ProtocolError(f"a prefill peer does not send {msg.TYPE}")
    except asyncio.IncompleteReadError:
        log.info("peer=%s closed its connection", peer)
    except (HMAError, TimeoutError, OSError) as exc:
        log.warning("dropping peer=%s reason=%s", peer, exc or type(exc).__name__)
    finally:
        dropped = landing.drop_peer(peer)
        if dropped:
            log.warning("peer=%s left %d requests unfinished; their blocks are freed", peer, len(dropped))
