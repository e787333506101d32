"""Engine speed at real Qwen3 shapes with random weights: prefill and decode tokens/s per batch size.

`python -m hma bench speed --shape qwen3-4b --device cuda --json results/speed.json`
Prefill: B prompts of --prompt-len tokens in one flat batch. Decode: B sequences at --context-len
tokens, one step. Each figure is the median of --iters timed runs after warm-up; transformers'
own forward at the same shape and batch is timed in the same run as the baseline (--no-baseline
to skip), so the ratio holds even on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hma.batch import Batch, SeqChunk
from hma.config import QWEN3_SHAPES, ModelConfig, qwen3_shape
from hma.engine import resolve_device, resolve_dtype, resolve_kv_format
from hma.kv_cache import KVCache, blocks_for
from hma.qwen3 import Qwen3ForCausalLM

BLOCK_SIZE = 16
HEADER = (f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode ms':>10} "
          f"{'hf prefill':>11} {'hf decode':>10} {'x prefill':>9} {'x decode':>9}")


def median_seconds(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 2) -> float:
    """Median wall time of fn over iters runs, synchronising the GPU around each."""
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def chunks(batch_size: int, prompt_len: int, vocab: int, context: int = 0) -> list[SeqChunk]:
    """batch_size sequences laid over consecutive blocks; decode chunks bring one token."""
    per_seq = blocks_for(context + prompt_len, BLOCK_SIZE)
    gen = torch.Generator().manual_seed(0)
    return [SeqChunk(torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(), context,
                     list(range(i * per_seq, (i + 1) * per_seq))) for i in range(batch_size)]


def bench_hma(model: Qwen3ForCausalLM, cache: KVCache, batch_size: int, prompt_len: int,
              context_len: int, device: torch.device, iters: int) -> dict[str, float]:
    vocab = model.config.vocab_size
    prefill = Batch.build(chunks(batch_size, prompt_len, vocab), [], BLOCK_SIZE, device)
    decode = Batch.build([], chunks(batch_size, 1, vocab, context_len - 1), BLOCK_SIZE, device)
    t_prefill = median_seconds(lambda: model(prefill, cache), device, iters)
    t_decode = median_seconds(lambda: model(decode, cache), device, iters)
    return {"prefill_s": t_prefill, "prefill_tok_s": batch_size * prompt_len / t_prefill,
            "decode_step_s": t_decode, "decode_tok_s": batch_size / t_decode}


def bench_transformers(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                       batch_size: int, prompt_len: int, context_len: int, iters: int) -> dict[str, float]:
    """transformers' own forward: a prefill of the same tokens, and one decode step over its cache."""
    model = _hf_model(config, dtype, device)
    ids = torch.randint(0, config.vocab_size, (batch_size, prompt_len), device=device)
    ctx = torch.randint(0, config.vocab_size, (batch_size, context_len - 1), device=device)
    with torch.inference_mode():
        t_prefill = median_seconds(lambda: model(ids, use_cache=False, logits_to_keep=1), device, iters)
        past = model(ctx, use_cache=True).past_key_values
        step = ids[:, :1]

        def decode_step() -> None:
            extra = past.get_seq_length() - (context_len - 1)
            if extra:
                past.crop(-extra)  # keep the context fixed across timed steps
            model(step, past_key_values=past, use_cache=True)

        t_decode = median_seconds(decode_step, device, iters)
    return {"prefill_s": t_prefill, "prefill_tok_s": batch_size * prompt_len / t_prefill,
            "decode_step_s": t_decode, "decode_tok_s": batch_size / t_decode}


_HF_CACHE: dict[str, torch.nn.Module] = {}


def _hf_model(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    import transformers

    key = f"{config}{dtype}{device}"
    if key not in _HF_CACHE:
        _HF_CACHE.clear()
        hf_config = transformers.Qwen3Config(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
            head_dim=config.head_dim, tie_word_embeddings=config.tie_word_embeddings)
        with torch.device(device):
            _HF_CACHE[key] = transformers.Qwen3ForCausalLM(hf_config).to(dtype).eval()
    return _HF_CACHE[key]


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m hma bench speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-4b", choices=sorted(QWEN3_SHAPES))
    parser.add_argument("--batch-sizes", default="1,8,16,32,64")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--context-len", type=int, default=512)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--num-layers", type=int, default=None, help="cut the layer count (smoke runs)")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers' forward")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config = qwen3_shape(args.shape)
    if args.num_layers:
        config = ModelConfig(**{**_fields(config), "num_hidden_layers": args.num_layers})
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    longest = max(args.prompt_len, args.context_len)
    model = Qwen3ForCausalLM.create(config, dtype, device, max_positions=longest + 1)
    model.init_random_()
    cache = KVCache(config, max(batch_sizes) * blocks_for(longest, BLOCK_SIZE), BLOCK_SIZE,
                    resolve_kv_format("auto", dtype), device)

    rows = []
    print(HEADER)
    for bs in batch_sizes:
        row = {"batch_size": bs, "hma": bench_hma(model, cache, bs, args.prompt_len, args.context_len,
                                                   device, args.iters)}
        if not args.no_baseline:
            row["transformers"] = bench_transformers(config, dtype, device, bs, args.prompt_len,
                                                     args.context_len, args.iters)
        rows.append(row)
        _print_row(row)
    result = {"machine": machine_name(device), "device": str(device), "dtype": str(dtype),
              "shape": args.shape, "num_layers": config.num_hidden_layers, "prompt_len": args.prompt_len,
              "context_len": args.context_len, "iters": args.iters, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    print(f"machine: {result['machine']}, {args.shape}, {dtype}, medians of {args.iters} runs")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


def _fields(config: ModelConfig) -> dict:
    return {name: getattr(config, name) for name in config.__slots__}


def _print_row(row: dict) -> None:
    ours, hf = row["hma"], row.get("transformers")
    line = (f"{row['batch_size']:>5} {ours['prefill_tok_s']:>14,.0f} {ours['decode_tok_s']:>13,.1f} "
            f"{ours['decode_step_s'] * 1e3:>10.2f}")
    if hf:
        line += (f" {hf['prefill_tok_s']:>11,.0f} {hf['decode_tok_s']:>10,.1f} "
                 f"{ours['prefill_tok_s'] / hf['prefill_tok_s']:>9.2f} "
                 f"{ours['decode_tok_s'] / hf['decode_tok_s']:>9.2f}")
    print(line)
