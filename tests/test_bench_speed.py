"""The arithmetic behind the GPU speed benchmark's floors and MFU (the timings need a GPU)."""

import pytest
import torch

from hma.bench.speed import main, prefill_flops, weight_bytes
from hma.config import ModelConfig
from hma.qwen3 import Qwen3ForCausalLM

SHAPE = dict(architecture="Qwen3ForCausalLM", vocab_size=100, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, head_dim=4)


def test_prefill_flops_count_every_matmul_of_a_causal_prompt():
    config = ModelConfig(**SHAPE)
    n = 3
    # per layer, per token: q 8x8, k 8x4, v 8x4, o 8x8, gate and up 8x12 each, down 12x8
    linear = 2 * (64 + 32 + 32 + 64 + 96 + 96 + 96)
    # QK^T and PV over the 1 + 2 + 3 = 6 query-key pairs, all 8 query dims of both heads
    attention = 2 * 2 * 6 * 8
    lm_head = 2 * 8 * 100  # the last token only
    assert prefill_flops(config, n) == 2 * (n * linear + attention) + lm_head


@pytest.mark.parametrize("tie", [True, False])
def test_decode_reads_each_weight_once_and_only_the_tokens_rows_of_an_untied_embedding(tie):
    model = Qwen3ForCausalLM.create(ModelConfig(**SHAPE, tie_word_embeddings=tie), torch.bfloat16, "cpu")
    everything = sum(p.numel() for p in model.parameters()) * 2  # parameters() lists a tied one once
    embedding = 100 * 8 * 2
    assert weight_bytes(model) == (everything if tie else everything - embedding)


def test_speed_benchmark_refuses_to_run_without_a_gpu():
    with pytest.raises(SystemExit, match="needs --device cuda"):
        main(["--device", "cpu"])


def test_markdown_tables_show_each_point_its_floor_ratio_and_the_baseline():
    from hma.bench.speed import markdown_tables

    point = dict(kv_dtype="bf16", context_len=1024, step_s=0.004, floor_s=0.002, x_floor=2.0)
    shape = {"shape": "qwen3-4b",
             "decode": [{**point, "batch_size": 1}, {**point, "batch_size": 64, "skipped": "too big"}],
             "prefill": [{"prefill_dtype": "fp8", "prompt_len": 512, "tok_s": 1234.4, "mfu_vs_bf16_peak": 0.1}],
             "transformers": [{"batch_size": 1, "context_len": 1024, "step_s": 0.04}],
             "engine": [{"async_scheduling": "off", "batch_size": 1, "context_len": 1024, "step_s": 0.005},
                        {"async_scheduling": "auto", "batch_size": 1, "context_len": 1024, "step_s": 0.0044}]}
    text = markdown_tables([{"shapes": [shape]}])
    assert "| 1 | 1,024 | 4.00 (2.00) | 5.00 (2.50) | 4.40 (2.20) |" in text
    assert "| bf16 | 1,024 | 4.00 (2.00) | does not fit |" in text
    assert "| fp8 | 1,234 (10%) |" in text
    assert "| qwen3-4b | 1 | 40.0 | 4.00 | 10.0 | 2.00 | 20.0 |" in text
    assert "as served / eager" not in text, "a run without eager timings gets no such table"
    assert "GPU work alone" not in text, "nor one without the steps' GPU times"
    shape["decode"][0].update(gpu_step_s=0.003, x_floor_gpu=1.5)
    gpu_table = markdown_tables([{"shapes": [shape]}]).split("GPU work alone")[1]
    assert "| bf16 | 1,024 | 3.00 (1.50) | does not fit |" in gpu_table
    shape["prefill"][0].update(seconds=0.01, eager_s=0.025)
    assert "| fp8 | 10.0 / 25.0 (2.50) |" in markdown_tables([{"shapes": [shape]}])


def test_engine_steps_are_timed_plain_and_overlapped():
    from hma.bench.speed import bench_engine_steps, engine_steps_len

    # RoPE's table exactly as long as main makes it: a longer run would index past its end
    longest = engine_steps_len(5, iters=2, steps=2)
    model = Qwen3ForCausalLM.create(ModelConfig(**SHAPE), torch.float32, "cpu", max_positions=longest + 1)
    model.init_random_()
    rows = bench_engine_steps(model, [1, 3], context=5, device=torch.device("cpu"), iters=2, steps=2)
    assert [(r["async_scheduling"], r["batch_size"]) for r in rows] == [("off", 1), ("off", 3), ("auto", 1), ("auto", 3)]
    assert all(r["step_s"] > 0 and r["tok_s"] == r["batch_size"] / r["step_s"] for r in rows)


def test_prefill_rows_time_the_first_prompt_of_each_length_apart():
    from hma.bench.speed import bench_prefill

    model = Qwen3ForCausalLM.create(ModelConfig(**SHAPE), torch.float32, "cpu")
    model.init_random_()
    rows = bench_prefill(model, ["bf16"], [5, 9], peak=1e12, device=torch.device("cpu"), iters=2)
    assert [r["prompt_len"] for r in rows] == [5, 9]
    assert all(r["first_s"] > 0 and r["seconds"] > 0 and r["eager_s"] > 0 for r in rows)
    assert all(r["piecewise_graphs"] for r in rows), "prompts this short run as the hosts run them"
    assert model.piecewise is None, "the model is handed back as it came"


def test_gpu_state_reads_each_field_of_the_cards_nvidia_smi_line(monkeypatch):
    import subprocess

    from hma.bench import speed

    asked = []

    def nvidia_smi(cmd, **kwargs):
        asked.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="580.65, 700.00 W, 312.5 W, 1980 MHz, 2619 MHz, 1980 MHz, 41, P0\n")

    monkeypatch.setattr(speed.subprocess, "run", nvidia_smi)
    state = speed.gpu_state(torch.device("cuda", 1))
    assert state["power.limit"] == "700.00 W" and state["clocks.sm"] == "1980 MHz" and state["pstate"] == "P0"
    assert list(state) == list(speed.GPU_STATE_FIELDS) and "--id=1" in asked[0]
    assert speed.gpu_state(torch.device("cpu")) == {} and len(asked) == 1

    def missing(cmd, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(speed.subprocess, "run", missing)
    assert speed.gpu_state(torch.device("cuda", 0)) == {}
    monkeypatch.setattr(speed.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, stdout="580.65\n"))
    assert speed.gpu_state(torch.device("cuda", 0)) == {}  # a short line: no values under the wrong names
