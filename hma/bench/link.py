"""How fast KV frames cross between two processes through hma's own transport (loopback TCP).

`python -m hma bench link --tokens 256,1024,4096`
A receiver process accepts one authenticated connection; the sender streams one request's KV of
--layers KVLayer frames (fp8, qwen3-4b/8b heads: 8 x 128, scales included) and waits for the
receiver's acknowledgement after the last; medians of --iters. This is the link a disaggregated
run on one machine has (framing, checksums and copies included, no GPU copies), and the figure
`bench systems` gives the cost planner for the prefill -> decode link. The baseline, in the same
run: the same bytes through a plain loopback socket between two processes (sendall of one
buffer, recv_into a reused one), the most any Python transport over TCP could reach here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import statistics
import struct
import time
from pathlib import Path

import torch

from hma.transport import connect, serve
from hma.wire import KVLayer, make_hello

SECRET = b"link-bench"
KV_HEADS, HEAD_DIM = 8, 128
RAW_CHUNK = 1 << 20  # bytes the baseline's receiver takes per recv_into
_LENGTH = struct.Struct("<Q")


def _layer(num_tokens: int, layer: int = 0) -> KVLayer:
    payload = torch.zeros(num_tokens, KV_HEADS, HEAD_DIM, dtype=torch.float8_e4m3fn)
    scales = torch.ones(num_tokens, KV_HEADS, 1, dtype=torch.float16)
    return KVLayer("link", layer, 0, num_tokens, payload, scales, payload, scales, 0.0)


def _receiver(port_queue: multiprocessing.Queue, num_layers: int) -> None:
    async def on_connection(conn) -> None:
        received = 0
        while True:
            try:
                msg = await conn.recv(timeout=None)
            except asyncio.IncompleteReadError:
                return  # the sender is done
            received += 1
            if received % num_layers == 0:
                await conn.send(_layer(0, msg.layer))  # acknowledges a whole request's KV

    async def main() -> None:
        server = await serve("127.0.0.1", 0, lambda: make_hello("decode", "link", "fp8", 16), SECRET, on_connection)
        port_queue.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


async def _send_requests(port: int, token_counts: list[int], num_layers: int, iters: int) -> list[dict]:
    conn = await connect("127.0.0.1", port, make_hello("prefill", "link", "fp8", 16), SECRET)
    rows = []
    for num_tokens in token_counts:
        frames = [_layer(num_tokens, i) for i in range(num_layers)]
        times = []
        for _ in range(iters + 1):  # the first warms the socket buffers
            start = time.perf_counter()
            for frame in frames:
                await conn.send(frame)
            await conn.recv()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times[1:])
        nbytes = num_layers * sum(t.numel() * t.element_size() for t in (frames[0].k, frames[0].k_scales,
                                                                       frames[0].v, frames[0].v_scales))
        rows.append({"tokens": num_tokens, "bytes": nbytes, "seconds": seconds, "gbytes_per_s": nbytes / seconds / 1e9})
    await conn.close()
    return rows


def _raw_receiver(port_queue: multiprocessing.Queue) -> None:
    """The baseline's far end: per message, a length, then that many bytes, then a one-byte ack."""
    server = socket.create_server(("127.0.0.1", 0))
    port_queue.put(server.getsockname()[1])
    buf = memoryview(bytearray(RAW_CHUNK))
    while True:  # one connection per measured size, until the sender kills this process
        conn, _ = server.accept()
        with conn:
            while header := _read_exactly(conn, _LENGTH.size):
                left = _LENGTH.unpack(header)[0]
                while left:
                    left -= conn.recv_into(buf[:min(RAW_CHUNK, left)])
                conn.sendall(b"k")


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    """n bytes, or b"" once the peer has closed."""
    data = b""
    while len(data) < n:
        more = conn.recv(n - len(data))
        if not more:
            return b""
        data += more
    return data


def _raw_seconds(port: int, nbytes: int, iters: int) -> float:
    """Median seconds to push nbytes through a plain socket and get the ack back."""
    payload = memoryview(bytearray(nbytes))
    with socket.create_connection(("127.0.0.1", port)) as conn:
        times = []
        for _ in range(iters + 1):  # the first warms the socket buffers
            start = time.perf_counter()
            conn.sendall(_LENGTH.pack(nbytes))
            conn.sendall(payload)
            _read_exactly(conn, 1)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(token_counts: list[int], num_layers: int = 36, iters: int = 3) -> list[dict]:
    """Per token count: one request's KV bytes, median seconds to deliver them, GB/s, and the
    plain-socket baseline's GB/s for the same bytes."""
    ctx = multiprocessing.get_context("spawn")  # no forked event loop or CUDA state
    ports = ctx.Queue()
    receivers = [ctx.Process(target=_receiver, args=(ports, num_layers), daemon=True),
                 ctx.Process(target=_raw_receiver, args=(ports,), daemon=True)]
    try:
        receivers[0].start()
        rows = asyncio.run(_send_requests(ports.get(timeout=60), token_counts, num_layers, iters))
        receivers[1].start()
        raw_port = ports.get(timeout=60)
        for row in rows:
            row["raw_gbytes_per_s"] = row["bytes"] / _raw_seconds(raw_port, row["bytes"], iters) / 1e9
        return rows
    finally:
        for receiver in receivers:
            if receiver.is_alive():
                receiver.kill()
                receiver.join()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m hma bench link", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="256,1024,4096")
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = measure([int(x) for x in args.tokens.split(",")], args.layers, args.iters)
    print(f"{'tokens':>8} {'MB':>8} {'ms':>8} {'GB/s':>6} {'raw GB/s':>8} {'x raw':>6}")
    for row in rows:
        print(f"{row['tokens']:>8} {row['bytes'] / 1e6:>8.1f} {row['seconds'] * 1e3:>8.1f} {row['gbytes_per_s']:>6.2f} "
              f"{row['raw_gbytes_per_s']:>8.2f} {row['gbytes_per_s'] / row['raw_gbytes_per_s']:>6.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows
