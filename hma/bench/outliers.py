"""Why a prefill precision costs what it costs: activation outliers and per-linear W8A8 error.

`python -m hma bench outliers --model demo --json outliers.json`
Prefills --tokens tokens of WikiText-2 through the float model and, at every decoder linear,
records how far the largest input channel stands above the median one (max over tokens of |x|)
and the relative error of each 8-bit mode on those real activations, with and without
SmoothQuant. Prints the mean and max per linear kind; medians are not needed: this is one run.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch

from hma.batch import Batch, SeqChunk
from hma.config import EngineConfig
from hma.eval import EVAL_DIR
from hma.kv_cache import KVCache, blocks_for
from hma.loading import load_model, resolve_device, resolve_dtype, resolve_kv_format
from hma.quant import QUANT_MODES, PhaseLinear, QuantizedLinear, smoothing_factors


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m hma bench outliers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default=None)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--smoothquant-alpha", type=float, default=0.5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_dtype(None, device)
    model, tokenizer, _ = load_model(EngineConfig(model=args.model), device, dtype)
    text = (EVAL_DIR / "wikitext2_raw_test.txt").read_text()[:20 * args.tokens]
    ids = tokenizer(text, add_special_tokens=False).input_ids[:args.tokens]
    stats: dict[str, list[dict]] = collections.defaultdict(list)

    def record(kind: str, module: PhaseLinear, inputs: tuple, out: torch.Tensor) -> None:
        x = inputs[0]
        amax = x.abs().amax(dim=0)
        row = {"outlier_ratio": (amax.max() / amax.median()).item()}
        smooth = smoothing_factors(amax, module.weight, args.smoothquant_alpha)
        for mode in QUANT_MODES:
            for name, s in ((mode, None), (f"{mode}+smoothquant", smooth)):
                y = QuantizedLinear(module.weight.data, mode, s)(x)
                row[name] = ((y - out).norm() / out.norm()).item()
        stats[kind].append(row)

    hooks = [m.register_forward_hook(lambda mod, i, o, k=n.rsplit(".", 1)[-1]: record(k, mod, i, o))
             for n, m in model.named_modules() if isinstance(m, PhaseLinear)]
    cache = KVCache(model.config, blocks_for(len(ids), 16), 16, resolve_kv_format("auto", dtype), device)
    model(Batch.build([SeqChunk(ids, 0, list(range(cache.num_blocks)))], [], 16, device), cache)
    for hook in hooks:
        hook.remove()
    summary = {kind: {key: {"mean": sum(r[key] for r in rows) / len(rows), "max": max(r[key] for r in rows)}
                      for key in rows[0]} for kind, rows in stats.items()}
    _print(summary)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "tokens": len(ids), "summary": summary}, indent=2))
    return summary


def _print(summary: dict) -> None:
    keys = list(next(iter(summary.values())))
    print(f"{'linear':>13} " + " ".join(f"{k:>18}" for k in keys) + "   (mean / max over layers)")
    for kind, cols in summary.items():
        print(f"{kind:>13} " + " ".join(f"{cols[k]['mean']:>8.3g} / {cols[k]['max']:<7.3g}" for k in keys))
