"""Serving metrics from per-request records: latency percentiles, throughput, SLO attainment, goodput.

In: one RequestRecord per request sent (times in seconds, on one clock). Out: a dict with vLLM
`bench serve`'s metric names (mean/median/std/p99 of ttft, tpot, itl, e2el in ms; throughputs;
request_goodput). Definitions: TTFT = first token - sent; TPOT = (last token - first token) /
(output tokens - 1), for requests of two tokens or more; ITL = gaps between streamed chunks;
E2EL = last token - sent. A request attains the SLO when it completed and meets both the TTFT
and the TPOT limit (a one-token request has no TPOT to miss). Goodput as DistServe defines it is
the highest request rate at which at least 90% of requests attain the SLO: `search_goodput`.
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)
TARGET_ATTAINMENT = 0.9


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request."""

    prompt_len: int
    output_len: int = 0           # tokens received (the server's usage count)
    sent: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each streamed chunk with text
    error: str = ""
    finished: bool = False        # the stream ended (completed or failed)

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent

    @property
    def e2el(self) -> float:
        return self.chunk_times[-1] - self.sent

    @property
    def tpot(self) -> float | None:
        if self.output_len < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.output_len - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


@dataclass(frozen=True, slots=True)
class SLO:
    """Latency limits a request must meet, in seconds."""

    ttft_s: float
    tpot_s: float

    def attained(self, record: RequestRecord) -> bool:
        tpot = record.tpot
        return record.ok and record.ttft <= self.ttft_s and (tpot is None or tpot <= self.tpot_s)

    def missed(self, record: RequestRecord, now: float) -> bool:
        """Whether the request has missed already, finished or not (no first token in time)."""
        if record.finished:
            return not self.attained(record)
        return bool(record.sent) and not record.chunk_times and now - record.sent > self.ttft_s


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks, as numpy's default."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def attainment(records: list[RequestRecord], slo: SLO) -> float:
    """Share of all requests sent (failed ones count as missed) that met both limits."""
    return sum(slo.attained(r) for r in records) / len(records) if records else 0.0


def summarize(records: list[RequestRecord], duration_s: float, slo: SLO | None = None,
              percentiles: tuple[float, ...] = DEFAULT_PERCENTILES) -> dict:
    """vLLM bench serve's summary of one run."""
    done = [r for r in records if r.ok]
    out_tokens = sum(r.output_len for r in done)
    in_tokens = sum(r.prompt_len for r in done)
    result = {"duration": duration_s, "completed": len(done), "failed": len(records) - len(done),
              "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
              "request_throughput": len(done) / duration_s,
              "output_throughput": out_tokens / duration_s,
              "total_token_throughput": (in_tokens + out_tokens) / duration_s}
    samples = {"ttft": [r.ttft for r in done], "tpot": [r.tpot for r in done if r.tpot is not None],
               "itl": [gap for r in done for gap in r.itls], "e2el": [r.e2el for r in done]}
    for name, values in samples.items():
        ms = [v * 1e3 for v in values]
        result[f"mean_{name}_ms"] = statistics.fmean(ms) if ms else 0.0
        result[f"median_{name}_ms"] = statistics.median(ms) if ms else 0.0
        result[f"std_{name}_ms"] = statistics.pstdev(ms) if ms else 0.0
        for q in percentiles:
            result[f"p{q:g}_{name}_ms"] = percentile(ms, q)
    if slo is not None:
        result["slo_attainment"] = attainment(records, slo)
        result["request_goodput"] = sum(slo.attained(r) for r in records) / duration_s
    return result


async def search_goodput(attainment_at: Callable[[float], Awaitable[float]], low: float, high: float,
                         iterations: int = 6,
                         target: float = TARGET_ATTAINMENT) -> tuple[float, list[tuple[float, float]]]:
    """The highest rate in [low, high] whose attainment is at least `target`, by bisection on a log
    scale (it assumes attainment falls as the rate rises), and every (rate, attainment) tried.
    0.0 if even `low` misses."""
    tried = []

    async def meets(rate: float) -> bool:
        value = await attainment_at(rate)
        tried.append((rate, value))
        return value >= target

    if not await meets(low):
        return 0.0, tried
    if await meets(high):
        return high, tried
    for _ in range(iterations):
        mid = (low * high) ** 0.5 if low > 0 else high / 2  # bisect on a log scale: rates span decades
        if await meets(mid):
            low = mid
        else:
            high = mid
    return low, tried


async def search_goodput_from(attainment_at: Callable[[float], Awaitable[float]], start: float, low: float,
                              high: float, refine: int = 2,
                              target: float = TARGET_ATTAINMENT) -> tuple[float, list[tuple[float, float]]]:
    """As search_goodput, but from a guess: doubles or halves `start` (within [low, high]) until
    attainment crosses the target, then bisects the last step `refine` times on a log scale. Far
    fewer probes than a wide bracket when the guess is within a factor of a few."""
    tried = []

    async def meets(rate: float) -> bool:
        value = await attainment_at(rate)
        tried.append((rate, value))
        return value >= target

    rate = min(max(start, low), high)
    if await meets(rate):
        passed, failed = rate, None
        while failed is None and passed < high:
            up = min(passed * 2, high)
            passed, failed = (up, None) if await meets(up) else (passed, up)
        if failed is None:
            return passed, tried
    else:
        passed, failed = None, rate
        while passed is None and failed > low:
            down = max(failed / 2, low)
            passed, failed = (down, failed) if await meets(down) else (None, down)
        if passed is None:
            return 0.0, tried
    for _ in range(refine):
        mid = (passed * failed) ** 0.5
        passed, failed = (mid, failed) if await meets(mid) else (passed, mid)
    return passed, tried
