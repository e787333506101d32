import pytest

from hma.metrics import Counter, Gauge, Histogram, render


def test_histogram_buckets_are_cumulative_with_sum_and_count():
    ttft = Histogram("hma:time_to_first_token_seconds", "Time to first token.", buckets=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        ttft.observe(value)
    text = render([ttft])
    assert '# TYPE hma:time_to_first_token_seconds histogram' in text
    assert 'hma:time_to_first_token_seconds_bucket{le="0.1"} 2' in text  # le is inclusive
    assert 'hma:time_to_first_token_seconds_bucket{le="1"} 3' in text
    assert 'hma:time_to_first_token_seconds_bucket{le="+Inf"} 4' in text
    assert 'hma:time_to_first_token_seconds_sum 3.65' in text
    assert 'hma:time_to_first_token_seconds_count 4' in text


def test_counters_and_gauges_per_label_set():
    sent = Counter("hma:kv_bytes_sent_total", "KV bytes sent.")
    sent.inc(1040, {"kv_format": "fp8"})
    sent.inc(2048, {"kv_format": "bf16"})
    sent.inc(1040, {"kv_format": "fp8"})
    usage = Gauge("hma:kv_cache_usage_perc", "KV cache usage.")
    usage.set(0.25)
    text = render([sent, usage])
    assert 'hma:kv_bytes_sent_total{kv_format="fp8"} 2080' in text
    assert 'hma:kv_bytes_sent_total{kv_format="bf16"} 2048' in text
    assert "hma:kv_cache_usage_perc 0.25" in text.splitlines()
    with pytest.raises(ValueError):
        sent.inc(-1)


def test_label_values_are_escaped():
    c = Counter("hma:x_total", "x")
    c.inc(labels={"model": 'a"b\\c\nd'})
    assert 'hma:x_total{model="a\\"b\\\\c\\nd"} 1' in render([c])


def test_hosts_report_the_kv_blocks_in_use_leaving_out_the_graphs_padding_block():
    from hma.router import host_metrics

    statuses = [("decode@a:1", {"running": 1, "waiting": 0, "num_blocks": 100, "num_free_blocks": 90,
                                "num_reserved_blocks": 1}),
                ("prefill@b:2", {"running": 0, "waiting": 0, "num_blocks": 50, "num_free_blocks": 50})]
    text = render(host_metrics(statuses))
    assert 'hma:kv_cache_used_blocks{host="decode@a:1"} 9' in text.splitlines()
    assert 'hma:kv_cache_used_blocks{host="prefill@b:2"} 0' in text.splitlines()
