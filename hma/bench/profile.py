"""Where a step's time goes, from torch.profiler: one decode step through its CUDA graph, and one
prefill, for a Qwen3 shape with random weights.

`python -m hma bench profile --shape qwen3-4b --batch-sizes 1,64 --context 1024 --prompt-len 512`
Decode (CUDA only, `--kv-dtype` KV): kernels a step launches, the GPU time they take against the
step's wall time (the rest is the GPU idle between kernels and the host's part), each kernel's
count and time per step, and the matrix products' share: their time against the bytes of
weights a step reads, as bandwidth. Prefill: the host's time to issue one forward, the time until the GPU is
done, the GPU's busy time (the sum of its kernels), how many kernels, and the host operations
that took longest (`--piecewise`: through the piecewise graphs, as the hosts run it). Five
profiled runs after three warm ones; per-step figures are their mean.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from hma.batch import Batch
from hma.bench import write_json
from hma.bench.speed import BLOCK_SIZE, chunks, machine_name, median_seconds, weight_bytes
from hma.config import PIECEWISE_GRAPH_TOKENS, qwen3_shape
from hma.cuda_graphs import DecodeGraphs
from hma.kv_cache import KVCache, blocks_for
from hma.kv_formats import get_kv_format
from hma.loading import resolve_device
from hma.qwen3 import Qwen3ForCausalLM

RUNS, WARM_RUNS = 5, 3
MATMUL_MARKS = ("gemm", "gemv", "matvec", "nvjet", "cutlass", "xmma", "splitkreduce", "scaled_mm")


def is_matmul(kernel: str) -> bool:
    return any(mark in kernel.lower() for mark in MATMUL_MARKS)


def by_kernel(events: list, runs: int) -> list[dict]:
    """GPU events -> one row per kernel name: launches and microseconds per run, slowest first."""
    rows: dict[str, dict] = {}
    for e in events:
        row = rows.setdefault(e.name, {"kernel": e.name, "count": 0, "us": 0.0})
        row["count"] += 1
        row["us"] += e.device_time
    out = [{**r, "count": r["count"] / runs, "us": r["us"] / runs} for r in rows.values()]
    return sorted(out, key=lambda r: -r["us"])


def _gpu_events(prof) -> list:
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def profile_decode(model: Qwen3ForCausalLM, batch_size: int, context: int, device: torch.device,
                   kv_dtype: str = "bf16") -> dict:
    """One greedy decode step (graph replay, tokens back on the host), timed, then profiled."""
    config = model.config
    cache = KVCache(config, batch_size * blocks_for(context, BLOCK_SIZE) + 1, BLOCK_SIZE, get_kv_format(kv_dtype),
                    device)
    graphs = DecodeGraphs(model, cache, batch_size, context)
    blocks = cache.allocator.allocate(batch_size * blocks_for(context, BLOCK_SIZE))
    decodes = chunks(batch_size, 1, config.vocab_size, context - 1, blocks)
    step_s = median_seconds(lambda: graphs.run(decodes).argmax(-1).tolist(), device, RUNS, WARM_RUNS)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(RUNS):
            graphs.run(decodes).argmax(-1).tolist()
    kernels = by_kernel(_gpu_events(prof), RUNS)
    matmul_us = sum(k["us"] for k in kernels if is_matmul(k["kernel"]))
    return {"batch_size": batch_size, "context_len": context, "kv_dtype": kv_dtype, "step_us": step_s * 1e6,
            "kernels_per_step": sum(k["count"] for k in kernels), "gpu_us_per_step": sum(k["us"] for k in kernels),
            "matmul_us_per_step": matmul_us, "weight_bytes": weight_bytes(model),
            "matmul_weight_bytes_per_s": weight_bytes(model) / (matmul_us * 1e-6) if matmul_us else None,
            "kernels": kernels}


def profile_prefill(model: Qwen3ForCausalLM, prompt_len: int, device: torch.device, top: int = 12,
                    piecewise: bool = False) -> dict:
    """One prefill of prompt_len tokens: host issue time, time to done, GPU busy time, top host ops;
    with piecewise, through the piecewise graphs as the hosts run it (captured first)."""
    if piecewise:
        model.use_piecewise_graphs(PIECEWISE_GRAPH_TOKENS)
        model.piecewise.capture()
    try:
        return _profile_prefill(model, prompt_len, device, top) | {"piecewise": piecewise}
    finally:
        model.piecewise = None


def _profile_prefill(model: Qwen3ForCausalLM, prompt_len: int, device: torch.device, top: int) -> dict:
    config = model.config
    cache = KVCache(config, blocks_for(prompt_len, BLOCK_SIZE), BLOCK_SIZE, get_kv_format("bf16"), device)
    batch = Batch.build(chunks(1, prompt_len, config.vocab_size), [], BLOCK_SIZE, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(WARM_RUNS):
        model(batch, cache)
    issued, done = [], []
    for _ in range(RUNS):
        sync()
        t0 = time.perf_counter()
        model(batch, cache)
        issued.append(time.perf_counter() - t0)
        sync()
        done.append(time.perf_counter() - t0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        model(batch, cache)
        sync()
    gpu = _gpu_events(prof)
    host_ops = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:top]
    return {"prompt_len": prompt_len, "host_issue_s": min(issued), "done_s": min(done),
            "gpu_busy_s": sum(e.device_time for e in gpu) / 1e6, "kernels": len(gpu),
            "top_host_ops": [{"name": a.key, "calls": a.count, "self_cpu_us": a.self_cpu_time_total}
                             for a in host_ops]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m hma bench profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-4b")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--kv-dtype", default="bf16", help="the decode steps' KV format")
    parser.add_argument("--prefill-dtype", default="bf16", help="bf16 | fp8 | int8")
    parser.add_argument("--top", type=int, default=12, help="kernels and host operations listed")
    parser.add_argument("--piecewise", action="store_true",
                        help="profile the prefill through the piecewise graphs, as the hosts run it")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device.type != "cuda":
        raise SystemExit("bench profile times CUDA graphs and GPU kernels: it needs --device cuda")
    model = Qwen3ForCausalLM.create(qwen3_shape(args.shape), torch.bfloat16, device,
                                    max_positions=max(args.context, args.prompt_len) + 1)
    model.init_random_()
    decode = [profile_decode(model, int(b), args.context, device, args.kv_dtype) for b in args.batch_sizes.split(",")]
    model.use_prefill_precision(args.prefill_dtype)
    prefill = profile_prefill(model, args.prompt_len, device, args.top, args.piecewise)
    out = {"machine": machine_name(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "shape": args.shape, "prefill_dtype": args.prefill_dtype, "decode": decode, "prefill": prefill}
    _print(out, args.top)
    write_json(args.json, out, indent=1)
    return out


def _print(out: dict, top: int) -> None:
    print(f"{out['shape']} on {out['machine']}, torch {out['torch']}")
    for d in out["decode"]:
        rate = d["matmul_weight_bytes_per_s"]
        print(f"\ndecode step, batch {d['batch_size']}, context {d['context_len']}, {d['kv_dtype']} KV: "
              f"{d['step_us']:.0f} us; {d['kernels_per_step']:.0f} kernels, "
              f"{d['gpu_us_per_step']:.0f} us of GPU time; matmuls {d['matmul_us_per_step']:.0f} us"
              + (f" = {rate / 1e12:.2f} TB/s of weights" if rate else ""))
        for k in d["kernels"][:top]:
            print(f"  {k['us']:8.1f} us  {k['count']:5.0f} x  {k['kernel'][:90]}")
    p = out["prefill"]
    print(f"\nprefill of {p['prompt_len']} tokens ({out['prefill_dtype']}{', piecewise graphs' if p.get('piecewise') else ''}): host issues it in {p['host_issue_s'] * 1e3:.1f} ms, "
          f"done in {p['done_s'] * 1e3:.1f} ms; GPU busy {p['gpu_busy_s'] * 1e3:.1f} ms over {p['kernels']} kernels")
    for op in p["top_host_ops"]:
        print(f"  {op['self_cpu_us'] / 1e3:8.2f} ms  {op['calls']:5d} x  {op['name'][:90]}")
