"""aiohttp app: the OpenAI-compatible /v1 API, /health and /metrics, in front of a generation backend.

A request is parsed and checked by api.py, tokenized here (chat template applied), and handed to
the backend's async `generate`, whose outputs stream back as SSE chunks or one JSON body. The
backend is a Cluster of prefill and decode hosts (hosts.py: disaggregated serving) or an
AsyncEngine in this process (colocated serving). Errors become OpenAI error bodies. With API keys
set, /v1 needs one as a Bearer token (401 otherwise); /health and /metrics stay open for probes.
At most max_queued requests may wait for their first token; more get a 503 with Retry-After.
On SIGTERM the router drains: new requests get 503, those in flight finish (up to 30 s), then it exits.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator

from aiohttp import web

from hma import api, random_weights
from hma.async_engine import AsyncEngine
from hma.checkpoint import load_tokenizer, resolve_model_path
from hma.config import RouterConfig
from hma.detokenizer import IncrementalDetokenizer
from hma.errors import (AuthenticationError, HMAError, InvalidRequestError, NotFoundError, RequestTooLargeError,
                        ServiceUnavailableError)
from hma.host import fingerprint_of, phase, resolve_secret, stop_on_signal
from hma.hosts import Cluster
from hma.loading import apply_chat_template
from hma.metrics import Counter, Gauge, Histogram, render
from hma.request import RequestOutput
from hma.transport import parse_address
from hma.wire import make_hello

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024
API_KEY_ENV = "HMA_API_KEY"
RETRY_AFTER_S = 1  # what a 503 for a full queue tells clients to wait
DRAIN_TIMEOUT_S = 30.0  # on SIGTERM, the longest the router waits for requests in flight


class Router:
    """The HTTP surface over one backend and its tokenizer."""

    def __init__(self, backend: AsyncEngine | Cluster, tokenizer, model_name: str, strict: bool = True,
                 api_keys: tuple[str, ...] = (), max_queued: int = 512) -> None:
        self.backend, self.tokenizer = backend, tokenizer
        self.model_name, self.strict = model_name, strict
        self.api_keys = [key.encode() for key in api_keys]  # empty: the API is open
        self.max_queued, self.num_queued = max_queued, 0  # requests without a first token yet
        self.num_in_flight, self.draining = 0, False
        self.created = int(time.time())
        self.ttft = Histogram("hma:time_to_first_token_seconds", "Time to first token.")
        self.itl = Histogram("hma:inter_token_latency_seconds", "Time between successive output tokens.")
        self.e2e = Histogram("hma:e2e_request_latency_seconds", "End-to-end request latency.")
        self.prompt_tokens = Counter("hma:prompt_tokens_total", "Prompt tokens processed.")
        self.generation_tokens = Counter("hma:generation_tokens_total", "Tokens generated.")
        self.finished = Counter("hma:request_success_total", "Finished requests by finish_reason.")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        app.add_routes([web.post("/v1/completions", self.completions),
                        web.post("/v1/chat/completions", self.chat_completions),
                        web.get("/v1/models", self.models), web.get("/health", self.health),
                        web.get("/metrics", self.metrics), web.get("/debug/timeline/{request_id}", self.timeline)])
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            if request.path.startswith("/v1/"):
                self._authenticate(request)
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status != 413:
                raise
            too_large = InvalidRequestError(f"the request body is over {MAX_BODY_BYTES} bytes")
            return web.json_response(api.error_body(too_large)[1], status=413)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error body
            if not isinstance(exc, HMAError):
                log.exception("request failed path=%s", request.path)
            status, body = api.error_body(exc)
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
            if getattr(exc, "retry_after_s", None):
                headers["Retry-After"] = str(exc.retry_after_s)
            return web.json_response(body, status=status, headers=headers)

    def _authenticate(self, request: web.Request) -> None:
        """With API keys set, /v1 needs one of them as a Bearer token (compared in constant time)."""
        if not self.api_keys:
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = token.strip().encode()
        # every key is compared, so the time taken does not tell which one came close
        if scheme.lower() != "bearer" or not sum(hmac.compare_digest(given, key) for key in self.api_keys):
            raise AuthenticationError("a valid API key is required: send `Authorization: Bearer <key>`")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(api.models_response(self.model_name, self.created, self.backend.max_model_len))

    async def health(self, request: web.Request) -> web.Response:
        """200 once every host is loaded, warm and connected; 503 until then, and while draining."""
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        if self.backend.is_ready:
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "starting"}, status=503)

    async def metrics(self, request: web.Request) -> web.Response:
        metrics = [self.ttft, self.itl, self.e2e, self.prompt_tokens, self.generation_tokens, self.finished]
        return web.Response(text=render(metrics + host_metrics(await self.backend.host_status())),
                            content_type="text/plain")

    async def timeline(self, request: web.Request) -> web.Response:
        """Per-layer timestamps of one request's KV transfer (disaggregated serving only)."""
        found = await self.backend.timeline(request.match_info["request_id"])
        if not found:
            raise NotFoundError(f"no timeline for request {request.match_info['request_id']}")
        return web.json_response(found)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        parsed = api.parse_completion_request(await _json(request), self.model_name, self.strict)
        prompt = parsed.prompt
        ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        return await self._serve(request, parsed, ids)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        parsed = api.parse_chat_request(await _json(request), self.model_name, self.strict)
        return await self._serve(request, parsed, apply_chat_template(self.tokenizer, parsed.messages))

    async def _serve(self, request: web.Request, parsed: api.CompletionRequest, ids: list[int]) -> web.StreamResponse:
        if self.draining:
            raise ServiceUnavailableError("this router is shutting down; retry on another",
                                          retry_after_s=RETRY_AFTER_S)
        self.num_in_flight += 1
        try:
            return await self._generate(request, parsed, ids)
        finally:
            self.num_in_flight -= 1

    async def drain(self, timeout_s: float) -> None:
        """Takes no new requests (503), then waits up to timeout_s for those in flight to finish."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.num_in_flight:
            log.warning("shutting down with %d requests still in flight after %.0f s", self.num_in_flight,
                        timeout_s)

    async def _generate(self, request: web.Request, parsed: api.CompletionRequest,
                        ids: list[int]) -> web.StreamResponse:
        max_model_len = self.backend.max_model_len
        if not max_model_len:
            raise ServiceUnavailableError("no decode host is connected yet; see /health")
        vocab_size = self.backend.vocab_size
        if vocab_size and max(ids, default=0) >= vocab_size:  # caught here, a bad id would fail its whole prefill batch
            raise InvalidRequestError(f"prompt token ids must lie in [0, {vocab_size}); got {max(ids)}", "prompt")
        room = max_model_len - len(ids)
        if room < 1 or (parsed.max_tokens or 0) > room:
            raise RequestTooLargeError(f"the prompt has {len(ids)} tokens and asks for {parsed.max_tokens} "
                                       f"more; this model's context is {max_model_len} tokens", "messages"
                                       if parsed.is_chat else "prompt")
        params = parsed.sampling_params(parsed.max_tokens or room)
        if self.num_queued >= self.max_queued:  # a bounded queue: shed load rather than grow without end
            raise ServiceUnavailableError(f"{self.num_queued} requests are already waiting for their first "
                                          "token; retry later", retry_after_s=RETRY_AFTER_S)
        request_id = f"{'chatcmpl' if parsed.is_chat else 'cmpl'}-{uuid.uuid4().hex}"
        outputs = self._timed(self.backend.generate({"prompt_token_ids": ids}, params, request_id))
        if parsed.stream:
            return await self._stream(request, parsed, request_id, outputs)
        async for out in outputs:
            pass
        self._record(out)
        shape = api.chat_response if parsed.is_chat else api.completion_response
        return web.json_response(shape(request_id, self.model_name, self.created, out.text,
                                       out.finish_reason, len(ids), len(out.token_ids)))

    async def _stream(self, request: web.Request, parsed: api.CompletionRequest, request_id: str,
                      outputs) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        sent, text_so_far = "", IncrementalDetokenizer(self.tokenizer)
        if parsed.is_chat:
            await response.write(api.sse_event(api.chat_chunk(request_id, self.model_name, self.created,
                                                              {"role": "assistant", "content": ""}, None)))
        try:
            async for out in outputs:
                text = out.text if out.finished else _held_back(text_so_far.update(out.token_ids), parsed)
                delta = text[len(sent):]  # text only grows: stop strings are held back until the end
                sent += delta
                if delta or out.finished:
                    await response.write(api.sse_event(self._chunk(parsed, request_id, delta, out)))
        except HMAError as exc:
            await response.write(api.sse_error(exc))
            return response
        self._record(out)
        if parsed.include_usage:
            await response.write(api.sse_event(api.usage_chunk(request_id, self.model_name, self.created,
                                                               len(out.prompt_token_ids), len(out.token_ids),
                                                               parsed.is_chat)))
        await response.write(api.SSE_DONE)
        return response

    async def _timed(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Passes outputs through, observing the time between tokens (a gap spread over the tokens
        that arrived together)."""
        last, num_tokens = None, 0
        self.num_queued += 1
        queued = True
        try:
            async for out in outputs:
                if queued:
                    self.num_queued, queued = self.num_queued - 1, False
                now = time.perf_counter()
                new = len(out.token_ids) - num_tokens
                if last is not None and new > 0:
                    for _ in range(new):
                        self.itl.observe((now - last) / new)
                last, num_tokens = now, len(out.token_ids)
                yield out
        finally:
            if queued:
                self.num_queued -= 1

    def _chunk(self, parsed: api.CompletionRequest, request_id: str, delta: str, out) -> dict:
        reason = out.finish_reason if out.finished else None
        if parsed.is_chat:
            return api.chat_chunk(request_id, self.model_name, self.created, {"content": delta}, reason)
        return api.completion_chunk(request_id, self.model_name, self.created, delta, reason)

    def _record(self, out) -> None:
        metrics = out.metrics
        if metrics.ttft is not None:
            self.ttft.observe(metrics.ttft)
        if metrics.e2e_latency is not None:
            self.e2e.observe(metrics.e2e_latency)
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(len(out.token_ids))
        self.finished.inc(labels={"finished_reason": out.finish_reason or "abort"})


def _held_back(text: str, parsed: api.CompletionRequest) -> str:
    """Streamed text so far, holding back anything that could be the start of a stop string
    (the finished text is cut before the stop string)."""
    hold = max((len(s) - 1 for s in parsed.stop), default=0)
    return text[:len(text) - hold] if hold else text


async def serve_router(config: RouterConfig) -> None:
    """The router's main: tokenizer, connections to every host, then the HTTP API until stopped."""
    secret = resolve_secret(config.secret)
    with phase("load-tokenizer"):
        random = random_weights.shape_of(config.model)
        tokenizer = random_weights.TokenIdText() if random else load_tokenizer(resolve_model_path(config.model))
        fingerprint = fingerprint_of(config.model)
    # the router holds no KV: its Hello's kv_format and block_size are placeholders no peer checks
    cluster = Cluster(_addresses(config.prefill_hosts), _addresses(config.decode_hosts),
                      lambda: make_hello("router", fingerprint, "none", 1), secret)
    cluster.start()
    router = Router(cluster, tokenizer, config.served_model_name or config.model, config.api_strict,
                    api_keys(config.api_key), config.max_queued_requests)
    runner = web.AppRunner(router.app(), access_log=None)
    await runner.setup()
    stop = stop_on_signal()
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        log.info("listening role=router url=http://%s:%d", config.host, config.port)
        await stop.wait()
        log.info("draining role=router in_flight=%d", router.num_in_flight)
        await router.drain(DRAIN_TIMEOUT_S)
    finally:
        await runner.cleanup()
        await cluster.stop()


def api_keys(flag: str | None) -> tuple[str, ...]:
    """--api-key, else $HMA_API_KEY: comma-separated keys; none means the API is open."""
    text = flag if flag is not None else os.environ.get(API_KEY_ENV, "")
    return tuple(key.strip() for key in text.split(",") if key.strip())


def _addresses(text: str) -> list[str]:
    found = [a.strip() for a in text.split(",") if a.strip()]
    for address in found:
        parse_address(address)  # refuse a bad address at start-up, not at the first request
    return found


def host_metrics(statuses: list[tuple[str, dict]]) -> list:
    """Gauges and counters from each host's status: requests, KV cache use, KV bytes moved."""
    running = Gauge("hma:num_requests_running", "Requests in model execution batches.")
    waiting = Gauge("hma:num_requests_waiting", "Requests waiting to be processed (or their KV to land).")
    usage = Gauge("hma:kv_cache_usage_perc", "KV cache usage; 1 means 100 percent.")
    free = Gauge("hma:kv_cache_free_blocks", "Free KV cache blocks.")
    used = Gauge("hma:kv_cache_used_blocks", "KV cache blocks held by requests (their KV landed, "
                 "arriving or being computed); 0 on an idle host, or blocks leaked.")
    sent = Counter("hma:kv_transfer_bytes_total", "KV bytes sent by prefill hosts, framing included.")
    finished = Counter("hma:request_success_total", "Requests each decode host finished.")
    for host, status in statuses:
        labels = {"host": host}
        running.set(status["running"], labels)
        waiting.set(status["waiting"], labels)
        free.set(status["num_free_blocks"], labels)
        used.set(status["num_blocks"] - status["num_free_blocks"] - status.get("num_reserved_blocks", 0), labels)
        usage.set(1 - status["num_free_blocks"] / max(status["num_blocks"], 1), labels)
        if "kv_bytes_sent" in status:
            sent.inc(status["kv_bytes_sent"], {**labels, "kv_format": status["kv_format"]})
        if "num_requests_finished" in status:
            finished.inc(status["num_requests_finished"], labels)
    return [running, waiting, usage, free, used, sent, finished]


async def _json(request: web.Request) -> object:
    try:
        return json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the body is not valid JSON: {exc}") from None
