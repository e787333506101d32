"""The cost planner's pieces: calibration, the cost model built from a plan, the hardware table."""

import json

import pytest

from hma.bench.hardware import ACCELERATORS
from hma.bench.plan import (H100_CALIBRATION, Calibration, Plan, build, calibrate, calibrate_steps, main,
                            merge_speed_runs, num_params)
from hma.bench.speed import prefill_flops
from hma.config import qwen3_shape
from hma.errors import InvalidRequestError

H100 = ACCELERATORS["H100"]
LINK = 100e9 / 8


def _speed_json(overhead_decode, eff_decode, overhead_prefill, eff_prefill):
    """What bench speed would print for a GPU that follows the cost model exactly."""
    config = qwen3_shape("qwen3-4b")
    decode = [{"kv_dtype": "bf16", "context_len": c, "batch_size": b, "weight_bytes": 8e9, "kv_bytes": 1e6 * b * c,
               "step_s": overhead_decode + (8e9 + 1e6 * b * c) / (H100.bandwidth * eff_decode)}
              for c in (1024, 4096) for b in (1, 64)]
    prefill = [{"prefill_dtype": "bf16", "prompt_len": n,
                "seconds": overhead_prefill + prefill_flops(config, n) / (H100.bf16_flops * eff_prefill)}
               for n in (512, 2048, 8192)]
    return {"shapes": [{"shape": "qwen3-4b", "decode": decode, "prefill": prefill}]}


def test_calibration_recovers_the_overheads_and_efficiencies_of_a_known_gpu():
    cal = calibrate(_speed_json(0.002, 0.8, 0.02, 0.6), H100)
    assert cal.decode["bf16"] == pytest.approx((0.002, 0.8), rel=1e-6)
    assert cal.prefill["bf16"] == pytest.approx((0.02, 0.6), rel=1e-6)


def test_step_calibration_fits_the_engines_prefill_steps_and_the_extra_of_mixed_ones():
    config = qwen3_shape("qwen3-4b")

    def step(kind, prompts, tokens):
        seconds = 0.009 + prefill_flops(config, tokens // prompts) * prompts / (H100.bf16_flops * 0.45)
        return {"kind": kind, "prompts": prompts, "prompt_tokens": tokens, "decodes": int(kind == "mixed"),
                "seconds": seconds + (0.013 if kind == "mixed" else 0.0)}

    steps = {"model": "random:qwen3-4b", "steps": [step("prefill", 1, n) for n in (100, 900, 3000)]
             + [step("mixed", 2, 800), step("mixed", 1, 300), {"kind": "decode", "seconds": 0.004}]}
    cal = calibrate_steps(H100_CALIBRATION, [steps], H100)
    assert cal.engine == pytest.approx((0.009, 0.45, 0.013), rel=1e-6)
    assert cal.prefill == H100_CALIBRATION.prefill, "prefill hosts keep the bench speed fit"
    colocated = build(Plan("c", H100, 1), config, cal, LINK)
    disaggregated = build(Plan("d", H100, 1, H100, 1), config, cal, LINK)
    assert colocated.mixed_s == pytest.approx(0.013) and disaggregated.mixed_s == 0.0
    assert colocated.prefill_s([512]) == pytest.approx(0.009 + prefill_flops(config, 512) / (H100.bf16_flops * 0.45))
    # per-prompt lengths, where a run has them, count each prompt's own attention
    uneven = {**steps, "steps": [{**x, "prompt_lens": [700, 100]} if x.get("prompts") == 2 else x
                                 for x in steps["steps"]]}
    assert calibrate_steps(H100_CALIBRATION, [uneven], H100).engine[2] < cal.engine[2]
    with pytest.raises(InvalidRequestError, match="prefill-only steps"):
        calibrate_steps(H100_CALIBRATION, [{**steps, "steps": steps["steps"][3:]}], H100)
    with pytest.raises(InvalidRequestError, match="one model"):
        calibrate_steps(H100_CALIBRATION, [steps, {**steps, "model": "random:qwen3-8b"}], H100)


def test_qwen3_parameter_counts_match_the_published_sizes():
    assert num_params(qwen3_shape("qwen3-8b")) / 1e9 == pytest.approx(8.2, abs=0.1)
    assert num_params(qwen3_shape("qwen3-32b")) / 1e9 == pytest.approx(32.8, abs=0.3)


def test_a_plan_whose_weights_do_not_fit_says_so():
    reason = build(Plan("x", ACCELERATORS["RTX4090"], 1), qwen3_shape("qwen3-14b"), H100_CALIBRATION, LINK)
    assert isinstance(reason, str) and "do not fit" in reason


def test_a_plans_transfer_is_its_kv_bytes_over_the_link_and_colocated_moves_none():
    model = qwen3_shape("qwen3-8b")
    l40s = ACCELERATORS["L40S"]
    piped = build(Plan("p", H100, 1, l40s, 1, "fp8", "fp8", True), model, H100_CALIBRATION, LINK)
    colocated = build(Plan("c", H100, 1), model, H100_CALIBRATION, LINK)
    fp8_bytes_per_token = 2 * 36 * 8 * (128 + 2)  # K and V, 36 layers, 8 KV heads, payload + scale
    assert piped.transfer_s(2048) == pytest.approx(fp8_bytes_per_token * 2048 / LINK)
    assert piped.pipelined and piped.num_layers == 36
    assert colocated.transfer_s(2048) == 0.0
    # a decode step reads every weight once plus the running tokens' KV
    assert colocated.decode_s([1000, 3000]) > colocated.decode_s([1000])


def test_a_plan_that_dequantizes_on_arrival_sends_fp8_kv_but_decodes_and_holds_bf16():
    model = qwen3_shape("qwen3-8b")

    def pair(wire, cache=None, cal=H100_CALIBRATION):
        return build(Plan("p", H100, 1, H100, 1, "fp8", wire, decode_kv_dtype=cache), model, cal, LINK)

    fp8, bf16, on_arrival, same = pair("fp8"), pair("bf16"), pair("fp8", "bf16"), pair("fp8", "fp8")
    assert on_arrival.transfer_s(2048) == fp8.transfer_s(2048) < bf16.transfer_s(2048)
    assert on_arrival.decode_s([1000, 3000]) == bf16.decode_s([1000, 3000]) != fp8.decode_s([1000, 3000])
    assert on_arrival.kv_capacity_tokens == bf16.kv_capacity_tokens < fp8.kv_capacity_tokens
    assert (same.transfer_s(2048), same.decode_s([1000]), same.kv_capacity_tokens) == (
        fp8.transfer_s(2048), fp8.decode_s([1000]), fp8.kv_capacity_tokens), "naming the wire's format changes nothing"
    fp8_only = Calibration({"fp8": H100_CALIBRATION.decode["fp8"]}, H100_CALIBRATION.prefill)
    assert "no bf16 KV decode" in pair("fp8", "bf16", fp8_only), "the decode format needs its calibration"


def test_faster_8bit_calibration_raises_the_planned_goodput(capsys):
    slow = main(["--model", "qwen3-4b", "--trace", "azure-conv", "--num-prompts", "60", "--search-iters", "5"])
    fast = main(["--model", "qwen3-4b", "--trace", "azure-conv", "--num-prompts", "60", "--search-iters", "5",
                 "--8bit-as-fast-as-bf16"])
    label = "L40S x2 + H100, HMA (fp8 prefill, fp8 KV, pipeline)"
    goodput = {r["deployment"]: r["goodput"] for r in slow["rows"] if "goodput" in r}
    goodput_fast = {r["deployment"]: r["goodput"] for r in fast["rows"] if "goodput" in r}
    assert goodput_fast[label] > goodput[label]
    assert "deployment" in capsys.readouterr().out


def test_every_card_names_its_sources_and_gives_dense_rates_or_none():
    for card in ACCELERATORS.values():
        assert card.spec_source and card.price_source
        assert card.memory_bytes > 0 and card.bandwidth > 0
        assert card.dollars_per_hour is None or card.dollars_per_hour > 0
    assert ACCELERATORS["L40S"].fp8_flops == 733e12  # dense, not the 1,466 with 2:4 sparsity



def test_merged_runs_take_each_point_from_the_last_run_that_measured_it():
    full = _speed_json(0.002, 0.8, 0.02, 0.6)
    rerun = _speed_json(0.002, 0.8, 0.004, 0.7)
    rerun["shapes"][0]["decode"] = rerun["shapes"][0]["decode"][:1]  # one decode point, every prefill one
    merged = merge_speed_runs([full, rerun])
    (shape,) = merged["shapes"]
    assert len(shape["decode"]) == 4 and shape["decode"][0] is rerun["shapes"][0]["decode"][0]
    assert shape["prefill"] == rerun["shapes"][0]["prefill"]
    assert calibrate(merged, H100).prefill["bf16"] == pytest.approx((0.004, 0.7), rel=1e-6)


def test_the_planner_calibrates_against_the_card_the_runs_measured(tmp_path):
    path = tmp_path / "speed.json"
    path.write_text(json.dumps(_speed_json(0.002, 0.8, 0.02, 0.6)))  # made with the H100's datasheet
    args = ["--model", "qwen3-4b", "--num-prompts", "20", "--search-iters", "2", "--calibration", str(path)]
    on_h100 = main(args)["calibration"]
    on_h200 = main(args + ["--calibration-card", "H200"])["calibration"]
    assert on_h100["decode"]["bf16"] == pytest.approx((0.002, 0.8), rel=1e-6)
    # the same times on a card with more bandwidth are a smaller share of it
    ratio = ACCELERATORS["H100"].bandwidth / ACCELERATORS["H200"].bandwidth
    assert on_h200["decode"]["bf16"][1] == pytest.approx(0.8 * ratio, rel=1e-6)


def test_calibration_refuses_a_run_with_a_cut_layer_count():
    speed = {**_speed_json(0.002, 0.8, 0.02, 0.6), "num_layers": 2}
    with pytest.raises(InvalidRequestError, match="num-layers"):
        calibrate(speed, H100)
