"""The chaos run: `python -m hma chaos` (300 requests by default).

Two prefill hosts, two decode hosts and the router run as processes on loopback with the demo model
(int8 KV), each prefill host behind a fault-injecting proxy (hma/faults.py), so every KV stream and
the router's link to the prefill hosts cross it. Greedy requests are driven through the router at a
fixed concurrency while a schedule, paced by the requests done, corrupts, truncates, slows and
stalls the proxied streams, SIGKILLs hosts with requests in flight, SIGTERMs others (they drain and
exit) and starts them again, and SIGSTOPs some for STOP_S (they miss their heartbeats). The report:
requests sent; completed with the single-process engine's greedy output (or with another one: must
be 0); failed with a clear error (an HTTP error body or an SSE error event, by message); hung (no
answer within --request-timeout-s: must be 0); hosts not back in the router's rotation and KV
blocks in use on each host once the cluster is idle (hma:kv_cache_used_blocks from the router's
/metrics), both must be 0; router restarts (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import aiohttp

from hma.faults import ProxyThread
from hma.launch import LocalCluster

CORRECT, OTHER = "completed, correct greedy output", "completed, other output (must be 0)"
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "The largest planet in our solar system is",
           "A haiku about the sea:", "def add(a, b):", "The opposite of hot is", "Monday, Tuesday,",
           "The chemical symbol for gold is"]
KV_FLAGS = ["--kv-dtype", "int8", "--kv-memory-gb", "0.05"]
NUM_HOSTS = 4
STOP_S = 8.0  # a SIGSTOPped host misses its heartbeats: the router takes it out of the rotation
# (share of requests done, action, argument): corrupt/truncate/stall the next chunk through proxy i
# (None: every proxy), slow it until "pass", SIGKILL a host and start it again, SIGTERM one (it
# drains) and start it again once it has exited, or SIGSTOP one for STOP_S
SCHEDULE = [(0.05, "corrupt", 0), (0.10, "corrupt", 1), (0.15, "truncate", 1), (0.20, "kill", "prefill-1"),
            (0.28, "slow", 0), (0.33, "term", "decode"), (0.36, "pass", None), (0.40, "stall", 0),
            (0.48, "kill", "decode-1"), (0.52, "term", "prefill-1"), (0.55, "truncate", 0),
            (0.60, "stop", "decode-1"), (0.62, "corrupt", None), (0.68, "kill", "prefill"), (0.75, "stall", 1),
            (0.78, "stop", "prefill-1"), (0.82, "corrupt", None), (0.88, "kill", "decode")]


def reference_outputs(max_tokens: int) -> dict[str, str]:
    """Each prompt's greedy completion from one process with the same precision and KV format."""
    from hma.engine import LLM
    from hma.sampling import SamplingParams

    llm = LLM(kv_dtype="int8", kv_memory_gb=0.05)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return {prompt: out.outputs[0].text for prompt, out in zip(PROMPTS, outs)}


async def one_request(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int,
                      timeout_s: float) -> tuple[str, str]:
    """("ok", text), ("error", message) or ("hung", ""); a stream cut off before [DONE] is an error."""
    body = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    text, done = [], False
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url + "/v1/completions", json=body) as response:
                if response.status != 200:
                    return "error", f"HTTP {response.status}: {(await response.json())['error']['message']}"
                async for raw in response.content:
                    line = raw.decode().strip()
                    done = done or line == "data: [DONE]"
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line.removeprefix("data: "))
                    if "error" in event:
                        return "error", f"stream error event: {event['error']['message']}"
                    text.append(event["choices"][0]["text"])
    except TimeoutError:
        return "hung", ""
    except aiohttp.ClientError as exc:
        return "error", f"connection: {type(exc).__name__}: {exc}"
    return ("ok", "".join(text)) if done else ("error", "the stream ended without [DONE]")


class Chaos:
    """The fault schedule, run as requests finish."""

    def __init__(self, cluster: LocalCluster, proxies: ProxyThread, total: int) -> None:
        self.cluster, self.proxies, self.total = cluster, proxies, total
        self.done = self.in_flight = 0
        self.events: list[tuple[int, str]] = []  # (requests done when it began, what happened)
        self.steps = list(SCHEDULE)
        self.restarts: dict[str, threading.Thread] = {}  # host -> its SIGTERM or SIGSTOP, still going

    def _in_background(self, action: str, name: str) -> None:
        """SIGTERM (it drains, then is started again) or SIGSTOP (for STOP_S, then SIGCONT) a host
        once it serves, in a thread: the requests keep going meanwhile."""
        def run(done: int, in_flight: int) -> None:
            self.cluster.wait_listening(name)  # a serving host, not one still loading
            t0 = time.monotonic()
            if action == "term":
                status = self.cluster.terminate(name)
                self.cluster.respawn(name)
                outcome = f"drained and exited with {status} after {time.monotonic() - t0:.1f} s, restarted"
            else:
                self.cluster.processes[name].send_signal(signal.SIGSTOP)
                time.sleep(STOP_S)
                self.cluster.processes[name].send_signal(signal.SIGCONT)
                outcome = f"SIGCONT {STOP_S:g} s later"
            self.events.append((done, f"SIG{action.upper()} {name} at request {done} ({in_flight} in flight): "
                                      f"{outcome}"))

        self.restarts[name] = threading.Thread(target=run, args=(self.done, self.in_flight))
        self.restarts[name].start()

    def advance(self) -> None:
        """Runs every scheduled action whose share of requests is done."""
        self.done += 1
        while self.steps and self.done >= self.steps[0][0] * self.total:
            _, action, arg = self.steps[0]
            if arg in self.restarts and self.restarts[arg].is_alive():
                return  # one action on a host at a time: this one waits for a later request
            self.steps.pop(0)
            if action == "kill":
                self.cluster.kill(arg)
                self.cluster.respawn(arg)
                self.events.append((self.done, f"SIGKILL {arg} at request {self.done} ({self.in_flight} in flight), "
                                                "restarted"))
            elif action in ("term", "stop"):
                self._in_background(action, arg)
            else:
                self.proxies.set_mode(action, arg)
                if action != "pass":
                    self.events.append((self.done, f"{action} {'every proxy' if arg is None else f'proxy {arg}'} "
                                                   f"at request {self.done}"))


async def drive(chaos: Chaos, args: argparse.Namespace, expected: dict[str, str]) -> Counter:
    outcomes: Counter = Counter()
    queue = list(range(args.requests))
    async with aiohttp.ClientSession() as session:
        async def worker() -> None:
            while queue:
                prompt = PROMPTS[queue.pop() % len(PROMPTS)]
                chaos.in_flight += 1
                kind, value = await one_request(session, chaos.cluster.url, prompt, args.max_tokens,
                                                args.request_timeout_s)
                chaos.in_flight -= 1
                if kind == "ok":
                    outcomes[CORRECT if value == expected[prompt] else OTHER] += 1
                elif kind == "error":
                    outcomes[f"failed: {_error_kind(value)}"] += 1
                else:
                    outcomes["hung"] += 1
                chaos.advance()

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return outcomes


def _error_kind(message: str) -> str:
    """The message without addresses and request ids, so failures group by their kind."""
    message = re.sub(r"(\w+@)?\d+\.\d+\.\d+\.\d+:\d+", "HOST", message)
    return re.sub(r"(chat)?cmpl-[0-9a-f]+", "ID", message)[:110]


async def blocks_held(url: str, timeout_s: float) -> dict[str, int]:
    """Once every host is back and idle: the KV blocks each host still holds (a leak unless 0).
    A host that has not answered /metrics by the deadline is left out (the caller counts it)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(url + "/metrics") as response:
                metrics = _gauges(await response.text())
            used = {host: int(v) for (name, host), v in metrics.items() if name == "hma:kv_cache_used_blocks"}
            busy = sum(v for (name, _), v in metrics.items() if name in ("hma:num_requests_running",
                                                                         "hma:num_requests_waiting"))
            if (len(used) == NUM_HOSTS and busy == 0 and not any(used.values())) or time.monotonic() > deadline:
                return used
            await asyncio.sleep(0.5)


def _gauges(text: str) -> dict[tuple[str, str], float]:
    """(metric, host label) -> value, for the per-host lines of /metrics."""
    found = {}
    for line in text.splitlines():
        if line.startswith("hma:") and '{host="' in line:
            name, rest = line.split("{", 1)
            host = rest.split('host="', 1)[1].split('"', 1)[0]
            found[(name, host)] = float(line.rsplit(" ", 1)[1])
    return found


def run(args: argparse.Namespace) -> dict:
    print("reference outputs from one process ...", flush=True)
    expected = reference_outputs(args.max_tokens)
    proxies = ProxyThread(args.seed)
    cluster = LocalCluster(num_prefill=2, num_decode=2, prefill_flags=KV_FLAGS, route_prefill=proxies.add,
                           decode_flags=[*KV_FLAGS, "--landing-timeout-s", str(args.landing_timeout_s)])
    try:
        cluster.start()
        print(f"cluster up (logs in {cluster.log_dir}); {args.requests} requests, {args.concurrency} at a time",
              flush=True)
        chaos = Chaos(cluster, proxies, args.requests)
        start = time.monotonic()
        outcomes = asyncio.run(drive(chaos, args, expected))
        for restart in chaos.restarts.values():
            restart.join()
        duration = time.monotonic() - start
        proxies.set_mode("pass")
        held = asyncio.run(blocks_held(cluster.url, args.settle_timeout_s))
        settle = time.monotonic() - start - duration
        restarts = int(cluster.processes["router"].poll() is not None)  # the router is never restarted here
        placed_again = (cluster.log_dir / "router.log").read_text().count("placing it again")
    finally:
        cluster.stop()
        proxies.stop()
    report = {"requests": args.requests, "concurrency": args.concurrency, "duration_s": round(duration, 1),
              "settle_s": round(settle, 1), "faults": [event for _, event in sorted(chaos.events)],
              "chunks_faulted": dict(proxies.injected()),
              "placed_again": placed_again,
              "outcomes": dict(outcomes.most_common()), "hung": outcomes["hung"],
              "kv_blocks_used_after": held, "hosts_not_back": NUM_HOSTS - len(held),
              "kv_blocks_leaked": sum(held.values()), "router_restarts": restarts,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "log_dir": str(cluster.log_dir)}
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


def _print(report: dict) -> None:
    print(f"chaos run, {report['date']}: {report['requests']} requests, {report['concurrency']} at a time, "
          f"{report['duration_s']} s (then {report['settle_s']} s until every host was back and idle)")
    for event in report["faults"]:
        print(f"  fault: {event}")
    print(f"  chunks faulted by the proxies: {report['chunks_faulted']}")
    print(f"  placements repeated by the router (a failure before the first token): {report['placed_again']}")
    print(f"  KV blocks in use per host once idle: {report['kv_blocks_used_after']}")
    rows = [("sent", report["requests"]), *report["outcomes"].items()]
    if OTHER not in report["outcomes"]:
        rows.append((OTHER, 0))
    rows += [("hung (must be 0)", report["hung"]),
             ("hosts not back in the rotation (must be 0)", report["hosts_not_back"]),
             ("KV blocks leaked on the hosts once idle (must be 0)", report["kv_blocks_leaked"]),
             ("router restarts (must be 0)", report["router_restarts"])]
    width = max(len(name) for name, _ in rows) + 2
    for name, count in rows:
        print(f"{name:<{width}}{count:>6}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hma chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="requests to send in all")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at a time")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per request (greedy)")
    parser.add_argument("--request-timeout-s", type=float, default=180.0, help="longer than this counts as hung")
    parser.add_argument("--settle-timeout-s", type=float, default=90.0, help="wait for hosts to be back and idle")
    parser.add_argument("--landing-timeout-s", type=float, default=10.0,
                        help="the decode hosts': how long a stalled KV stream holds its request")
    parser.add_argument("--seed", type=int, default=0, help="where the corrupted bits fall")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    return parser.parse_args(argv)


def is_clean(report: dict) -> bool:
    """Nothing hung, leaked, lost from the rotation or wrong, and the router never restarted."""
    return not (report["hung"] or report["kv_blocks_leaked"] or report["router_restarts"]
                or report["hosts_not_back"] or report["outcomes"].get(OTHER))


def main(argv: list[str] | None = None) -> dict:
    report = run(parse_args(argv))
    if not is_clean(report):
        raise SystemExit(1)
    return report
