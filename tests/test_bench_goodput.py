"""Serving metrics on hand-made request records, and the goodput search on a known curve."""

import pytest

from hma.bench.goodput import (SLO, RequestRecord, attainment, percentile, search_goodput, search_goodput_from,
                               summarize)


def _record(sent, chunks, output_len, prompt_len=10, error=""):
    return RequestRecord(prompt_len=prompt_len, output_len=output_len, sent=sent, chunk_times=chunks, error=error)


def test_per_request_latencies_follow_the_definitions():
    r = _record(1.0, [1.5, 1.6, 1.8, 2.1], output_len=4)
    assert r.ttft == pytest.approx(0.5)
    assert r.e2el == pytest.approx(1.1)
    assert r.tpot == pytest.approx((2.1 - 1.5) / 3)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])
    assert _record(0.0, [0.2], output_len=1).tpot is None


def test_percentiles_interpolate_between_ranks_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(4.0 + 0.6 * 6.0)
    assert percentile(values, 100) == 10.0
    assert percentile([7.0], 99) == 7.0


def test_attainment_counts_failed_and_slow_requests_as_missed():
    slo = SLO(ttft_s=0.5, tpot_s=0.1)
    records = [
        _record(0.0, [0.2, 0.3, 0.4], 3),         # meets both
        _record(0.0, [0.8, 0.9], 2),              # TTFT too slow
        _record(0.0, [0.1, 0.5, 0.9], 3),         # TPOT 0.4 too slow
        _record(0.0, [0.3], 1),                   # one token: no TPOT to miss
        _record(0.0, [], 0, error="HTTP 503"),    # failed
    ]
    assert attainment(records, slo) == pytest.approx(2 / 5)


def test_summary_uses_vllm_names_and_counts_only_completed_requests():
    records = [_record(0.0, [0.1, 0.2, 0.3], 3, prompt_len=5), _record(1.0, [1.3, 1.5], 2, prompt_len=7),
               _record(2.0, [], 0, prompt_len=9, error="boom")]
    s = summarize(records, duration_s=4.0, slo=SLO(0.2, 1.0))
    assert (s["completed"], s["failed"]) == (2, 1)
    assert s["total_input_tokens"] == 12 and s["total_output_tokens"] == 5
    assert s["request_throughput"] == pytest.approx(0.5)
    assert s["output_throughput"] == pytest.approx(1.25)
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["median_tpot_ms"] == pytest.approx((100.0 + 200.0) / 2)
    assert s["p99_itl_ms"] == pytest.approx(percentile([100.0, 100.0, 200.0], 99))
    assert s["slo_attainment"] == pytest.approx(1 / 3)  # only the first meets TTFT <= 200 ms
    assert s["request_goodput"] == pytest.approx(1 / 4.0)


async def test_goodput_search_finds_the_knee_of_the_attainment_curve():
    # attainment stays 100% up to 3 req/s, then falls steeply
    curve = lambda rate: 1.0 if rate <= 3.0 else max(0.0, 1.0 - (rate - 3.0))  # noqa: E731

    async def attainment_at(rate):
        return curve(rate)

    goodput, tried = await search_goodput(attainment_at, 0.5, 8.0, iterations=12)
    assert goodput == pytest.approx(3.1, abs=0.01)  # the last rate keeping 90%
    assert all(curve(rate) >= 0.9 for rate, _ in tried if rate <= goodput)


async def test_goodput_is_zero_when_even_the_lowest_rate_misses():
    async def attainment_at(rate):
        return 0.5

    assert (await search_goodput(attainment_at, 0.1, 4.0))[0] == 0.0


def _step_curve(knee):
    async def attainment_at(rate):
        return 1.0 if rate <= knee else 0.5
    return attainment_at


@pytest.mark.parametrize("start", [1.0, 50.0, 7.0])
async def test_a_search_from_a_guess_brackets_then_bisects(start):
    goodput, tried = await search_goodput_from(_step_curve(7.3), start, 0.05, 200.0, refine=3)
    passed = [r for r, a in tried if a >= 0.9]
    failed = [r for r, a in tried if a < 0.9]
    assert goodput == max(passed) <= 7.3 < min(failed)
    assert min(failed) / goodput <= 2 ** (1 / 8) + 1e-9  # the doubling step, bisected three times
    assert len(tried) <= 8


async def test_a_search_from_a_guess_stops_at_its_bounds():
    assert (await search_goodput_from(_step_curve(1e9), 10.0, 0.05, 40.0))[0] == 40.0
    goodput, tried = await search_goodput_from(_step_curve(0.01), 10.0, 0.05, 40.0)
    assert goodput == 0.0 and min(r for r, _ in tried) == 0.05


def test_a_request_has_missed_once_its_first_token_is_late_or_it_ended_badly():
    slo = SLO(ttft_s=0.5, tpot_s=0.1)
    waiting = _record(1.0, [], 0)
    assert not slo.missed(waiting, now=1.4) and slo.missed(waiting, now=1.6)
    streaming = _record(1.0, [1.2], 0)
    assert not slo.missed(streaming, now=9.0)  # its first token was in time; its TPOT is not known yet
    slow = _record(1.0, [1.2, 2.2], 2)
    slow.finished = True
    assert slo.missed(slow, now=2.3)
    assert not slo.missed(_record(0.0, [], 0), now=9.0)  # not sent yet
