"""Incremental detokenization: the text of a growing list of output tokens, decoding only its
newest few tokens at each step.

Decoding the whole output again for every new token costs O(n) per token, O(n^2) per request,
and that CPU is the router's event loop (streamed text) or the engine's own thread, between
steps (stop strings). As vLLM and transformers' TextStreamer do, the tokens are decoded as a short
window: the tokens since the last emitted text plus the few before them, so tokenizers that
treat a leading space or byte specially see the same context the whole decode would; the new
text is what the window adds to the text of its older part. A trailing incomplete character
(a multi-byte character split across tokens decodes to U+FFFD) is held back until the tokens
that complete it arrive.
"""

from __future__ import annotations

from collections.abc import Sequence

INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """The text of one request's output tokens, kept up to date one update at a time."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = ""            # the text of token_ids[:read_offset]
        self.prefix_offset = 0    # where the decoded window starts
        self.read_offset = 0      # tokens whose text is in self.text

    def update(self, token_ids: Sequence[int]) -> str:
        """The text of token_ids, which must extend the list of the last call (a trailing
        incomplete character left out)."""
        if len(token_ids) > self.read_offset:
            before = self._decode(token_ids[self.prefix_offset:self.read_offset])
            window = self._decode(token_ids[self.prefix_offset:])
            if len(window) > len(before) and not window.endswith(INCOMPLETE):
                self.text += window[len(before):]
                self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return self.text

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True) if token_ids else ""
