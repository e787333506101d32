"""The serving simulator on cases whose answer is known by hand."""

import pytest

from hma.bench.goodput import SLO, attainment
from hma.bench.simulate import Deployment, simulate
from hma.bench.traces import TraceRequest

PREFILL = lambda lens: 0.1 + 0.001 * sum(lens)  # noqa: E731  seconds for a batch of prompts
DECODE = lambda ctx: 0.02  # noqa: E731  seconds per decode step, whatever the batch
TRANSFER = lambda prompt_len: 0.05  # noqa: E731


def _disaggregated(**kw) -> Deployment:
    return Deployment(num_prefill=1, num_decode=1, prefill_s=PREFILL, decode_s=DECODE, transfer_s=TRANSFER, **kw)


def test_one_request_takes_prefill_then_transfer_then_one_step_per_token():
    (record,) = simulate([TraceRequest(1.0, 100, 5)], _disaggregated())
    assert record.ttft == pytest.approx(0.2 + 0.05)
    assert record.output_len == 5
    assert record.chunk_times[1:] == pytest.approx([1.27, 1.29, 1.31, 1.33])
    assert record.tpot == pytest.approx(0.02)


def test_a_saturated_prefill_queue_serves_prompts_one_batch_after_another():
    # a token budget of one prompt: ten prompts arriving together are prefilled one by one
    requests = [TraceRequest(0.0, 100, 2) for _ in range(10)]
    records = simulate(requests, _disaggregated(max_batch_tokens=100))
    assert [r.ttft for r in records] == pytest.approx([0.2 * (i + 1) + 0.05 for i in range(10)])


def test_prompts_that_arrive_while_the_device_is_busy_share_the_next_batch():
    requests = [TraceRequest(0.0, 100, 2), TraceRequest(0.1, 100, 2), TraceRequest(0.1, 100, 2)]
    records = simulate(requests, _disaggregated(max_batch_tokens=300))
    # the first runs alone (0 - 0.2 s); the two that came at 0.1 s run together (0.2 - 0.5 s),
    # and their two transfers share the link after that
    assert [r.ttft for r in records] == pytest.approx([0.25, 0.5 + 0.1 - 0.1, 0.5 + 0.1 - 0.1])


def test_decode_kv_capacity_holds_a_prompt_back_until_another_request_finishes():
    # room for one request's tokens at a time: as the decode host refuses to reserve blocks, the
    # second prompt's prefill starts only once the first request is done
    requests = [TraceRequest(0.0, 100, 20), TraceRequest(0.0, 100, 3)]
    first, second = simulate(requests, _disaggregated(kv_capacity_tokens=130))
    assert first.chunk_times[-1] == pytest.approx(0.25 + 19 * 0.02)
    assert second.ttft == pytest.approx(first.chunk_times[-1] + 0.2 + 0.05)
    assert second.tpot == pytest.approx(0.02)


def test_colocated_replica_prefills_then_decodes_without_a_transfer():
    (record,) = simulate([TraceRequest(0.0, 100, 3)],
                         Deployment(num_prefill=0, num_decode=1, prefill_s=PREFILL, decode_s=DECODE))
    assert record.ttft == pytest.approx(0.2)
    assert record.chunk_times == pytest.approx([0.2, 0.22, 0.24])


def test_colocated_prefills_stall_the_running_decodes():
    # the second prompt arrives mid-decode; the next step mixes its prefill with the first
    # request's decode, so that token waits for the whole prefill
    requests = [TraceRequest(0.0, 100, 4), TraceRequest(0.21, 100, 2)]
    first, second = simulate(requests, Deployment(num_prefill=0, num_decode=1, prefill_s=PREFILL, decode_s=DECODE))
    assert first.chunk_times[:2] == pytest.approx([0.2, 0.22])
    assert second.ttft == pytest.approx(0.22 + 0.2 - 0.21)
    assert first.chunk_times[2] == pytest.approx(0.42)  # carried along by the mixed step
    assert first.chunk_times[3] == second.chunk_times[1] == pytest.approx(0.44)


def test_a_colocated_step_that_mixes_prompts_into_decodes_pays_the_mixed_cost_and_others_do_not():
    requests = [TraceRequest(0.0, 100, 4), TraceRequest(0.21, 100, 2)]
    deployment = Deployment(num_prefill=0, num_decode=1, prefill_s=PREFILL, decode_s=DECODE, mixed_s=0.03)
    first, second = simulate(requests, deployment)
    assert first.ttft == pytest.approx(0.2), "a prompt alone is no mixed step"
    assert second.ttft == pytest.approx(0.22 + 0.2 + 0.03 - 0.21)
    assert first.chunk_times[3] - first.chunk_times[2] == pytest.approx(0.02), "decode steps neither"


def test_more_prefill_devices_raise_slo_attainment_under_load():
    requests = [TraceRequest(i * 0.05, 400, 4) for i in range(40)]  # one prompt every 50 ms, each 0.5 s
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    one = attainment(simulate(requests, _disaggregated(max_batch_tokens=400)), slo)
    many = attainment(simulate(requests, Deployment(num_prefill=12, num_decode=1, prefill_s=PREFILL, decode_s=DECODE,
                                                    transfer_s=TRANSFER, max_batch_tokens=400)), slo)
    assert one < 0.2 and many == 1.0


def test_pipelining_hides_all_but_the_last_layers_share_of_the_transfer():
    request = [TraceRequest(0.0, 100, 2)]
    slow_link = lambda prompt_len: 0.15  # noqa: E731  less than the prefill's 0.2 s
    piped = simulate(request, Deployment(1, 1, PREFILL, DECODE, slow_link, pipelined=True, num_layers=10))
    whole = simulate(request, Deployment(1, 1, PREFILL, DECODE, slow_link, pipelined=False, num_layers=10))
    assert piped[0].ttft == pytest.approx(0.2 + 0.015)
    assert whole[0].ttft == pytest.approx(0.2 + 0.15)


def test_a_request_whose_kv_landed_first_joins_decode_first():
    # A finishes prefill first but its KV crawls; B, prefilled later on another device, lands first
    requests = [TraceRequest(0.0, 100, 3), TraceRequest(0.0, 150, 3)]
    transfer = lambda prompt_len: 1.0 if prompt_len == 100 else 0.0  # noqa: E731
    a, b = simulate(requests, Deployment(2, 1, PREFILL, DECODE, transfer, pipelined=False))
    assert (a.ttft, b.ttft) == pytest.approx((1.2, 0.25))
    assert b.chunk_times[1] == pytest.approx(0.27)  # not held behind A, which lands at 1.2 s
