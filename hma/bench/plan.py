"""Cost planner: goodput and goodput per dollar of deployments we cannot rent, by simulation.

`python -m hma plan --model qwen3-8b --trace azure-conv --slo-ttft-ms 250 --slo-tpot-ms 100`
Step costs are rooflines scaled by efficiencies measured on a real GPU: a decode step takes
overhead + (weights + KV of every running token) / (bandwidth x efficiency); a prefill batch
takes overhead + FLOPs / (peak x efficiency), per precision; KV crosses each prefill card's
--link-gbps link batch after batch (pipelined or not: the simulator's model).
The efficiencies and overheads come from `python -m hma bench speed` on an H100 (--calibration
refits them from its JSON) and are assumed to carry over to the other cards: a hypothesis,
checked only where a measured run exists. Each deployment replays the same trace through the
simulator (hma/bench/simulate.py) at bisected rates; goodput is the highest rate with 90% of
requests within both SLOs (DistServe), and goodput per dollar divides it by the cards' price.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hma import random_weights
from hma.bench import write_json
from hma.bench.goodput import SLO, attainment, search_goodput
from hma.bench.hardware import ACCELERATORS, Accelerator
from hma.bench.simulate import Deployment, simulate
from hma.bench.speed import decoder_linear_params, prefill_flops
from hma.bench.traces import TraceRequest, clip, read_trace, scale_to_rate, trace_path
from hma.config import QWEN3_SHAPES, ModelConfig, qwen3_shape
from hma.errors import InvalidRequestError
from hma.kv_cache import kv_bytes_per_token
from hma.kv_formats import get_kv_format

MEMORY_USABLE = 0.9  # share of a card's memory for weights and KV (the rest: activations, graphs)


@dataclass(frozen=True, slots=True)
class Calibration:
    """(overhead seconds, efficiency) for decode steps per KV format and prefill per precision."""

    decode: dict[str, tuple[float, float]]
    prefill: dict[str, tuple[float, float]]
    # A colocated engine's own steps (calibrate_steps): (overhead, efficiency) of its bf16 prefill
    # steps, and the seconds a step that mixes prompts into running decodes takes beyond that.
    engine: tuple[float, float, float] | None = None


# Fitted by `calibrate` to the H100 run in the README (bench speed, 2026-11-23, qwen3-4b and -8b).
H100_CALIBRATION = Calibration(
    decode={"bf16": (1.86e-3, 0.799), "fp8": (0.0, 0.531), "int8": (0.0, 0.500), "int4": (0.0, 0.384)},
    prefill={"bf16": (20.2e-3, 0.602), "fp8": (44.3e-3, 0.471), "int8": (40.5e-3, 0.277)})


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept >= 0, slope) of a least-squares line through (x, seconds) points."""
    x, y = np.array(points).T
    slope, intercept = np.polyfit(x, y, 1)
    if intercept < 0:
        intercept, slope = 0.0, float(np.dot(x, y) / np.dot(x, x))
    return float(intercept), float(slope)


def merge_speed_runs(runs: list[dict]) -> dict:
    """One bench speed result from several: each (shape, point) from the last run that has it, so
    a short rerun of some points (say, prefill only) replaces those points of a full run."""
    shapes: dict[str, dict] = {}
    for run in runs:
        for shape in run["shapes"]:
            merged = shapes.setdefault(shape["shape"], {"shape": shape["shape"], "decode": {}, "prefill": {}})
            for r in shape["decode"]:
                merged["decode"][r["kv_dtype"], r["context_len"], r["batch_size"]] = r
            for r in shape["prefill"]:
                merged["prefill"][r["prefill_dtype"], r["prompt_len"]] = r
    return {"shapes": [{**s, "decode": list(s["decode"].values()), "prefill": list(s["prefill"].values())}
                       for s in shapes.values()],
            "num_layers": next((r["num_layers"] for r in runs if r.get("num_layers")), None)}


def calibrate(speed: dict, device: Accelerator) -> Calibration:
    """Overheads and efficiencies from a `bench speed` JSON measured on `device`."""
    if speed.get("num_layers"):
        raise InvalidRequestError("this bench speed run cut the layer count (--num-layers): its timings "
                                  "are not the named shapes'; calibrate from a full run")
    decode, prefill = {}, {}
    for kv in {r["kv_dtype"] for s in speed["shapes"] for r in s["decode"]}:
        points = [(r["weight_bytes"] + r["kv_bytes"], r["step_s"]) for s in speed["shapes"]
                  for r in s["decode"] if r["kv_dtype"] == kv and "step_s" in r]
        overhead, slope = _fit(points)
        decode[kv] = (overhead, 1 / (slope * device.bandwidth))
    for mode in {r["prefill_dtype"] for s in speed["shapes"] for r in s["prefill"]}:
        points = [(prefill_flops(qwen3_shape(s["shape"]), r["prompt_len"]), r["seconds"])
                  for s in speed["shapes"] for r in s["prefill"] if r["prefill_dtype"] == mode]
        overhead, slope = _fit(points)
        prefill[mode] = (overhead, 1 / (slope * device.peak(mode)))
    return Calibration(decode, prefill)


def calibrate_steps(cal: Calibration, runs: list[dict], device: Accelerator) -> Calibration:
    """cal plus the colocated engine's step costs, from `bench steps` JSONs of one random:SHAPE
    model measured on `device`: their prefill-only steps give prefill's overhead and efficiency,
    their mixed steps the median of what they take beyond that (they run eagerly, after reading
    the decode step launched before them). Runs that predate per-prompt lengths count a step's
    prompts as equal parts of its tokens."""
    models = {r["model"] for r in runs}
    if len(models) != 1:
        raise InvalidRequestError(f"step calibration takes runs of one model, got {sorted(models)}")
    config = random_weights.config_of(models.pop())
    steps = [s for r in runs for s in r["steps"]]

    def flops(step: dict) -> float:
        lens = step.get("prompt_lens") or [step["prompt_tokens"] // step["prompts"]] * step["prompts"]
        return sum(prefill_flops(config, n) for n in lens)

    only = [(flops(s), s["seconds"]) for s in steps if s["kind"] == "prefill"]
    if len(only) < 2:
        raise InvalidRequestError(f"the bench steps run has {len(only)} prefill-only steps; fitting needs two")
    overhead, slope = _fit(only)
    beyond = [s["seconds"] - overhead - slope * flops(s) for s in steps if s["kind"] == "mixed"]
    mixed = float(np.median(beyond)) if beyond else 0.0
    return Calibration(cal.decode, cal.prefill, (overhead, 1 / (slope * device.peak("bf16")), max(0.0, mixed)))


def num_params(config: ModelConfig) -> int:
    h = config.hidden_size
    norms = config.num_hidden_layers * 2 * h + h
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return decoder_linear_params(config) + norms + embeddings


@dataclass(frozen=True, slots=True)
class Plan:
    """One deployment to evaluate: cards, counts, precisions."""

    label: str
    decode: Accelerator
    num_decode: int
    prefill: Accelerator | None = None  # None: colocated replicas on the decode cards
    num_prefill: int = 0
    prefill_dtype: str = "bf16"
    kv_dtype: str = "bf16"  # on the wire, and in the decode cache unless decode_kv_dtype says otherwise
    pipeline: bool = True
    decode_kv_dtype: str | None = None  # the decode cache's, transcoded on arrival (None: kv_dtype)

    @property
    def dollars_per_hour(self) -> float | None:
        prices = [(self.decode, self.num_decode)] + ([(self.prefill, self.num_prefill)] if self.prefill else [])
        if any(card.dollars_per_hour is None for card, _ in prices):
            return None
        return sum(card.dollars_per_hour * n for card, n in prices)


def build(plan: Plan, model: ModelConfig, cal: Calibration, link_bytes_per_s: float) -> Deployment | str:
    """The simulator's Deployment for a plan, or why it cannot run (does not fit, no such unit)."""
    params = num_params(model)
    decode_kv = plan.decode_kv_dtype or plan.kv_dtype
    wire_per_token, kv_per_token = (kv_bytes_per_token(model, get_kv_format(kv)) for kv in (plan.kv_dtype, decode_kv))
    decode_weights = 2 * params  # decode keeps bf16 weights
    kv_room = plan.decode.memory_bytes * MEMORY_USABLE - decode_weights
    if kv_room <= 0:
        return f"bf16 weights ({decode_weights / 1e9:.0f} GB) do not fit a {plan.decode.name}"
    prefill_card = plan.prefill or plan.decode
    prefill_mode = plan.prefill_dtype if plan.prefill else "bf16"
    peak = prefill_card.peak(prefill_mode)
    if peak is None:
        return f"{prefill_card.name} has no {prefill_mode} rate to plan with"
    if plan.prefill and params * (1 if prefill_mode != "bf16" else 2) > plan.prefill.memory_bytes * MEMORY_USABLE:
        return f"{prefill_mode} weights do not fit a {plan.prefill.name}"
    if prefill_mode not in cal.prefill or decode_kv not in cal.decode:
        return f"the calibration has no {prefill_mode} prefill or no {decode_kv} KV decode"
    p_over, p_eff = cal.prefill[prefill_mode]
    mixed = 0.0
    if plan.prefill is None and cal.engine is not None:  # colocated: the engine's own step costs
        p_over, p_eff, mixed = cal.engine
    d_over, d_eff = cal.decode[decode_kv]
    weight_read = decode_weights - (0 if model.tie_word_embeddings else 2 * model.vocab_size * model.hidden_size)

    def prefill_s(lens: list[int]) -> float:
        return p_over + sum(prefill_flops(model, n) for n in lens) / (peak * p_eff)

    def decode_s(contexts: list[int]) -> float:
        return d_over + (weight_read + kv_per_token * sum(contexts)) / (plan.decode.bandwidth * d_eff)

    def transfer_s(prompt_len: int) -> float:
        return wire_per_token * prompt_len / link_bytes_per_s if plan.prefill else 0.0

    return Deployment(num_prefill=plan.num_prefill if plan.prefill else 0, num_decode=plan.num_decode,
                      prefill_s=prefill_s, decode_s=decode_s, transfer_s=transfer_s, mixed_s=mixed,
                      pipelined=plan.pipeline,
                      num_layers=model.num_hidden_layers, kv_capacity_tokens=int(kv_room // kv_per_token))


def simulated_goodput(requests: list[TraceRequest], deployment: Deployment, slo: SLO, low: float, high: float,
                      iterations: int, at_rate: Callable[[list[TraceRequest], float], list[TraceRequest]] = scale_to_rate,
                      ) -> tuple[float, list[tuple[float, float]]]:
    """Goodput, and every (rate, attainment) the search simulated. at_rate(requests, rate) is what
    one probe replays: by default every request, time-scaled to the rate."""
    async def attainment_at(rate: float) -> float:
        return attainment(simulate(at_rate(requests, rate), deployment), slo)

    return asyncio.run(search_goodput(attainment_at, low, high, iterations))


def default_plans() -> list[Plan]:
    """Homogeneous baselines, HMA on two H100s with each technique off in turn (as bench systems'
    ablations), and HMA pairs: GDDR prefill cards with an H100 decoding."""
    h100 = ACCELERATORS["H100"]
    plans = [Plan("H100 x2, colocated (bf16)", h100, 2),
             Plan("H100 + H100, disaggregated bf16, no pipeline", h100, 1, h100, 1, "bf16", "bf16", False),
             Plan("H100 + H100, HMA (fp8 prefill, fp8 KV, pipeline)", h100, 1, h100, 1, "fp8", "fp8"),
             Plan("H100 + H100, HMA without fp8 prefill (bf16 prefill)", h100, 1, h100, 1, "bf16", "fp8"),
             Plan("H100 + H100, HMA without fp8 KV (bf16 KV)", h100, 1, h100, 1, "fp8", "bf16"),
             Plan("H100 + H100, HMA without the pipeline", h100, 1, h100, 1, "fp8", "fp8", False),
             Plan("H100 + H100, HMA without deferred dequantization", h100, 1, h100, 1, "fp8", "fp8",
                  decode_kv_dtype="bf16")]
    for name in ("L40S", "RTX4090", "Blackhole", "A10", "L20"):
        card = ACCELERATORS[name]
        mode = "fp8" if card.fp8_flops else "int8"
        for n in (1, 2):
            plans.append(Plan(f"{name} x{n} + H100, HMA ({mode} prefill, fp8 KV, pipeline)", h100, 1, card, n,
                              mode, "fp8"))
    return plans


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m hma plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-8b", choices=sorted(QWEN3_SHAPES))
    parser.add_argument("--trace", default="azure-conv")
    parser.add_argument("--num-prompts", type=int, default=300)
    parser.add_argument("--max-prompt-len", type=int, default=32768)
    parser.add_argument("--max-output-len", type=int, default=2048)
    parser.add_argument("--slo-ttft-ms", type=float, default=250.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=100.0)
    parser.add_argument("--link-gbps", type=float, default=100.0, help="prefill -> decode link, Gbit/s")
    parser.add_argument("--calibration", type=Path, nargs="+", default=None,
                        help="bench speed JSONs measured on --calibration-card (later files' points replace "
                             "earlier ones')")
    parser.add_argument("--calibration-card", default="H100", choices=sorted(ACCELERATORS),
                        help="the GPU the calibration runs measured")
    parser.add_argument("--step-calibration", type=Path, nargs="+", default=None,
                        help="bench steps JSONs from --calibration-card: colocated plans take the engine's own "
                             "prefill and mixed-step costs from them")
    parser.add_argument("--8bit-as-fast-as-bf16", dest="fast_8bit", action="store_true",
                        help="what if: 8-bit prefill and KV reached bf16's measured efficiency and overhead")
    parser.add_argument("--search-rates", default="0.1,200")
    parser.add_argument("--search-iters", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    model = qwen3_shape(args.model)
    card = ACCELERATORS[args.calibration_card]
    cal = H100_CALIBRATION
    if args.calibration:
        cal = calibrate(merge_speed_runs([json.loads(p.read_text()) for p in args.calibration]), card)
    if args.step_calibration:
        cal = calibrate_steps(cal, [json.loads(p.read_text()) for p in args.step_calibration], card)
    if args.fast_8bit:
        cal = Calibration({kv: cal.decode["bf16"] for kv in cal.decode},
                          {mode: cal.prefill["bf16"] for mode in cal.prefill}, cal.engine)
    requests, num_clipped = clip(read_trace(trace_path(args.trace))[:args.num_prompts], args.max_prompt_len,
                                 args.max_output_len)
    slo = SLO(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    low, high = (float(x) for x in args.search_rates.split(","))
    rows = []
    print(f"{args.model}, {args.trace} ({len(requests)} requests, {num_clipped} clipped), SLO TTFT "
          f"{args.slo_ttft_ms:g} ms / TPOT {args.slo_tpot_ms:g} ms, link {args.link_gbps:g} Gbit/s")
    print(f"{'deployment':<58} {'$/h':>6} {'goodput req/s':>13} {'req per $':>10}")
    for plan in default_plans():
        deployment = build(plan, model, cal, args.link_gbps * 1e9 / 8)
        row = {"deployment": plan.label, "dollars_per_hour": plan.dollars_per_hour}
        if isinstance(deployment, str):
            rows.append({**row, "skipped": deployment})
            print(f"{plan.label:<58}  skipped: {deployment}")
            continue
        goodput, tried = simulated_goodput(requests, deployment, slo, low, high, args.search_iters)
        per_dollar = goodput * 3600 / plan.dollars_per_hour if plan.dollars_per_hour else None
        rows.append({**row, "goodput": goodput, "requests_per_dollar": per_dollar,
                     "tried": [{"rate": r, "slo_attainment": a} for r, a in tried]})
        price = f"{plan.dollars_per_hour:>6.2f}" if plan.dollars_per_hour else f"{'n/a':>6}"
        dollars = f"{per_dollar:>10,.0f}" if per_dollar is not None else f"{'n/a':>10}"
        print(f"{plan.label:<58} {price} {goodput:>13.2f} {dollars}")
    result = {"model": args.model, "trace": args.trace, "num_prompts": len(requests), "num_clipped": num_clipped,
              "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms}, "link_gbps": args.link_gbps,
              "calibration": {"decode": cal.decode, "prefill": cal.prefill, "engine": cal.engine,
                              "files": [str(p) for p in (args.calibration or []) + (args.step_calibration or [])],
                              "card": args.calibration_card},
              "fast_8bit": args.fast_8bit,
              "date": time.strftime("%Y-%m-%d"),
              "rows": rows}
    write_json(args.json, result)
    return result
