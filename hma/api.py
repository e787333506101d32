"""The /v1 surface as pure functions: OpenAI JSON bodies in, a validated CompletionRequest out;
response dicts, error bodies and SSE frames back. No aiohttp and no I/O: router.py does the HTTP.

Invariant: parse_* either returns or raises an HMAError with a 4xx status whose `param` names the
field at fault; a JSON null counts as the field being absent, as in OpenAI's and vLLM's servers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from hma.errors import HMAError, InvalidRequestError, ModelNotFoundError, describe
from hma.sampling import SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024               # per stop string: each is searched for in the text at every step
MAX_STOP_TOKEN_IDS = 256            # each is checked against every new token
MAX_TOKEN_ID = 2**31 - 1            # token ids and top_k live in int32/int64 tensors downstream
SEED_RANGE = (-(2**63), 2**63 - 1)  # vLLM's: an int64
GREEDY_BELOW_TEMPERATURE = 1e-5     # vLLM's _SAMPLING_EPS: logits / 1e-300 would overflow to inf
CHAT_ROLES = ("system", "user", "assistant")
SSE_DONE = b"data: [DONE]\n\n"

# Fields accepted only at the value that turns them off, so clients that send defaults still work.
_OFF_VALUES: dict[str, tuple] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
    "best_of": (None, 1), "logit_bias": (None, {}), "suffix": (None, ""),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1), "min_tokens": (None, 0),
    "response_format": (None, {"type": "text"}),
}
_COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                  "stop_token_ids", "ignore_eos", "stream", "stream_options", "n", "user"}
_COMPLETION_OFF = ("logprobs", "echo", "best_of", "logit_bias", "suffix", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "min_tokens")
_CHAT_OFF = ("logprobs", "top_logprobs", "logit_bias", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "min_tokens", "response_format")
COMPLETION_FIELDS = frozenset(_COMMON_FIELDS | {"prompt"} | set(_COMPLETION_OFF))
CHAT_FIELDS = frozenset(_COMMON_FIELDS | {"messages", "max_completion_tokens"} | set(_CHAT_OFF))

# OpenAI's error `type` per HTTP status; other 4xx are invalid requests, other 5xx internal.
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable"}


@dataclass(slots=True)
class CompletionRequest:
    """One validated /v1/completions or /v1/chat/completions body."""

    model: str
    prompt: str | list[int] | None   # completions: text or token ids
    messages: list[dict] | None      # chat: [{"role": ..., "content": str}], parts already joined
    max_tokens: int | None           # chat's None: up to the context limit, the router resolves it
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    is_chat: bool = False

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's SamplingParams, with max_tokens as the router resolved it."""
        greedy = self.temperature < GREEDY_BELOW_TEMPERATURE
        return SamplingParams(
            max_tokens=max_tokens, temperature=0.0 if greedy else self.temperature,
            top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos)


def parse_completion_request(body: object, served_model: str, strict: bool = True) -> CompletionRequest:
    """Validates a /v1/completions body (whatever json.loads returned)."""
    body = _check_keys(body, COMPLETION_FIELDS, strict, "")
    model = _parse_model(body, served_model)
    prompt = _parse_prompt(body.get("prompt"))
    max_tokens = _int(body, "max_tokens", 16, minimum=1)  # 16 is OpenAI's default
    return _build(body, _COMPLETION_OFF, strict, model=model, prompt=prompt, messages=None,
                  max_tokens=max_tokens, is_chat=False)


def parse_chat_request(body: object, served_model: str, strict: bool = True) -> CompletionRequest:
    """Validates a /v1/chat/completions body (whatever json.loads returned)."""
    body = _check_keys(body, CHAT_FIELDS, strict, "")
    model = _parse_model(body, served_model)
    messages = _parse_messages(body.get("messages"), strict)
    max_tokens = _int(body, "max_tokens", None, minimum=1)
    # OpenAI renamed max_tokens to max_completion_tokens; the new name wins, as in vLLM.
    max_completion_tokens = _int(body, "max_completion_tokens", None, minimum=1)
    return _build(body, _CHAT_OFF, strict, model=model, prompt=None, messages=messages,
                  max_tokens=max_completion_tokens or max_tokens, is_chat=True)


def _build(body: dict, off_fields: tuple[str, ...], strict: bool, **fields: object) -> CompletionRequest:
    """The fields both endpoints share, checked in the body's terms."""
    for name in off_fields:
        if not _is_off(body.get(name), _OFF_VALUES[name]):
            raise _bad(name, f"'{name}' is not supported by this server; leave it unset")
    if _int(body, "n", 1, minimum=1) != 1:
        raise _bad("n", "only n=1 is supported; send one request per completion")
    if not isinstance(body.get("user"), (str, type(None))):
        raise _bad("user", f"'user' must be a string, got {_json_type(body['user'])}")
    top_k = _int(body, "top_k", -1, minimum=-1)
    stream = _bool(body, "stream", False)
    stop_token_ids = body.get("stop_token_ids")
    if isinstance(stop_token_ids, list) and len(stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise _bad("stop_token_ids", f"'stop_token_ids' holds {len(stop_token_ids)} ids; at most "
                                     f"{MAX_STOP_TOKEN_IDS} are allowed")
    return CompletionRequest(
        **fields,
        temperature=_number(body, "temperature", 1.0, lambda t: t >= 0, "at least 0"),
        top_p=_number(body, "top_p", 1.0, lambda p: 0 < p <= 1, "in (0, 1]"),
        top_k=-1 if top_k == 0 or top_k > MAX_TOKEN_ID else top_k,  # 0 and beyond any vocab: off
        seed=_int(body, "seed", None, *SEED_RANGE),
        stop=_parse_stop(body.get("stop")),
        stop_token_ids=_token_ids([] if stop_token_ids is None else stop_token_ids, "stop_token_ids"),
        ignore_eos=_bool(body, "ignore_eos", False),
        stream=stream,
        include_usage=_parse_stream_options(body.get("stream_options"), stream, strict),
    )


def _check_keys(obj: object, allowed: frozenset[str], strict: bool, where: str) -> dict:
    """obj must be a JSON object; in strict mode every key must be one we know."""
    if not isinstance(obj, dict):
        what = where or "the request body"
        raise _bad(where or None, f"{what} must be a JSON object, got {_json_type(obj)}")
    if strict:
        for key in obj:
            if key not in allowed:
                raise _bad(f"{where}.{key}" if where else key, f"unknown field '{key}'")
    return obj


def _parse_model(body: dict, served_model: str) -> str:
    model = body.get("model")
    if model is None:
        raise _bad("model", "'model' is required")
    if not isinstance(model, str):
        raise _bad("model", f"'model' must be a string, got {_json_type(model)}")
    if model != served_model:
        raise ModelNotFoundError(f"model '{model}' does not exist; this server serves '{served_model}'",
                                 param="model")
    return model


def _parse_prompt(prompt: object) -> str | list[int]:
    """A string or token ids, bare or as a batch of one (OpenAI clients send both)."""
    if prompt is None:
        raise _bad("prompt", "'prompt' is required")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > 1:
            raise _bad("prompt", "batched prompts are not supported; send one prompt per request")
        prompt = prompt[0]
    if prompt == "" or prompt == []:
        raise _bad("prompt", "'prompt' must not be empty")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return _token_ids(prompt, "prompt")
    raise _bad("prompt", f"'prompt' must be a string or a list of token ids, got {_json_type(prompt)}")


def _parse_messages(messages: object, strict: bool) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    parsed = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        message = _check_keys(message, frozenset({"role", "content", "name"}), strict, where)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise _bad(f"{where}.role", f"{where}.role must be one of {', '.join(CHAT_ROLES)}")
        content = _parse_content(message.get("content"), strict, f"{where}.content")
        parsed.append({"role": role, "content": content})
    return parsed


def _parse_content(content: object, strict: bool, where: str) -> str:
    """A string, or text parts joined by newlines as vLLM joins them."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(where, f"{where} must be a string or a list of text parts, got {_json_type(content)}")
    texts = []
    for i, part in enumerate(content):
        part = _check_keys(part, frozenset({"type", "text"}), strict, f"{where}[{i}]")
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _bad(f"{where}[{i}]", f"{where}[{i}] must be {{\"type\": \"text\", \"text\": string}}")
        texts.append(part["text"])
    return "\n".join(texts)


def _parse_stop(stop: object) -> list[str]:
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", "'stop' must be a non-empty string or a list of them")
    if len(stop) > MAX_STOP_STRINGS:
        raise _bad("stop", f"'stop' holds {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    if max(map(len, stop), default=0) > MAX_STOP_CHARS:
        raise _bad("stop", f"a stop string is {max(map(len, stop))} characters long; at most {MAX_STOP_CHARS} "
                           "are allowed")
    return stop


def _parse_stream_options(options: object, stream: bool, strict: bool) -> bool:
    """Whether to send a final usage chunk; OpenAI allows stream_options only when streaming."""
    if options is None:
        return False
    if not stream:
        raise _bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
    options = _check_keys(options, frozenset({"include_usage"}), strict, "stream_options")
    return _bool(options, "include_usage", False, "stream_options.include_usage")


def _token_ids(ids: object, name: str) -> list[int]:
    if not isinstance(ids, list) or not all(_is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in ids):
        raise _bad(name, f"'{name}' must be a list of non-negative integer token ids")
    return list(ids)


def _int(body: dict, name: str, default: int | None, minimum: int | None = None,
         maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise _bad(name, f"'{name}' must be an integer, got {_json_type(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise _bad(name, f"'{name}' must be {bounds}, got {value}")
    return value


def _number(body: dict, name: str, default: float, is_valid: Callable[[float], bool],
            bounds: str) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, f"'{name}' must be a number, got {_json_type(value)}")
    try:
        value = float(value)  # a JSON integer past 1e308 raises here
    except OverflowError:
        value = math.inf
    if not math.isfinite(value) or not is_valid(value):
        raise _bad(name, f"'{name}' must be {bounds}, got {value}")
    return value


def _bool(body: dict, name: str, default: bool, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(param or name, f"'{param or name}' must be true or false, got {_json_type(value)}")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # bool subclasses int


def _is_off(value: object, offs: tuple) -> bool:
    # Compare booleans by identity, since True == 1 and False == 0 in Python.
    if isinstance(value, bool):
        return any(off is value for off in offs)
    return any(value == off and not isinstance(off, bool) for off in offs)


def _json_type(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _bad(param: str | None, message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def error_body(exc: Exception) -> tuple[int, dict]:
    """HTTP status and OpenAI error body; anything not an HMAError is a 500 that leaks nothing."""
    if not isinstance(exc, HMAError):
        return 500, _error("internal server error", "internal_error", None, "internal_error")
    fallback = "invalid_request_error" if exc.status < 500 else "internal_error"
    kind = _ERROR_TYPES.get(exc.status, fallback)
    param = getattr(exc, "param", None)  # a subclass may define its own __init__
    return exc.status, _error(describe(exc), kind, param, exc.code)


def _error(message: str, kind: str, param: str | None, code: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(request_id: str, model: str, created: int, text: str, finish_reason: str,
                        prompt_tokens: int, completion_tokens: int) -> dict:
    """A whole /v1/completions answer."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return _envelope(request_id, "text_completion", model, created, choice,
                     usage=usage(prompt_tokens, completion_tokens))


def chat_response(request_id: str, model: str, created: int, text: str, finish_reason: str,
                  prompt_tokens: int, completion_tokens: int) -> dict:
    """A whole /v1/chat/completions answer."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish_reason}
    return _envelope(request_id, "chat.completion", model, created, choice,
                     usage=usage(prompt_tokens, completion_tokens))


def completion_chunk(request_id: str, model: str, created: int, text_delta: str,
                     finish_reason: str | None) -> dict:
    """One streamed /v1/completions event; finish_reason is set on the last one only."""
    choice = {"index": 0, "text": text_delta, "logprobs": None, "finish_reason": finish_reason}
    return _envelope(request_id, "text_completion", model, created, choice)


def chat_chunk(request_id: str, model: str, created: int, delta: dict,
               finish_reason: str | None) -> dict:
    """One streamed chat event; the first delta must be {"role": "assistant", "content": ""}."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return _envelope(request_id, "chat.completion.chunk", model, created, choice)


def usage_chunk(request_id: str, model: str, created: int, prompt_tokens: int,
                completion_tokens: int, is_chat: bool) -> dict:
    """The last event before [DONE] when stream_options.include_usage is set: no choices."""
    kind = "chat.completion.chunk" if is_chat else "text_completion"
    return {"id": request_id, "object": kind, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def _envelope(request_id: str, kind: str, model: str, created: int, choice: dict, **extra: dict) -> dict:
    return {"id": request_id, "object": kind, "created": created, "model": model,
            "choices": [choice], **extra}


def models_response(model: str, created: int, max_model_len: int) -> dict:
    """GET /v1/models: the one model this server serves."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "hma", "max_model_len": max_model_len}]}


def sse_event(obj: dict) -> bytes:
    """One server-sent event: compact JSON, ASCII-escaped so any text frames safely."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode("ascii") + b"\n\n"


def sse_error(exc: Exception) -> bytes:
    """An error mid-stream: the status is already sent, so the body goes out as an event."""
    return sse_event(error_body(exc)[1])
