"""bench stream: the engine alone and the same requests served, on the CPU demo deployment."""

import os
import time

from hma.bench.stream import cpu_seconds, main


def test_cpu_seconds_counts_this_process_working():
    before, start = cpu_seconds(os.getpid()), time.process_time()
    while time.process_time() - start < 0.3:
        pass
    assert 0.15 < cpu_seconds(os.getpid()) - before < 5.0


def test_a_short_run_times_both_and_charges_each_process_its_cpu(demo_model_path, tmp_path):
    out = main(["--model", str(demo_model_path), "--num-requests", "2", "--prompt-len", "8", "--output-len", "6",
                "--host-flags", "--device cpu --kv-memory-gb 0.05", "--json", str(tmp_path / "stream.json")])
    alone, served = out["engine_alone"], out["served"]
    assert alone["output_tokens"] == served["output_tokens"] == 12
    assert alone["tok_s"] > 0 and served["tok_s"] > 0 and out["served_over_alone"] > 0
    assert set(served["cpu_us_per_token"]) == {"router", "decode"}
    # /proc counts in clock ticks (10 ms): the router's share of 12 tokens can round to none
    assert served["cpu_us_per_token"]["decode"] > 0 and served["cpu_us_per_token"]["router"] >= 0
    assert (tmp_path / "stream.json").exists()
