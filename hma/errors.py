"""The few exception types that cross module boundaries.

Each carries the HTTP `status` and OpenAI-style `code` that the router puts in the /v1 JSON
error body; everything else in hma raises these or lets a programming error propagate.
"""

from __future__ import annotations


class HMAError(Exception):
    """Base of every error hma raises on purpose."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param  # the request field at fault: OpenAI's error `param`


class ModelNotFoundError(HMAError):
    """The named model is neither the demo, a local folder, nor reachable on the hub."""

    status = 404
    code = "model_not_found"


class CheckpointError(HMAError):
    """A checkpoint folder is missing files or holds ones we cannot read."""

    status = 500
    code = "checkpoint_error"


class UnsupportedModelError(HMAError):
    """The checkpoint is readable but its architecture is not one hma runs."""

    status = 400
    code = "unsupported_model"


class RequestTooLargeError(HMAError):
    """Prompt plus max_tokens exceed the model's context length or the KV budget."""

    status = 400
    code = "context_length_exceeded"


class InvalidRequestError(HMAError):
    """A request field is missing, mistyped or out of range."""

    status = 400
    code = "invalid_request_error"


class AuthenticationError(HMAError):
    """The router wants an API key (`Authorization: Bearer ...`) and the request has none or a wrong one."""

    status = 401
    code = "invalid_api_key"


class ProtocolError(HMAError):
    """A peer sent bytes that are not a valid frame or message; its connection is closed."""

    status = 400
    code = "protocol_error"


class ServiceUnavailableError(HMAError):
    """No host can take the request now (none reachable, or none with room), or a host that was
    serving it was lost; the client may retry (after retry_after_s, when given: Retry-After)."""

    status = 503
    code = "service_unavailable"

    def __init__(self, message: str, param: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message, param)
        self.retry_after_s = retry_after_s


class NotFoundError(HMAError):
    """Something the request names does not exist (outside model names, which have their own)."""

    status = 404
    code = "not_found"


def describe(exc: BaseException) -> str:
    """The exception's message, or its type's name when it has none (a TimeoutError has none)."""
    return str(exc) or type(exc).__name__
