"""bench steps: an in-process engine replaying a trace, every step timed and kept with its kind."""

import json

import pytest

from hma.bench.steps import main, replay, summarize
from hma.bench.traces import TraceRequest
from tests.helpers import engine_from_hf, tiny_hf_model


def test_replay_keeps_every_step_with_what_it_ran_and_each_requests_ttft():
    engine = engine_from_hf(tiny_hf_model())
    requests = [TraceRequest(0.0, 5, 3), TraceRequest(0.05, 9, 4), TraceRequest(0.1, 3, 1)]
    steps, ttfts = replay(engine, requests)
    assert len(ttfts) == 3 and all(t > 0 for t in ttfts)
    assert sum(s["prompts"] for s in steps) == 3 and sum(s["prompt_tokens"] for s in steps) == 17
    assert all(sum(s["prompt_lens"]) == s["prompt_tokens"] and len(s["prompt_lens"]) == s["prompts"] for s in steps)
    assert {s["kind"] for s in steps} <= {"prefill", "mixed", "decode", "read"} and "decode" in {s["kind"] for s in steps}
    # every output token but each request's first comes from a decode row: 2 + 3 + 0
    assert sum(s["decodes"] for s in steps) == 5
    assert all(s["seconds"] > 0 for s in steps) and [s["t"] for s in steps] == sorted(s["t"] for s in steps)
    assert not engine.has_unfinished and engine.kv_cache.allocator.num_free == 256


def test_summary_gives_each_kind_its_count_median_p90_and_slowest():
    steps = [{"kind": "decode", "seconds": s} for s in (0.004, 0.005, 0.006, 0.007, 0.5)] + \
            [{"kind": "mixed", "seconds": 0.08}]
    summary = summarize(steps)
    assert summary["decode"] == {"count": 5, "median_s": 0.006, "p90_s": pytest.approx(0.3028), "max_s": 0.5}
    assert summary["mixed"]["count"] == 1 and "prefill" not in summary


def test_the_command_replays_a_shipped_trace_on_the_demo_model(tmp_path):
    out = tmp_path / "steps.json"
    result = main(["--model", "demo", "--device", "cpu", "--rate", "20", "--num-requests", "4", "--max-prompt-len", "32",
                   "--max-output-len", "3", "--max-model-len", "128", "--kv-memory-gb", "0.05", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert len(saved["ttft_s"]) == 4 and saved["summary"] == result["summary"]
    assert sum(s["prompts"] for s in saved["steps"]) == 4
