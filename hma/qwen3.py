"""The Qwen3 decoder, written out by hand; Llama checkpoints run through it as Qwen3 without QK-norm.

In: a flat Batch of token ids (many sequences, no padding) and the paged KV cache. Out: float32
logits for the rows the batch asks for. Per layer: RMSNorm, fused QKV projection, per-head
q_norm/k_norm (Qwen3 only), RoPE, paged attention, output projection, RMSNorm, SwiGLU MLP.
Weights load from Hugging Face names; q/k/v and gate/up are fused on load into one matmul each.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hma.attention import paged_attention
from hma.batch import Batch, SeqChunk
from hma.config import ModelConfig
from hma.errors import CheckpointError
from hma.fusion import gpu_kernel
from hma.kv_cache import KVCache, LayerKV
from hma.quant import PhaseLinear, smoothing_factors


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as the reference implementation does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, its norm) in one pass."""
    x = x + residual
    return x, _rms_norm(x, weight, eps)


rms_norm = gpu_kernel("rms_norm")(_rms_norm)
add_rms_norm = gpu_kernel("add_rms_norm")(_add_rms_norm)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half layout) from a cos/sin table built once."""

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        super().__init__()
        self.head_dim, self.theta, self.max_positions = head_dim, theta, max_positions
        self.register_buffer("cos", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.reset()

    def reset(self) -> None:
        """(Re)computes the table in float32 on the buffers' device."""
        if self.cos.is_meta:
            return
        device = self.cos.device
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        inv_freq = 1.0 / self.theta ** exponent
        positions = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, inv_freq)  # (max_positions, head_dim/2)
        self.cos = freqs.cos()
        self.sin = freqs.sin()

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for the batch's positions, once per step: (num_tokens, 1, head_dim) each."""
        cos = self.cos[positions].repeat(1, 2)[:, None, :].to(dtype)
        sin = self.sin[positions].repeat(1, 2)[:, None, :].to(dtype)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x (num_tokens, heads, head_dim) in the rotate-half layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@gpu_kernel("norm_and_rotate")
def norm_and_rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head q/k RMSNorm (when weights are given), then RoPE on both."""
    if q_weight is not None:
        q, k = _rms_norm(q, q_weight, eps), _rms_norm(k, k_weight, eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


@gpu_kernel("silu_and_mul")
def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's silu(gate) * up from the fused gate_up projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class Attention(nn.Module):
    """Grouped-query attention over the paged cache."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = PhaseLinear(config.hidden_size, self.q_size + 2 * self.kv_size)
        self.o_proj = PhaseLinear(self.q_size, config.hidden_size)
        self.qk_norm = config.has_qk_norm
        self.eps = config.rms_norm_eps
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                num_prefill_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (num_tokens, heads, head_dim), k and v (num_tokens, kv_heads, head_dim), normed
        (Qwen3) and rotated: everything before attention reads the cache."""
        qkv = self.qkv_proj(x, num_prefill_rows)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q_weight, k_weight = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm else (None, None)
        q, k = norm_and_rotate(q, k, *rope, q_weight, k_weight, self.eps)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, cache: LayerKV,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Writes k, v to the cache and attends: (num_tokens, heads, head_dim), into out if given."""
        return paged_attention(q, k, v, cache, batch, self.head_dim ** -0.5, out)

    def output(self, attn: torch.Tensor, num_prefill_rows: int) -> torch.Tensor:
        return self.o_proj(attn.reshape(-1, self.q_size), num_prefill_rows)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up in one matmul."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = PhaseLinear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = PhaseLinear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor, num_prefill_rows: int) -> torch.Tensor:
        return self.down_proj(self.activated_gate_up(x, num_prefill_rows), num_prefill_rows)

    def activated_gate_up(self, x: torch.Tensor, num_prefill_rows: int) -> torch.Tensor:
        """silu_and_mul(gate_up_proj(x)). A decode step of one sequence on the GPU runs it as one
        matrix-vector kernel (hma.matvec.gated_linear): at batch 1 a launch's fixed cost, not
        its bytes, is what a small kernel costs."""
        weight = self.gate_up_proj.float_weight_for(num_prefill_rows)
        # input_amax's forward hooks must see the linear's input, and the one kernel skips the module
        if x.is_cuda and weight is not None and not self.gate_up_proj._forward_hooks:
            from hma import matvec  # Triton ships with CUDA builds of torch, not CPU ones

            if matvec.fits(x, weight):
                return matvec.gated_linear(x, weight)
        return silu_and_mul(self.gate_up_proj(x, num_prefill_rows))


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP, each with a residual add. The residual stream travels beside
    the layer's output, so each add runs fused with the norm that follows it (one kernel fewer
    per layer in a decode step)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
                batch: Batch, cache: LayerKV) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the last layer's MLP output, not yet added to residual (None: x is the embedding).
        Returns this layer's (MLP output, residual stream before it)."""
        n = batch.num_prefill_precision_tokens
        residual, q, k, v = self.before_attention(x, residual, rope, n)
        return self.after_attention(self.self_attn.attend(q, k, v, batch, cache), residual, n)

    def before_attention(self, x: torch.Tensor, residual: torch.Tensor | None,
                         rope: tuple[torch.Tensor, torch.Tensor], num_prefill_rows: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(residual stream, q, k, v): the part of the layer before it touches the KV cache."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            residual, h = add_rms_norm(x, residual, self.input_layernorm.weight, self.input_layernorm.eps)
        return residual, *self.self_attn.project(h, rope, num_prefill_rows)

    def after_attention(self, attn: torch.Tensor, residual: torch.Tensor,
                        num_prefill_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, residual stream): the part of the layer after attention."""
        norm = self.post_attention_layernorm
        residual, h = add_rms_norm(self.self_attn.output(attn, num_prefill_rows), residual, norm.weight, norm.eps)
        return self.mlp(h, num_prefill_rows), residual


class Qwen3ForCausalLM(nn.Module):
    """Embedding, decoder layers, final norm, lm_head (tied to the embedding where configured)."""

    def __init__(self, config: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta,
                                    max_positions or config.max_position_embeddings)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.piecewise = None  # PiecewiseGraphs, once use_piecewise_graphs turns them on

    @classmethod
    def create(cls, config: ModelConfig, dtype: torch.dtype, device: torch.device | str,
               max_positions: int | None = None) -> Qwen3ForCausalLM:
        """An uninitialised model straight on device (no wasted random init); load or init it next."""
        with torch.device("meta"):
            model = cls(config, max_positions)
        model = model.to_empty(device=device).to(dtype)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.rope.reset()
        return model.eval()

    def use_prefill_precision(self, mode: str, keep_decode_weights: bool = True,
                              input_amax: dict[str, torch.Tensor] | None = None, alpha: float = 0.5) -> None:
        """Gives every decoder linear a W8A8 copy for prefill rows ('bf16': none, the float weight
        serves both phases), SmoothQuant-scaled where calibrated input_amax is given. lm_head
        stays in the model's dtype: it runs on one row per sequence."""
        if self.piecewise is not None:
            self.piecewise.reset()  # its graphs read the weights they were captured with
        for name, module in self.named_modules():
            if isinstance(module, PhaseLinear):
                smooth = None
                if input_amax and mode != "bf16":
                    smooth = smoothing_factors(input_amax[name], module.weight, alpha)
                module.set_prefill_precision(mode, keep_decode_weights, smooth)

    @torch.inference_mode()
    def input_amax(self, token_ids: list[int], kv_cache: KVCache) -> dict[str, torch.Tensor]:
        """Per-input-channel max |x| of every decoder linear over one float prefill of token_ids
        (SmoothQuant's calibration); kv_cache needs blocks for len(token_ids) tokens."""
        self.use_prefill_precision("bf16")
        amax: dict[str, torch.Tensor] = {}

        def record(name: str, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            amax[name] = args[0].abs().amax(dim=0).float()

        hooks = [m.register_forward_hook(functools.partial(record, n))
                 for n, m in self.named_modules() if isinstance(m, PhaseLinear)]
        try:
            blocks = list(range(kv_cache.num_blocks))
            with self.eagerly():  # a graph replay would call no hook
                self(Batch.build([SeqChunk(token_ids, 0, blocks)], [], kv_cache.block_size, kv_cache.device), kv_cache)
        finally:
            for hook in hooks:
                hook.remove()
        return amax

    def init_random_(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights for benchmarks at real shapes; norms start at one."""
        gen = torch.Generator(self.embed_tokens.weight.device).manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.data.fill_(1.0)
            else:
                param.data.normal_(0.0, std, generator=gen)

    @torch.inference_mode()
    def forward(self, batch: Batch, kv_cache: KVCache,
                on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Returns float32 logits (len(batch.logits_indices), vocab_size). on_layer(i) runs as
        soon as layer i's KV is in the cache: the prefill host hands it off from there. Batches
        the piecewise graphs fit (use_piecewise_graphs) replay them instead; same arithmetic."""
        if self.piecewise is not None and self.piecewise.can_run(batch):
            return self.piecewise.forward(batch, kv_cache, on_layer)
        x, rope = self.embed(batch.input_ids, batch.positions)
        residual = None
        for i, (layer, cache) in enumerate(zip(self.layers, kv_cache.layers)):
            x, residual = layer(x, residual, rope, batch, cache)
            if on_layer is not None:
                on_layer(i)
        return self.logits(x, residual, batch.logits_indices)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(token embeddings (num_tokens, hidden), RoPE's cos and sin for the positions)."""
        x = self.embed_tokens(input_ids)
        return x, self.rope(positions, x.dtype)

    def logits(self, x: torch.Tensor, residual: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """float32 logits of the given rows from the last layer's output and residual stream."""
        _, x = add_rms_norm(x[rows], residual[rows], self.norm.weight, self.norm.eps)
        return self.lm_head(x).float()

    @contextlib.contextmanager
    def eagerly(self) -> Iterator[None]:
        """Inside the block forward runs eagerly; the piecewise graphs, if any, come back after."""
        piecewise, self.piecewise = self.piecewise, None
        try:
            yield
        finally:
            self.piecewise = piecewise

    def use_piecewise_graphs(self, max_tokens: int) -> None:
        """Steps of up to max_tokens tokens (prompts, or prompts mixed with decodes) replay CUDA
        graphs of everything but attention from here on (hma.piecewise_graphs); 0: never."""
        from hma.piecewise_graphs import PiecewiseGraphs

        self.piecewise = PiecewiseGraphs(self, max_tokens) if max_tokens > 0 else None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies Hugging Face-named tensors in, fusing q/k/v and gate/up; checks none is missing."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded = set()
        for name, tensor in weights:
            target, offset = _fused_target(name, self.config)
            if target not in params:
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                raise CheckpointError(f"checkpoint tensor {name!r} has no place in {self.config.architecture}")
            param = params[target]
            rows = tensor.shape[0]
            param.data[offset:offset + rows].copy_(tensor)
            loaded.add((target, offset))
        if self.config.tie_word_embeddings:
            loaded.add(("lm_head.weight", 0))
        expected = {(t, o) for n in _expected_names(self.config) for t, o in [_fused_target(n, self.config)]}
        missing = sorted(t for t, o in expected - loaded)
        if missing:
            raise CheckpointError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _fused_target(name: str, config: ModelConfig) -> tuple[str, int]:
    """Maps a Hugging Face tensor name to (our parameter, first row inside it)."""
    name = name.removeprefix("model.")
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    fused = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", q), "v_proj": ("qkv_proj", q + kv),
             "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", config.intermediate_size)}
    for part, (into, offset) in fused.items():
        if f".{part}." in name:
            return name.replace(part, into), offset
    return name, 0


def _expected_names(config: ModelConfig) -> list[str]:
    names = ["embed_tokens.weight", "norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    per_layer = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]
    if config.has_qk_norm:
        per_layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    return names + [f"layers.{i}.{p}" for i in range(config.num_hidden_layers) for p in per_layer]
