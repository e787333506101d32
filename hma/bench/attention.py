"""The fused decode attention kernel alone: every launch configuration on one layer, per KV format.

`python -m hma bench attention --device cuda --json attention.json`
One layer of a Qwen3 shape (8 KV heads, 32 query heads, head_dim 128), batch x context tokens
in shuffled blocks, one decode query per sequence. For each KV format and each configuration
(tokens per tile, warps, software-pipeline stages, register cap, most tokens per split, where
8-bit K converts) it
reports the median kernel time and the bytes read per second (payload and scales) against the
GPU's copy bandwidth measured in the same run, checks every output against the kernel's default
configuration, and names the fastest per format (`kernels.for_format` holds the picks).
`--launches N` only launches each format's default kernel N times, untimed, for a profiler.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hma import kernels
from hma.attention import write_kv
from hma.bench import write_json
from hma.bench.speed import copy_bytes_per_s, machine_name, median_seconds
from hma.kernels import DecodeConfig
from hma.kv_cache import LayerKV
from hma.kv_formats import AbsmaxFormat, get_kv_format
from hma.loading import resolve_device

BLOCK_SIZE = 16
FILL_TOKENS = 1 << 16  # tokens written per call while filling the pools


def candidates(tiles: list[int], warps: list[int], stages: list[int], registers: list[int] | None = None,
               partitions: list[int] | None = None, k_in_registers: list[int] | None = None,
               group_rows: list[int] | None = None) -> list[DecodeConfig]:
    """Every combination of the given tiles, warps, stages, register caps (0: none), most tokens
    per split, 8-bit K conversions (1: in registers) and least rows of q per dot."""
    return [DecodeConfig(t, w, s, r or None, p, bool(k), g) for t, w, s, r, p, k, g in itertools.product(
        tiles, warps, stages, registers or [0], partitions or [kernels.MAX_PARTITION], k_in_registers or [0],
        group_rows or [kernels.MIN_GROUP_ROWS])]


def filled_layer(kv_dtype: str, num_tokens: int, num_kv_heads: int, head_dim: int,
                 device: torch.device) -> LayerKV:
    """Pools of random K/V (written through the real quantizing path) for num_tokens tokens."""
    layer = LayerKV.empty(get_kv_format(kv_dtype), num_tokens // BLOCK_SIZE, BLOCK_SIZE, num_kv_heads, head_dim, device)
    gen = torch.Generator(device).manual_seed(0)
    for start in range(0, num_tokens, FILL_TOKENS):
        n = min(FILL_TOKENS, num_tokens - start)
        k, v = torch.randn(2, n, num_kv_heads, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
        write_kv(layer, k, v, torch.arange(start, start + n, device=device))
    return layer


def layer_inputs(kv_dtype: str, batch: int, context: int, device: torch.device,
                 num_heads: int = 32, num_kv_heads: int = 8, head_dim: int = 128):
    """(q, layer, block tables, lengths) of one decode step over one layer: batch sequences of
    context tokens each, their blocks shuffled through the pools."""
    layer = filled_layer(kv_dtype, batch * context, num_kv_heads, head_dim, device)
    order = torch.randperm(batch * context // BLOCK_SIZE, device=device)
    tables = order.view(batch, context // BLOCK_SIZE)
    lens = torch.full((batch,), context, device=device)
    q = torch.randn(batch, num_heads, head_dim, device=device, dtype=torch.bfloat16)
    return q, layer, tables, lens


def launch_defaults(kv_dtypes: list[str], batch: int, context: int, device: torch.device, launches: int) -> None:
    """Each format's default kernel launched `launches` times, untimed: a run to profile. For
    example `ncu --kernel-name _paged_decode_kernel --launch-skip 2 --launch-count 1 python -m hma
    bench attention --kv-dtypes fp8 --launches 3` (the first launches compile)."""
    for kv_dtype in kv_dtypes:
        q, layer, tables, lens = layer_inputs(kv_dtype, batch, context, device)
        for _ in range(launches):
            kernels.paged_decode_attention(q, layer, tables, lens, q.shape[-1] ** -0.5)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            del layer
            torch.cuda.empty_cache()


def sweep(kv_dtype: str, configs: list[DecodeConfig], batch: int, context: int, device: torch.device,
          rep_ms: float, attend: Callable = kernels.paged_decode_attention) -> list[dict]:
    """Times every config on one layer; attend(q, layer, tables, lens, scale, config=...) is the kernel."""
    q, layer, tables, lens = layer_inputs(kv_dtype, batch, context, device)
    head_dim = q.shape[-1]
    nbytes = sum(t.numel() * t.element_size() for t in layer.tensors)
    run = lambda config: attend(q, layer, tables, lens, head_dim ** -0.5, config=config)  # noqa: E731
    expected = run(kernels.for_format(layer.format)).float()
    rows = []
    for config in configs:
        if config.k_in_registers and not isinstance(layer.format, AbsmaxFormat):
            continue  # only 8-bit K has a conversion to place
        try:
            # relative to the largest output: rounding moves it ~1%, dropping one tile of 4,096 tokens ~20%
            error = ((run(config).float() - expected).abs().max() / expected.abs().max()).item()
            seconds = kernel_seconds(lambda: run(config), device, rep_ms)
        except Exception as exc:  # a config the compiler rejects (shared memory, registers) is listed, not fatal
            rows.append({"kv_dtype": kv_dtype, **dataclasses.asdict(config),
                         "failed": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        rows.append({"kv_dtype": kv_dtype, **dataclasses.asdict(config), "seconds": seconds,
                     "bytes_per_s": nbytes / seconds, "max_rel_diff": error})
    return rows


def kernel_seconds(fn: Callable[[], object], device: torch.device, rep_ms: float) -> float:
    """Median time of fn on the GPU from CUDA events over about rep_ms of runs, L2 flushed between
    them (triton's do_bench): a host sync per run, as median_seconds does, would add the launch
    latency to a ~0.3 ms kernel. On the CPU (the tests), one timed run."""
    if device.type != "cuda":
        return median_seconds(fn, device, 1)
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=rep_ms, return_mode="median") / 1e3


def fastest(rows: list[dict], tolerance: float = 0.05) -> DecodeConfig | None:
    """The quickest config whose output stays within tolerance (relative) of the default's."""
    ok = [r for r in rows if "seconds" in r and r["max_rel_diff"] <= tolerance]
    if not ok:
        return None
    best = min(ok, key=lambda r: r["seconds"])
    return DecodeConfig(**{f.name: best[f.name] for f in dataclasses.fields(DecodeConfig)})


def main(argv: list[str] | None = None) -> dict:
    """Sweeps every format, prints the table, writes the JSON."""
    parser = argparse.ArgumentParser(prog="python -m hma bench attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-dtypes", default="bf16,fp8,int8,int4")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--tiles", default="64,128")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--max-registers", default="0,128", help="caps on registers per thread; 0: none")
    parser.add_argument("--max-partitions", default="1024", help="most tokens of a sequence per program")
    parser.add_argument("--k-in-registers", default="0,1", help="8-bit K converted in registers (1) or not (0)")
    parser.add_argument("--group-rows", default=str(kernels.MIN_GROUP_ROWS),
                        help="least rows of q per dot (the group's query heads, padded)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--rep-ms", type=float, default=40.0, help="GPU time spent timing each config")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--launches", type=int, default=0,
                        help="only launch each format's default kernel this many times, untimed (to profile)")
    args = parser.parse_args(argv)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    device = resolve_device(args.device)
    if device.type != "cuda":
        raise SystemExit("bench attention times a GPU kernel: it needs --device cuda")
    if args.launches:
        launch_defaults(args.kv_dtypes.split(","), args.batch_size, args.context, device, args.launches)
        return {}
    copy = copy_bytes_per_s(device, 10)
    configs = candidates(ints(args.tiles), ints(args.warps), ints(args.stages), ints(args.max_registers),
                         ints(args.max_partitions), ints(args.k_in_registers), ints(args.group_rows))
    rows, best = [], {}
    for kv_dtype in args.kv_dtypes.split(","):
        found = sweep(kv_dtype, configs, args.batch_size, args.context, device, args.rep_ms)
        best_config = fastest(found)
        best[kv_dtype] = best_config and dataclasses.asdict(best_config)  # None: no config passed
        rows += found
        torch.cuda.empty_cache()
    out = {"machine": machine_name(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "batch_size": args.batch_size, "context": args.context, "copy_bytes_per_s": copy,
           "rows": rows, "fastest": best}
    _print(out)
    write_json(args.json, out)
    return out


def _print(out: dict) -> None:
    print(f"decode attention, one layer, {out['batch_size']} x {out['context']} tokens, {out['machine']}; "
          f"copy {out['copy_bytes_per_s'] / 1e12:.2f} TB/s")
    print(f"{'kv':>5} {'tile':>4} {'warps':>5} {'stages':>6} {'regs':>5} {'split':>5} {'k reg':>5} {'rows':>4} "
          f"{'us':>8} {'TB/s':>6} {'x copy':>6}")
    for r in out["rows"]:
        head = (f"{r['kv_dtype']:>5} {r['tile']:>4} {r['num_warps']:>5} {r['num_stages']:>6} "
                f"{r.get('max_registers') or '-':>5} {r.get('max_partition', kernels.MAX_PARTITION):>5} "
                f"{'yes' if r.get('k_in_registers') else 'no':>5} {r.get('group_rows', kernels.MIN_GROUP_ROWS):>4}")
        if "failed" in r:
            print(f"{head}  failed: {r['failed']}")
            continue
        print(f"{head} {r['seconds'] * 1e6:>8.1f} {r['bytes_per_s'] / 1e12:>6.2f} "
              f"{r['bytes_per_s'] / out['copy_bytes_per_s']:>6.2f}")
    for kv_dtype, config in out["fastest"].items():
        print(f"fastest for {kv_dtype}: {config}")
