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

A fault of the server (a 5xx other than 503 and 504, whose messages flowbatch
writes itself) goes through :class:`Faults` on its way out: the server log
gets a request id with the full message and the cause's traceback, and the
client gets that id with "internal error" (or, with
``ServeConfig(expose_errors=True)``, the full message). A stage's exception
text (``RuntimeError: database password is ...``) never reaches a client
unless asked for.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from flowbatch.errors import (
    DeadlineExceeded,
    FlowbatchError,
    ItemFailed,
    Overloaded,
    PipelineClosed,
)

__all__ = [
    "INPUT_ERRORS",
    "ApiError",
    "ClientGone",
    "Faults",
    "from_engine",
    "internal_error",
    "is_fault",
]

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
    #: Set once :class:`Faults` has logged this answer under that id.
    request_id: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def as_dict(self) -> dict[str, object]:
        doc: dict[str, object] = {"status": self.status, "type": self.code, "message": self.message}
        if self.request_id is not None:
            doc["request_id"] = self.request_id
        return doc


class ClientGone(Exception):
    """The client disconnected; there is nobody left to answer."""


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "bad_request", message, param=param)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def too_large(message: str) -> ApiError:
    return ApiError(413, "too_large", message)


def internal_error(exc: BaseException) -> ApiError:
    """The answer to an exception nobody expected (a bug); chained to it for the log."""
    err = ApiError(500, "internal", f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def is_fault(status: int) -> bool:
    """Whether an answer with this status is the server's fault and may hold private text.

    503 (no room, shutting down) and 504 (deadline) are expected under load
    and their messages are flowbatch's own; 4xx are the client's to read.
    """
    return status >= 500 and status not in (503, 504)


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def _traceback_of(cause: BaseException | None) -> BaseException | None:
    if isinstance(cause, ItemFailed):
        return cause.error  # the stage's own exception, with its traceback
    return cause


class Faults:
    """How the server's faults are told: logged in full under a request id, answered briefly.

    Usage::

        faults = Faults(expose=False)
        err = faults.conceal(from_engine(exc), "POST /v1/pipelines/embed")
        # err.message == "internal error (request id 3f9c...); ..."; the log has the rest
    """

    __slots__ = ("expose",)

    def __init__(self, expose: bool) -> None:
        self.expose = expose

    def conceal(self, err: ApiError, where: str, request_id: str | None = None) -> ApiError:
        """``err`` as a client may see it; a fault is logged first (once).

        ``err.__cause__`` (set by ``raise ... from exc``) gives the traceback
        logged. Errors that are not faults, or were concealed already, come
        back unchanged.
        """
        if not is_fault(err.status) or err.request_id is not None:
            return err
        rid = request_id or new_request_id()
        cause = _traceback_of(err.__cause__)
        log.error(
            "%s -> %d %s [request id %s]: %s", where, err.status, err.code, rid, err.message,
            exc_info=(type(cause), cause, cause.__traceback__) if cause is not None else None,
        )
        headers = {**err.headers, "X-Request-Id": rid}
        if self.expose:
            message = f"{err.message} (request id {rid})"
        else:
            message = f"internal error (request id {rid}); the server log has the details"
        return ApiError(err.status, err.code, message, headers, err.param, request_id=rid)


def overloaded(message: str, retry_after: int) -> ApiError:
    return ApiError(503, "overloaded", message, {"Retry-After": str(retry_after)})


def from_engine(exc: BaseException, retry_after: int = 1) -> ApiError:
    """The answer to an error raised by the engine for one item.

    A fault (see :func:`is_fault`) holds the full message here: pass it
    through :meth:`Faults.conceal` before a client sees it.
    """
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
        err = ApiError(500, "item_failed", str(exc))
    elif isinstance(exc, FlowbatchError):
        err = ApiError(exc.http_status, type(exc).__name__, str(exc))
    else:
        err = ApiError(500, "internal", f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc  # the traceback Faults logs
    return err
