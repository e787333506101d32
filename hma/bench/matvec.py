"""Decode steps' matrix-vector products: hma.matvec's kernel against cuBLAS (F.linear).

`python -m hma bench matvec --json matvec.json`
For each Qwen3 shape, one row of x (a decode step of one sequence): a CUDA graph of one decoder
linear over every layer's own weight (distinct tensors, so nothing stays in L2), then the chain
of a layer's four linears (qkv, o, gate_up, down), each feeding the next, over all layers: the
weight traffic of a decode step; then the layers as a step runs them, attention left out (the
norms and SiLU-and-mul as kernels of their own, or SiLU-and-mul in gate_up's hma.matvec). Median of graph replays; bytes are the weights read.
Outputs are checked against F.linear. `--sweep` also times every launch configuration and names
the fastest per linear, which is how hma.matvec's picks were made.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from hma.bench import write_json
from hma.bench.speed import copy_bytes_per_s, decoder_linears, event_seconds, machine_name, median_seconds
from hma.config import ModelConfig, qwen3_shape
from hma.loading import resolve_device

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def graph_seconds(fn: Callable[[], object], device: torch.device, replays: int) -> float:
    """Median time of one replay of fn captured as a CUDA graph (on the CPU, of fn itself)."""
    if device.type != "cuda":
        return median_seconds(fn, device, replays)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        fn()  # compiles and warms up outside the capture
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    return event_seconds(graph.replay, replays, warmup=3)


def _rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def bench_linear(weights: list[torch.Tensor], impls: dict[str, Linear], device: torch.device,
                 replays: int) -> dict:
    """One linear over every layer's weight, per implementation: seconds and max relative diff to F.linear."""
    gen = torch.Generator(device).manual_seed(1)
    xs = [torch.randn(1, w.shape[1], device=device, dtype=w.dtype, generator=gen) for w in weights]
    want = F.linear(xs[0], weights[0])
    out = {"bytes": sum(w.numel() * w.element_size() for w in weights)}
    for name, linear in impls.items():
        out[name] = {"max_rel_diff": _rel_diff(linear(xs[0], weights[0]), want),
                     "seconds": graph_seconds(lambda: [linear(x, w) for x, w in zip(xs, weights)], device, replays)}
    return out


def bench_chain(layers: list[dict[str, torch.Tensor]], impls: dict[str, Linear],
                device: torch.device, replays: int) -> dict:
    """Every layer's qkv -> o -> gate_up -> down, each input a slice of the last output."""
    hidden = layers[0]["qkv"].shape[1]
    q_size, inter = layers[0]["o"].shape[1], layers[0]["down"].shape[1]
    x0 = torch.randn(1, hidden, device=device, dtype=layers[0]["qkv"].dtype) * 0.1

    def chain(linear: Linear) -> torch.Tensor:
        x = x0
        for w in layers:
            x = linear(linear(linear(x, w["qkv"])[:, :q_size], w["o"]), w["gate_up"])
            x = linear(x[:, :inter], w["down"])
        return x

    want = chain(F.linear)
    out = {"bytes": sum(w.numel() * w.element_size() for layer in layers for w in layer.values())}
    for name, linear in impls.items():
        out[name] = {"max_rel_diff": _rel_diff(chain(linear), want),
                     "seconds": graph_seconds(lambda: chain(linear), device, replays)}
    return out


def bench_layers(layers: list[dict[str, torch.Tensor]], device: torch.device, replays: int) -> dict:
    """Every layer as a decode step of one sequence runs it, attention left out: add + RMSNorm,
    qkv, o (on q's slice), add + RMSNorm, gate_up, SiLU-and-mul, down, the norms and the
    activation as kernels of their own (hma.layer_kernels) beside cuBLAS or hma.matvec; fused:
    hma.matvec with SiLU-and-mul in gate_up's kernel (gated_linear), one launch a layer fewer."""
    from hma import matvec, qwen3

    dtype, hidden = layers[0]["qkv"].dtype, layers[0]["qkv"].shape[1]
    q_size, eps = layers[0]["o"].shape[1], 1e-6
    gen = torch.Generator(device).manual_seed(2)
    x0, residual0 = (torch.randn(1, hidden, device=device, dtype=dtype, generator=gen) for _ in range(2))
    norm = (torch.rand(hidden, device=device, generator=gen) + 0.5).to(dtype)

    def layer_step(linear: Linear, activated_gate_up: Linear) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            x, residual = x0, residual0
            for w in layers:
                residual, h = qwen3.add_rms_norm(x, residual, norm, eps)
                o = linear(linear(h, w["qkv"])[:, :q_size], w["o"])
                residual, h = qwen3.add_rms_norm(o, residual, norm, eps)
                x = linear(activated_gate_up(h, w["gate_up"]), w["down"])
            return x
        return step

    steps = {"cublas": layer_step(F.linear, lambda x, w: qwen3.silu_and_mul(F.linear(x, w))),
             "matvec": layer_step(matvec.linear, lambda x, w: qwen3.silu_and_mul(matvec.linear(x, w))),
             "fused": layer_step(matvec.linear, matvec.gated_linear)}
    want = steps["cublas"]()
    out = {"bytes": sum(w.numel() * w.element_size() for layer in layers for w in layer.values())}
    for name, step in steps.items():
        out[name] = {"max_rel_diff": _rel_diff(step(), want), "seconds": graph_seconds(step, device, replays)}
    return out


def sweep_impls() -> dict[str, Linear]:
    """hma.matvec at every candidate launch: features per program, K per step, warps."""
    from hma import matvec

    configs = [matvec.MatvecConfig(f, k, w) for f, k, w in itertools.product((1, 2, 4, 8), (256, 512, 1024), (2, 4, 8))]
    return {f"matvec {c.features}/{c.block_k}/{c.num_warps}": (lambda x, w, c=c: matvec.linear(x, w, c))
            for c in configs}


def bench_shape(config: ModelConfig, device: torch.device, dtype: torch.dtype,
                replays: int, sweep: bool = False) -> dict:
    """Each linear alone and the layer chain, cuBLAS against hma.matvec."""
    from hma import matvec

    gen = torch.Generator(device).manual_seed(0)
    shapes = decoder_linears(config)
    layers = [{name: torch.randn(n, k, device=device, dtype=dtype, generator=gen) * 0.02
               for name, (n, k) in shapes.items()} for _ in range(config.num_hidden_layers)]
    impls: dict[str, Linear] = {"cublas": F.linear, "matvec": matvec.linear}
    per_linear = {**impls, **(sweep_impls() if sweep else {})}
    result = {"shapes": shapes, "runs": []}
    for name in shapes:
        run = bench_linear([layer[name] for layer in layers], per_linear, device, replays)
        result["runs"].append({"linear": name, **run})
    result["runs"].append({"linear": "chain", **bench_chain(layers, impls, device, replays)})
    result["runs"].append({"linear": "layer", **bench_layers(layers, device, replays)})
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m hma bench matvec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen3-4b,qwen3-8b")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also time every launch configuration")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device.type != "cuda":
        raise SystemExit("bench matvec times GPU kernels: it needs --device cuda")
    out = {"machine": machine_name(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "copy_bytes_per_s": copy_bytes_per_s(device, 10), "results": {}}
    for shape in args.shapes.split(","):
        out["results"][shape] = bench_shape(qwen3_shape(shape), device, torch.bfloat16, args.replays,
                                            args.sweep)
        torch.cuda.empty_cache()
    print_table(out)
    write_json(args.json, out)
    return out


def print_table(out: dict) -> None:
    print(f"decode linears, one row, graphs over all layers, {out['machine']}; "
          f"copy {out['copy_bytes_per_s'] / 1e12:.2f} TB/s")
    print(f"{'shape':>9} {'linear':>8} {'cuBLAS us':>10} {'TB/s':>5} {'matvec us':>10} {'TB/s':>5} "
          f"{'x cuBLAS':>8} {'diff':>7}")
    for shape, result in out["results"].items():
        for run in result["runs"]:
            cublas, ours = run["cublas"], run["matvec"]
            print(f"{shape:>9} {run['linear']:>8} {cublas['seconds'] * 1e6:>10.1f} "
                  f"{run['bytes'] / cublas['seconds'] / 1e12:>5.2f} {ours['seconds'] * 1e6:>10.1f} "
                  f"{run['bytes'] / ours['seconds'] / 1e12:>5.2f} {cublas['seconds'] / ours['seconds']:>8.2f} "
                  f"{ours['max_rel_diff']:>7.1e}")
            if "fused" in run:
                fused = run["fused"]
                print(f"{'':>9} {'':>8} SiLU-and-mul in gate_up's hma.matvec: {fused['seconds'] * 1e6:.1f} us "
                      f"({run['bytes'] / fused['seconds'] / 1e12:.2f} TB/s, "
                      f"{cublas['seconds'] / fused['seconds']:.2f}x cuBLAS, "
                      f"{ours['seconds'] / fused['seconds']:.2f}x matvec, diff {fused['max_rel_diff']:.1e})")
            swept = {k: v for k, v in run.items() if k.startswith("matvec ") and v["max_rel_diff"] < 0.02}
            if swept:
                best = min(swept, key=lambda k: swept[k]["seconds"])
                print(f"{'':>9} {'':>8} fastest {best}: {swept[best]['seconds'] * 1e6:.1f} us")
