"""Request (one sequence in flight, with its status and blocks) and RequestOutput (what callers get).

Status moves WAITING -> RUNNING -> FINISHED; preemption sends a RUNNING request back to WAITING
with its blocks freed and its generated tokens kept, so it is recomputed as a longer prompt.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from hma.detokenizer import IncrementalDetokenizer
from hma.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock times (time.time()) of a request's life; ttft and e2e derived from them."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


PENDING = -1  # an output token a launched step samples, not yet read by the host (overlap.py)


@dataclass(slots=True)
class Request:
    """One sequence: prompt, generated tokens, sampling state and its KV blocks."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    generator: torch.Generator | None = None
    output_token_ids: list[int] = field(default_factory=list)
    output_text: str = ""
    detokenizer: IncrementalDetokenizer | None = None  # the output's text as it grows (stop strings)
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None    # "stop" or "length", as in the OpenAI API
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.time()))

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        """The newest token (what the next decode step feeds in), without copying the sequence."""
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def read_token_ids(self) -> list[int]:
        """Output tokens without the PENDING ones at the end."""
        ids = self.output_token_ids
        end = len(ids)
        while end and ids[end - 1] == PENDING:
            end -= 1
        return ids[:end]


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence, as vLLM names it."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class RequestOutput:
    """A request's result: prompt, its completion(s) and timings (vLLM's shape)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @classmethod
    def of(cls, req: Request) -> RequestOutput:
        completion = CompletionOutput(0, req.output_text, req.read_token_ids,
                                      req.finish_reason, req.stop_reason)
        return cls(req.request_id, req.prompt, req.prompt_token_ids, [completion],
                   req.is_finished, req.metrics)
