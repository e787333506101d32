"""Engine steps on a trace: one in-process engine replays a trace at a rate and times every step,
by kind, so first-use stalls and the host's cost of eager steps show up.

`python -m hma bench steps --model random:qwen3-4b --trace azure-conv --rate 3.4 --num-requests 70`
No router and no HTTP: each request is added once its (time-scaled) arrival has passed, and the
engine steps in between; token-id prompts of the trace's lengths, greedy, ignore_eos. Each step
is kept with what it ran: decode (decodes only: the CUDA-graph path), prefill (prompts only),
mixed (both, run eagerly) or read (only the tokens of a step launched before). The table gives
per kind the count, median, p90 and slowest step, then every step slower than --slow-ms; the
JSON keeps every step and each request's TTFT.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from hma.bench import write_json
from hma.bench.goodput import percentile
from hma.bench.speed import machine_name
from hma.bench.traces import clip, read_trace, scale_to_rate, trace_path
from hma.config import EngineConfig
from hma.engine import LLMEngine, warm_up
from hma.sampling import SamplingParams
from hma.scheduler import SchedulerOutput


def _kind(plan: SchedulerOutput) -> str:
    if plan.prefills:
        return "mixed" if plan.decodes else "prefill"
    return "decode" if plan.decodes else "read"


def record_plans(engine: LLMEngine) -> list[dict]:
    """What each step the engine runs from now on plans, in order, taken as it is planned (a
    prefilled request holds one token more once its step is done)."""
    plans: list[dict] = []
    schedule = engine.scheduler.schedule

    def recorded() -> SchedulerOutput:
        plan = schedule()
        lens = [r.num_tokens for r in plan.prefills]
        plans.append({"kind": _kind(plan), "prompts": len(lens), "prompt_tokens": sum(lens), "prompt_lens": lens,
                      "decodes": len(plan.decodes)})
        return plan

    engine.scheduler.schedule = recorded  # the engine calls it once at the start of each step
    return plans


def replay(engine: LLMEngine, requests: list, seed: int = 0) -> tuple[list[dict], list[float]]:
    """Runs the requests through the engine on their arrival times; (steps, TTFTs in seconds)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model.config.vocab_size
    plans, steps, added = record_plans(engine), [], []
    t0, i = time.perf_counter(), 0
    while i < len(requests) or engine.has_unfinished:
        now = time.perf_counter() - t0
        while i < len(requests) and requests[i].arrival_s <= now:
            r = requests[i]
            prompt = torch.randint(0, vocab, (r.prompt_len,), generator=gen).tolist()
            added.append(engine.add_request(prompt, SamplingParams(max_tokens=r.output_len, temperature=0.0,
                                                                    ignore_eos=True)))
            i += 1
        if not engine.has_unfinished:
            time.sleep(0.0005)
            continue
        start = time.perf_counter()
        engine.step()
        steps.append({"t": start - t0, "seconds": time.perf_counter() - start, **plans[-1]})
    ttfts = [r.metrics.first_token_time - r.metrics.arrival_time for r in added]
    return steps, ttfts


def summarize(steps: list[dict]) -> dict[str, dict]:
    """Per kind: count, median, p90 and slowest step in seconds."""
    out = {}
    for kind in ("decode", "prefill", "mixed", "read"):
        times = [s["seconds"] for s in steps if s["kind"] == kind]
        if times:
            out[kind] = {"count": len(times), "median_s": statistics.median(times),
                         "p90_s": percentile(times, 90), "max_s": max(times)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m hma bench steps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:qwen3-4b")
    parser.add_argument("--device", default=None)
    parser.add_argument("--trace", default="azure-conv")
    parser.add_argument("--rate", type=float, default=3.4, help="requests per second")
    parser.add_argument("--num-requests", type=int, default=70, help="the trace's first requests")
    parser.add_argument("--max-prompt-len", type=int, default=8192)
    parser.add_argument("--max-output-len", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=8192 + 512)
    parser.add_argument("--kv-memory-gb", type=float, default=None)
    parser.add_argument("--slow-ms", type=float, default=500.0, help="list steps slower than this")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    engine = LLMEngine.from_config(EngineConfig(model=args.model, device=args.device, max_model_len=args.max_model_len,
                                                kv_memory_gb=args.kv_memory_gb))
    t0 = time.perf_counter()
    warm_up(engine)
    warm_up_s = time.perf_counter() - t0
    requests, _ = clip(read_trace(trace_path(args.trace)), args.max_prompt_len, args.max_output_len)
    steps, ttfts = replay(engine, scale_to_rate(requests[:args.num_requests], args.rate))
    summary = summarize(steps)
    print(f"{args.model} on {machine_name(engine.device)}, {args.trace} first {len(ttfts)} requests at "
          f"{args.rate:g} req/s; warm-up {warm_up_s:.1f} s")
    print(f"TTFT p50 {percentile(ttfts, 50) * 1e3:.0f} ms, p90 {percentile(ttfts, 90) * 1e3:.0f} ms, "
          f"max {max(ttfts) * 1e3:.0f} ms")
    print(f"{'step':>8} {'count':>6} {'median ms':>10} {'p90 ms':>8} {'max ms':>8}")
    for kind, row in summary.items():
        print(f"{kind:>8} {row['count']:>6} {row['median_s'] * 1e3:>10.1f} {row['p90_s'] * 1e3:>8.1f} "
              f"{row['max_s'] * 1e3:>8.1f}")
    slow = [s for s in steps if s["seconds"] * 1e3 > args.slow_ms]
    print(f"{len(slow)} steps over {args.slow_ms:g} ms")
    for s in slow:
        print(f"  at {s['t']:6.2f} s: {s['seconds'] * 1e3:7.1f} ms, {s['kind']}: {s['prompts']} prompts of "
              f"{s['prompt_tokens']} tokens, {s['decodes']} decodes")
    out = {"machine": machine_name(engine.device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "model": args.model, "trace": args.trace, "rate": args.rate, "warm_up_s": warm_up_s,
           "summary": summary, "ttft_s": ttfts, "steps": steps}
    write_json(args.json, out, indent=1)
    return out
