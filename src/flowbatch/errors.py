"""The exception hierarchy of flowbatch.

::

    FlowbatchError
    ├── ItemFailed            an item failed in a stage (the cause is chained)
    ├── DeadlineExceeded      an item's deadline passed before it finished
    ├── Overloaded            no room to admit an item and the caller would not wait
    ├── PipelineClosed        the runner is closing or closed; no new items
    ├── PipelineError         an invalid pipeline, found when it is built
    ├── BatchContractError    a batched stage broke its list-in, list-out contract
    └── WorkerCrashed         a worker process died while it held the item

Each error knows the HTTP status a front end should map it to
(``http_status``). ``DeadlineExceeded`` is not a ``TimeoutError`` subclass on
purpose: a stage that catches ``TimeoutError`` must not swallow the engine's
deadline.
"""

from __future__ import annotations

__all__ = [
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
