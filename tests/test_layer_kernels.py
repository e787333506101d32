"""The decoder layer's Triton kernels against their PyTorch references in qwen3.py (on CPU through
Triton's interpreter, on a GPU natively)."""

import pytest
import torch

from hma import layer_kernels, qwen3

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's interpreter has no bfloat16 (numpy lacks it): the CPU checks half precision in float16.
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16
DTYPES = [(torch.float32, 1e-5), (HALF, 1e-2)]


def _randn(*shape, dtype, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 64), (7, 40), (0, 64)])  # 40: a width that is not a power of two
def test_rms_norm_and_its_residual_add_match_the_reference(dtype, tol, rows, cols):
    x, residual = _randn(rows, cols, dtype=dtype, scale=3.0), _randn(rows, cols, dtype=dtype, seed=1)
    weight = _randn(cols, dtype=dtype, seed=2)
    torch.testing.assert_close(layer_kernels.rms_norm(x, weight, 1e-6),
                               qwen3.rms_norm.reference(x, weight, 1e-6), rtol=tol, atol=tol)
    got_sum, got_norm = layer_kernels.add_rms_norm(x, residual, weight, 1e-6)
    want_sum, want_norm = qwen3.add_rms_norm.reference(x, residual, weight, 1e-6)
    torch.testing.assert_close(got_sum, want_sum, rtol=0, atol=0)  # one rounded add: exact
    torch.testing.assert_close(got_norm, want_norm, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("head_dim", [64, 24])  # 24: half a head (12) is not a power of two
def test_norm_and_rotate_matches_the_reference_on_views_of_the_fused_projection(dtype, tol, qk_norm, head_dim):
    tokens, heads, kv_heads = 5, 6, 2
    qkv = _randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, scale=2.0)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)  # strided, as in the model
    rope = qwen3.RotaryEmbedding(head_dim, 10000.0, 64).to(DEVICE)
    cos, sin = rope(torch.tensor([0, 3, 17, 40, 63], device=DEVICE), dtype)
    weights = (_randn(head_dim, dtype=dtype, seed=3), _randn(head_dim, dtype=dtype, seed=4)) if qk_norm else (None, None)
    got = layer_kernels.norm_and_rotate(q, k, cos, sin, *weights, 1e-6)
    want = qwen3.norm_and_rotate.reference(q, k, cos, sin, *weights, 1e-6)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.is_contiguous()
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("rows,cols", [(3, 1536), (1, 40), (0, 16)])  # 1536: two column blocks
def test_silu_and_mul_matches_the_reference(dtype, tol, rows, cols):
    gate_up = _randn(rows, 2 * cols, dtype=dtype, scale=4.0)
    torch.testing.assert_close(layer_kernels.silu_and_mul(gate_up), qwen3.silu_and_mul.reference(gate_up),
                               rtol=tol, atol=tol)
