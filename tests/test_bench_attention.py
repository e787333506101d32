"""The attention sweep's bookkeeping, and one real sweep of the kernel under Triton's interpreter."""

from dataclasses import asdict

import pytest
import torch

from hma import kernels
from hma.bench.attention import candidates, fastest, launch_defaults, main, sweep
from hma.kernels import DecodeConfig


def test_fastest_skips_failed_and_wrong_configs():
    rows = [{**asdict(DecodeConfig(64, 4, 2)), "seconds": 1.0, "max_rel_diff": 0.0},
            {**asdict(DecodeConfig(128, 4, 2)), "seconds": 0.5, "max_rel_diff": 0.2},  # quick but wrong
            {**asdict(DecodeConfig(128, 8, 3)), "failed": "OutOfResources"},
            {**asdict(DecodeConfig(128, 4, 3)), "seconds": 0.8, "max_rel_diff": 1e-3}]
    assert fastest(rows) == DecodeConfig(128, 4, 3)
    assert fastest(rows[1:3]) is None  # nothing both ran and agreed


def test_sweep_times_every_config_and_checks_its_output():
    configs = candidates([32, 64], [4], [2], [0, 128])
    assert configs[:2] == [DecodeConfig(32, 4, 2), DecodeConfig(32, 4, 2, 128)]
    assert candidates([64], [4], [2], [0], [256, 512]) == [DecodeConfig(64, 4, 2, None, p) for p in (256, 512)]
    assert candidates([64], [4], [2], [0], [512], [0, 1]) == [DecodeConfig(64, 4, 2, None, 512, k)
                                                             for k in (False, True)]
    rows = sweep("int8", configs, batch=2, context=64, device=torch.device("cpu"), rep_ms=1)
    assert [DecodeConfig(r["tile"], r["num_warps"], r["num_stages"], r["max_registers"]) for r in rows] == configs
    assert all(r["seconds"] > 0 and r["max_rel_diff"] < 0.02 for r in rows)
    # payload (int8) and scales (float16) of K and V, 8 heads x 128 dims, for 2 x 64 tokens
    assert rows[0]["bytes_per_s"] * rows[0]["seconds"] == pytest.approx(2 * 2 * 64 * 8 * (128 + 2))


def test_attention_benchmark_refuses_to_run_without_a_gpu():
    with pytest.raises(SystemExit, match="needs --device cuda"):
        main(["--device", "cpu"])


def test_sweep_places_the_k_conversion_only_for_8_bit_payloads():
    configs = candidates([64], [4], [2], [0], [512], [0, 1])
    assert len(sweep("fp16", configs, batch=1, context=32, device=torch.device("cpu"), rep_ms=1)) == 1
    rows = sweep("fp8", configs, batch=1, context=32, device=torch.device("cpu"), rep_ms=1)
    assert [r["k_in_registers"] for r in rows] == [False, True]


def test_launches_run_each_formats_default_kernel_for_a_profiler(monkeypatch):
    seen = []
    real = kernels.paged_decode_attention

    def counted(q, layer, tables, lens, scale, **kw):
        seen.append((layer.format.name, tuple(q.shape), tuple(tables.shape), kw))
        return real(q, layer, tables, lens, scale, **kw)

    monkeypatch.setattr(kernels, "paged_decode_attention", counted)
    launch_defaults(["fp8", "bf16"], batch=2, context=32, device=torch.device("cpu"), launches=2)
    # default launches (no config passed), 16-token blocks: 2 rows of 2 blocks each
    assert seen == [("fp8", (2, 32, 128), (2, 2), {})] * 2 + [("bf16", (2, 32, 128), (2, 2), {})] * 2
