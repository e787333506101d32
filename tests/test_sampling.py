import pytest
import torch

from hma.errors import InvalidRequestError
from hma.sampling import SamplingParams, make_generator, sample

VOCAB = 50


def _logits(rows: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _draw(params: list[SamplingParams], logits: torch.Tensor) -> list[int]:
    gens = [make_generator(p.seed, torch.device("cpu")) for p in params]
    return sample(logits, params, gens)


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    logits = _logits()
    params = [SamplingParams(temperature=1.5, seed=s) for s in range(6)]
    draws = [tuple(_draw(params, logits.repeat(1, 1))) for _ in range(2)]
    assert draws[0] == draws[1]
    many = {tuple(_draw([SamplingParams(temperature=2.0, seed=s)] * 6, logits)) for s in range(8)}
    assert len(many) > 1


def test_seeded_row_does_not_depend_on_its_batch_neighbours():
    logits = _logits()
    seeded = SamplingParams(temperature=1.0, seed=7)
    alone = _draw([seeded], logits[:1])
    mixed = _draw([seeded] + [SamplingParams(temperature=1.0)] * 5, logits)
    assert mixed[0] == alone[0]


def test_top_k_one_equals_greedy_through_the_sampling_path():
    logits = _logits()
    params = [SamplingParams(temperature=0.9, top_k=1, seed=s) for s in range(6)]
    assert _draw(params, logits) == logits.argmax(-1).tolist()


def test_top_k_and_top_p_never_pick_outside_their_set():
    logits = _logits(rows=1)
    order = logits[0].argsort(descending=True)
    probs = logits[0].softmax(-1)[order]
    nucleus = int((probs.cumsum(0) - probs < 0.5).sum())
    picks_k = {_draw([SamplingParams(temperature=1.0, top_k=3, seed=s)], logits)[0] for s in range(200)}
    picks_p = {_draw([SamplingParams(temperature=1.0, top_p=0.5, seed=s)], logits)[0] for s in range(200)}
    assert picks_k <= set(order[:3].tolist()) and len(picks_k) > 1
    assert picks_p <= set(order[:nucleus].tolist())


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    picks = [_draw([SamplingParams(temperature=1.0, seed=s)], logits)[0] for s in range(3000)]
    freq = torch.bincount(torch.tensor(picks), minlength=3) / 3000
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.03, rtol=0)


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0),
                                 dict(top_k=-2), dict(stop=[""])])
def test_invalid_params_are_refused(bad):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**bad)
