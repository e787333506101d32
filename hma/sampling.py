"""SamplingParams (vLLM's names) and the batched sampler: greedy, temperature, top-k, top-p, seeds.

In: float32 logits (num_seqs, vocab) and each row's params and generator. Out: one token id per
row. Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which draws exactly
from p and lets a seeded row draw its own noise while the rest share one batched draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hma.errors import InvalidRequestError


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop; field names and defaults follow vLLM."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                 # -1 or 0: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be non-negative, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and self.top_k >= -1, f"top_k must be -1 (off) or positive, got {self.top_k}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A per-request generator when a seed is given, so the request samples reproducibly."""
    return None if seed is None else torch.Generator(device).manual_seed(seed)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """Picks one token per row of logits (num_seqs, vocab)."""
    greedy = logits.argmax(dim=-1)
    if all(p.is_greedy for p in params):
        return greedy.tolist()
    probs = _filtered_probs(logits, params)
    noise = torch.empty_like(probs).exponential_()
    for row, gen in enumerate(generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    sampled = (probs / noise).argmax(dim=-1)
    is_greedy = torch.tensor([p.is_greedy for p in params], device=logits.device)
    return torch.where(is_greedy, greedy, sampled).tolist()


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p, as probabilities."""
    device = logits.device
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
    logits = logits / temps[:, None]
    vocab = logits.shape[-1]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=device)[None, :]
    sorted_logits.masked_fill_(rank >= top_k[:, None], float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    # Drop a token once the tokens ranked above it already cover top_p; the first always stays.
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_logits.masked_fill_(before > top_p[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits.softmax(dim=-1))
