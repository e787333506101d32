"""What handing each layer's KV to the host costs the prefill host's compute.

`python -m hma bench transfer --shape qwen3-4b --device cuda --json results/transfer.json`
One batch of --batch-size prompts x --prompt-len tokens, random weights, per --kv-dtypes format,
medians of --iters runs: the forward alone (baseline), prefill_batch (each layer's KV copied to
pinned host memory on a side stream while the next layer computes, delivered by a copier
thread), and a naive synchronous per-layer copy. Also checks the delivered bytes equal the cache's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hma.batch import Batch
from hma.bench import write_json
from hma.bench.speed import BLOCK_SIZE, chunks, machine_name, median_seconds
from hma.config import QWEN3_SHAPES, qwen3_shape
from hma.kv_cache import KVCache, blocks_for
from hma.kv_formats import get_kv_format
from hma.kv_transfer import take_layer_kv, token_slots
from hma.loading import resolve_device
from hma.prefill import PrefillJob, prefill_batch
from hma.qwen3 import Qwen3ForCausalLM
from hma.sampling import SamplingParams


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m hma bench transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-4b", choices=sorted(QWEN3_SHAPES))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--kv-dtypes", default="fp8,bf16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = qwen3_shape(args.shape)
    model = Qwen3ForCausalLM.create(config, dtype, device, max_positions=args.prompt_len)
    model.init_random_()
    seqs = chunks(args.batch_size, args.prompt_len, config.vocab_size)
    jobs = [PrefillJob(f"r{i}", s.token_ids, SamplingParams(max_tokens=1, temperature=0), s.block_ids)
            for i, s in enumerate(seqs)]
    rows = []
    for name in args.kv_dtypes.split(","):
        cache = KVCache(config, args.batch_size * blocks_for(args.prompt_len, BLOCK_SIZE), BLOCK_SIZE,
                        get_kv_format(name), device)
        rows.append(_measure(model, cache, jobs, seqs, name, device, args.iters))
    result = {"machine": machine_name(device), "shape": args.shape, "batch_size": args.batch_size,
              "prompt_len": args.prompt_len, "rows": rows}
    print(f"{result['machine']}, {args.shape}, {args.batch_size} x {args.prompt_len} tokens, medians of {args.iters}")
    print("| kv format | KV to host MB | forward only ms | pipelined handoff ms (ratio) | sync per-layer copy ms (ratio) | bytes equal |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['kv_format']} | {r['kv_mb']:,.0f} | {r['forward_s'] * 1e3:.1f} | {r['pipelined_s'] * 1e3:.1f} "
              f"({r['pipelined_s'] / r['forward_s']:.2f}x) | {r['sync_s'] * 1e3:.1f} ({r['sync_s'] / r['forward_s']:.2f}x) "
              f"| {r['bytes_equal']} |")
    write_json(args.json, result, indent=1)
    return result


def _measure(model, cache, jobs, seqs, name, device, iters) -> dict:
    batch = Batch.build(seqs, [], BLOCK_SIZE, device)
    slots = [token_slots(cache, j.block_ids, 0, len(j.prompt_token_ids)) for j in jobs]
    delivered = []
    prefill_batch(model, cache, jobs, delivered.append)
    layers = [m for m in delivered if m.TYPE == "KVLayer"]
    equal = all(torch.equal(m.k.view(torch.uint8), take_layer_kv(cache, m.layer, m.request_id, slots[int(m.request_id[1:])],
                                                                 0).k.view(torch.uint8)) for m in layers)

    def sync_copy() -> None:
        model(batch, cache, lambda layer: [take_layer_kv(cache, layer, j.request_id, s, 0) for j, s in zip(jobs, slots)])

    return {"kv_format": name, "bytes_equal": equal,
            "kv_mb": sum(t.nbytes for m in layers for t in (m.k, m.k_scales, m.v, m.v_scales)) / 1e6,
            "forward_s": median_seconds(lambda: model(batch, cache), device, iters),
            "pipelined_s": median_seconds(lambda: prefill_batch(model, cache, jobs, lambda m: None), device, iters),
            "sync_s": median_seconds(sync_copy, device, iters)}
