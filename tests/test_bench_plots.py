"""The pictures: attainment curves read from serve and plan results, and both PNGs written."""

import json

import pytest

from hma.bench.plots import attainment_curves, main

SERVE = {"model": "demo", "base_url": "http://h:1", "goodput_search": {"tried": [
    {"rate": 4.0, "slo_attainment": 0.5}, {"rate": 0.5, "slo_attainment": 1.0}, {"rate": 2.0, "slo_attainment": 0.95}]}}
PLAN = {"rows": [{"deployment": "A", "tried": [{"rate": 1.0, "slo_attainment": 1.0}, {"rate": 9.0, "slo_attainment": 0.2}]},
                 {"deployment": "B", "skipped": "does not fit"}]}
TIMELINE = {"request_id": "cmpl-1", "num_prompt_tokens": 100, "kv_format": "int8", "begin_at": 10.0,
            "first_token_at": 10.9, "layers": [[i, 10.1 + 0.2 * i, 10.15 + 0.2 * i] for i in range(4)]}


def test_curves_come_sorted_by_rate_one_per_run_or_deployment():
    curves = attainment_curves([SERVE, PLAN], labels=["ours"])
    assert curves["ours"] == [(0.5, 1.0), (2.0, 0.95), (4.0, 0.5)]
    assert curves["A"] == [(1.0, 1.0), (9.0, 0.2)]
    assert "B" not in curves  # skipped deployments have nothing to draw


def test_two_systems_runs_of_the_same_system_keep_a_curve_each_under_their_labels():
    def run(rate):
        probes = [{"rate": rate, "slo_attainment": 0.95}, {"rate": 2 * rate, "slo_attainment": 0.3}]
        return {"model": "random:qwen3-4b", "systems": [{"label": "one replica", "traces": [
            {"trace": "azure-conv", "probes": probes}, {"trace": "azure-code", "probes": probes}]}]}

    curves = attainment_curves([run(2.0), run(16.0)], labels=["before", "after"], trace="azure-conv")
    assert curves == {"before one replica [azure-conv]": [(2.0, 0.95), (4.0, 0.3)],
                      "after one replica [azure-conv]": [(16.0, 0.95), (32.0, 0.3)]}
    assert len(attainment_curves([run(2.0), run(16.0)])) == 2  # unlabelled: one curve per system and trace


def test_both_pictures_are_written_as_png(tmp_path):
    (tmp_path / "serve.json").write_text(json.dumps(SERVE))
    (tmp_path / "plan.json").write_text(json.dumps(PLAN))
    (tmp_path / "timeline.json").write_text(json.dumps(TIMELINE))
    main(["--attainment", str(tmp_path / "serve.json"), str(tmp_path / "plan.json"), "--out", str(tmp_path / "a.png")])
    main(["--timeline", str(tmp_path / "timeline.json"), "--out", str(tmp_path / "t.png")])
    for name in ("a.png", "t.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plots_wants_exactly_one_kind_of_input(tmp_path):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x.png")])
