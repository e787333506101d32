"""The chaos run's fault-injecting proxy against an echo server on loopback: each mode does to the
bytes coming back what it says, and only for as long as it says."""

from __future__ import annotations

import asyncio

import pytest

from hma.faults import ProxyThread

PAYLOAD = bytes(range(256)) * 16  # 4 KiB: one chunk


@pytest.fixture
async def echo_proxy():
    """Proxies (in their own thread) for echo servers in this test's loop; stopped before the loop
    ends, so the servers' handlers see their connections close."""
    proxies = ProxyThread(seed=0)
    yield proxies
    proxies.stop()
    await asyncio.sleep(0.05)


async def _echo_server() -> tuple[asyncio.Server, str]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def _round_trip(address: str, timeout: float = 5.0) -> bytes:
    """Sends PAYLOAD, returns what comes back before the connection closes or goes quiet."""
    host, port = address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(PAYLOAD)
    await writer.drain()
    received = b""
    try:
        while len(received) < len(PAYLOAD):
            chunk = await asyncio.wait_for(reader.read(1 << 16), timeout)
            if not chunk:
                break
            received += chunk
    except TimeoutError:
        pass
    writer.close()
    return received


async def test_each_mode_does_what_it_says_to_the_next_chunk(echo_proxy):
    server, target = await _echo_server()
    address = echo_proxy.add(target)
    try:
        assert await _round_trip(address) == PAYLOAD
        echo_proxy.set_mode("corrupt")
        damaged = await _round_trip(address)
        flipped = [a ^ b for a, b in zip(damaged, PAYLOAD) if a != b]
        assert len(damaged) == len(PAYLOAD) and len(flipped) == 1 and bin(flipped[0]).count("1") == 1
        echo_proxy.set_mode("truncate")
        assert await _round_trip(address) == PAYLOAD[:len(PAYLOAD) // 2]  # half, then closed
        echo_proxy.set_mode("stall")
        assert await _round_trip(address, timeout=0.5) == b""  # held, connection left open
        assert await _round_trip(address) == PAYLOAD  # one-shot modes are spent: passing again
        assert echo_proxy.injected() == {"corrupt": 1, "truncate": 1, "stall": 1}
    finally:
        server.close()


async def test_slow_holds_every_chunk_until_pass(echo_proxy):
    server, target = await _echo_server()
    address = echo_proxy.add(target)
    try:
        echo_proxy.set_mode("slow")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for _ in range(3):
            assert await _round_trip(address) == PAYLOAD
        assert loop.time() - t0 >= 3 * 0.05 and echo_proxy.injected()["slow"] == 3
        echo_proxy.set_mode("pass")
        assert await _round_trip(address) == PAYLOAD and echo_proxy.injected()["slow"] == 3
    finally:
        server.close()


async def test_modes_apply_to_one_proxy_or_all_and_a_dead_target_refuses(echo_proxy):
    server, target = await _echo_server()
    first, second = echo_proxy.add(target), echo_proxy.add(target)
    try:
        echo_proxy.set_mode("truncate", 1)
        assert await _round_trip(first) == PAYLOAD
        assert await _round_trip(second) == PAYLOAD[:len(PAYLOAD) // 2]
        with pytest.raises(ValueError, match="fault mode"):
            echo_proxy.set_mode("explode")
    finally:
        server.close()
        await server.wait_closed()
    assert await _round_trip(first) == b""  # the target is gone: the proxy closes at once
