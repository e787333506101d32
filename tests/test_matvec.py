"""hma.matvec's kernel against F.linear (on CPU through Triton's interpreter, on a GPU natively),
and the benchmark that times it against cuBLAS."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hma import matvec, qwen3
from hma.bench import matvec as bench
from hma.config import qwen3_shape

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter has no bfloat16


def _randn(*shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (HALF, 2e-2)])
@pytest.mark.parametrize("out_features,in_features", [(64, 1024), (37, 300)])  # 37 x 300: tails in both
def test_matvec_matches_f_linear(dtype, tol, out_features, in_features):
    x, w = _randn(1, in_features, dtype=dtype), _randn(out_features, in_features, dtype=dtype, seed=1)
    got = matvec.linear(x, w, matvec.MatvecConfig(4, 256, 2))
    assert got.shape == (1, out_features) and got.dtype == dtype
    torch.testing.assert_close(got.float(), F.linear(x.float(), w.float()), rtol=tol, atol=tol * in_features ** 0.5)


def test_matvec_reads_a_slice_and_leaves_more_rows_to_f_linear(monkeypatch):
    x = _randn(1, 512, dtype=torch.float32)[:, :256]  # a slice of a wider output, as qkv's q is
    w = _randn(16, 256, dtype=torch.float32, seed=1)
    torch.testing.assert_close(matvec.linear(x, w), F.linear(x, w), rtol=1e-4, atol=1e-4)
    launches = []
    monkeypatch.setattr(matvec.kernels, "triton_launch", lambda *a, **k: launches.append(k))
    two = _randn(2, 256, dtype=torch.float32)
    torch.testing.assert_close(matvec.linear(two, w), F.linear(two, w), rtol=0, atol=0)
    assert launches == []
    matvec.linear(x, w)
    assert launches[0]["FEATURES"] == 4 and not launches[0]["EVEN"]  # K 256 is short of one 512 step


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (HALF, 2e-2)])
@pytest.mark.parametrize("features,in_features", [(64, 512), (37, 300)])
def test_gated_linear_is_silu_and_mul_of_the_linear(dtype, tol, features, in_features):
    x, w = _randn(1, in_features, dtype=dtype), _randn(2 * features, in_features, dtype=dtype, seed=1) * 0.1
    got = matvec.gated_linear(x, w, matvec.MatvecConfig(2, 256, 2))
    want = qwen3.silu_and_mul.reference(F.linear(x.float(), w.float()).to(dtype))
    assert got.shape == (1, features) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.float().abs().max().item())


def test_gated_config_counts_a_feature_as_its_gate_and_its_up_row():
    gated = matvec.choose_config(2560, 2, gated=True)  # qwen3-4b's gate_up: 4 rows, 2 features
    assert (gated.features, gated.block_k, gated.num_warps) == (2, 512, 2)
    gated = matvec.choose_config(4096, 2, gated=True)  # qwen3-8b's: two features of the two-row tile
    assert (gated.features, gated.block_k, gated.num_warps) == (2, 1024, 4)
    assert matvec.choose_config(16384, 2, gated=True).features == 1


@pytest.mark.skipif(DEVICE != "cuda", reason="the fused path is what a decode step of one sequence takes on a GPU")
def test_mlp_of_one_row_runs_gate_up_and_silu_as_one_kernel_and_matches_them_apart(monkeypatch):
    config = dataclasses.replace(qwen3_shape("qwen3-4b"), hidden_size=256, intermediate_size=512, num_hidden_layers=1)
    mlp = qwen3.Qwen3ForCausalLM.create(config, torch.float32, DEVICE, max_positions=16).layers[0].mlp
    with torch.no_grad():
        for param in mlp.parameters():
            param.normal_(0, 0.05)
    x = _randn(1, 256, dtype=torch.float32)
    calls = []
    real = matvec.gated_linear
    monkeypatch.setattr(matvec, "gated_linear", lambda *a, **k: calls.append(a) or real(*a, **k))
    got = mlp(x, 0)
    assert len(calls) == 1
    mlp.gate_up_proj.register_forward_hook(lambda *a: None)  # input_amax's hooks must see gate_up's input
    want = mlp(x, 0)
    assert len(calls) == 1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_config_gives_each_program_about_sixteen_kib_of_weights():
    # qwen3-4b's bf16 linears: qkv/gate_up (K 2,560) 4 features, o (4,096) 2, down (9,728) 1
    assert [matvec.choose_config(k, 2).features for k in (2560, 4096, 9728)] == [4, 2, 1]
    assert matvec.choose_config(2560, 4).features == 2  # float32 rows are twice as wide


def test_benchmark_times_each_linear_the_layer_chain_and_the_fused_layers_and_checks_them():
    config = qwen3_shape("qwen3-4b")
    shapes = bench.decoder_linears(config)
    assert shapes == {"qkv": (6144, 2560), "o": (2560, 4096), "gate_up": (19456, 2560), "down": (2560, 9728)}
    tiny = dataclasses.replace(config, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, num_hidden_layers=1)
    result = bench.bench_shape(tiny, torch.device(DEVICE), torch.float32, replays=1)
    assert [r["linear"] for r in result["runs"]] == ["qkv", "o", "gate_up", "down", "chain", "layer"]
    chain, layer = result["runs"][4:]
    assert chain["bytes"] == layer["bytes"] == 4 * (128 * 64 + 64 * 64 + 192 * 64 + 64 * 96)
    for run in result["runs"]:
        assert run["matvec"]["max_rel_diff"] < 1e-4 and run["cublas"]["max_rel_diff"] == 0
        assert run["matvec"]["seconds"] > 0
    assert layer["fused"]["max_rel_diff"] < 1e-4 and layer["fused"]["seconds"] > 0


def test_matvec_benchmark_refuses_to_run_without_a_gpu():
    with pytest.raises(SystemExit, match="needs --device cuda"):
        bench.main(["--device", "cpu"])
