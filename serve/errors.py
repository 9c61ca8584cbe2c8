"""Errors that belong to one request, each with its HTTP status and OpenAI error code.

The generator and the residual cache raise these. `RequestError.body()` is the one mapping to
OpenAI's error object: `request_error_response` in serve/app.py sends it as a JSON response with
the error's status, and `Ingress._stream` sends the same object in a stream's `error` event, so a
status and a body are decided once, by the error's type (docs/contracts.md, "Errors").
"""

from __future__ import annotations


class RequestError(Exception):
    """A request that cannot be answered as asked; the message says why and what would work."""

    status = 400
    code = "invalid_value"
    type = "invalid_request_error"
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        if param is not None:
            self.param = param

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
    """Every generator replica's queue is full (429); retrying shortly may work."""

    status = 429
    code = "overloaded"
    type = "rate_limit_error"


class GenerationFailedError(RequestError):
    """The server failed while making the image, not because of the request (500)."""

    status = 500
    code = "server_error"
    type = "server_error"


class ServiceUnavailableError(RequestError):
    """The residual store cannot be reached and no verified copy is cached (503); retrying later may work."""

    status = 503
    code = "storage_unavailable"
    type = "server_error"
    param = "model"


def request_error(exc: BaseException) -> RequestError | None:
    """The RequestError behind ``exc``: itself, or the cause Ray wrapped when a replica raised it."""
    for candidate in (getattr(exc, "cause", None), exc):
        if isinstance(candidate, RequestError) and not hasattr(candidate, "traceback_str"):
            return candidate
    return None
