"""The three roles as real processes on 127.0.0.1 with the demo model, driven through the HTTP API."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from hma.checkpoint import checkpoint_fingerprint
from hma.engine import LLM
from hma.kv_formats import get_kv_format
from hma.launch import LocalCluster, free_port, post_json, stream_chat
from hma.sampling import SamplingParams
from hma.transport import HandshakeError, connect, serve
from hma.wire import (BeginReply, ErrorMessage, Generate, KVLayer, Query, QueryReply, RequestBegin,
                      encode_bytes, make_hello)

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 30, 3, 64  # the demo model
SMALL_KV = ["--kv-memory-gb", "0.05"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def cluster(demo_model_path):
    """bf16 (unquantized) prefill with int8 KV; the two hosts use different block sizes."""
    with LocalCluster(prefill_flags=["--kv-dtype", "int8", "--block-size", "16", *SMALL_KV],
                      decode_flags=["--kv-dtype", "int8", "--block-size", "32", *SMALL_KV]) as running:
        yield running


@pytest.fixture(scope="module")
def single_process(demo_model_path):
    """The same precision and KV format in one process: the reference outputs."""
    return LLM(kv_dtype="int8", kv_memory_gb=0.05)


def _chat(url: str, **fields) -> tuple[int, dict]:
    return post_json(url + "/v1/chat/completions", {"model": "demo", "messages": QUESTION, "max_tokens": 24,
                                                    "temperature": 0, **fields})


def _metric(url: str, name: str, host_role: str) -> float:
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    found = re.search(rf'^{re.escape(name)}{{host="{host_role}@[^"]*"}} (\S+)$', text, re.M)
    assert found, f"{name} for a {host_role} host is not in /metrics"
    return float(found.group(1))


def _timeline(url: str, request_id: str) -> dict:
    import json
    return json.loads(urllib.request.urlopen(f"{url}/debug/timeline/{request_id}").read())


def test_greedy_chat_equals_the_single_process_engine_streaming_or_not(cluster, single_process):
    expected = single_process.chat(QUESTION, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0]
    status, body = _chat(cluster.url)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == expected.text
    assert "Paris" in expected.text
    assert body["usage"]["completion_tokens"] == len(expected.token_ids)
    events = stream_chat(cluster.url + "/v1/chat/completions",
                         {"model": "demo", "messages": QUESTION, "max_tokens": 24, "temperature": 0})
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for _, e in events)
    assert streamed == expected.text
    assert events[-1][1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]


def test_32_concurrent_requests_of_mixed_lengths_complete_and_free_their_blocks(cluster, single_process):
    free_before = _metric(cluster.url, "hma:kv_cache_free_blocks", "decode")
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    prompts = [" ".join(words[: 1 + i % len(words)] * (1 + i // 8)) for i in range(32)]
    max_tokens = [2 + (i * 5) % 15 for i in range(32)]

    def complete(i: int) -> tuple[int, dict]:
        return post_json(cluster.url + "/v1/completions", {"model": "demo", "prompt": prompts[i],
                                                           "max_tokens": max_tokens[i], "temperature": 0})

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(complete, range(32)))
    # Batched with others, a request's float32 matmuls round differently, which can move a value
    # across an int8 KV rounding step and flip a near-tie greedy token late in a reply (on the CI
    # machine of 2026-12-02, request 17's 9th token of 12: "The" where alone it is "It"). A
    # transfer or block bug garbles replies from their first tokens, and many of them.
    differ = []
    for i, (status, body) in enumerate(results):
        assert status == 200, body
        alone = single_process.generate(prompts[i], SamplingParams(max_tokens=max_tokens[i], temperature=0),
                                        use_tqdm=False)[0]
        got = body["choices"][0]["text"]
        if got != alone.text:
            differ.append(i)
            assert len(os.path.commonprefix([got, alone.text])) >= len(alone.text) // 2, f"request {i}"
    assert len(differ) <= 2, f"requests {differ} differ from the single-process engine"
    assert _metric(cluster.url, "hma:kv_cache_free_blocks", "decode") == free_before
    assert _metric(cluster.url, "hma:num_requests_running", "decode") == 0


def test_wire_bytes_are_the_formats_bytes_per_token_times_tokens_times_layers(cluster):
    status, body = _chat(cluster.url, max_tokens=2)
    assert status == 200
    timeline = _timeline(cluster.url, body["id"])
    num_tokens = body["usage"]["prompt_tokens"]
    per_token_layer = 2 * get_kv_format("int8").bytes_per_token(NUM_KV_HEADS, HEAD_DIM)  # K and V
    assert timeline["kv_payload_bytes"] == per_token_layer * num_tokens * NUM_LAYERS
    # framing: one frame per layer = 18-byte prefix + msgpack header (~150 bytes) + 4-byte checksum
    framing = timeline["kv_frame_bytes"] - timeline["kv_payload_bytes"]
    assert NUM_LAYERS * 22 < framing <= NUM_LAYERS * 256
    bf16_bytes = 2 * get_kv_format("bf16").bytes_per_token(NUM_KV_HEADS, HEAD_DIM) * num_tokens * NUM_LAYERS
    assert timeline["kv_payload_bytes"] <= 0.53 * bf16_bytes


def test_decode_host_receives_layer_0_before_prefill_computes_the_last_layer(cluster):
    long_prompt = " ".join(f"item {i} is blue." for i in range(300))  # ~1,800 tokens
    status, body = post_json(cluster.url + "/v1/completions",
                             {"model": "demo", "prompt": long_prompt, "max_tokens": 1, "temperature": 0})
    assert status == 200, body
    layers = {layer: (computed, received) for layer, computed, received in _timeline(cluster.url, body["id"])["layers"]}
    assert sorted(layers) == list(range(NUM_LAYERS))
    assert layers[0][1] < layers[NUM_LAYERS - 1][0], "layer 0 landed only after the last layer was computed"


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "JSON"),
    ({"model": "demo", "messages": "hi"}, 400, "messages"),
    ({"model": "demo", "messages": QUESTION, "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "demo", "messages": []}, 400, "messages"),
    ({"model": "demo", "messages": QUESTION, "bogus_field": 1}, 400, "bogus_field"),
    ({"model": "gpt-9", "messages": QUESTION}, 404, "gpt-9"),
    ({"model": "demo", "messages": [{"role": "user", "content": "word " * 9000}]}, 400, "context"),
])
def test_bad_requests_get_openai_errors_and_the_cluster_keeps_serving(cluster, body, status, fragment):
    data = body if isinstance(body, bytes) else __import__("json").dumps(body).encode()
    request = urllib.request.Request(cluster.url + "/v1/chat/completions", data, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request)
    error = __import__("json").loads(caught.value.read())["error"]
    assert caught.value.code == status and fragment in error["message"]
    assert _chat(cluster.url, max_tokens=2)[0] == 200


async def test_a_corrupt_kv_stream_fails_only_its_request_and_frees_its_blocks(cluster, demo_model_path):
    fingerprint, secret = checkpoint_fingerprint(demo_model_path), cluster.secret.encode()
    prompt = list(range(100, 140))

    async def corrupt_prefill(conn) -> None:  # accepts, sends one good layer, then garbage
        begin = await conn.recv()
        assert isinstance(begin, RequestBegin)
        await conn.send(BeginReply(begin.request_id, True))
        n = len(prompt)
        payload, scales = torch.zeros(n, NUM_KV_HEADS, HEAD_DIM, dtype=torch.int8), torch.ones(n, NUM_KV_HEADS, 1, dtype=torch.float16)
        layer = KVLayer(begin.request_id, 0, 0, n, payload, scales, payload, scales)
        await conn.send(layer)
        frame = bytearray(encode_bytes(KVLayer(begin.request_id, 1, 0, n, payload, scales, payload, scales)))
        frame[40] ^= 0xFF
        await asyncio.sleep(0)  # small frames leave at the end of the loop's turn: let those go first
        conn.writer.write(bytes(frame))
        await asyncio.sleep(10)

    fake = await serve("127.0.0.1", 0, lambda: make_hello("prefill", fingerprint, "int8", 16), secret, corrupt_prefill)
    decode_host, decode_port = cluster.decode_address.rsplit(":", 1)
    router = await connect(decode_host, int(decode_port), make_hello("router", fingerprint, "none", 1), secret)
    try:
        await router.send(Query("q0", "status"))
        before = (await router.recv()).data["num_free_blocks"]
        fake_address = f"127.0.0.1:{fake.sockets[0].getsockname()[1]}"
        await router.send(Generate("evil-1", prompt, {"max_tokens": 4, "temperature": 0.0}, fake_address))
        assert (await router.recv(timeout=30)).accepted
        failed = await router.recv(timeout=30)
        assert isinstance(failed, ErrorMessage) and failed.request_id == "evil-1"
        await router.send(Query("q1", "status"))
        after = await router.recv()
        assert isinstance(after, QueryReply) and after.data["num_free_blocks"] == before
        assert _chat(cluster.url, max_tokens=2)[0] == 200  # every other request carries on
        with pytest.raises(HandshakeError, match="secret"):
            await connect(decode_host, int(decode_port), make_hello("router", fingerprint, "none", 1), b"wrong")
        with pytest.raises(HandshakeError, match="fingerprint"):
            await connect(decode_host, int(decode_port), make_hello("router", "0" * 64, "none", 1), secret)
    finally:
        await router.close()
        fake.close()
    for fragment in ("dropping peer=prefill@", "checksum", "proof does not match", "model fingerprint"):
        for _ in range(100):  # the host writes its log line just after answering us
            if fragment in cluster.log_tail("decode", 200):
                break
            time.sleep(0.05)
        assert fragment in cluster.log_tail("decode", 200), fragment


@pytest.fixture(scope="module")
def bf16_cluster(demo_model_path):
    """A prefill host sending bf16 KV to a decode host that keeps int8 (transcoded on arrival)."""
    with LocalCluster(prefill_flags=["--kv-dtype", "bf16", *SMALL_KV],
                      decode_flags=["--kv-dtype", "int8", *SMALL_KV]) as running:
        yield running


def test_8_bit_kv_sends_at_most_0_53x_the_bytes_of_bf16(cluster, bf16_cluster):
    sizes = {}
    for name, running in (("int8", cluster), ("bf16", bf16_cluster)):
        status, body = _chat(running.url, max_tokens=12)
        assert status == 200, body
        timeline = _timeline(running.url, body["id"])
        assert timeline["kv_format"] == name
        sizes[name] = timeline["kv_frame_bytes"]  # framing included
    assert "Paris" in body["choices"][0]["message"]["content"]  # bf16 KV landed in an int8 cache
    assert sizes["int8"] <= 0.53 * sizes["bf16"]


NETNS, VETH, PREFILL_IP, DECODE_IP = f"hma-test-{os.getpid()}", f"hmat{os.getpid() % 100000}", "10.77.0.1", "10.77.0.2"
LINK_RATE = "50mbit"


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


def _shape_link(prefix: list[str], device: str) -> str:
    """Slows one end of the link: netem where the kernel has it, else a token bucket (tbf) at the
    same rate; the rate is what matters here. Returns the qdisc used."""
    for qdisc in (["netem", "rate", LINK_RATE], ["tbf", "rate", LINK_RATE, "burst", "64kb", "latency", "2000ms"]):
        try:
            _run(*prefix, "tc", "qdisc", "add", "dev", device, "root", *qdisc)
            return qdisc[0]
        except subprocess.CalledProcessError:
            continue
    pytest.skip(f"this machine cannot shape a link with tc (neither netem nor tbf): {LINK_RATE} not applied")


@pytest.fixture
def slow_link():
    """A network namespace for the prefill host, joined to this one by a veth pair at LINK_RATE."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("creating network namespaces needs root and iproute2 (ip, tc); this machine has neither")
    inside = ["ip", "netns", "exec", NETNS]
    try:
        _run("ip", "netns", "add", NETNS)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"this machine cannot create network namespaces: {exc.stderr.strip()}")
    try:
        _run("ip", "link", "add", VETH + "d", "type", "veth", "peer", "name", VETH + "p")
        _run("ip", "link", "set", VETH + "p", "netns", NETNS)
        _run("ip", "addr", "add", f"{DECODE_IP}/24", "dev", VETH + "d")
        _run("ip", "link", "set", VETH + "d", "up")
        _run(*inside, "ip", "addr", "add", f"{PREFILL_IP}/24", "dev", VETH + "p")
        _run(*inside, "ip", "link", "set", VETH + "p", "up")
        qdiscs = {_shape_link([], VETH + "d"), _shape_link(inside, VETH + "p")}
        yield inside, qdiscs
    finally:
        subprocess.run(["ip", "link", "del", VETH + "d"], capture_output=True)
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


def test_on_a_slow_link_the_pipeline_lowers_ttft(slow_link, demo_model_path):
    inside, qdiscs = slow_link
    prompt = " ".join(f"item {i} is blue." for i in range(300))  # ~1,800 tokens: ~21 MB of int8 KV
    ttft = {}
    for mode in ("--pipeline", "--no-pipeline"):
        with LocalCluster(prefill_flags=["--kv-dtype", "int8", mode, *SMALL_KV], decode_flags=["--kv-dtype", "int8", *SMALL_KV],
                          prefix={"prefill": inside}, prefill_address=f"{PREFILL_IP}:{free_port()}") as running:
            times = []
            for _ in range(3):
                sent = time.perf_counter()
                events = stream_chat(running.url + "/v1/completions",
                                     {"model": "demo", "prompt": prompt, "max_tokens": 1, "temperature": 0})
                times.append(events[0][0] - sent)
            ttft[mode] = statistics.median(times)
    print(f"median TTFT over a {LINK_RATE} link ({'/'.join(sorted(qdiscs))}): {ttft}")
    assert ttft["--pipeline"] < ttft["--no-pipeline"]


def test_load_generator_replays_a_trace_through_the_router(cluster, tmp_path):
    """A short real run of `python -m hma bench serve` against the demo deployment."""
    from hma.bench.serve import main as bench_serve
    from hma.bench.traces import clip, read_trace, trace_path

    out = tmp_path / "serve.json"
    result = bench_serve(["--base-url", cluster.url, "--trace", "azure-conv", "--num-prompts", "6",
                          "--request-rate", "4", "--max-prompt-len", "48", "--max-output-len", "6",
                          "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--json", str(out)])
    assert (result["completed"], result["failed"]) == (6, 0), result["errors"]
    asked = clip(read_trace(trace_path("azure-conv"))[:6], 48, 6)[0]
    assert result["total_output_tokens"] == sum(r.output_len for r in asked)  # ignore_eos: every token asked
    assert result["total_input_tokens"] == sum(r.prompt_len for r in asked)
    assert result["slo_attainment"] == 1.0 and result["mean_ttft_ms"] > 0
    assert json.loads(out.read_text())["completed"] == 6


def test_colocated_replicas_behind_the_router_serve_like_one_engine(demo_model_path, single_process):
    """Baseline (a): no prefill host; two decode hosts each prefill and decode their own requests,
    overlapping their greedy decode steps (async scheduling, the default with CUDA graphs) here too."""
    # the prompts of the 32-request test, whose greedy answers have no near ties that batching
    # (other rows in the same matmul) could flip
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    prompts = [" ".join(words[: 1 + i] * (1 + i // 4)) for i in range(8)]
    with LocalCluster(colocated=True, num_decode=2, decode_flags=["--kv-dtype", "int8", "--async-scheduling", "on",
                                                                  *SMALL_KV]) as replicas:
        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(lambda p: post_json(replicas.url + "/v1/completions", {
                "model": "demo", "prompt": p, "max_tokens": 8, "temperature": 0}), prompts))
        metrics = urllib.request.urlopen(replicas.url + "/metrics").read().decode()
    assert "prefill" not in replicas.processes
    for prompt, (status, body) in zip(prompts, answers):
        assert status == 200, body
        alone = single_process.generate(prompt, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)[0]
        assert body["choices"][0]["text"] == alone.text
    served = [float(n) for n in re.findall(r'^hma:request_success_total{host="decode@[^"]*"} (\S+)$', metrics, re.M)]
    assert len(served) == 2 and sum(served) == len(prompts) and min(served) > 0  # both replicas served


def test_a_decode_host_that_overlaps_its_steps_serves_like_one_engine(demo_model_path, single_process):
    """Async scheduling on a disaggregated decode host (its default with CUDA graphs): requests join
    from the prefill host while a launched step is unread."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    prompts = [" ".join(words[: 2 + i] * (1 + i // 3)) for i in range(12)]
    with LocalCluster(prefill_flags=["--kv-dtype", "int8", *SMALL_KV],
                      decode_flags=["--kv-dtype", "int8", "--async-scheduling", "on", *SMALL_KV]) as running:
        free_before = _metric(running.url, "hma:kv_cache_free_blocks", "decode")
        for prompt in prompts[:3]:  # one at a time: the single process's batches, so its tokens
            status, body = post_json(running.url + "/v1/completions", {"model": "demo", "prompt": prompt,
                                                                       "max_tokens": 12, "temperature": 0})
            alone = single_process.generate(prompt, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)[0]
            assert status == 200 and body["choices"][0]["text"] == alone.text, body
        with ThreadPoolExecutor(len(prompts)) as pool:  # all at once: joins while steps are in flight
            results = list(pool.map(lambda i: post_json(running.url + "/v1/completions", {
                "model": "demo", "prompt": prompts[i], "max_tokens": 3 + i, "temperature": 0,
                "ignore_eos": True}), range(len(prompts))))
        for i, (status, body) in enumerate(results):
            assert status == 200 and body["usage"]["completion_tokens"] == 3 + i, body
        assert _metric(running.url, "hma:kv_cache_free_blocks", "decode") == free_before
        assert _metric(running.url, "hma:num_requests_running", "decode") == 0
