"""Typed exceptions. Everything CoSine raises on purpose derives from :class:`CosineError`."""

from __future__ import annotations


class CosineError(Exception):
    """Base class of every error CoSine raises on purpose."""


class InvalidParameterError(CosineError, ValueError):
    """A request or setting has a value outside its allowed range.

    ``field`` names the offending parameter so callers (and users) can tell what to fix.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class ModelLoadError(CosineError):
    """A model could not be loaded or is incompatible with the others (e.g. vocabulary mismatch)."""


class ZooNotFoundError(ModelLoadError):
    """The demo model zoo is missing; ``cosine zoo build`` creates it."""


class RequestError(CosineError):
    """A request ended without its output. ``request_id`` names it."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        self.request_id = request_id
        super().__init__(f"{message}" + (f" (request {request_id})" if request_id else ""))


class RequestTimeoutError(RequestError, TimeoutError):
    """The request did not finish within its timeout (it was cancelled)."""


class RequestCancelledError(RequestError):
    """The request was cancelled."""


class InvalidRequestError(RequestError, InvalidParameterError):
    """The server refused the request as invalid (e.g. a prompt longer than the model's context)."""

    def __init__(self, message: str, request_id: str | None = None, field: str = "request") -> None:
        self.request_id = request_id
        self.field = field
        CosineError.__init__(self, f"{field}: {message}" + (f" (request {request_id})" if request_id else ""))


class NoWorkersError(RequestError):
    """No live verifier worker is registered, so nothing would serve the request."""


class OverloadedError(RequestError):
    """The deployment holds as many requests as it accepts (queued or in flight): retry later."""


class ServerError(RequestError):
    """A worker failed the request (the reason is in the message)."""


class StreamGapError(ServerError):
    """The output stream skipped chunks (e.g. lost in a broker failover without persistence)."""
