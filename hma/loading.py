"""From an EngineConfig to what an engine runs on: device and dtype, the model (a checkpoint or
random weights at a Qwen3 shape) with its prefill-precision copy (SmoothQuant-calibrated where
asked), its tokenizer and EOS ids, and the paged KV cache sized from the memory left after the
weights. Also the chat template, which calibration and the APIs share.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from hma import random_weights
from hma.checkpoint import iter_safetensors, load_config_dict, load_tokenizer, resolve_model_path
from hma.config import EngineConfig, ModelConfig
from hma.errors import InvalidRequestError
from hma.kv_cache import KVCache, blocks_for, bytes_per_block, kv_budget_bytes
from hma.kv_formats import KVFormat, get_kv_format
from hma.qwen3 import Qwen3ForCausalLM

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}



def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequestError("device 'cuda' was asked for but no CUDA GPU is visible")
    return torch.device(name)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InvalidRequestError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(config: EngineConfig, device: torch.device,
               dtype: torch.dtype) -> tuple[Qwen3ForCausalLM, object, list[int]]:
    """The checkpoint's model (with its prefill-precision copy), tokenizer and EOS token ids."""
    t0 = time.perf_counter()
    if random_weights.shape_of(config.model):
        model_config, path, tokenizer = random_weights.config_of(config.model), None, random_weights.TokenIdText()
    else:
        path = resolve_model_path(config.model)
        model_config, tokenizer = ModelConfig.from_dict(load_config_dict(path)), load_tokenizer(path)
    max_positions = min(config.max_model_len or model_config.max_position_embeddings,
                        model_config.max_position_embeddings)
    if path is None:
        model = random_weights.build(config.model, dtype, device, max_positions)
    else:
        model = Qwen3ForCausalLM.create(model_config, dtype, device, max_positions)
        model.load_weights(iter_safetensors(path, device=device, dtype=dtype))
    set_prefill_precision(model, tokenizer, config.prefill_dtype, config.smoothquant_alpha)
    log.info("loaded %s (%s, %s on %s, prefill %s) in %.1f s", config.model, model_config.architecture,
             dtype, device, config.prefill_dtype, time.perf_counter() - t0)
    eos = set(model_config.eos_token_ids) | (_generation_eos(path) if path else set())
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return model, tokenizer, sorted(eos)


# SmoothQuant calibration text: chat-formatted, varied, long enough to show the outlier channels,
# which in these models sit in fixed channels whatever the input.
CALIBRATION_MESSAGES = [
    "Explain how a refrigerator keeps food cold, step by step, for a curious ten-year-old.",
    "Write a short poem about the sea at night, then summarise it in one sentence.",
    "def fibonacci(n):\n    # return the n-th Fibonacci number; fix the bug below\n    return n",
    "What were the main causes of the French Revolution? Answer in three bullet points.",
    "Translate into German and Spanish: 'The train to Lisbon leaves at 7:45 from platform 3.'",
    "A shop sells 3 apples for $2. How much do 18 apples cost? Show your working.",
]


def set_prefill_precision(model: Qwen3ForCausalLM, tokenizer, mode: str, smoothquant_alpha: float) -> None:
    """Gives the model its prefill-precision copy, calibrating SmoothQuant first if asked."""
    input_amax = None
    if smoothquant_alpha and mode != "bf16":
        ids = [t for m in CALIBRATION_MESSAGES for t in apply_chat_template(tokenizer, [{"role": "user", "content": m}])]
        fmt = resolve_kv_format("auto", next(model.parameters()).dtype)
        cache = KVCache(model.config, blocks_for(len(ids), 16), 16, fmt, next(model.parameters()).device)
        input_amax = model.input_amax(ids, cache)
    model.use_prefill_precision(mode, input_amax=input_amax, alpha=smoothquant_alpha)


def resolve_kv_format(name: str, dtype: torch.dtype) -> KVFormat:
    """'auto' is the model's own dtype, unquantized."""
    if name == "auto":
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return get_kv_format(name)


def make_kv_cache(model_config: ModelConfig, config: EngineConfig, dtype: torch.dtype,
                  device: torch.device) -> KVCache:
    """Sizes the block pools from the budget (after the weights are loaded) and allocates them."""
    fmt = resolve_kv_format(config.kv_dtype, dtype)
    budget = kv_budget_bytes(device, config.kv_memory_gb, config.kv_memory_fraction)
    num_blocks = budget // bytes_per_block(model_config, config.block_size, fmt)
    return KVCache(model_config, num_blocks, config.block_size, fmt, device)


def _generation_eos(path: Path) -> set[int]:
    gen = path / "generation_config.json"
    if not gen.exists():
        return set()
    eos = json.loads(gen.read_text()).get("eos_token_id")
    return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())


def apply_chat_template(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation under the chat template, ready for the assistant's reply."""
    if not messages:
        raise InvalidRequestError("messages must not be empty")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this checkpoint has no chat template; use a plain prompt")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template already holds any BOS token, so none is added twice.
    return tokenizer(text, add_special_tokens=False).input_ids
