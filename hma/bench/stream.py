"""What the serving path costs per streamed token: one batch decoded by the engine alone, then the
same batch through the router and a colocated host, with each process's CPU time per token.

`python -m hma bench stream --model demo --num-requests 16 --prompt-len 32 --output-len 256`
Engine alone (the baseline, in this process): the requests' prompts (token ids) added at once and
stepped to the end: output tokens per second. Served: a colocated cluster on the same device
(router and one host, separate processes, hma.launch.LocalCluster, the same --host-flags), the
same requests sent at once as streaming completions (hma.bench.serve): output tokens per second
from the first request sent to the last token received, and the router's and the host's CPU
seconds over the run per token, read from /proc (the host's includes its engine's). served /
alone is the share of the engine's throughput the serving path leaves; the router's CPU per
token is what a busy router spends on every token it streams (on a trace like azure-conv at 16
requests a second, about 4,000 a second).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import shlex
import time
from pathlib import Path

import torch

from hma.bench import write_json
from hma.bench.serve import prompt_ids, replay
from hma.bench.speed import machine_name
from hma.bench.traces import TraceRequest
from hma.config import EngineConfig, add_flags, from_flags
from hma.engine import LLMEngine, warm_up
from hma.launch import LocalCluster
from hma.sampling import SamplingParams


def engine_alone(config: EngineConfig, requests: list[TraceRequest]) -> dict:
    """Output tokens per second of the engine stepping the requests, all added at once."""
    engine = LLMEngine.from_config(config)
    warm_up(engine)
    rng = random.Random(0)
    for r in requests:
        engine.add_request(prompt_ids(r.prompt_len, rng), SamplingParams(max_tokens=r.output_len, temperature=0.0,
                                                                          ignore_eos=True))
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished:
        engine.step()
        steps += 1
    seconds = time.perf_counter() - start
    device = engine.device
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the cluster's host takes this memory next
    tokens = sum(r.output_len for r in requests)
    return {"device": machine_name(device), "seconds": seconds, "steps": steps, "output_tokens": tokens,
            "tok_s": tokens / seconds}


def served(model: str, host_flags: list[str], requests: list[TraceRequest]) -> dict:
    """The same requests through a colocated cluster; tokens per second and CPU per token."""
    with LocalCluster(model=model, colocated=True, decode_flags=host_flags) as cluster:
        pids = {name: proc.pid for name, proc in cluster.processes.items()}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        records, seconds = asyncio.run(replay(cluster.url + "/v1/completions", model, requests, progress=False))
        used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    failed = [r.error for r in records if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(records)} requests failed, e.g. {failed[0]}")
    tokens = sum(r.output_len for r in records)
    return {"seconds": seconds, "output_tokens": tokens, "tok_s": tokens / seconds,
            "cpu_s": used, "cpu_us_per_token": {name: 1e6 * s / tokens for name, s in used.items()}}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc, in clock ticks: 10 ms, so a run
    should stream enough tokens for the router's share to span many ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m hma bench stream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--host-flags", default="", help="engine flags for both runs, e.g. '--device cpu "
                                                         "--kv-memory-gb 0.3'")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    host_flags = shlex.split(args.host_flags)
    engine_parser = argparse.ArgumentParser(prog="--host-flags")
    add_flags(engine_parser, EngineConfig)
    config = from_flags(engine_parser.parse_args([*host_flags, "--model", args.model]), EngineConfig)
    requests = [TraceRequest(0.0, args.prompt_len, args.output_len) for _ in range(args.num_requests)]
    alone = engine_alone(config, requests)
    through = served(args.model, host_flags, requests)
    out = {"model": args.model, "machine": alone["device"], "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "num_requests": args.num_requests, "prompt_len": args.prompt_len,
           "output_len": args.output_len, "host_flags": args.host_flags, "engine_alone": alone,
           "served": through, "served_over_alone": through["tok_s"] / alone["tok_s"]}
    _print(out)
    write_json(args.json, out, indent=1)
    return out


def _print(out: dict) -> None:
    alone, through = out["engine_alone"], out["served"]
    print(f"{out['model']} on {out['machine']}: {out['num_requests']} requests x {out['output_len']} tokens")
    print(f"{'':>14} {'tok/s':>9} {'seconds':>8}")
    print(f"{'engine alone':>14} {alone['tok_s']:>9,.1f} {alone['seconds']:>8.2f}")
    print(f"{'served':>14} {through['tok_s']:>9,.1f} {through['seconds']:>8.2f}   "
          f"= {out['served_over_alone']:.2f}x the engine alone")
    for name, us in through["cpu_us_per_token"].items():
        print(f"  {name} CPU: {us:,.0f} us per streamed token ({through['cpu_s'][name]:.2f} s)")
