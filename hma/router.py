"""aiohttp app: the OpenAI-compatible /v1 API, /health and /metrics, in front of a generation backend.

A request is parsed and checked by api.py, tokenized here (chat template applied), and handed to
the backend's async `generate`, whose outputs stream back as SSE chunks or one JSON body. Today
the backend is an AsyncEngine in this process (colocated serving); the disaggregated backend
(prefill and decode hosts) plugs in behind the same call. Errors become OpenAI error bodies.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from aiohttp import web

from hma import api
from hma.async_engine import AsyncEngine
from hma.engine import apply_chat_template
from hma.errors import HMAError, InvalidRequestError, RequestTooLargeError
from hma.metrics import Counter, Histogram, render

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024


class Router:
    """The HTTP surface over one backend and its tokenizer."""

    def __init__(self, backend: AsyncEngine, tokenizer, model_name: str, max_model_len: int,
                 strict: bool = True) -> None:
        self.backend, self.tokenizer = backend, tokenizer
        self.model_name, self.max_model_len, self.strict = model_name, max_model_len, strict
        self.created = int(time.time())
        self.ttft = Histogram("hma:time_to_first_token_seconds", "Time to first token.")
        self.e2e = Histogram("hma:e2e_request_latency_seconds", "End-to-end request latency.")
        self.prompt_tokens = Counter("hma:prompt_tokens_total", "Prompt tokens processed.")
        self.generation_tokens = Counter("hma:generation_tokens_total", "Tokens generated.")
        self.finished = Counter("hma:request_success_total", "Finished requests by finish_reason.")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        app.add_routes([web.post("/v1/completions", self.completions),
                        web.post("/v1/chat/completions", self.chat_completions),
                        web.get("/v1/models", self.models), web.get("/health", self.health),
                        web.get("/metrics", self.metrics)])
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
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
            return web.json_response(body, status=status)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(api.models_response(self.model_name, self.created, self.max_model_len))

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        metrics = [self.ttft, self.e2e, self.prompt_tokens, self.generation_tokens, self.finished]
        return web.Response(text=render(metrics), content_type="text/plain")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        parsed = api.parse_completion_request(await _json(request), self.model_name, self.strict)
        prompt = parsed.prompt
        ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        return await self._serve(request, parsed, ids)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        parsed = api.parse_chat_request(await _json(request), self.model_name, self.strict)
        return await self._serve(request, parsed, apply_chat_template(self.tokenizer, parsed.messages))

    async def _serve(self, request: web.Request, parsed: api.CompletionRequest, ids: list[int]) -> web.StreamResponse:
        room = self.max_model_len - len(ids)
        if room < 1 or (parsed.max_tokens or 0) > room:
            raise RequestTooLargeError(f"the prompt has {len(ids)} tokens and asks for {parsed.max_tokens} "
                                       f"more; this model's context is {self.max_model_len} tokens", "messages"
                                       if parsed.is_chat else "prompt")
        params = parsed.sampling_params(parsed.max_tokens or room)
        request_id = f"{'chatcmpl' if parsed.is_chat else 'cmpl'}-{uuid.uuid4().hex}"
        outputs = self.backend.generate({"prompt_token_ids": ids}, params, request_id)
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
        sent = ""
        if parsed.is_chat:
            await response.write(api.sse_event(api.chat_chunk(request_id, self.model_name, self.created,
                                                              {"role": "assistant", "content": ""}, None)))
        try:
            async for out in outputs:
                text = out.text if out.finished else self._partial_text(out, parsed)
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

    def _partial_text(self, out, parsed: api.CompletionRequest) -> str:
        """Text so far, holding back a trailing partial character and anything that could be the
        start of a stop string (the finished text is cut before the stop string)."""
        text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True).rstrip("\ufffd")
        hold = max((len(s) - 1 for s in parsed.stop), default=0)
        return text[:len(text) - hold] if hold else text

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


async def _json(request: web.Request) -> object:
    try:
        return json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the body is not valid JSON: {exc}") from None
