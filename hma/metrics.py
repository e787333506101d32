"""Counters, gauges and histograms, rendered in Prometheus' text exposition format (version 0.0.4).

Names follow vLLM's with an `hma:` prefix where vLLM has one (hma:time_to_first_token_seconds).
A metric holds one value (or one set of buckets) per label tuple; `render` writes HELP and TYPE
lines and one sample line per series. No I/O here: the router serves the text at /metrics.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

# vLLM's latency buckets, in seconds.
LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                     7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)

Labels = tuple[tuple[str, str], ...]


def _labels(labels: dict[str, str] | None) -> Labels:
    return tuple(sorted((labels or {}).items()))


def _format_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = labels + extra
    if not pairs:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, escaped)) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _scalar_samples(name: str, values: dict[Labels, float]) -> list[str]:
    return [f"{name}{_format_labels(k)} {_number(v)}" for k, v in sorted(values.items())]


@dataclass(slots=True)
class Counter:
    """A value that only goes up (requests, tokens, bytes)."""

    name: str
    help: str
    values: dict[Labels, float] = field(default_factory=dict)
    kind = "counter"

    def inc(self, amount: float = 1.0, labels: dict[str, str] | None = None) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot go down ({amount})")
        key = _labels(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def samples(self) -> list[str]:
        return _scalar_samples(self.name, self.values)


@dataclass(slots=True)
class Gauge:
    """A value that goes up and down (running requests, KV cache usage)."""

    name: str
    help: str
    values: dict[Labels, float] = field(default_factory=dict)
    kind = "gauge"

    def set(self, value: float, labels: dict[str, str] | None = None) -> None:
        self.values[_labels(labels)] = value

    def samples(self) -> list[str]:
        return _scalar_samples(self.name, self.values)


@dataclass(slots=True)
class Histogram:
    """Observations counted into buckets (rendered cumulative), with their sum and count."""

    name: str
    help: str
    buckets: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: dict[Labels, list[int]] = field(default_factory=dict)  # per bucket, then one for +Inf
    sums: dict[Labels, float] = field(default_factory=dict)
    kind = "histogram"

    def observe(self, value: float, labels: dict[str, str] | None = None) -> None:
        key = _labels(labels)
        counts = self.counts.setdefault(key, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1  # the first bucket with le >= value
        self.sums[key] = self.sums.get(key, 0.0) + value

    def samples(self) -> list[str]:
        lines = []
        for labels, counts in sorted(self.counts.items()):
            cumulative = 0
            for le, n in zip(self.buckets + (math.inf,), counts):
                cumulative += n
                le_label = (("le", _number(le)),)
                lines.append(f"{self.name}_bucket{_format_labels(labels, le_label)} {cumulative}")
            lines.append(f"{self.name}_sum{_format_labels(labels)} {_number(self.sums[labels])}")
            lines.append(f"{self.name}_count{_format_labels(labels)} {cumulative}")
        return lines


Metric = Counter | Gauge | Histogram


def render(metrics: list[Metric]) -> str:
    """The /metrics body."""
    lines = []
    for metric in metrics:
        lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} {metric.kind}"]
        lines += metric.samples()
    return "\n".join(lines) + "\n"
