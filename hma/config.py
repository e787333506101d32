"""Settings: the model's shape from its config.json, and each role's settings as frozen dataclasses.

ModelConfig is read from a checkpoint (or built from a named real shape for benchmarks);
EngineConfig holds what one engine process needs. Flags are the fields with dashes, made by
`add_flags` so that flags, defaults and help cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hma.errors import UnsupportedModelError
from hma.kv_formats import KV_FORMATS
from hma.quant import PREFILL_DTYPES

# Architectures the hand-written decoder runs; Llama is Qwen3 without QK-norm.
SUPPORTED_ARCHITECTURES = {"Qwen3ForCausalLM": True, "LlamaForCausalLM": False}
MODEL_TYPES = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}  # when architectures is absent
PIECEWISE_GRAPH_TOKENS = 2048  # prompt steps up to this many tokens replay piecewise CUDA graphs


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The dimensions of a Qwen3 or Llama decoder, with Hugging Face's names."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40_960
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")

    @property
    def has_qk_norm(self) -> bool:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Reads a checkpoint's config.json; refuses architectures the decoder does not run."""
        model_type = cfg.get("model_type", "?")
        arch = (cfg.get("architectures") or [MODEL_TYPES.get(model_type, model_type)])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported; HMA-Serve runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        _refuse_unsupported_features(cfg)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        heads = cfg["num_attention_heads"]
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 40_960),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            eos_token_ids=eos_ids,
        )


def _rope_theta(cfg: dict[str, Any]) -> float:
    # transformers 5 moved rope_theta into rope_parameters; checkpoints carry either.
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10_000.0)


def _refuse_unsupported_features(cfg: dict[str, Any]) -> None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", None):
        raise UnsupportedModelError(f"rope scaling {rope_type!r} is not supported (plain RoPE only)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UnsupportedModelError("attention_bias / mlp_bias are not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act={cfg['hidden_act']!r} is not supported (silu only)")


# Public config.json values of the Qwen3 family, for random-weight benchmarks at real shapes.
QWEN3_SHAPES: dict[str, dict[str, int]] = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8),
    "qwen3-14b": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=8),
    "qwen3-32b": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                      num_attention_heads=64, num_key_value_heads=8),
}


def qwen3_shape(name: str) -> ModelConfig:
    """A ModelConfig for a named Qwen3 size (head_dim 128, vocab 151936, rope_theta 1e6)."""
    if name not in QWEN3_SHAPES:
        raise UnsupportedModelError(f"unknown shape {name!r}; choose from {', '.join(QWEN3_SHAPES)}")
    return ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=151_936, head_dim=128,
                       eos_token_ids=(151_645,), **QWEN3_SHAPES[name])


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What one engine process needs: model, placement, KV memory and batching limits."""

    model: str = field(default="demo", metadata={
        "help": "'demo', a local checkpoint folder, a hub id, or random:SHAPE (random weights at a Qwen3 shape "
                "such as random:qwen3-4b, for benchmarks)"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda if present)"})
    dtype: str | None = field(default=None, metadata={"help": "float32 | bfloat16 | float16 "
                                                              "(default: bfloat16 on cuda, float32 on cpu)"})
    prefill_dtype: str = field(default="bf16", metadata={
        "help": "prefill precision (W8A8): bf16 (the model's own dtype, unquantized) | fp8 | int8 | bfp8"})
    smoothquant_alpha: float = field(default=0.0, metadata={
        "help": "SmoothQuant strength for 8-bit prefill, e.g. 0.5, calibrated at load on a built-in "
                "text; 0 turns it off"})
    kv_dtype: str = field(default="auto", metadata={
        "help": "KV cache format: auto (the model's dtype) | bf16 | fp16 | fp32 | fp8 | int8 | int4 | bfp8"})
    kv_memory_gb: float | None = field(default=None, metadata={"help": "KV cache budget in GB"})
    kv_memory_fraction: float = field(default=0.9, metadata={
        "help": "share of free device memory for the KV cache when --kv-memory-gb is not given "
                "(on cpu: of available RAM, capped at 1 GB)"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    max_num_seqs: int = field(default=256, metadata={"help": "most sequences in one step"})
    max_num_batched_tokens: int = field(default=8192, metadata={"help": "most tokens in one step"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "longest prompt + output (default: the model's max_position_embeddings)"})
    enforce_eager: bool = field(default=False, metadata={
        "help": "never capture CUDA graphs: decode steps launch their kernels one by one"})
    piecewise_graph_tokens: int = field(default=PIECEWISE_GRAPH_TOKENS, metadata={
        "help": "steps carrying prompts of up to this many tokens replay CUDA graphs of everything "
                "but attention (CUDA, unless --enforce-eager); 0: never"})
    async_scheduling: str = field(default="auto", metadata={
        "help": "launch greedy decode step n+1 before reading step n's tokens, so the host's work "
                "overlaps the GPU: auto (with CUDA graphs) | on (also eager; gains nothing there) | off"})

    def __post_init__(self) -> None:
        if self.prefill_dtype not in PREFILL_DTYPES:
            raise ValueError(f"prefill_dtype={self.prefill_dtype!r}; choose from {', '.join(PREFILL_DTYPES)}")
        if self.kv_dtype != "auto" and self.kv_dtype not in KV_FORMATS:
            raise ValueError(f"kv_dtype={self.kv_dtype!r}; choose from auto, {', '.join(KV_FORMATS)}")
        if not 0 <= self.smoothquant_alpha <= 1:
            raise ValueError(f"smoothquant_alpha={self.smoothquant_alpha} must be in [0, 1]")
        if self.async_scheduling not in ("auto", "on", "off"):
            raise ValueError(f"async_scheduling={self.async_scheduling!r}; choose from auto, on, off")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be at least 1")
        if self.kv_memory_gb is not None and self.kv_memory_gb <= 0:
            raise ValueError(f"kv_memory_gb={self.kv_memory_gb} must be positive")
        if not 0 < self.kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction={self.kv_memory_fraction} must be in (0, 1]")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")


@dataclass(frozen=True, slots=True)
class HostConfig:
    """Where a prefill or decode host listens, and the secret its peers must prove they share."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=0, metadata={"help": "TCP port (0: the role's default)"})
    secret: str | None = field(default=None, metadata={
        "help": "shared secret of the hosts' handshake (default: $HMA_SECRET)"})
    pipeline: bool = field(default=True, metadata={
        "help": "prefill only: send each layer's KV as it finishes (--no-pipeline: after the last)"})
    landing_timeout_s: float = field(default=120.0, metadata={
        "help": "decode only: a request whose KV has not fully landed this long after the prefill host "
                "took it fails and frees its blocks"})


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """The router: its HTTP address, the hosts behind it, and the model it tokenizes for."""

    model: str = field(default="demo", metadata={
        "help": "checkpoint whose tokenizer to use (as the hosts'); random:SHAPE has none"})
    served_model_name: str | None = field(default=None, metadata={"help": "the model name clients send"})
    host: str = field(default="127.0.0.1", metadata={"help": "HTTP address to listen on"})
    port: int = field(default=8000, metadata={"help": "HTTP port"})
    prefill_hosts: str = field(default="127.0.0.1:8100", metadata={
        "help": "comma-separated host:port; '' makes the decode hosts colocated replicas that prefill "
                "their own prompts (the memory-homogeneous baseline)"})
    decode_hosts: str = field(default="127.0.0.1:8200", metadata={"help": "comma-separated host:port"})
    secret: str | None = field(default=None, metadata={"help": "the hosts' shared secret (default: $HMA_SECRET)"})
    api_strict: bool = field(default=True, metadata={"help": "refuse unknown request fields with a 400"})
    max_queued_requests: int = field(default=512, metadata={
        "help": "requests the router holds that have no first token yet; beyond it, 503 with Retry-After"})
    api_key: str | None = field(default=None, metadata={
        "help": "require `Authorization: Bearer KEY` on /v1 (several keys: comma-separated; default: "
                "$HMA_API_KEY; neither: the API is open)"})


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds one --flag per dataclass field, with its default and help."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _flag_type(f)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata.get("help"))
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata.get("help"))


def from_flags(args: argparse.Namespace, cls: type) -> Any:
    """Builds the dataclass back from parsed flags."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _flag_type(f: dataclasses.Field) -> type:
    text = str(f.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if text.startswith(name):
            return kind
    return str
