"""A fault-injecting TCP proxy, for the chaos run: it sits between peers and, on command, corrupts,
truncates, slows or stalls the bytes its upstream (a prefill host) sends downstream (KV streams).

Each proxy listens on a loopback port and forwards every connection to its target. `mode` is read
for every chunk the target sends back: "pass" forwards it; "corrupt" flips one bit of it (the
frame checksum must catch that); "truncate" forwards half of it, then closes both sides; "slow"
holds each chunk SLOW_S first; "stall" freezes that connection (nothing more is forwarded or read
from the target, so its sender feels back-pressure) until a peer closes it. corrupt, truncate and
stall hit the next chunk only (one connection), then the proxy passes again; slow lasts until the
next command. The proxies run in one background thread with their own event loop, so the caller
may block (start processes, sleep) while bytes flow; stop() closes every connection, stalled ones
included.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter

CHUNK_BYTES = 64 * 1024
SLOW_S = 0.05
MODES = ("pass", "corrupt", "truncate", "slow", "stall")


class FaultyProxy:
    """One listening port forwarding to `target`, with faults on the way back."""

    def __init__(self, target: str, rng: random.Random) -> None:
        self.target = target
        self.mode = "pass"
        self.rng = rng
        self.injected: Counter[str] = Counter()  # faults applied, by mode
        self.address = ""
        self.server: asyncio.Server | None = None
        self.open: set[asyncio.Event] = set()  # each open connection's `closed`, set to close it

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _connection(self, down_reader: asyncio.StreamReader, down_writer: asyncio.StreamWriter) -> None:
        host, _, port = self.target.rpartition(":")
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            down_writer.close()  # the target is down (killed): the peer sees a refused connection
            return
        writers, closed = (down_writer, up_writer), asyncio.Event()
        self.open.add(closed)
        try:
            await asyncio.gather(self._pump(down_reader, up_writer, closed, faulty=False),
                                 self._pump(up_reader, down_writer, closed, faulty=True),
                                 self._close_when_set(writers, closed))
        finally:
            self.open.discard(closed)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, closed: asyncio.Event,
                    faulty: bool) -> None:
        try:
            while chunk := await reader.read(CHUNK_BYTES):
                chunk, is_last = await self._fault(chunk, closed) if faulty else (chunk, False)
                writer.write(chunk)
                await writer.drain()
                if is_last:
                    break
        except OSError:
            pass  # either side went away: close both
        finally:
            closed.set()

    @staticmethod
    async def _close_when_set(writers: tuple[asyncio.StreamWriter, ...], closed: asyncio.Event) -> None:
        await closed.wait()
        for writer in writers:
            writer.close()

    async def _fault(self, chunk: bytes, closed: asyncio.Event) -> tuple[bytes, bool]:
        """The bytes to forward after this proxy's fault, and whether to close the connection then."""
        mode = self.mode
        if mode == "pass":
            return chunk, False
        self.injected[mode] += 1
        if mode == "slow":
            await asyncio.sleep(SLOW_S)
            return chunk, False
        self.mode = "pass"  # the others hit one chunk per command
        if mode == "corrupt":
            damaged = bytearray(chunk)
            damaged[self.rng.randrange(len(damaged))] ^= 1 << self.rng.randrange(8)
            return bytes(damaged), False
        if mode == "stall":
            await closed.wait()  # frozen until a peer gives up on it
            return b"", True
        return chunk[:len(chunk) // 2], True


class ProxyThread:
    """Owns the proxies' event loop thread."""

    def __init__(self, seed: int = 0) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.rng = random.Random(seed)
        self.proxies: list[FaultyProxy] = []

    def add(self, target: str) -> str:
        """Starts a proxy to target; returns the address to use instead."""
        proxy = FaultyProxy(target, self.rng)
        asyncio.run_coroutine_threadsafe(proxy.start(), self.loop).result(timeout=10)
        self.proxies.append(proxy)
        return proxy.address

    def set_mode(self, mode: str, index: int | None = None) -> None:
        """Sets the mode of proxy `index` (in the order added), or of every proxy."""
        if mode not in MODES:
            raise ValueError(f"fault mode {mode!r}; choose from {', '.join(MODES)}")
        for i, proxy in enumerate(self.proxies):
            if index is None or i == index:
                proxy.mode = mode

    def injected(self) -> Counter[str]:
        """Chunks faulted so far, by mode, over every proxy."""
        return sum((p.injected for p in self.proxies), Counter())

    def stop(self) -> None:
        """Closes every proxy and connection (stalled ones included), then the loop."""
        async def shut_down() -> None:
            for proxy in self.proxies:
                proxy.server.close()
                for closed in proxy.open:
                    closed.set()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if tasks:
                await asyncio.wait(tasks, timeout=5)

        asyncio.run_coroutine_threadsafe(shut_down(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()
