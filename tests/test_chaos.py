"""A shortened chaos run (hma/chaos.py): two prefill and two decode hosts and the router as processes
on loopback, with hosts SIGKILLed or SIGTERMed (they drain) and restarted, and KV streams
corrupted, truncated, slowed and stalled meanwhile. Nothing may hang, leak KV blocks, stay out of
the rotation or come back wrong."""

from __future__ import annotations

from hma import chaos


def test_a_short_chaos_run_loses_nothing(demo_model_path, tmp_path):
    report = chaos.run(chaos.parse_args(["--requests", "32", "--concurrency", "6", "--request-timeout-s", "90",
                                         "--settle-timeout-s", "60", "--landing-timeout-s", "4",
                                         "--json", str(tmp_path / "chaos.json")]))
    outcomes = report["outcomes"]
    assert chaos.is_clean(report), report
    assert report["hung"] == 0 and report["kv_blocks_leaked"] == 0 and report["router_restarts"] == 0
    assert sum(1 for e in report["faults"] if e.startswith("SIGKILL")) == 4
    assert sum(1 for e in report["faults"] if e.startswith("SIGTERM") and "exited with 0" in e) == 2
    assert sum(1 for e in report["faults"] if e.startswith("SIGSTOP")) == 2
    assert report["chunks_faulted"].get("corrupt", 0) >= 2 and report["chunks_faulted"].get("truncate", 0) >= 1
    assert outcomes.get(chaos.CORRECT, 0) >= 16  # most requests get through, with the right greedy output
    assert sum(outcomes.values()) == 32 and all(k == chaos.CORRECT or k.startswith("failed: ") for k in outcomes)
