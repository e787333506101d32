"""bench systems: the deployments it starts, the probes it sends, the table it prints, and a short
real run of the colocated baseline on this CPU (two replicas of the demo model behind the router)."""

import argparse
import json
from pathlib import Path

import pytest

from hma.bench import systems
from hma.bench.link import measure as measure_link
from hma.bench.plan import default_plans
from hma.bench.systems import ABLATIONS, SYSTEMS, main, probe_requests, table
from hma.bench.traces import TraceRequest
from hma.config import EngineConfig, HostConfig, add_flags, from_flags


def test_each_system_starts_the_hosts_and_flags_it_names():
    colocated = SYSTEMS["colocated"].cluster("demo", ["--max-model-len", "512"])
    assert colocated.colocated and colocated.num_decode == 2 and colocated.gpus == {"decode": "0", "decode-1": "1"}
    hma = SYSTEMS["hma"].cluster("demo", [])
    assert hma.prefill_flags == ["--kv-dtype", "fp8", "--prefill-dtype", "fp8"] and hma.decode_flags == ["--kv-dtype", "fp8"]
    assert hma.gpus == {"prefill": "0", "decode": "1"}
    bf16 = SYSTEMS["disagg-bf16"].plan("H200")
    assert (bf16.prefill_dtype, bf16.kv_dtype, bf16.pipeline, bf16.num_prefill) == ("bf16", "bf16", False, 1)
    assert SYSTEMS["hma"].plan("H200").pipeline and SYSTEMS["colocated"].plan("H200").prefill is None
    one = SYSTEMS["colocated-1"]
    assert one.cluster("demo", []).num_decode == 1 and one.cluster("demo", []).gpus == {"decode": "0"}
    assert one.plan("H200").num_decode == 1 and one.num_gpus == 1 and SYSTEMS["colocated"].num_gpus == 2


def _host_settings(flags: list[str]) -> tuple[EngineConfig, HostConfig]:
    """What a prefill or decode host started with these flags runs with."""
    parser = argparse.ArgumentParser()
    add_flags(parser, EngineConfig)
    add_flags(parser, HostConfig)
    args = parser.parse_args(flags)
    return from_flags(args, EngineConfig), from_flags(args, HostConfig)


@pytest.mark.parametrize(("name", "prefill_dtype", "wire", "cache", "pipeline"), [
    ("hma", "fp8", "fp8", "fp8", True),  # (c) itself: each ablation below differs from it in one place
    ("hma-bf16-prefill", "bf16", "fp8", "fp8", True),
    ("hma-bf16-kv", "fp8", "bf16", "bf16", True),
    ("hma-no-pipeline", "fp8", "fp8", "fp8", False),
    ("hma-dequant-on-arrival", "fp8", "fp8", "bf16", True)])
def test_each_ablation_starts_and_plans_hma_with_one_technique_off(name, prefill_dtype, wire, cache, pipeline):
    system = SYSTEMS[name]
    cluster = system.cluster("random:qwen3-4b", ["--max-model-len", "512"])
    prefill, prefill_host = _host_settings(cluster.prefill_flags)
    decode, _ = _host_settings(cluster.decode_flags)
    assert (prefill.prefill_dtype, prefill.kv_dtype, prefill_host.pipeline) == (prefill_dtype, wire, pipeline)
    assert decode.kv_dtype == cache and decode.max_model_len == prefill.max_model_len == 512
    assert not cluster.colocated and cluster.gpus == {"prefill": "0", "decode": "1"}
    plan = system.plan("H200")
    assert (plan.prefill_dtype, plan.kv_dtype, plan.pipeline, plan.decode_kv_dtype or plan.kv_dtype) == (
        prefill_dtype, wire, pipeline, cache)


def test_the_planner_lists_the_disaggregated_pairs_bench_systems_runs():
    def settings(plan):
        return plan.prefill_dtype, plan.kv_dtype, plan.pipeline, plan.decode_kv_dtype or plan.kv_dtype

    pairs = {settings(p) for p in default_plans() if p.prefill is p.decode}  # H100 + H100
    assert pairs == {settings(SYSTEMS[n].plan("H100")) for n in ("disagg-bf16", "hma", *ABLATIONS)}


def test_ablations_run_only_when_named(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(systems, "measure_link", lambda sizes: [{"gbytes_per_s": 1.0}])
    monkeypatch.setattr(systems, "run_system", lambda name, *args: ran.append(name))
    main([])
    assert ran == ["colocated", "colocated-1", "disagg-bf16", "hma"]
    ran.clear()
    main(["--systems", "hma,ablations"])
    assert ran == ["hma", *ABLATIONS] and len(ABLATIONS) == 4
    with pytest.raises(SystemExit):
        main(["--systems", "hma,hma-fp4"])
    assert "no system hma-fp4" in capsys.readouterr().err and len(ran) == 5


def test_a_probe_spans_the_window_at_its_rate():
    trace = [TraceRequest(float(i), 10, 5) for i in range(100)]
    assert len(probe_requests(trace, 4.0, 10.0, 20)) == 40
    assert len(probe_requests(trace, 0.5, 10.0, 20)) == 20  # never fewer than min_requests
    assert len(probe_requests(trace, 50.0, 10.0, 20)) == 100  # never more than the trace holds
    batch = probe_requests(trace, 4.0, 10.0, 20)
    assert abs(len(batch) / (batch[-1].arrival_s - batch[0].arrival_s) - 4.0) < 0.2


def _trace(name, goodput, probes, predicted):
    return {"trace": name, "slo": {"ttft_ms": 250, "tpot_ms": 100}, "goodput": goodput,
            "predicted_goodput": predicted, "probes": [{"rate": r, "slo_attainment": a} for r, a in probes]}


def test_the_table_shows_brackets_planner_error_and_ratios():
    result = {"model": "m", "systems": [
        {"system": "colocated", "traces": [_trace("t", 8.0, [(4, 1.0), (8, 0.95), (16, 0.2), (11.3, 0.5)], 10.0)]},
        {"system": "hma", "traces": [_trace("t", 0.0, [(1, 0.1), (0.5, 0.2)], 0.0)]},
        {"system": "disagg-bf16", "traces": [{**_trace("t", None, [(1, 0.95)], 0.5), "goodput_at_least": 1}]}]}
    text = table([result])
    assert "| 8.00 (fails at 11.30) | 4.00 | 10.00 | +25% |" in text
    assert "| < 0.50 |" in text and ">= 1.00 (cut short)" in text
    assert "m, t: (c) / (a) = 0.00x" in text


def test_the_table_gives_what_each_ablated_technique_is_worth_to_hma():
    result = {"model": "m", "systems": [
        {"system": "hma", "traces": [_trace("t", 3.0, [(3, 0.95)], 3.0)]},
        {"system": "hma-no-pipeline", "traces": [_trace("t", 2.0, [(2, 0.95)], 2.0)]},
        {"system": "hma-dequant-on-arrival", "traces": [_trace("t", 4.0, [(4, 0.95)], 4.0)]}]}
    text = table([result])
    assert "| (c-3) HMA without the pipeline (--no-pipeline) | >= 2.00 |" in text
    assert "m, t: (c) / (c-3) = 1.50x" in text and "m, t: (c) / (c-4) = 0.75x" in text
    assert "(c-1)" not in text, "an ablation that did not run has no ratio"


def test_the_loopback_link_is_measured_through_the_transport():
    (row,) = measure_link([64], num_layers=4, iters=1)
    assert row["bytes"] == 4 * 2 * 64 * 8 * (128 + 2) and row["gbytes_per_s"] > 0
    assert row["raw_gbytes_per_s"] > 0  # the plain-socket baseline, same bytes, same run


@pytest.mark.parametrize("system", ["colocated", "colocated-1"])
def test_a_short_colocated_run_on_the_cpu_finds_a_goodput(tmp_path, system):
    out = tmp_path / "systems.json"
    speed = str(Path(__file__).parents[1] / "hma/bench/results/speed_h200_qwen3-4b.json")  # fitted, unused by demo
    result = main(["--model", "demo", "--systems", system, "--traces", "azure-conv", "--max-prompt-len", "48",
                   "--max-output-len", "3", "--window-s", "2", "--min-requests", "3", "--start-rate", "0.5",
                   "--max-rate", "0.5", "--refine", "0", "--slo-ttft-ms", "20000", "--slo-tpot-ms", "5000",
                   "--calibration", speed, "--json", str(out)])
    assert result["calibration"] == [speed]
    (system,) = result["systems"]
    (trace,) = system["traces"]
    assert trace["goodput"] == 0.5 and trace["probes"][0]["completed"] == 3
    assert trace["predicted_goodput"] is None  # the demo model is no Qwen3 shape the planner knows
    assert json.loads(out.read_text())["link"]["gbytes_per_s"] > 0


def test_the_planner_simulates_the_probes_the_measurement_sends():
    from hma.bench.plan import H100_CALIBRATION, build, simulated_goodput
    from hma.bench.systems import predicted
    from hma.bench.traces import clip, read_trace, trace_path
    from hma.bench.goodput import SLO
    from hma import random_weights

    requests, _ = clip(read_trace(trace_path("azure-code"))[:400], 8192, 512)
    slo = SLO(0.5, 0.2)
    sizes = []
    deployment = build(SYSTEMS["colocated-1"].plan("H200"), random_weights.config_of("random:qwen3-4b"),
                       H100_CALIBRATION, 1e9)
    simulated_goodput(requests, deployment, slo, 0.5, 8.0, 3,
                      lambda reqs, rate: sizes.append(len(probe_requests(reqs, rate, 10.0, 20))) or
                      probe_requests(reqs, rate, 10.0, 20))
    assert sizes and all(n < 400 for n in sizes)  # a probe's window, not the whole trace
    windowed = predicted(SYSTEMS["colocated-1"], "random:qwen3-4b", requests, slo, "H200", 8.0, window_s=10.0)
    whole = simulated_goodput(requests, deployment, slo, 0.05, 400.0, 12)[0]
    assert windowed > whole  # a short window builds less queue than 400 requests in a row


def test_saved_runs_are_predicted_again_from_other_step_costs():
    from hma.bench.plan import H100_CALIBRATION, Calibration
    from hma.bench.systems import repredict

    run = {"model": "random:qwen3-4b", "card": "H200", "link_gbps": 6.5, "num_prompts": 200,
           "max_prompt_len": 8192, "max_output_len": 512, "window_s": 10.0}
    trace = _trace("azure-conv", 1.0, [(1, 1.0)], 99.0)
    slow = Calibration(decode=H100_CALIBRATION.decode,
                       prefill={k: (o + 0.15, e) for k, (o, e) in H100_CALIBRATION.prefill.items()})
    fast, slowed = (repredict(run, "colocated", trace, c) for c in (H100_CALIBRATION, slow))
    assert fast > slowed > 0  # 150 ms more per prefill batch lowers the goodput the planner finds
    assert f"| {fast:.2f} |" in table([{**run, "systems": [{"system": "colocated", "traces": [trace]}]}],
                                      H100_CALIBRATION)
