"""Errors that belong to one request, each with its HTTP status and OpenAI error code.

The generator and the residual cache raise these; the ingress turns any of them into OpenAI's
error body in one place (`Ingress` in serve/app.py), so a status is decided once, by its type.
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
