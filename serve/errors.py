"""Errors that belong to one request, each with its HTTP status and OpenAI error code.

The generator and the residual cache raise these (the generator hands them to the ingress as values,
so that Ray Serve does not log a client's mistake as a failed request with a traceback). `RequestError.body()`
is the one mapping to OpenAI's error object: `request_error_response` in serve/app.py sends it as a
JSON response with the error's status (and `Retry-After` when the error has one), and `Ingress._stream`
sends the same object in a stream's `error` event, so a status and a body are decided once, by the
error's type (docs/contracts.md, "Errors").
"""

from __future__ import annotations

# Retry-After of a 503: long enough not to hammer a recovering store or a replica being replaced, short
# enough that a client retrying finds the replica that already took over.
RETRY_AFTER_S = 5.0


class RequestError(Exception):
    """A request that cannot be answered as asked; the message says why and what would work."""

    status = 400
    code = "invalid_value"
    type = "invalid_request_error"
    param: str | None = None
    retry_after_s: float | None = None  # sent as Retry-After (whole seconds, at least 1) when set

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        if param is not None:
            self.param = param
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def body(self) -> dict:
        """OpenAI's error object for this error: the body of its HTTP response and of a stream's error event."""
        return openai_error(self.message, type_=self.type, code=self.code, param=self.param)


def openai_error(message: str, *, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> dict:
    """OpenAI's error object, ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class InvalidParameterError(RequestError):
    """A request field outside what this server or model supports (400)."""


class UnknownConceptError(RequestError, LookupError):
    """No residual exists for the requested concept id (404)."""

    status = 404
    code = "model_not_found"
    param = "model"


class UnusableResidualError(RequestError):
    """A residual exists but is corrupt or does not fit the loaded base model (422)."""

    status = 422
    code = "residual_invalid"
    param = "model"


class OverloadedError(RequestError):
    """The generator has more work queued than its bound allows, or its queue is full (429); retry after
    ``retry_after_s``."""

    status = 429
    code = "overloaded"
    type = "rate_limit_error"
    retry_after_s = 1.0


class GenerationFailedError(RequestError):
    """The server failed, not because of the request (500). The message carries the request id that the
    server's log line (with the traceback) carries too."""

    status = 500
    code = "server_error"
    type = "server_error"


class ServiceUnavailableError(RequestError):
    """The residual store cannot be reached and no verified copy is cached (503); retrying later may work."""

    status = 503
    code = "storage_unavailable"
    type = "server_error"
    param = "model"
    retry_after_s = RETRY_AFTER_S


class GeneratorUnavailableError(RequestError):
    """No warm generator replica took the request in time, or its replica died and so did the one retry
    (503); a replica is starting or being replaced."""

    status = 503
    code = "service_unavailable"
    type = "server_error"
    retry_after_s = RETRY_AFTER_S


def request_error(exc: BaseException) -> RequestError | None:
    """The RequestError behind ``exc``: itself, or the cause Ray wrapped when a replica raised it."""
    for candidate in (getattr(exc, "cause", None), exc):
        if isinstance(candidate, RequestError) and not hasattr(candidate, "traceback_str"):
            return candidate
    return None
