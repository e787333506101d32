"""The load generator against a scripted OpenAI-style server: what it records and how it fails."""

import asyncio
import json

from aiohttp import web

from hma.bench.goodput import SLO, attainment
from hma.bench.serve import replay
from hma.bench.traces import TraceRequest
from hma.launch import free_port

MAX_PROMPT = 50
BROKEN = 33  # a prompt this long gets a stream that is not JSON
SLOW = 44  # a prompt this long waits SLOW_S for its first token
SLOW_S = 5.0
CHUNK_GAP_S = 0.02


async def _completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if (isinstance(body["prompt"], list) and len(body["prompt"]) > MAX_PROMPT) or not body.get("ignore_eos"):
        return web.json_response({"error": {"message": "prompt too long", "type": "BadRequestError"}}, status=400)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    if len(body["prompt"]) == BROKEN:
        await response.write(b"data: {not json\n\n")
        return response
    if len(body["prompt"]) == SLOW:
        await asyncio.sleep(SLOW_S)
    for i in range(body["max_tokens"]):
        await asyncio.sleep(CHUNK_GAP_S)
        await response.write(f'data: {json.dumps({"choices": [{"text": f"t{i}"}]})}\n\n'.encode())
    prompt = body["prompt"]
    # a text prompt's "tokens": its words, so the test can tell the server's count was used
    usage = {"prompt_tokens": len(prompt.split()) if isinstance(prompt, str) else len(prompt),
             "completion_tokens": body["max_tokens"]}
    await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    return response


async def _scripted_server() -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_post("/v1/completions", _completions)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def test_replay_records_each_chunk_and_reports_failures_without_stopping():
    runner, port = await _scripted_server()
    try:
        requests = [TraceRequest(0.0, 10, 4), TraceRequest(0.05, 60, 3), TraceRequest(0.1, 20, 1),
                    TraceRequest(0.1, BROKEN, 2)]
        records, duration = await replay(f"http://127.0.0.1:{port}/v1/completions", "m", requests, progress=False)
    finally:
        await runner.cleanup()
    first, too_long, single, broken = records
    assert not broken.ok and "JSONDecodeError" in broken.error
    assert first.ok and first.output_len == 4 and len(first.chunk_times) == 4
    assert first.ttft >= CHUNK_GAP_S and first.tpot >= CHUNK_GAP_S * 0.9
    assert not too_long.ok and "HTTP 400" in too_long.error
    assert single.ok and single.output_len == 1 and single.tpot is None
    assert single.sent - first.sent >= 0.09  # sent at its arrival time, not at once
    assert duration >= 0.1


async def test_text_prompts_are_real_text_counted_by_the_server():
    runner, port = await _scripted_server()
    try:
        requests = [TraceRequest(0.0, 400, 2), TraceRequest(0.0, 40, 2)]
        records, _ = await replay(f"http://127.0.0.1:{port}/v1/completions", "m", requests, progress=False,
                                  text=True)
    finally:
        await runner.cleanup()
    assert all(r.ok for r in records)
    assert [r.prompt_len for r in records] == [300, 30]  # the server's count: 0.75 words per token asked


def test_text_prompts_come_from_the_eval_text():
    import random

    from hma.bench.serve import EVAL_TEXT, prompt_text

    words = EVAL_TEXT.read_text().split()
    text = prompt_text(100, words, random.Random(0))
    assert len(text.split()) == 75 and text in " ".join(words)


async def _replay_until_decided(requests: list[TraceRequest]):
    runner, port = await _scripted_server()
    try:
        return await replay(f"http://127.0.0.1:{port}/v1/completions", "m", requests, progress=False,
                            give_up=SLO(ttft_s=0.5, tpot_s=1.0))
    finally:
        await runner.cleanup()


async def test_a_search_probe_stops_once_too_many_requests_missed():
    requests = [TraceRequest(0.0, SLOW, 2), TraceRequest(0.0, SLOW, 2)] + [TraceRequest(0.1 * i, 10, 2) for i in range(8)]
    records, duration = await _replay_until_decided(requests)
    assert duration < SLOW_S / 2  # 2 of 10 past the TTFT limit: more than 10% missed, decided
    assert all("cancelled" in r.error for r in records[:2])
    assert attainment(records, SLO(0.5, 1.0)) < 0.9


async def test_a_search_probe_stops_once_enough_requests_met_the_slo():
    requests = [TraceRequest(0.0, SLOW, 2)] + [TraceRequest(0.02 * i, 10, 2) for i in range(10)]
    records, duration = await _replay_until_decided(requests)
    assert duration < SLOW_S / 2  # 10 of 11 met it: at least 90%, decided before the slow one ends
    assert "cancelled" in records[0].error and all(r.ok for r in records[1:])
    assert attainment(records, SLO(0.5, 1.0)) == 10 / 11
