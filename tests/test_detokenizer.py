"""Incremental detokenization against decoding the whole output at every token."""

import random

import pytest

from hma.detokenizer import INCOMPLETE, IncrementalDetokenizer
from hma.loading import load_tokenizer
from hma.random_weights import TokenIdText

TEXTS = ["The capital of France is Paris. Café, naïve, jalapeño!",
         "Emoji split over byte tokens: 🙂🚀 and CJK 東京タワー, then plain words again.",
         "  leading spaces,\ttabs and\nnew lines\n\n  indented code: def f(x):\n    return x ** 2"]


@pytest.fixture(scope="module")
def tokenizer(demo_model_path):
    return load_tokenizer(demo_model_path)


class CountingTokenizer:
    """Records how many ids each decode call was given."""

    def __init__(self, inner) -> None:
        self.inner, self.lengths = inner, []

    def decode(self, token_ids, skip_special_tokens=True):
        self.lengths.append(len(token_ids))
        return self.inner.decode(token_ids, skip_special_tokens=skip_special_tokens)


def _check_against_full_decode(tokenizer, ids: list[int]) -> None:
    """At every step the text is a prefix of the whole decode, and equal to it unless the whole
    decode ends in an incomplete character (which is held back)."""
    detok = IncrementalDetokenizer(tokenizer)
    for n in range(1, len(ids) + 1):
        text, full = detok.update(ids[:n]), tokenizer.decode(ids[:n], skip_special_tokens=True)
        assert full.startswith(text), (n, text, full)
        if not full.endswith(INCOMPLETE):
            assert text == full, (n, text, full)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_the_whole_decode_for_real_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    _check_against_full_decode(tokenizer, ids)
    assert IncrementalDetokenizer(tokenizer).update(ids) == text


def test_random_token_ids_stay_a_prefix_of_the_whole_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(5):
        _check_against_full_decode(tokenizer, [rng.randrange(len(tokenizer)) for _ in range(120)])


def test_each_token_decodes_a_short_window_not_the_whole_output(tokenizer):
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting)
    ids = tokenizer(" ".join(TEXTS * 4), add_special_tokens=False).input_ids
    for n in range(1, len(ids) + 1):
        detok.update(ids[:n])
    assert len(ids) > 200 and max(counting.lengths) <= 8  # the whole decode would reach len(ids)
    assert detok.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_several_new_tokens_at_once_and_no_new_tokens():
    detok = IncrementalDetokenizer(TokenIdText())
    assert detok.update([]) == ""
    assert detok.update([5, 6, 7]) == "<5><6><7>"
    assert detok.update([5, 6, 7]) == "<5><6><7>"
    assert detok.update([5, 6, 7, 8, 9]) == "<5><6><7><8><9>"


class LeadingSpaceTokenizer:
    """SentencePiece's way: pieces carry their space as '▁', and a decode drops the space that
    starts its first piece, so a window decoded without the tokens before it loses a space."""

    pieces = ["▁The", "▁cap", "ital", "▁of", "▁France", "▁is", "▁Paris", "."]

    def decode(self, token_ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in token_ids).replace("▁", " ").removeprefix(" ")


def test_a_tokenizer_that_drops_a_leading_space_keeps_every_space():
    tokenizer = LeadingSpaceTokenizer()
    ids = list(range(len(tokenizer.pieces)))
    _check_against_full_decode(tokenizer, ids)
    assert IncrementalDetokenizer(tokenizer).update(ids) == "The capital of France is Paris."
