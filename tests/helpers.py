"""Small random transformers models and the glue that runs the same weights through hma."""

from __future__ import annotations

import torch

from hma.config import EngineConfig, ModelConfig
from hma.kv_cache import KVCache
from hma.kv_formats import get_kv_format
from hma.qwen3 import Qwen3ForCausalLM

TINY = dict(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6,
            max_position_embeddings=512, rope_theta=10_000.0)


def tiny_hf_model(architecture: str = "Qwen3ForCausalLM", tie: bool = False, seed: int = 0, **overrides):
    """A transformers model with a GQA ratio of 2 and head_dim != hidden / heads."""
    import transformers

    torch.manual_seed(seed)
    shape = {**TINY, **overrides}
    if architecture == "Qwen3ForCausalLM":
        cfg = transformers.Qwen3Config(**shape, tie_word_embeddings=tie)
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**shape, tie_word_embeddings=tie)
        model = transformers.LlamaForCausalLM(cfg)
    # Random norm weights, so a wrong norm placement cannot hide behind weights of one.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def hma_model_from_hf(hf_model, device: str = "cpu") -> Qwen3ForCausalLM:
    """Our decoder, loaded with the transformers model's weights through load_weights."""
    cfg = ModelConfig.from_dict(hf_model.config.to_dict())
    model = Qwen3ForCausalLM.create(cfg, torch.float32, device)
    model.load_weights(hf_model.state_dict().items())
    return model


def engine_from_hf(hf_model, num_blocks: int = 256, block_size: int = 4, kv_dtype: str = "fp32",
                   device: str = "cpu", **config):
    """An engine over hf_model's weights with a small paged cache."""
    from hma.engine import LLMEngine

    model = hma_model_from_hf(hf_model, device)
    cache = KVCache(model.config, num_blocks, block_size, get_kv_format(kv_dtype), device)
    engine_config = EngineConfig(block_size=block_size, device=device, **config)
    return LLMEngine(model, cache, engine_config, eos_token_ids=[])
