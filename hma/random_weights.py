"""Random-weight models at real Qwen3 shapes: `--model random:qwen3-4b` on every host and the router.

No Qwen3 checkpoint can be had here, so serving benchmarks on GPUs run random weights at the
family's public shapes (config.QWEN3_SHAPES). Each host builds the same weights from one seed, and
the handshake's fingerprint comes from the shapes, as it does for a checkpoint. Such a model has no
tokenizer: prompts are token ids, and outputs read as ids ("<1234>"), one piece of text per token,
so a stream carries one chunk per token as it would with a real vocabulary.
"""

from __future__ import annotations

import dataclasses

import torch

from hma.config import ModelConfig, qwen3_shape
from hma.errors import InvalidRequestError
from hma.qwen3 import Qwen3ForCausalLM
from hma.wire import model_fingerprint

PREFIX = "random:"
SEED = 0


def shape_of(model: str) -> str | None:
    """'random:qwen3-4b' -> 'qwen3-4b'; None for a checkpoint name."""
    return model.removeprefix(PREFIX) if model.startswith(PREFIX) else None


def config_of(model: str) -> ModelConfig:
    return qwen3_shape(shape_of(model))


def fingerprint(model: str) -> str:
    """The handshake fingerprint, from the shape's weight shapes (no weights are made)."""
    config = config_of(model)
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in Qwen3ForCausalLM(config, 1).named_parameters()}
    return model_fingerprint(dataclasses.asdict(config), shapes)


def build(model: str, dtype: torch.dtype, device: torch.device, max_positions: int) -> Qwen3ForCausalLM:
    built = Qwen3ForCausalLM.create(config_of(model), dtype, device, max_positions)
    built.init_random_(SEED)
    return built


class TokenIdText:
    """Stands in for a tokenizer where there is none: refuses text, shows ids."""

    eos_token_id = None
    chat_template = None

    def __call__(self, text: str, **kwargs):
        raise InvalidRequestError("this model has random weights and no tokenizer: send the prompt as "
                                  "a list of token ids")

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return "".join(f"<{t}>" for t in token_ids)
