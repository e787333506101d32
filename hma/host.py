"""What every host process shares at start-up: timed phases in the log, the shared secret, and
listening for authenticated peers. A host listens only once it is loaded and warm, so a router
that completes a handshake with it knows it is ready (that is what /health reports). On SIGTERM
(or SIGINT) a host stops listening, refuses new requests (for now: routers place them elsewhere)
and lets those in flight finish, up to DRAIN_TIMEOUT_S, before it closes its connections and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator

from hma import random_weights
from hma.checkpoint import checkpoint_fingerprint, resolve_model_path
from hma.config import EngineConfig
from hma.engine import LLMEngine
from hma.errors import InvalidRequestError
from hma.transport import Connection, serve
from hma.wire import Hello, make_hello

log = logging.getLogger(__name__)

SECRET_ENV = "HMA_SECRET"
DRAIN_TIMEOUT_S = 30.0  # on SIGTERM, the longest a host waits for its requests in flight
DEFAULT_PORTS = {"prefill": 8100, "decode": 8200}


def resolve_secret(flag: str | None) -> bytes:
    """--secret, else $HMA_SECRET; every host and the router must be given the same one."""
    secret = flag or os.environ.get(SECRET_ENV)
    if not secret:
        raise InvalidRequestError(f"no shared secret: pass --secret or set {SECRET_ENV} "
                                  "(the same on every host and the router)")
    return secret.encode()


def fingerprint_of(model: str) -> str:
    """The handshake's model fingerprint of a checkpoint or of a random-weight shape."""
    if random_weights.shape_of(model):
        return random_weights.fingerprint(model)
    return checkpoint_fingerprint(resolve_model_path(model))


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Logs one start-up phase with its duration."""
    t0 = time.perf_counter()
    log.info("phase=%s started", name)
    yield
    log.info("phase=%s done seconds=%.2f", name, time.perf_counter() - t0)


def load_engine(config: EngineConfig, role: str) -> tuple[LLMEngine, Callable[[], Hello]]:
    """The role's engine (weights, KV cache) and the Hello it greets peers with."""
    with phase("load"):
        engine = LLMEngine.from_config(config, runs_decode=role != "prefill")
    fingerprint = fingerprint_of(config.model)
    kv, block_size = engine.kv_cache.format.name, engine.kv_cache.block_size
    log.info("role=%s kv_format=%s block_size=%d num_blocks=%d max_model_len=%d", role, kv, block_size,
             engine.kv_cache.num_blocks, engine.max_model_len)
    return engine, lambda: make_hello(role, fingerprint, kv, block_size)


async def listen_until_stopped(host: str, port: int, hello: Callable[[], Hello], secret: bytes,
                               on_connection: Callable[[Connection], Awaitable[None]],
                               drain: Callable[[], Awaitable[None]]) -> None:
    """Accepts peers until SIGINT or SIGTERM; then stops listening and awaits drain() (which refuses
    new work and returns once the work in flight is done) for up to DRAIN_TIMEOUT_S."""
    stop = stop_on_signal()
    server = await serve(host, port, hello, secret, on_connection)
    bound = server.sockets[0].getsockname()
    role = hello().role
    log.info("listening role=%s address=%s:%d", role, bound[0], bound[1])
    try:
        await stop.wait()
    finally:
        # No new peers; those connected keep their connections while draining (Server.wait_closed
        # is not awaited: from Python 3.12 it waits for every connection, and routers never leave).
        server.close()
    log.info("draining role=%s", role)
    try:
        await asyncio.wait_for(drain(), DRAIN_TIMEOUT_S)
    except TimeoutError:
        log.warning("stopping role=%s with work still in flight after %.0f s", role, DRAIN_TIMEOUT_S)
    log.info("stopped role=%s", role)


def stop_on_signal() -> asyncio.Event:
    """An event set on SIGINT or SIGTERM, its handlers installed now. A host installs them before
    its log says it listens: a SIGTERM sent the moment it does (as the chaos run sends one to a
    host just restarted) would otherwise meet the default handler, which exits at once, undrained."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
