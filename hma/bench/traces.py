"""Request traces to replay: arrival times and prompt/output lengths, from ../shared/traces or Poisson.

In: a trace file (Azure LLM 2023 CSV or Mooncake JSONL) or a rate. Out: TraceRequests sorted by
arrival, the first arriving at 0 s. Only lengths matter to a replay (no text is in the traces):
prompts are sent as token ids of the given length, outputs forced to the given length.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from hma.errors import InvalidRequestError

TRACE_DIR = Path(__file__).resolve().parents[3] / "shared" / "traces"  # ../shared/traces beside the repo
TRACES = {"azure-code": "azure_llm_2023_code.csv", "azure-conv": "azure_llm_2023_conv.csv",
          "mooncake": "mooncake_conversation.jsonl"}


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request to send: when (seconds after the first), and its token counts."""

    arrival_s: float
    prompt_len: int
    output_len: int


def trace_path(name: str) -> Path:
    """A shipped trace by short name (azure-code, azure-conv, mooncake), or a file path."""
    path = TRACE_DIR / TRACES[name] if name in TRACES else Path(name)
    if not path.is_file():
        raise InvalidRequestError(f"no trace at {path}; name one of {', '.join(TRACES)} or give a file")
    return path


def read_trace(path: Path) -> list[TraceRequest]:
    """Every row of an Azure 2023 CSV or a Mooncake JSONL trace, arrivals relative to the first."""
    if path.suffix == ".csv":
        rows = [(_azure_time(r["TIMESTAMP"]), int(r["ContextTokens"]), int(r["GeneratedTokens"]))
                for r in csv.DictReader(path.open())]
    elif path.suffix == ".jsonl":
        rows = [(r["timestamp"] / 1000, r["input_length"], r["output_length"])
                for r in map(json.loads, path.open())]
    else:
        raise InvalidRequestError(f"{path.name}: traces are Azure .csv or Mooncake .jsonl files")
    if not rows:
        raise InvalidRequestError(f"{path.name} holds no requests")
    rows.sort()
    start = rows[0][0]
    return [TraceRequest(t - start, p, o) for t, p, o in rows]


def _azure_time(text: str) -> float:
    """'2023-11-16 18:17:03.9799600' -> POSIX seconds (strptime's %f takes six digits, not seven)."""
    day, _, fraction = text.partition(".")
    return datetime.strptime(day, "%Y-%m-%d %H:%M:%S").timestamp() + float(f"0.{fraction or 0}")


def scale_to_rate(requests: list[TraceRequest], rate: float) -> list[TraceRequest]:
    """The same requests with arrival gaps stretched or squeezed so they arrive at `rate` per second."""
    if len(requests) < 2 or requests[-1].arrival_s == 0:
        return requests
    span = requests[-1].arrival_s
    factor = (len(requests) - 1) / span / rate
    return [replace(r, arrival_s=r.arrival_s * factor) for r in requests]


def poisson_arrivals(requests: list[TraceRequest], rate: float, seed: int = 0) -> list[TraceRequest]:
    """The same lengths arriving as a Poisson process of `rate` per second (seeded)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i, r in enumerate(requests):
        t += rng.expovariate(rate) if i else 0.0
        out.append(replace(r, arrival_s=t))
    return out


def clip(requests: list[TraceRequest], max_prompt_len: int | None,
         max_output_len: int | None) -> tuple[list[TraceRequest], int]:
    """Requests with lengths cut to the limits (a small model's context), and how many were cut."""
    out, num_clipped = [], 0
    for r in requests:
        p = min(r.prompt_len, max_prompt_len or r.prompt_len)
        o = min(r.output_len, max_output_len or r.output_len)
        num_clipped += (p, o) != (r.prompt_len, r.output_len)
        out.append(replace(r, prompt_len=max(1, p), output_len=max(1, o)))
    return out, num_clipped
