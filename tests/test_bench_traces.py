"""The trace reader on each shipped trace, rate scaling, Poisson arrivals and clipping."""

import statistics

import pytest

from hma.bench.traces import (TRACES, TraceRequest, _azure_time, clip, poisson_arrivals, read_trace,
                              scale_to_rate, trace_path)
from hma.errors import InvalidRequestError

ROWS = {"azure-code": 8819, "azure-conv": 19366, "mooncake": 12031}  # from ../shared/traces/README.md
SPAN_MIN = {"azure-code": 57.3, "azure-conv": 58.4, "mooncake": 3537 / 60}


@pytest.mark.parametrize("name", list(TRACES))
def test_every_shipped_trace_reads_whole_and_in_order(name):
    requests = read_trace(trace_path(name))
    assert len(requests) == ROWS[name]
    arrivals = [r.arrival_s for r in requests]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals)
    assert arrivals[-1] / 60 == pytest.approx(SPAN_MIN[name], abs=0.1)
    assert all(r.prompt_len > 0 and r.output_len >= 0 for r in requests)


def test_azure_timestamps_keep_their_seventh_fractional_digit():
    assert _azure_time("2023-11-16 18:17:03.9799601") - _azure_time("2023-11-16 18:17:03") == pytest.approx(0.9799601)


def test_scaling_to_a_rate_keeps_the_order_and_hits_the_mean_rate():
    requests = read_trace(trace_path("azure-conv"))[:500]
    scaled = scale_to_rate(requests, 2.0)
    assert (len(scaled) - 1) / scaled[-1].arrival_s == pytest.approx(2.0)
    assert [r.prompt_len for r in scaled] == [r.prompt_len for r in requests]


def test_poisson_arrivals_are_seeded_and_have_the_mean_gap():
    requests = [TraceRequest(0.0, 8, 4)] * 4000
    a, b = poisson_arrivals(requests, 5.0, seed=1), poisson_arrivals(requests, 5.0, seed=1)
    assert a == b
    gaps = [y.arrival_s - x.arrival_s for x, y in zip(a, a[1:])]
    assert statistics.fmean(gaps) == pytest.approx(0.2, rel=0.05)


def test_clipping_cuts_lengths_and_counts_what_it_cut():
    requests = [TraceRequest(0.0, 100, 5), TraceRequest(1.0, 10, 50), TraceRequest(2.0, 10, 5)]
    clipped, n = clip(requests, max_prompt_len=64, max_output_len=32)
    assert [(r.prompt_len, r.output_len) for r in clipped] == [(64, 5), (10, 32), (10, 5)]
    assert n == 2


def test_an_unknown_trace_is_refused_by_name():
    with pytest.raises(InvalidRequestError, match="azure-code"):
        trace_path("no-such-trace")
