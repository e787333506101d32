"""Prefill speed per prefill precision (phase-wise quantization) and KV bytes per token per format.

`python -m hma bench prefill --shape qwen3-4b --device cuda --json results/prefill.json`
One prompt of each --prompt-lens length, prefilled through bf16, fp8 and int8 (W8A8) weights,
its KV written in the --kv-dtype format; medians of --iters runs after warm-up. bf16 is the
baseline in the same run. The KV table is arithmetic on the formats, the bytes the cache holds
and the wire carries for every token of every layer.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hma.batch import Batch
from hma.bench import write_json
from hma.bench.speed import BLOCK_SIZE, chunks, machine_name, median_seconds
from hma.config import QWEN3_SHAPES, qwen3_shape
from hma.kv_cache import KVCache, blocks_for, kv_bytes_per_token
from hma.kv_formats import KV_FORMATS, get_kv_format
from hma.loading import resolve_device, resolve_dtype
from hma.qwen3 import Qwen3ForCausalLM


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m hma bench prefill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-4b", choices=sorted(QWEN3_SHAPES))
    parser.add_argument("--prompt-lens", default="2048,8192")
    parser.add_argument("--prefill-dtypes", default="bf16,fp8,int8")
    parser.add_argument("--kv-dtype", default="fp8", help="the format prefill writes its KV in")
    parser.add_argument("--device", default=None)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_dtype(None, device)
    config = qwen3_shape(args.shape)
    lens = [int(n) for n in args.prompt_lens.split(",")]
    model = Qwen3ForCausalLM.create(config, dtype, device, max_positions=max(lens))
    model.init_random_()
    cache = KVCache(config, blocks_for(max(lens), BLOCK_SIZE), BLOCK_SIZE, get_kv_format(args.kv_dtype), device)

    rows = []
    print(f"{'prefill':>8} {'tokens':>7} {'ms':>9} {'tok/s':>9} {'x bf16':>7}")
    for mode in args.prefill_dtypes.split(","):
        model.use_prefill_precision(mode)
        for n in lens:
            batch = Batch.build(chunks(1, n, config.vocab_size), [], BLOCK_SIZE, device)
            seconds = median_seconds(lambda: model(batch, cache), device, args.iters)
            rows.append({"prefill_dtype": mode, "prompt_len": n, "seconds": seconds, "tok_s": n / seconds})
            base = next(r for r in rows if r["prompt_len"] == n)
            print(f"{mode:>8} {n:>7} {seconds * 1e3:>9.1f} {n / seconds:>9,.0f} "
                  f"{base['seconds'] / seconds:>7.2f}")
    kv = kv_bytes_table(config)
    result = {"machine": machine_name(device), "shape": args.shape, "dtype": str(dtype),
              "kv_dtype": args.kv_dtype, "iters": args.iters, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "prefill": rows, "kv_bytes_per_token": kv}
    print(f"machine: {result['machine']}, {args.shape}, medians of {args.iters} runs")
    write_json(args.json, result)
    return result


def kv_bytes_table(config) -> list[dict]:
    """K and V bytes per token, all layers, per format, and the ratio to bf16."""
    def per_token(name: str) -> int:
        return kv_bytes_per_token(config, get_kv_format(name))

    rows = [{"kv_dtype": name, "bytes_per_token": per_token(name),
             "vs_bf16": per_token(name) / per_token("bf16")} for name in KV_FORMATS]
    print(f"{'kv':>6} {'bytes/token':>12} {'x bf16':>7}")
    for r in rows:
        print(f"{r['kv_dtype']:>6} {r['bytes_per_token']:>12,} {r['vs_bf16']:>7.3f}")
    return rows
