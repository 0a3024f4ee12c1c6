"""The exception hierarchy of flowbatch.

::

    FlowbatchError
    ├── ItemFailed            an item failed in a stage (the cause is chained)
    ├── DeadlineExceeded      an item's deadline passed before it finished
    ├── Overloaded            no room to admit an item and the caller would not wait
    ├── PipelineClosed        the runner is closing or closed; no new items
    ├── PipelineError         an invalid pipeline, found when it is built
    ├── BatchContractError    a batched stage broke its list-in, list-out contract
    ├── WorkerCrashed         a worker process died while it held the item
    └── Backpressure          raised BY a stage: the service it calls is overloaded

Each error knows the HTTP status a front end should map it to
(``http_status``). ``DeadlineExceeded`` is not a ``TimeoutError`` subclass on
purpose: a stage that catches ``TimeoutError`` must not swallow the engine's
deadline.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping

__all__ = [
    "Backpressure",
    "BatchContractError",
    "DeadlineExceeded",
    "FlowbatchError",
    "ItemFailed",
    "Overloaded",
    "PipelineClosed",
    "PipelineError",
    "WorkerCrashed",
]


class FlowbatchError(Exception):
    """Base class of every error flowbatch raises."""

    http_status: int = 500


class ItemFailed(FlowbatchError):
    """An item failed in ``stage`` after ``attempts`` tries.

    The original exception is chained as ``__cause__`` (and kept in
    ``.error``).
    """

    http_status = 500

    def __init__(self, stage: str, attempts: int, error: BaseException) -> None:
        self.stage = stage
        self.attempts = attempts
        self.error = error
        tries = "attempt" if attempts == 1 else "attempts"
        super().__init__(
            f"stage {stage!r} failed after {attempts} {tries}: "
            f"{type(error).__name__}: {error}"
        )
        self.__cause__ = error

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.stage, self.attempts, self.error))


class DeadlineExceeded(FlowbatchError):
    """The item's deadline passed before its result was ready."""

    http_status = 504


class Overloaded(FlowbatchError):
    """There is no room to admit the item and the caller asked not to wait."""

    http_status = 503


class PipelineClosed(FlowbatchError):
    """The runner no longer accepts items (it is draining or closed)."""

    http_status = 503


class PipelineError(FlowbatchError):
    """The pipeline is invalid; raised when it is built or opened."""

    http_status = 500


class BatchContractError(FlowbatchError):
    """A batched stage returned something other than one result per input."""

    http_status = 500


class WorkerCrashed(FlowbatchError):
    """The worker process that held the item died (exit code in the message)."""

    http_status = 500


class Backpressure(FlowbatchError):
    """Raise it in a stage function: the service it called is overloaded.

    The engine does not count it as a failed attempt: the item is queued
    again (it is not the item's fault) after the stage waited ``retry_after``
    seconds; a stage with ``concurrency=fb.Adaptive(...)`` also cuts its
    limit at once and starts no call until then (see flowbatch.adaptive).
    The item's deadline, and the caller going away, still end it. Raised by a
    batched stage's call, the whole batch is queued again the same way and the
    stage starts no batch until ``retry_after`` has passed; returned in place
    of one item's result, it is that item's ordinary error.

    Usage, with an HTTP client (httpx shown; any status and headers do)::

        async def call_api(x):
            r = await client.post(URL, json=x)
            if (bp := fb.Backpressure.from_response(r.status_code, r.headers)):
                raise bp
            r.raise_for_status()
            return r.json()
    """

    http_status = 503

    #: the statuses :meth:`from_response` reads as backpressure
    STATUSES = frozenset({429, 503})

    def __init__(self, retry_after: float | None = None, message: str | None = None) -> None:
        if retry_after is not None and (
            isinstance(retry_after, bool)
            or not isinstance(retry_after, int | float)
            or not math.isfinite(retry_after)
            or retry_after < 0
        ):
            raise ValueError(
                f"Backpressure.retry_after must be seconds >= 0 or None, got {retry_after!r}"
            )
        self.retry_after = None if retry_after is None else float(retry_after)
        self.message = message
        text = message if message is not None else "the called service is overloaded"
        if retry_after is not None:
            text += f"; retry after {retry_after:g}s"
        super().__init__(text)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.retry_after, self.message))

    @classmethod
    def from_response(
        cls, status: int, headers: Mapping[str, str] | None = None
    ) -> Backpressure | None:
        """A ``Backpressure`` for an HTTP 429 or 503 answer, else None.

        ``retry_after`` comes from the ``Retry-After`` header (seconds or an
        HTTP date; found whatever its case); None when it is absent or
        unreadable (the stage then waits ``DEFAULT_RETRY_AFTER``).
        """
        if status not in cls.STATUSES:
            return None
        raw = _header(headers, "retry-after") if headers is not None else None
        return cls(_retry_after(raw), f"the called service answered HTTP {status}")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)  # case-insensitive mappings (httpx, aiohttp)
    if value is None:
        for k, v in headers.items():
            if k.lower() == name:
                return v
    return value


def _retry_after(raw: str | None) -> float | None:
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        # an HTTP date is wall-clock time: the one place time.time() is right
        return max(when.timestamp() - time.time(), 0.0)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
