"""Two-GPU runs: each serving system on the same two GPUs, measured by goodput searches on traces.

`python -m hma bench systems --model random:qwen3-4b --traces azure-conv,azure-code --json out.json`
Every host is its own process (hma.launch.LocalCluster), KV crosses loopback TCP, and the
router's OpenAI API is what the load generator (bench serve's replay) drives:
  colocated    (a) two replicas, one per GPU, each prefilling and decoding its own requests
  colocated-1  (a1) one such replica on one GPU (a check of the planner where only one GPU is lent)
  disagg-bf16  (b) prefill host on GPU 0, decode host on GPU 1: bf16 prefill, bf16 KV, no pipeline
  hma          (c) the same two hosts: fp8 prefill, fp8 KV, per-layer pipeline, deferred dequantization
and (c) with one technique off in turn, run only when named (`--systems ablations` names them all):
  hma-bf16-prefill        (c-1) bf16 prefill
  hma-bf16-kv             (c-2) bf16 KV, on the wire and in the decode cache
  hma-no-pipeline         (c-3) --no-pipeline: a layer's KV leaves only once the whole prefill is done
  hma-dequant-on-arrival  (c-4) fp8 KV on the wire, transcoded into a bf16 decode cache as it lands
Per system and trace, goodput (DistServe: the highest rate at which 90% of requests meet both
SLOs) is searched from the cost planner's prediction for that deployment (whose prefill -> decode
link is the loopback transport, measured first as `bench link` does): the rate doubles or halves
until attainment crosses 90%, then the last step is bisected --refine times. A probe at rate r
replays the trace's first max(--min-requests, r x --window-s) requests, time-scaled to r, and
stops once its verdict is decided (over 10% missed, or 90% met). The JSON keeps every probe and
the planner's prediction beside the measurement (their ratio is the planner's error).
`--table a.json b.json` prints the README's markdown table from saved runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from hma import random_weights
from hma.bench import write_json
from hma.bench.goodput import TARGET_ATTAINMENT, SLO, attainment, search_goodput_from, summarize
from hma.bench.hardware import ACCELERATORS
from hma.bench.link import measure as measure_link
from hma.bench.plan import (H100_CALIBRATION, Calibration, Plan, build, calibrate, calibrate_steps, merge_speed_runs,
                            simulated_goodput)
from hma.bench.serve import replay
from hma.bench.traces import TraceRequest, clip, read_trace, scale_to_rate, trace_path
from hma.launch import LocalCluster, post_json, process_name

# DistServe's chatbot SLO for the conversation trace; the code trace's prompts are 2k tokens on
# average (7k at p99), too long for DistServe's 125 ms code-completion TTFT, so its TTFT limit is
# the chatbot one scaled by the mean prompt length ratio (about 2x), and its TPOT is DistServe's code one.
DEFAULT_SLOS = {"azure-conv": SLO(0.25, 0.1), "azure-code": SLO(0.5, 0.2), "mooncake": SLO(15.0, 0.15)}
IDLE_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class System:
    label: str
    colocated: bool
    prefill_flags: tuple[str, ...] = ()
    kv_dtype: str = "bf16"
    decode_kv_dtype: str | None = None  # the decode host's cache, if not kv_dtype (it transcodes on arrival)
    replicas: int = 2  # colocated only

    @property
    def num_gpus(self) -> int:
        return self.replicas if self.colocated else 2

    def cluster(self, model: str, common: list[str]) -> LocalCluster:
        kv = ["--kv-dtype", self.kv_dtype]
        decode_kv = ["--kv-dtype", self.decode_kv_dtype or self.kv_dtype]
        if self.colocated:
            gpus = {process_name("decode", i): str(i) for i in range(self.replicas)}
            return LocalCluster(model=model, colocated=True, num_decode=self.replicas, decode_flags=[*common, *kv],
                                gpus=gpus)
        return LocalCluster(model=model, prefill_flags=[*common, *kv, *self.prefill_flags],
                            decode_flags=[*common, *decode_kv], gpus={"prefill": "0", "decode": "1"})

    def plan(self, card: str) -> Plan:
        gpu = ACCELERATORS[card]
        if self.colocated:
            return Plan(self.label, gpu, self.replicas)
        pipeline = "--no-pipeline" not in self.prefill_flags
        mode = self.prefill_flags[self.prefill_flags.index("--prefill-dtype") + 1]
        return Plan(self.label, gpu, 1, gpu, 1, mode, self.kv_dtype, pipeline, decode_kv_dtype=self.decode_kv_dtype)


SYSTEMS = {
    "colocated": System("(a) colocated replicas, bf16", colocated=True),
    "colocated-1": System("(a1) one colocated replica, bf16, one GPU", colocated=True, replicas=1),
    "disagg-bf16": System("(b) disaggregated, bf16 prefill + KV, no pipeline", False,
                          ("--prefill-dtype", "bf16", "--no-pipeline")),
    "hma": System("(c) HMA: fp8 prefill, fp8 KV, pipeline", False, ("--prefill-dtype", "fp8"), "fp8"),
    "hma-bf16-prefill": System("(c-1) HMA without fp8 prefill (bf16 prefill)", False, ("--prefill-dtype", "bf16"),
                               "fp8"),
    "hma-bf16-kv": System("(c-2) HMA without fp8 KV (bf16 KV)", False, ("--prefill-dtype", "fp8"), "bf16"),
    "hma-no-pipeline": System("(c-3) HMA without the pipeline (--no-pipeline)", False,
                              ("--prefill-dtype", "fp8", "--no-pipeline"), "fp8"),
    "hma-dequant-on-arrival": System("(c-4) HMA without deferred dequantization (bf16 decode cache)", False,
                                     ("--prefill-dtype", "fp8"), "fp8", "bf16"),
}
# Each is one more goodput search as long as (c)'s, so they run only when named.
ABLATIONS = ("hma-bf16-prefill", "hma-bf16-kv", "hma-no-pipeline", "hma-dequant-on-arrival")


def system_names(spec: str) -> list[str]:
    """--systems' comma-separated names in order, "ablations" standing for every ablation."""
    return [name for part in spec.split(",") for name in (ABLATIONS if part == "ablations" else (part,))]


def probe_requests(requests: list[TraceRequest], rate: float, window_s: float, min_requests: int) -> list[TraceRequest]:
    """The trace's first requests, enough to span window_s at `rate`, time-scaled to it."""
    n = min(len(requests), max(min_requests, math.ceil(rate * window_s)))
    return scale_to_rate(requests[:n], rate)


async def wait_idle(url: str, timeout: float = IDLE_TIMEOUT_S) -> bool:
    """Waits until no host has a request running or waiting (the last probe's stragglers gone)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(url + "/metrics") as response:
                text = await response.text()
            busy = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith(("hma:num_requests_running", "hma:num_requests_waiting")))
            if busy == 0:
                return True
            await asyncio.sleep(0.5)
    return False


async def measure(url: str, model: str, requests: list[TraceRequest], slo: SLO, start: float,
                  args: argparse.Namespace, out_of_time: float) -> dict:
    """One goodput search; every probe's rate, size, attainment and latency medians."""
    probes = []

    async def attainment_at(rate: float) -> float:
        if time.monotonic() > out_of_time:
            raise TimeoutError("the run's --time-budget-s is spent")
        idle = await wait_idle(url)
        batch = probe_requests(requests, rate, args.window_s, args.min_requests)
        records, duration = await replay(url + "/v1/completions", model, batch, args.seed, progress=False,
                                         give_up=slo)
        value = attainment(records, slo)
        summary = summarize(records, duration, slo)
        probes.append({"rate": rate, "num_requests": len(batch), "slo_attainment": value, "idle_before": idle,
                       "stopped_early": any(r.error.startswith("cancelled") for r in records),
                       "errors": sorted({r.error for r in records if r.error and "cancelled" not in r.error})[:3],
                       **{k: summary[k] for k in ("duration", "completed", "median_ttft_ms", "p90_ttft_ms",
                                                  "median_tpot_ms", "p90_tpot_ms")}})
        print(f"  rate {rate:7.3f} req/s, {len(batch):4d} requests: attainment {value:6.1%}  "
              f"TTFT p90 {summary['p90_ttft_ms']:8.1f} ms  TPOT p90 {summary['p90_tpot_ms']:6.1f} ms", flush=True)
        return value

    try:
        goodput, _ = await search_goodput_from(attainment_at, start, args.min_rate, args.max_rate, args.refine)
    except TimeoutError as exc:  # cut short: what the probes so far prove
        passed = [p["rate"] for p in probes if p["slo_attainment"] >= TARGET_ATTAINMENT]
        return {"goodput": None, "goodput_at_least": max(passed, default=None), "incomplete": str(exc),
                "probes": probes}
    return {"goodput": goodput, "probes": probes}


def predicted(system: System, model: str, requests: list[TraceRequest], slo: SLO, card: str, link_gbps: float,
              calibration: Calibration = H100_CALIBRATION, window_s: float = 12.0,
              min_requests: int = 20) -> float | None:
    """The cost planner's goodput for this deployment (random:SHAPE models only), asked the
    measurement's question: each simulated probe replays the requests a real probe at that rate
    would (the trace's first max(min_requests, rate x window_s)), not the whole trace, where
    queues would build for longer."""
    shape = random_weights.shape_of(model)
    if shape is None:
        return None
    deployment = build(system.plan(card), random_weights.config_of(model), calibration, link_gbps * 1e9 / 8)
    if isinstance(deployment, str):
        return None

    def probe(reqs: list[TraceRequest], rate: float) -> list[TraceRequest]:
        return probe_requests(reqs, rate, window_s, min_requests)

    return simulated_goodput(requests, deployment, slo, 0.05, 400.0, 12, probe)[0]


def run_system(name: str, args: argparse.Namespace, result: dict, out_of_time: float,
               calibration: Calibration = H100_CALIBRATION) -> None:
    system = SYSTEMS[name]
    common = ["--max-model-len", str(args.max_model_len), *args.host_flags.split()]
    t0 = time.monotonic()
    with system.cluster(args.model, common) as cluster:
        entry = {"system": name, "label": system.label, "startup_s": time.monotonic() - t0, "traces": []}
        result["systems"].append(entry)
        print(f"{system.label}: up in {entry['startup_s']:.0f} s", flush=True)
        for trace in args.traces.split(","):
            requests, num_clipped = clip(read_trace(trace_path(trace))[:args.num_prompts], args.max_prompt_len,
                                         args.max_output_len)
            slo = SLO(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3) if args.slo_ttft_ms else DEFAULT_SLOS[trace]
            guess = predicted(system, args.model, requests, slo, args.card, args.link_gbps, calibration,
                              args.window_s, args.min_requests)
            print(f" {trace} (SLO TTFT {slo.ttft_s * 1e3:g} ms, TPOT {slo.tpot_s * 1e3:g} ms), planner: "
                  f"{guess if guess is None else round(guess, 2)} req/s", flush=True)
            found = asyncio.run(measure(cluster.url, args.model, requests, slo, guess or args.start_rate,
                                        args, out_of_time))
            entry["traces"].append({"trace": trace, "slo": {"ttft_ms": slo.ttft_s * 1e3, "tpot_ms": slo.tpot_s * 1e3},
                                    "num_clipped": num_clipped, "predicted_goodput": guess, **found})
            write_json(args.json, result)
        if args.timeline and not system.colocated:
            entry["timeline"] = one_timeline(cluster.url, args.model, args.timeline)
            write_json(args.json, result)


def one_timeline(url: str, model: str, prompt_len: int) -> dict:
    """The per-layer timeline of one request with a prompt_len-token prompt, on an idle system."""
    asyncio.run(wait_idle(url))
    prompt = list(range(1000, 1000 + prompt_len))
    status, body = post_json(url + "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 8,
                                                       "ignore_eos": True})
    if status != 200:
        return {"error": body}
    with urllib.request.urlopen(f"{url}/debug/timeline/{body['id']}") as response:
        return json.loads(response.read())


def machine() -> str:
    if shutil.which("nvidia-smi"):
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True).stdout.split("\n")
        return " + ".join(n.strip() for n in names if n.strip())
    return "cpu"


def table(results: list[dict], calibration: Calibration | None = None) -> str:
    """Markdown: goodput per system and trace, the planner's prediction (made again with
    `calibration` when given, else the one the run recorded), and (c)'s ratios to the baselines
    and to its ablations (what the technique each turns off is worth)."""
    lines = ["| model | trace (SLO TTFT / TPOT) | system | goodput req/s | per GPU | planner | planner error |",
             "|---|---|---|---:|---:|---:|---:|"]
    ratios = []
    for result in results:
        found = {(s["system"], t["trace"]): t for s in result["systems"] for t in s["traces"]}
        for (name, trace), t in found.items():
            g = t["goodput"]
            p = t["predicted_goodput"] if calibration is None else repredict(result, name, t, calibration)
            error = f"{(p - g) / g:+.0%}" if g and p is not None else "n/a"
            shown = _shown(g, t)
            per_gpu = _num(g / SYSTEMS[name].num_gpus) if g is not None else "n/a"
            lines.append(f"| {result['model']} | {trace} ({t['slo']['ttft_ms']:g} / {t['slo']['tpot_ms']:g} ms) | "
                         f"{SYSTEMS[name].label} | {shown} | {per_gpu} | {_num(p)} | {error} |")
        for trace in dict.fromkeys(t for _, t in found):
            c = found.get(("hma", trace), {}).get("goodput")
            for base in ("colocated", "disagg-bf16", *ABLATIONS):
                b = found.get((base, trace), {}).get("goodput")
                if c is not None and b:
                    tag = SYSTEMS[base].label.split()[0]
                    ratios.append(f"{result['model']}, {trace}: (c) / {tag} = {c / b:.2f}x")
    return "\n".join(lines + [""] + ratios)


def repredict(result: dict, system: str, trace: dict, calibration: Calibration) -> float | None:
    """The planner's goodput for a saved run's system and trace, from other step costs."""
    requests, _ = clip(read_trace(trace_path(trace["trace"]))[:result.get("num_prompts", 1000)],
                       result["max_prompt_len"], result["max_output_len"])
    slo = SLO(trace["slo"]["ttft_ms"] / 1e3, trace["slo"]["tpot_ms"] / 1e3)
    return predicted(SYSTEMS[system], result["model"], requests, slo, result["card"], result["link_gbps"],
                     calibration, result["window_s"], result.get("min_requests", 20))


def _shown(goodput: float | None, trace: dict) -> str:
    """The goodput with the bracket the probes prove: passed at it, failed at the next rate up."""
    rates = [p["rate"] for p in trace["probes"]]
    failed = [p["rate"] for p in trace["probes"] if p["slo_attainment"] < TARGET_ATTAINMENT]
    if goodput is None:
        return f">= {trace['goodput_at_least']:.2f} (cut short)" if trace.get("goodput_at_least") else "not run"
    if goodput == 0:
        return f"< {min(rates):.2f}"
    above = [r for r in failed if r > goodput]
    return f"{goodput:.2f} (fails at {min(above):.2f})" if above else f">= {goodput:.2f}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m hma bench systems", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:qwen3-4b")
    systems = [n for n in SYSTEMS if n not in ABLATIONS]
    parser.add_argument("--systems", default=",".join(systems),
                        help=f"comma-separated, some of: {', '.join(systems)} (the default: all of these); "
                             f"(c)'s ablations, run only when named: {', '.join(ABLATIONS)} ('ablations' "
                             f"names every one)")
    parser.add_argument("--traces", default="azure-conv,azure-code")
    parser.add_argument("--num-prompts", type=int, default=1000, help="the trace's first requests to draw from")
    parser.add_argument("--max-prompt-len", type=int, default=8192)
    parser.add_argument("--max-output-len", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=8192 + 512)
    parser.add_argument("--host-flags", default="", help="more flags for every host, e.g. '--device cpu'")
    parser.add_argument("--slo-ttft-ms", type=float, default=None, help="one SLO for every trace instead of "
                                                                         "the defaults (with --slo-tpot-ms)")
    parser.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument("--window-s", type=float, default=12.0, help="a probe's arrivals span about this long")
    parser.add_argument("--min-requests", type=int, default=20)
    parser.add_argument("--start-rate", type=float, default=1.0, help="where the search starts without a planner guess")
    parser.add_argument("--min-rate", type=float, default=0.25, help="below this, goodput is reported as 0")
    parser.add_argument("--max-rate", type=float, default=200.0)
    parser.add_argument("--refine", type=int, default=2, help="bisections after the crossing is bracketed")
    parser.add_argument("--card", default="H200", choices=sorted(ACCELERATORS), help="the GPUs, for the planner")
    parser.add_argument("--link-gbps", type=float, default=None,
                        help="the planner's prefill -> decode link (default: measured, bench link)")
    parser.add_argument("--timeline", type=int, default=4096, help="prompt tokens of one timed request per "
                                                                    "disaggregated system (0: none)")
    parser.add_argument("--time-budget-s", type=float, default=1e9, help="stop searching after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--table", type=Path, nargs="*", default=None, help="print the table of saved runs")
    parser.add_argument("--calibration", type=Path, nargs="+", default=None,
                        help="predict with step costs fitted to these bench speed JSONs (measured on --card's "
                             "kind of GPU; with --table: predict saved runs again)")
    parser.add_argument("--step-calibration", type=Path, nargs="+", default=None,
                        help="bench steps JSONs (same GPU kind and model): colocated replicas get the engine's "
                             "own prefill and mixed-step costs from them")
    args = parser.parse_args(argv)
    if bool(args.slo_ttft_ms) != bool(args.slo_tpot_ms):
        parser.error("give both --slo-ttft-ms and --slo-tpot-ms, or neither")
    names = system_names(args.systems)
    if unknown := [n for n in names if n not in SYSTEMS]:  # before hours of other systems' runs
        parser.error(f"no system {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}, ablations")
    calibration = None
    if args.calibration:
        merged = merge_speed_runs([json.loads(p.read_text()) for p in args.calibration])
        calibration = calibrate(merged, ACCELERATORS[args.card])  # refuses cut-layer runs
    if args.step_calibration:
        calibration = calibrate_steps(calibration or H100_CALIBRATION,
                                      [json.loads(p.read_text()) for p in args.step_calibration], ACCELERATORS[args.card])
    if args.table is not None:
        print(table([json.loads(p.read_text()) for p in args.table], calibration))
        return None
    out_of_time = time.monotonic() + args.time_budget_s
    link = measure_link([1024])[0]
    print(f"loopback KV link through hma's transport: {link['gbytes_per_s']:.2f} GB/s (1024 tokens of fp8 KV)")
    args.link_gbps = args.link_gbps or 8 * link["gbytes_per_s"]
    result = {"model": args.model, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "card": args.card, "link": link, "link_gbps": args.link_gbps, "window_s": args.window_s,
              "min_requests": args.min_requests,
              "calibration": [str(p) for p in args.calibration or []],
              "step_calibration": [str(p) for p in args.step_calibration or []],
              "num_prompts": args.num_prompts,
              "max_prompt_len": args.max_prompt_len, "max_output_len": args.max_output_len, "systems": []}
    for name in names:
        if time.monotonic() > out_of_time:
            break
        run_system(name, args, result, out_of_time, calibration or H100_CALIBRATION)
    print(table([result]))
    return result
