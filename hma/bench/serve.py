"""Load generator: replays a trace (or Poisson arrivals) against any OpenAI-compatible server.

`python -m hma bench serve --base-url http://127.0.0.1:8000 --trace azure-conv --num-prompts 200
 --request-rate 2 --slo-ttft-ms 2000 --slo-tpot-ms 100 --json serve.json`
Each request is a streaming /v1/completions call whose prompt is a list of token ids of the
trace's prompt length (or, with --prompts text, real WikiText-2 text of about that length), with
max_tokens = the trace's output length and ignore_eos, sent at its (rate-scaled) arrival time.
Per request it records when each chunk arrived and the server's token counts, then reports vLLM
`bench serve`'s metrics, SLO attainment and request goodput (hma/bench/goodput.py).
--goodput-search replays the same requests at several rates and reports
the highest one at which 90% of requests meet both SLOs (DistServe's goodput), per GPU and per
dollar when --num-gpus and --dollars-per-hour are given; each of its runs stops as soon as its
verdict (above or below 90%) is decided.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import aiohttp
from tqdm import tqdm

from hma.bench import write_json
from hma.bench.goodput import TARGET_ATTAINMENT, SLO, RequestRecord, search_goodput, summarize
from hma.bench.traces import (TRACE_DIR, TraceRequest, clip, poisson_arrivals, read_trace, scale_to_rate,
                              trace_path)

TOKEN_ID_RANGE = (1000, 20000)  # ordinary tokens in every vocabulary this project serves
REQUEST_TIMEOUT_S = 600.0
EVAL_TEXT = TRACE_DIR.parent / "eval" / "wikitext2_raw_test.txt"
WORDS_PER_TOKEN = 0.75  # English text under BPE vocabularies: about four tokens per three words


def prompt_ids(length: int, rng: random.Random) -> list[int]:
    return [rng.randrange(*TOKEN_ID_RANGE) for _ in range(length)]


def prompt_text(length: int, words: list[str], rng: random.Random) -> str:
    """A run of real text of about `length` tokens (the server's count is what gets recorded)."""
    num_words = max(1, round(length * WORDS_PER_TOKEN))
    start = rng.randrange(max(1, len(words) - num_words))
    return " ".join(words[start:start + num_words])


async def send(session: aiohttp.ClientSession, url: str, model: str, request: TraceRequest,
               prompt: list[int] | str, record: RequestRecord) -> None:
    """One streaming completion into `record`; every failure ends up in its error, never raised."""
    body = {"model": model, "prompt": prompt, "max_tokens": request.output_len, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    record.sent = time.perf_counter()
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                record.error = f"HTTP {response.status}: {(await response.text())[:200]}"
            else:
                async for raw in response.content:
                    _read_event(raw.decode().strip(), record)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, AttributeError, TypeError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"  # a broken stream (bad JSON, odd shapes) too
    if not record.error and record.output_len != request.output_len:
        record.error = f"asked for {request.output_len} tokens, got {record.output_len}"
    record.finished = True


def _read_event(line: str, record: RequestRecord) -> None:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return
    event = json.loads(line.removeprefix("data: "))
    if "error" in event:
        error = event["error"]
        record.error = error.get("message", "error event") if isinstance(error, dict) else str(error)
    elif event.get("usage"):
        record.output_len = event["usage"]["completion_tokens"]
        record.prompt_len = event["usage"].get("prompt_tokens", record.prompt_len)
    elif event.get("choices"):  # every chunk counts, text or not, as vLLM's bench serve counts them
        record.chunk_times.append(time.perf_counter())


async def replay(url: str, model: str, requests: list[TraceRequest], seed: int = 0, progress: bool = True,
                 text: bool = False, give_up: SLO | None = None) -> tuple[list[RequestRecord], float]:
    """Sends every request at its arrival time (prompts of token ids, or real text); returns the
    records and the run's duration. With `give_up`, the run stops as soon as its outcome against
    the goodput target is decided: more requests missed that SLO than the target allows, or enough
    met it. What is left is cancelled and counts as missed, so a decided pass reports a lower
    bound of its attainment (a search needs only the verdict, and saves the rest of the run)."""
    rng = random.Random(seed)
    if text:
        words = EVAL_TEXT.read_text().split()
        prompts = [prompt_text(r.prompt_len, words, rng) for r in requests]
    else:
        prompts = [prompt_ids(r.prompt_len, rng) for r in requests]
    records = [RequestRecord(prompt_len=r.prompt_len) for r in requests]  # text: the server's count replaces it
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0)  # no client-side cap on concurrent requests
    with tqdm(total=len(requests), desc="requests", disable=not progress) as bar:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            start = time.perf_counter()

            async def one(request: TraceRequest, prompt: list[int] | str, record: RequestRecord) -> None:
                await asyncio.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
                await send(session, url, model, request, prompt, record)
                bar.update(1)

            tasks = [asyncio.create_task(one(*job)) for job in zip(requests, prompts, records)]
            await _until_done_or_decided(tasks, records, give_up)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    for record in records:
        if not record.finished:
            record.error, record.finished = "cancelled: the run had already missed its SLO target", True
    return records, time.perf_counter() - start


async def _until_done_or_decided(tasks: list[asyncio.Task], records: list[RequestRecord],
                                 give_up: SLO | None, every_s: float = 0.25) -> None:
    allowed, needed = (1 - TARGET_ATTAINMENT) * len(records), TARGET_ATTAINMENT * len(records)
    pending = set(tasks)
    while pending:
        _, pending = await asyncio.wait(pending, timeout=every_s if give_up else None)
        now = time.perf_counter()
        if give_up and (sum(give_up.missed(r, now) for r in records) > allowed
                        or sum(r.finished and give_up.attained(r) for r in records) >= needed):
            return


def load_requests(args: argparse.Namespace) -> tuple[list[TraceRequest], int]:
    """The trace's first --num-prompts requests, clipped to the length limits; (requests, clipped)."""
    requests = read_trace(trace_path(args.trace))[:args.num_prompts]
    if args.prompt_len or args.output_len:
        requests = [TraceRequest(r.arrival_s, args.prompt_len or r.prompt_len, args.output_len or r.output_len)
                    for r in requests]
    return clip(requests, args.max_prompt_len, args.max_output_len)


def at_rate(requests: list[TraceRequest], rate: float | None, arrivals: str, seed: int) -> list[TraceRequest]:
    """The requests' arrivals at `rate` (None: as recorded): the trace's own gaps scaled, or Poisson."""
    if rate is None:
        return requests
    return poisson_arrivals(requests, rate, seed) if arrivals == "poisson" else scale_to_rate(requests, rate)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m hma bench serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="the served model name (default: the server's first)")
    parser.add_argument("--trace", default="azure-conv", help="azure-code | azure-conv | mooncake | a file")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--request-rate", type=float, default=None, help="requests/s (default: the trace's own)")
    parser.add_argument("--arrivals", choices=["trace", "poisson"], default="trace",
                        help="scale the trace's own gaps, or draw Poisson gaps at the rate")
    parser.add_argument("--prompt-len", type=int, default=None, help="every prompt this long instead")
    parser.add_argument("--output-len", type=int, default=None, help="every output this long instead")
    parser.add_argument("--max-prompt-len", type=int, default=None, help="clip longer prompts (say so)")
    parser.add_argument("--max-output-len", type=int, default=None, help="clip longer outputs")
    parser.add_argument("--prompts", choices=["token-ids", "text"], default="token-ids",
                        help="token ids of the exact lengths, or real text (WikiText-2 from ../shared/eval) "
                             "of about those lengths, counted by the server")
    parser.add_argument("--slo-ttft-ms", type=float, default=None)
    parser.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument("--goodput-search", action="store_true", help="find the highest rate keeping 90%% attainment")
    parser.add_argument("--search-rates", default="0.1,8", help="low,high request rates the search brackets")
    parser.add_argument("--search-iters", type=int, default=5)
    parser.add_argument("--num-gpus", type=int, default=None, help="GPUs serving, for goodput per GPU")
    parser.add_argument("--dollars-per-hour", type=float, default=None, help="their price, for goodput per dollar")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    slo = SLO(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3) if args.slo_ttft_ms and args.slo_tpot_ms else None
    if args.goodput_search and slo is None:
        parser.error("--goodput-search needs --slo-ttft-ms and --slo-tpot-ms")
    return asyncio.run(_run(args, slo))


async def _run(args: argparse.Namespace, slo: SLO | None) -> dict:
    model = args.model or await _first_model(args.base_url)
    url = args.base_url.rstrip("/") + "/v1/completions"
    requests, num_clipped = load_requests(args)
    result = {"base_url": args.base_url, "model": model, "trace": args.trace, "num_prompts": len(requests),
              "prompts": args.prompts,
              "num_clipped": num_clipped, "arrivals": args.arrivals, "request_rate": args.request_rate,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms} if slo else None}
    records, duration = await replay(url, model, at_rate(requests, args.request_rate, args.arrivals, args.seed),
                                     args.seed, text=args.prompts == "text")
    result |= summarize(records, duration, slo)
    result["errors"] = sorted({r.error for r in records if r.error})[:10]
    if args.goodput_search:
        result["goodput_search"] = await _search(args, slo, url, model, requests)
    _print(result)
    write_json(args.json, result)
    return result


async def _search(args: argparse.Namespace, slo: SLO, url: str, model: str,
                  requests: list[TraceRequest]) -> dict:
    async def attainment_at(rate: float) -> float:
        records, duration = await replay(url, model, at_rate(requests, rate, args.arrivals, args.seed),
                                         args.seed, progress=False, text=args.prompts == "text", give_up=slo)
        value = summarize(records, duration, slo)["slo_attainment"]
        print(f"rate {rate:.3f} req/s: SLO attainment {value:.1%}")
        return value

    low, high = (float(x) for x in args.search_rates.split(","))
    goodput, tried = await search_goodput(attainment_at, low, high, args.search_iters)
    found = {"goodput": goodput, "tried": [{"rate": r, "slo_attainment": a} for r, a in tried]}
    if args.num_gpus:
        found["goodput_per_gpu"] = goodput / args.num_gpus
    if args.dollars_per_hour:
        found["goodput_per_dollar"] = goodput * 3600 / args.dollars_per_hour  # requests per dollar
    return found


async def _first_model(base_url: str) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(base_url.rstrip("/") + "/v1/models") as response:
            return (await response.json())["data"][0]["id"]


def _print(result: dict) -> None:
    print(f"{'Successful requests:':<40}{result['completed']:>12}")
    print(f"{'Failed requests:':<40}{result['failed']:>12}")
    print(f"{'Benchmark duration (s):':<40}{result['duration']:>12.2f}")
    print(f"{'Request throughput (req/s):':<40}{result['request_throughput']:>12.2f}")
    print(f"{'Output token throughput (tok/s):':<40}{result['output_throughput']:>12.2f}")
    for name in ("ttft", "tpot", "itl", "e2el"):
        print(f"{name.upper() + ' mean / median / p99 (ms):':<40}{result[f'mean_{name}_ms']:>12.2f}"
              f"{result[f'median_{name}_ms']:>10.2f}{result[f'p99_{name}_ms']:>10.2f}")
    if "slo_attainment" in result:
        print(f"{'SLO attainment:':<40}{result['slo_attainment']:>12.1%}")
        print(f"{'Request goodput (req/s):':<40}{result['request_goodput']:>12.2f}")
    if "goodput_search" in result:
        print(f"{'Goodput (req/s at >= 90% attainment):':<40}{result['goodput_search']['goodput']:>12.3f}")
    if result["num_clipped"]:
        print(f"{result['num_clipped']} requests had their lengths clipped to the limits given")
