"""bench profile: the kernel table's arithmetic, and the prefill profile on the CPU (the decode
profile replays CUDA graphs and needs a GPU)."""

from types import SimpleNamespace

import pytest
import torch

from hma.bench.profile import by_kernel, is_matmul, main, profile_prefill
from hma.config import ModelConfig
from hma.qwen3 import Qwen3ForCausalLM

SHAPE = dict(architecture="Qwen3ForCausalLM", vocab_size=100, hidden_size=16, intermediate_size=24,
             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8)


def test_kernels_are_counted_and_timed_per_run_slowest_first():
    events = [SimpleNamespace(name=n, device_time=t) for n, t in
              [("nvjet_sm90_tst_192x8", 30.0), ("_paged_decode_kernel", 5.0), ("nvjet_sm90_tst_192x8", 30.0),
               ("_paged_decode_kernel", 7.0)]]
    rows = by_kernel(events, runs=2)
    assert rows == [{"kernel": "nvjet_sm90_tst_192x8", "count": 1.0, "us": 30.0},
                    {"kernel": "_paged_decode_kernel", "count": 1.0, "us": 6.0}]


def test_matrix_product_kernels_are_told_from_the_rest():
    assert is_matmul("nvjet_sm90_tst_64x8_64x16_4x1_v_bz_splitK_TNT")
    assert is_matmul("void cublasLt::splitKreduce_kernel<32, 16, int, float>")
    assert is_matmul("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n")
    assert is_matmul("_matvec_kernel")  # hma.matvec's, which one-row decode steps run
    assert not is_matmul("_paged_decode_kernel") and not is_matmul("triton_poi_fused_mul_silu_split_0")


def test_a_prefill_profile_on_the_cpu_has_host_ops_and_no_kernels():
    model = Qwen3ForCausalLM.create(ModelConfig(**SHAPE), torch.float32, "cpu")
    model.init_random_()
    out = profile_prefill(model, 20, torch.device("cpu"), top=5)
    assert out["kernels"] == 0 and out["gpu_busy_s"] == 0
    assert out["host_issue_s"] > 0 and out["done_s"] > 0
    assert len(out["top_host_ops"]) == 5 and any(op["name"].startswith("aten::") for op in out["top_host_ops"])


def test_a_prefill_profile_through_the_piecewise_pieces_hands_the_model_back_without_them():
    model = Qwen3ForCausalLM.create(ModelConfig(**SHAPE), torch.float32, "cpu")
    model.init_random_()
    out = profile_prefill(model, 20, torch.device("cpu"), top=5, piecewise=True)
    assert out["piecewise"] and out["host_issue_s"] > 0
    assert any(op["name"].startswith("aten::") for op in out["top_host_ops"])
    assert model.piecewise is None


def test_the_profile_refuses_to_run_without_a_gpu():
    with pytest.raises(SystemExit, match="needs --device cuda"):
        main(["--device", "cpu"])
