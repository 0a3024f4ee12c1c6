"""Retry policy: which errors are retried, how often, and how long to wait.

Usage::

    fb.stage(fetch, retry=fb.Retry(attempts=5, backoff=0.1, on=(OSError,)))
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .errors import BatchContractError, DeadlineExceeded, PipelineClosed

__all__ = ["DEFAULT_RETRY", "NO_RETRY", "Retry"]

# Errors that say something about the item's fate or the engine, not about a
# transient fault: retrying them cannot help.
_NEVER_RETRY: tuple[type[BaseException], ...] = (
    BatchContractError,
    DeadlineExceeded,
    PipelineClosed,
)


@dataclass(frozen=True, slots=True)
class Retry:
    """Retry an item up to ``attempts`` times in all, with exponential backoff.

    The wait before attempt ``n + 1`` is ``backoff * 2 ** (n - 1)`` seconds,
    capped at ``max_backoff``; with ``jitter`` it is drawn uniformly from the
    upper half of that interval so that a burst of failures does not retry in
    lockstep. Only exceptions that are instances of ``on`` are retried.

    Usage: ``fb.Retry(attempts=3, backoff=0.05, on=(ConnectionError,))``
    """

    attempts: int = 3
    backoff: float = 0.05
    max_backoff: float = 2.0
    jitter: bool = True
    on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"Retry.attempts must be an int >= 1, got {self.attempts!r}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("Retry.backoff and Retry.max_backoff must be >= 0")
        on = self.on
        if isinstance(on, type):
            object.__setattr__(self, "on", (on,))
            on = (on,)
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in on):
            raise ValueError(f"Retry.on must be exception classes, got {on!r}")

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Whether an item that failed its ``attempt``-th try gets another."""
        return (
            attempt < self.attempts
            and isinstance(error, self.on)
            and not isinstance(error, _NEVER_RETRY)
        )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after the ``attempt``-th failed try."""
        base: float = min(self.max_backoff, self.backoff * (2 ** (attempt - 1)))
        if self.jitter:
            return random.uniform(base / 2, base)
        return base


NO_RETRY = Retry(attempts=1)
DEFAULT_RETRY = NO_RETRY
