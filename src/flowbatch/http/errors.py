"""HTTP errors: what a client is told, and how engine errors map onto them.

::

    ApiError                      an answer other than success, with its status
    ├── 400 bad_request           malformed body, wrong types, missing fields
    ├── 401 unauthorized          missing or wrong API key
    ├── 404 not_found             unknown pipeline, model, job or route
    ├── 405 method_not_allowed
    ├── 413 too_large             body or input count over the limit
    ├── 415 unsupported_media_type
    ├── 422 rejected_input        the pipeline refused this input (its stage
    │                             raised TypeError, ValueError, KeyError, ...)
    ├── 500 item_failed / internal  the pipeline broke; never the client's fault
    ├── 503 overloaded / unavailable  no room now, or draining (Retry-After)
    └── 504 deadline_exceeded     the client's deadline passed

Engine errors (``fb.FlowbatchError``) carry ``http_status``; :func:`from_engine`
turns one into an ``ApiError`` with a message that says what happened and no
stack trace. Each route family renders it in its protocol's shape (see
``render`` in ``app.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from flowbatch.errors import (
    DeadlineExceeded,
    FlowbatchError,
    ItemFailed,
    Overloaded,
    PipelineClosed,
)

__all__ = ["INPUT_ERRORS", "ApiError", "ClientGone", "from_engine", "internal_error", "log_answer"]

log = logging.getLogger("flowbatch.http")

#: Exceptions a stage raises when the input itself is wrong: a client's mistake.
INPUT_ERRORS: tuple[type[BaseException], ...] = (
    TypeError,
    ValueError,
    LookupError,
    UnicodeError,
)


@dataclass(eq=False)
class ApiError(Exception):
    """An answer other than success: ``status``, a short ``code`` and a message."""

    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    param: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def as_dict(self) -> dict[str, object]:
        return {"status": self.status, "type": self.code, "message": self.message}


class ClientGone(Exception):
    """The client disconnected; there is nobody left to answer."""


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "bad_request", message, param=param)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def too_large(message: str) -> ApiError:
    return ApiError(413, "too_large", message)


def internal_error() -> ApiError:
    """The answer to a server fault: no detail (the server log has the traceback)."""
    return ApiError(500, "internal", "internal server error; the server log has the details")


def log_answer(method: str, path: str, err: ApiError) -> None:
    """Log an error answer that is the server's fault (a 500).

    503 and 504 are expected under load and not logged one by one; 4xx are
    the client's to read.
    """
    if err.status == 500:
        log.warning("%s %s -> %d: %s", method, path, err.status, err.message)


def overloaded(message: str, retry_after: int) -> ApiError:
    return ApiError(503, "overloaded", message, {"Retry-After": str(retry_after)})


def from_engine(exc: BaseException, retry_after: int = 1) -> ApiError:
    """The client-facing form of an error raised by the engine for one item."""
    if isinstance(exc, Overloaded):
        return overloaded(str(exc), retry_after)
    if isinstance(exc, PipelineClosed):
        return ApiError(
            503, "unavailable", f"{exc}; the server is shutting down",
            {"Retry-After": str(retry_after)},
        )
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, "deadline_exceeded", str(exc))
    if isinstance(exc, ItemFailed):
        cause = exc.error
        if isinstance(cause, INPUT_ERRORS):
            return ApiError(
                422, "rejected_input",
                f"stage {exc.stage!r} rejected the input: {type(cause).__name__}: {cause}",
            )
        return ApiError(500, "item_failed", str(exc))
    if isinstance(exc, FlowbatchError):
        return ApiError(exc.http_status, type(exc).__name__, str(exc))
    return ApiError(500, "internal", f"internal error ({type(exc).__name__})")
