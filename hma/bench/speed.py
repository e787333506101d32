"""GPU speed against the GPU's own limits, in one run: peaks, decode vs its roofline, prefill MFU,
and transformers as the baseline.

`python -m hma bench speed --device cuda --json speed.json`
1. Peaks of this GPU: device-to-device copy bandwidth (bytes read + written per second) and
   8192^3 matmuls in bf16, fp8 (`_scaled_mm`, row-wise scales) and int8 (`_int_mm`).
2. Decode: one step (CUDA graph replay, greedy sampling, tokens back on the host) for each
   shape x KV format x context x batch; the floor is the bytes a step must read (every weight
   once, plus the KV of every token) over the copy bandwidth, and the ratio is step / floor.
   Each point also times the step's GPU work alone: the graph replayed back to back on the
   same inputs (CUDA events), so the host's share of a step (inputs, launch, tokens read back)
   shows as the difference, which overlapped engine steps hide.
3. Whole engine steps (host work included) in steady greedy decode, plain and overlapped.
4. Prefill: one prompt of each length per prefill precision (its KV written in the same 8-bit
   format, bf16 KV for bf16), tokens/s and model FLOPs utilisation against the bf16 peak, and
   the first prompt of each length after the hosts' warm-up (first-use stalls).
5. transformers' `generate` on the same shapes (bf16, random weights): decode tokens/s from two
   generate calls of different lengths, so its prefill cancels out.
Medians of --iters runs. Points whose KV does not fit in memory are listed as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hma.batch import Batch, SeqChunk
from hma.bench import write_json
from hma.config import PIECEWISE_GRAPH_TOKENS, EngineConfig, ModelConfig, qwen3_shape
from hma.cuda_graphs import DecodeGraphs
from hma.kv_cache import KVCache, blocks_for, bytes_per_block, kv_bytes_per_token
from hma.kv_formats import get_kv_format
from hma.loading import resolve_device
from hma.qwen3 import Qwen3ForCausalLM

BLOCK_SIZE = 16
MATMUL_SIZE = 8192
COPY_BYTES = 1 << 30
MEMORY_HEADROOM = 6e9  # bytes left free beside weights and KV for activations and graphs
ENGINE_WINDOW_STEPS = 10  # engine steps per timed window of bench_engine_steps
BACK_TO_BACK = 10  # graph replays per timed run of gpu_step_seconds


def median_seconds(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 2) -> float:
    """Median wall time of fn over iters runs, synchronising the GPU around each."""
    times = []
    for i in range(warmup + iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def event_seconds(fn: Callable[[], object], iters: int, warmup: int = 0) -> float:
    """Median GPU time of fn over iters runs: CUDA events around each run, the host waiting for
    its end, so what the host does between runs is not counted."""
    times = []
    for i in range(warmup + iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def gpu_step_seconds(graphs: DecodeGraphs, num_seqs: int, iters: int) -> float:
    """Median GPU time of one decode step over iters runs of BACK_TO_BACK replays of its graph on
    the inputs already uploaded: nothing of the host's work sits between them."""
    replays = lambda: [graphs.replay_uploaded(num_seqs) for _ in range(BACK_TO_BACK)]
    return event_seconds(replays, iters) / BACK_TO_BACK


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chunks(batch_size: int, prompt_len: int, vocab: int, context: int = 0,
           blocks: list[int] | None = None) -> list[SeqChunk]:
    """batch_size sequences of random tokens, each over its share of `blocks` (default: the
    first ones in order); decode chunks bring one token."""
    per_seq = blocks_for(context + prompt_len, BLOCK_SIZE)
    blocks = blocks if blocks is not None else list(range(batch_size * per_seq))
    gen = torch.Generator().manual_seed(0)
    return [SeqChunk(torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(), context,
                     blocks[i * per_seq:(i + 1) * per_seq]) for i in range(batch_size)]


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


# What nvidia-smi says of the card, before and after a run: H100s of one name have differed by
# 18% on the same batch-1 step (README sixteenth run), and power caps or clocks can say why.
GPU_STATE_FIELDS = ("driver_version", "power.limit", "power.draw", "clocks.sm", "clocks.mem", "clocks.max.sm",
                    "temperature.gpu", "pstate")


def gpu_state(device: torch.device) -> dict[str, str]:
    """GPU_STATE_FIELDS of the device's card, as nvidia-smi prints them; {} where it cannot tell."""
    if device.type != "cuda":
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        out = subprocess.run(["nvidia-smi", f"--id={index}", f"--query-gpu={','.join(GPU_STATE_FIELDS)}",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return {}
    values = [v.strip() for v in out.stdout.strip().split(",")]
    return dict(zip(GPU_STATE_FIELDS, values)) if len(values) == len(GPU_STATE_FIELDS) else {}


def copy_bytes_per_s(device: torch.device, iters: int) -> float:
    """Device-to-device copy bandwidth: bytes read + written per second."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / median_seconds(lambda: dst.copy_(src), device, iters)


def measure_peaks(device: torch.device, iters: int) -> dict[str, float]:
    """Copy bandwidth (bytes read + written / s) and matmul rates (FLOP/s) of this device."""
    peaks = {"copy_bytes_per_s": copy_bytes_per_s(device, iters)}
    n = MATMUL_SIZE
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    peaks["bf16_flop_per_s"] = 2 * n**3 / median_seconds(lambda: a @ b, device, iters)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
    ones_a, ones_b = torch.ones(n, 1, device=device), torch.ones(1, n, device=device)
    fp8 = lambda: torch._scaled_mm(a8, b8, scale_a=ones_a, scale_b=ones_b, out_dtype=torch.bfloat16)  # noqa: E731
    peaks["fp8_flop_per_s"] = 2 * n**3 / median_seconds(fp8, device, iters)
    ai, bi = a.to(torch.int8), b.to(torch.int8).t()
    peaks["int8_op_per_s"] = 2 * n**3 / median_seconds(lambda: torch._int_mm(ai, bi), device, iters)
    return peaks


def weight_bytes(model: Qwen3ForCausalLM) -> int:
    """Bytes a decode step reads from the weights: every parameter once, less the embedding
    table unless it doubles as lm_head (a step reads only its tokens' rows)."""
    params = {id(p): p for p in model.parameters()}  # a tied lm_head counts once
    total = sum(p.numel() * p.element_size() for p in params.values())
    if not model.config.tie_word_embeddings:
        total -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def bench_decode(model: Qwen3ForCausalLM, kv_dtype: str, contexts: list[int], batch_sizes: list[int],
                 bandwidth: float, device: torch.device, iters: int) -> list[dict]:
    """One decode step per (context, batch) through the CUDA graphs, against its floor."""
    config = model.config
    fmt = get_kv_format(kv_dtype)
    per_block = bytes_per_block(config, BLOCK_SIZE, fmt)
    wanted = max(batch_sizes) * blocks_for(max(contexts), BLOCK_SIZE) + 1
    free = torch.cuda.mem_get_info(device)[0]
    num_blocks = int(min(wanted, (free - MEMORY_HEADROOM) // per_block))
    cache = KVCache(config, num_blocks, BLOCK_SIZE, fmt, device)
    graphs = DecodeGraphs(model, cache, max(batch_sizes), max(contexts))
    weights = weight_bytes(model)
    rows = []
    for context in contexts:
        for bs in batch_sizes:
            row = {"kv_dtype": kv_dtype, "context_len": context, "batch_size": bs}
            need = bs * blocks_for(context, BLOCK_SIZE)
            if need > cache.allocator.num_free:
                rows.append({**row, "skipped": f"KV of {bs} x {context} tokens needs {need * per_block / 1e9:.1f} GB; "
                                               f"{num_blocks * per_block / 1e9:.1f} GB fit beside the weights"})
                continue
            blocks = cache.allocator.allocate(need)
            decodes = chunks(bs, 1, config.vocab_size, context - 1, blocks)
            seconds = median_seconds(lambda: graphs.run(decodes).argmax(-1).tolist(), device, iters)
            gpu_seconds = gpu_step_seconds(graphs, bs, iters)  # on the inputs the last run uploaded
            cache.allocator.free(blocks)
            kv_bytes = bs * context * kv_bytes_per_token(config, fmt)
            floor = (weights + kv_bytes) / bandwidth
            rows.append({**row, "step_s": seconds, "tok_s": bs / seconds, "floor_s": floor,
                         "weight_bytes": weights, "kv_bytes": kv_bytes, "x_floor": seconds / floor,
                         "gpu_step_s": gpu_seconds, "x_floor_gpu": gpu_seconds / floor})
    return rows


def engine_steps_len(context: int, iters: int, steps: int = ENGINE_WINDOW_STEPS) -> int:
    """Tokens a sequence of bench_engine_steps reaches: its prompt, then every timed step."""
    return context + steps * (iters + 2) + 1


def bench_engine_steps(model: Qwen3ForCausalLM, batch_sizes: list[int], context: int, device: torch.device,
                       iters: int, steps: int = ENGINE_WINDOW_STEPS) -> list[dict]:
    """Whole engine steps in steady greedy decode (scheduling, inputs, graph replay, tokens read
    back, stop checks), plain and overlapped (async_scheduling off / auto), bf16 KV, prompts of
    `context` tokens: median over iters windows of `steps` steps each, after two windows."""
    from hma.engine import LLMEngine
    from hma.sampling import SamplingParams

    rows, length = [], engine_steps_len(context, iters, steps)
    for mode in ("off", "auto"):
        for bs in batch_sizes:
            cache = KVCache(model.config, bs * blocks_for(length, BLOCK_SIZE) + 2, BLOCK_SIZE, get_kv_format("bf16"), device)
            config = EngineConfig(device=device.type, block_size=BLOCK_SIZE, max_num_seqs=bs, max_model_len=length,
                                  async_scheduling=mode)
            engine = LLMEngine(model, cache, config, eos_token_ids=[])
            params = SamplingParams(max_tokens=length - context, temperature=0.0, ignore_eos=True)
            reqs = [engine.add_request(c.token_ids, params) for c in chunks(bs, context, model.config.vocab_size)]
            while not all(r.output_token_ids for r in reqs):
                engine.step()  # the prefills
            times = []
            for i in range(iters + 2):
                t0 = time.perf_counter()
                for _ in range(steps):
                    engine.step()
                if i >= 2:
                    times.append((time.perf_counter() - t0) / steps)
            rows.append({"async_scheduling": mode, "batch_size": bs, "context_len": context,
                         "step_s": statistics.median(times), "tok_s": bs / statistics.median(times)})
            del engine, cache
            torch.cuda.empty_cache()
    return rows


def decoder_linears(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of a layer's four linears, q/k/v and gate/up fused as in qwen3."""
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    hidden, inter = config.hidden_size, config.intermediate_size
    return {"qkv": (q + 2 * kv, hidden), "o": (hidden, q), "gate_up": (2 * inter, hidden), "down": (hidden, inter)}


def decoder_linear_params(config: ModelConfig) -> int:
    """Weights of every layer's q/k/v, o, gate/up and down projections (no norms, no embeddings)."""
    return config.num_hidden_layers * sum(n * k for n, k in decoder_linears(config).values())


def prefill_flops(config: ModelConfig, num_tokens: int) -> float:
    """Matmul FLOPs of one causal prompt: decoder linears for every token, attention's two
    products over the n(n+1)/2 query-key pairs, lm_head for the last token."""
    q = config.num_attention_heads * config.head_dim
    pairs = num_tokens * (num_tokens + 1) / 2
    attention = config.num_hidden_layers * 2 * 2 * pairs * q
    return 2 * decoder_linear_params(config) * num_tokens + attention + 2 * config.hidden_size * config.vocab_size


def bench_prefill(model: Qwen3ForCausalLM, modes: list[str], lens: list[int], peak: float,
                  device: torch.device, iters: int) -> list[dict]:
    """One prompt per length and precision as the serving hosts run it (piecewise graphs up to
    their default token count, after their warm-up: a tiny prompt, prefill attention at every
    length bucket, graph capture) and fully eager in the same run; first_s is the first prompt of
    that length after warm-up."""
    from hma.engine import warm_up_prompts

    config = model.config
    graph_tokens = PIECEWISE_GRAPH_TOKENS
    rows = []
    for mode in modes:
        model.use_prefill_precision(mode)
        model.use_piecewise_graphs(graph_tokens)
        t0 = time.perf_counter()
        warm_up_prompts(model, max(lens))
        capture_s = time.perf_counter() - t0
        cache = KVCache(config, blocks_for(max(lens), BLOCK_SIZE), BLOCK_SIZE,
                        get_kv_format("bf16" if mode == "bf16" else mode), device)
        model(Batch.build(chunks(1, 4, config.vocab_size), [], BLOCK_SIZE, device), cache)
        for n in lens:
            batch = Batch.build(chunks(1, n, config.vocab_size), [], BLOCK_SIZE, device)
            first = median_seconds(lambda: model(batch, cache), device, iters=1, warmup=0)
            seconds = median_seconds(lambda: model(batch, cache), device, iters)
            with model.eagerly():
                eager = median_seconds(lambda: model(batch, cache), device, iters)
            flops = prefill_flops(config, n)
            rows.append({"prefill_dtype": mode, "prompt_len": n, "seconds": seconds, "first_s": first,
                         "eager_s": eager, "piecewise_graphs": n <= graph_tokens, "warm_up_s": capture_s,
                         "tok_s": n / seconds, "tflop_per_s": flops / seconds / 1e12,
                         "mfu_vs_bf16_peak": flops / seconds / peak})
    model.use_prefill_precision("bf16")
    model.piecewise = None
    return rows


def bench_transformers(config: ModelConfig, batch_sizes: list[int], prompt_len: int, new_tokens: int,
                       device: torch.device, iters: int) -> list[dict]:
    """transformers' generate, greedy, bf16: decode step = (t(1 + new) - t(1)) / new tokens."""
    import transformers

    hf_config = transformers.Qwen3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, tie_word_embeddings=config.tie_word_embeddings)
    with torch.device(device):
        model = transformers.Qwen3ForCausalLM(hf_config).to(torch.bfloat16).eval()
    rows = []
    for bs in batch_sizes:
        ids = torch.randint(0, config.vocab_size, (bs, prompt_len), device=device)

        def generate(n: int) -> None:
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           attention_mask=torch.ones_like(ids), pad_token_id=0)

        with torch.inference_mode():
            short = median_seconds(lambda: generate(1), device, iters, warmup=1)
            long = median_seconds(lambda: generate(1 + new_tokens), device, iters, warmup=1)
        step = (long - short) / new_tokens
        rows.append({"batch_size": bs, "context_len": prompt_len, "step_s": step, "tok_s": bs / step})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m hma bench speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen3-4b,qwen3-8b")
    parser.add_argument("--batch-sizes", default="1,8,32,64,128")
    parser.add_argument("--contexts", default="1024,4096")
    parser.add_argument("--kv-dtypes", default="bf16,fp8,int8,int4")
    parser.add_argument("--prompt-lens", default="512,2048,8192")
    parser.add_argument("--prefill-dtypes", default="bf16,fp8,int8")
    parser.add_argument("--baseline-batch-sizes", default="1,64", help="transformers' generate ('' skips)")
    parser.add_argument("--baseline-tokens", type=int, default=16, help="decode steps per baseline run")
    parser.add_argument("--engine-batch-sizes", default="1,64",
                        help="whole engine steps, plain and overlapped, at the smallest context ('' skips)")
    parser.add_argument("--attention", default="",
                        help="DecodeConfig fields set in every KV format's attention launch, "
                             "e.g. group_rows=4,merge_in_place=1")
    parser.add_argument("--device", default=None)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--num-layers", type=int, default=None, help="cut the layer count (smoke runs)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--table", type=Path, nargs="+", default=None,
                        help="print the README's markdown tables from saved --json runs, measure nothing")
    args = parser.parse_args(argv)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    if args.table:
        runs = [json.loads(path.read_text()) for path in args.table]
        print(markdown_tables(runs))
        return {"runs": runs}

    device = resolve_device(args.device)
    if device.type != "cuda":
        raise SystemExit("bench speed measures a GPU against its own peaks: it needs --device cuda")
    if args.attention:
        from hma import kernels  # Triton: only GPU runs get here

        kernels.LAUNCH_OVERRIDES.update(kernels.parse_overrides(args.attention))
    state_before = gpu_state(device)
    peaks = measure_peaks(device, args.iters)
    _print_peaks(peaks)
    shapes = []
    for shape in args.shapes.split(","):
        config = qwen3_shape(shape)
        if args.num_layers:
            config = dataclasses.replace(config, num_hidden_layers=args.num_layers)
        # RoPE's table must reach the longest sequence: a decode context, a prompt or an engine run's
        lengths = ints(args.contexts) + ints(args.prompt_lens)
        if args.engine_batch_sizes:
            lengths.append(engine_steps_len(min(ints(args.contexts)), args.iters))
        model = Qwen3ForCausalLM.create(config, torch.bfloat16, device, max_positions=max(lengths) + 1)
        model.init_random_()
        result = {"shape": shape, "decode": [], "engine": [], "prefill": [], "transformers": []}
        for kv_dtype in args.kv_dtypes.split(","):
            result["decode"] += bench_decode(model, kv_dtype, ints(args.contexts), ints(args.batch_sizes),
                                             peaks["copy_bytes_per_s"], device, args.iters)
            torch.cuda.empty_cache()
        if args.engine_batch_sizes:
            result["engine"] = bench_engine_steps(model, ints(args.engine_batch_sizes), min(ints(args.contexts)),
                                                  device, args.iters)
        if args.prompt_lens:  # '' skips prefill, as the other ''s skip theirs
            result["prefill"] = bench_prefill(model, args.prefill_dtypes.split(","), ints(args.prompt_lens),
                                              peaks["bf16_flop_per_s"], device, args.iters)
        del model
        torch.cuda.empty_cache()
        if args.baseline_batch_sizes:
            result["transformers"] = bench_transformers(
                config, ints(args.baseline_batch_sizes), min(ints(args.contexts)), args.baseline_tokens,
                device, max(3, args.iters // 3))
        _print_shape(result)
        shapes.append(result)
    out = {"machine": machine_name(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "attention": args.attention, "gpu_state": {"before": state_before, "after": gpu_state(device)},
           "iters": args.iters, "num_layers": args.num_layers, "peaks": peaks, "shapes": shapes}
    print(f"machine: {out['machine']}, torch {torch.__version__}, medians of {args.iters} runs; "
          f"nvidia-smi after: {out['gpu_state']['after'] or 'not available'}")
    write_json(args.json, out)
    return out


def _print_peaks(peaks: dict[str, float]) -> None:
    print(f"copy {peaks['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + written); matmul {MATMUL_SIZE}^3: "
          f"bf16 {peaks['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s, fp8 {peaks['fp8_flop_per_s'] / 1e12:.0f}, "
          f"int8 {peaks['int8_op_per_s'] / 1e12:.0f} TOP/s")


def _print_shape(result: dict) -> None:
    print(f"\n{result['shape']} decode step")
    print(f"{'kv':>5} {'context':>7} {'batch':>5} {'step ms':>8} {'floor ms':>8} {'x floor':>7} {'tok/s':>9} {'x hf':>6}"
          f" {'gpu ms':>7} {'x floor':>7}")
    hf = {r["batch_size"]: r for r in result["transformers"]}
    for r in result["decode"]:
        if "skipped" in r:
            print(f"{r['kv_dtype']:>5} {r['context_len']:>7} {r['batch_size']:>5}  skipped: {r['skipped']}")
            continue
        base = hf.get(r["batch_size"]) if r["context_len"] == min(x["context_len"] for x in result["decode"]) else None
        versus = f"{r['tok_s'] / base['tok_s']:>6.1f}" if base else f"{'':>6}"
        print(f"{r['kv_dtype']:>5} {r['context_len']:>7} {r['batch_size']:>5} {r['step_s'] * 1e3:>8.2f} "
              f"{r['floor_s'] * 1e3:>8.2f} {r['x_floor']:>7.2f} {r['tok_s']:>9,.0f} {versus} "
              f"{r['gpu_step_s'] * 1e3:>7.2f} {r['x_floor_gpu']:>7.2f}")
    for r in result.get("engine", []):
        print(f"engine step, async_scheduling={r['async_scheduling']}: batch {r['batch_size']}, context "
              f"{r['context_len']}: {r['step_s'] * 1e3:.2f} ms, {r['tok_s']:,.0f} tok/s")
    for r in result["transformers"]:
        print(f"transformers generate: batch {r['batch_size']}, context {r['context_len']}: "
              f"{r['step_s'] * 1e3:.2f} ms/step, {r['tok_s']:,.1f} tok/s")
    print(f"\n{result['shape']} prefill")
    print(f"{'dtype':>5} {'tokens':>6} {'ms':>8} {'first ms':>8} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>5} {'x bf16':>6}"
          f" {'eager ms':>8} {'x eager':>7}")
    for r in result["prefill"]:
        base = next(b for b in result["prefill"] if b["prompt_len"] == r["prompt_len"])
        eager = r.get("eager_s", r["seconds"])  # older JSON measured the eager path only
        print(f"{r['prefill_dtype']:>5} {r['prompt_len']:>6} {r['seconds'] * 1e3:>8.1f} {r['first_s'] * 1e3:>8.1f} "
              f"{r['tok_s']:>9,.0f} {r['tflop_per_s']:>8.0f} {r['mfu_vs_bf16_peak']:>5.0%} "
              f"{base['seconds'] / r['seconds']:>6.2f} {eager * 1e3:>8.1f} {eager / r['seconds']:>7.2f}")


def markdown_tables(runs: list[dict]) -> str:
    """Decode (ms and x floor), prefill (tok/s and MFU) and the transformers baseline, per shape."""
    out = []
    for run in runs:
        for shape in run["shapes"]:
            out += (_decode_table(shape) + _gpu_decode_table(shape) + _engine_table(shape) + _prefill_table(shape)
                    + _baseline_table(shape))
    return "\n".join(out)


def _gpu_decode_table(shape: dict) -> list[str]:
    """The decode table of the steps' GPU work alone (runs saved before it was timed have none)."""
    if not any("gpu_step_s" in r for r in shape["decode"]):
        return []
    return _decode_table(shape, "gpu_step_s", "x_floor_gpu",
                         f"Decode step, {shape['shape']}, GPU work alone (graph replays back to back): ms (x floor)")


def _decode_table(shape: dict, step: str = "step_s", ratio: str = "x_floor", title: str | None = None) -> list[str]:
    batches = sorted({r["batch_size"] for r in shape["decode"]})
    lines = [title or f"Decode step, {shape['shape']}: ms (x floor)", "",
             "| KV | context | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|---:|" + "---:|" * len(batches)]
    for (kv, context) in dict.fromkeys((r["kv_dtype"], r["context_len"]) for r in shape["decode"]):
        cells = {r["batch_size"]: ("does not fit" if "skipped" in r else f"{r[step] * 1e3:.2f} ({r[ratio]:.2f})")
                 for r in shape["decode"] if (r["kv_dtype"], r["context_len"]) == (kv, context)}
        lines.append(f"| {kv} | {context:,} | " + " | ".join(cells.get(b, "") for b in batches) + " |")
    return lines + [""]


def _bf16_step(shape: dict, batch_size: int, context_len: int) -> dict | None:
    """The measured bf16-KV graph step at this batch and context, if the run has one."""
    return next((r for r in shape["decode"] if r["kv_dtype"] == "bf16" and "skipped" not in r
                 and (r["batch_size"], r["context_len"]) == (batch_size, context_len)), None)


def _engine_table(shape: dict) -> list[str]:
    rows = shape.get("engine", [])  # (runs saved before engine steps were measured have none)
    if not rows:
        return []
    lines = [f"Whole engine step, {shape['shape']}, bf16 KV: ms (x floor of the graph step at that batch)", "",
             "| batch | context | graph replay only | engine, plain | engine, overlapped |", "|---:|---:|---:|---:|---:|"]
    for bs in dict.fromkeys(r["batch_size"] for r in rows):
        graph = _bf16_step(shape, bs, rows[0]["context_len"])
        if graph is None:
            continue
        cell = lambda r: f"{r['step_s'] * 1e3:.2f} ({r['step_s'] / graph['floor_s']:.2f})"  # noqa: E731
        plain, overlapped = (next(r for r in rows if r["batch_size"] == bs and r["async_scheduling"] == m)
                             for m in ("off", "auto"))
        lines.append(f"| {bs} | {rows[0]['context_len']:,} | {cell(graph)} | {cell(plain)} | {cell(overlapped)} |")
    return lines + [""]


def _prefill_table(shape: dict) -> list[str]:
    lens = sorted({r["prompt_len"] for r in shape["prefill"]})
    lines = [f"Prefill, {shape['shape']} (one prompt): tokens/s (MFU against the bf16 peak)", "",
             "| prefill | " + " | ".join(f"{n:,} tokens" for n in lens) + " |", "|---|" + "---:|" * len(lens)]
    for mode in dict.fromkeys(r["prefill_dtype"] for r in shape["prefill"]):
        cells = {r["prompt_len"]: f"{r['tok_s']:,.0f} ({r['mfu_vs_bf16_peak']:.0%})"
                 for r in shape["prefill"] if r["prefill_dtype"] == mode}
        lines.append(f"| {mode} | " + " | ".join(cells.get(n, "") for n in lens) + " |")
    return lines + [""] + _eager_prefill_table(shape, lens)


def _eager_prefill_table(shape: dict, lens: list[int]) -> list[str]:
    """ms as served (piecewise graphs where they apply) against fully eager, from the same run."""
    rows = [r for r in shape["prefill"] if "eager_s" in r]
    if not rows:
        return []
    lines = [f"Prefill, {shape['shape']}: ms as served / eager (x faster)", "",
             "| prefill | " + " | ".join(f"{n:,} tokens" for n in lens) + " |", "|---|" + "---:|" * len(lens)]
    for mode in dict.fromkeys(r["prefill_dtype"] for r in rows):
        cells = {r["prompt_len"]: f"{r['seconds'] * 1e3:.1f} / {r['eager_s'] * 1e3:.1f} ({r['eager_s'] / r['seconds']:.2f})"
                 for r in rows if r["prefill_dtype"] == mode}
        lines.append(f"| {mode} | " + " | ".join(cells.get(n, "") for n in lens) + " |")
    return lines + [""]


def _baseline_table(shape: dict) -> list[str]:
    if not shape["transformers"]:
        return []
    lines = ["| shape | batch | transformers ms/step | ours (bf16 KV) ms/step | x transformers | floor ms | most possible x |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for base in shape["transformers"]:
        ours = _bf16_step(shape, base["batch_size"], base["context_len"])
        if ours is None:  # no bf16 step of ours at that batch and context to compare with
            continue
        lines.append(f"| {shape['shape']} | {base['batch_size']} | {base['step_s'] * 1e3:.1f} | {ours['step_s'] * 1e3:.2f} | "
                     f"{base['step_s'] / ours['step_s']:.1f} | {ours['floor_s'] * 1e3:.2f} | "
                     f"{base['step_s'] / ours['floor_s']:.1f} |")
    return lines + [""]
