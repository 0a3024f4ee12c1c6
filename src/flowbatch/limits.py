"""The one in-flight limiter: how many items a runner (or a front end) holds at once.

A :class:`CapacityLimiter` is a counting gate with two ways in, after trio's
``op`` / ``op_nowait`` convention:

- :meth:`~CapacityLimiter.acquire` waits in line (first come, first served)
  for ``n`` places; jobs, streams and ``runner.submit`` use it;
- :meth:`~CapacityLimiter.acquire_nowait` takes them at once or raises
  :class:`~flowbatch.Overloaded` (and counts a rejection); a request that holds
  a connection and ``runner.submit_nowait`` use it. :meth:`try_acquire` is the
  same as a boolean.

``n`` places are taken all together or not at all, so a request of many items
is admitted whole. A waiter ahead in line is never overtaken by a smaller
request behind it (no starvation of large requests). ``total`` can be changed
while running (an adaptive controller does); a larger total wakes waiters at
once, a smaller one lets the places in use drain below it.

Usage::

    limiter = fb.CapacityLimiter(64)
    limiter.acquire_nowait(3)      # or: await limiter.acquire(3)
    try:
        ...
    finally:
        limiter.release(3)

Sizing: the bound is the work an admitted item may find ahead of it. Enough to
give every worker a full batch keeps the model busy; much more only lengthens
every admitted item's wait under overload.

One event loop only (like every object of the engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from dataclasses import dataclass

from .errors import Overloaded

__all__ = ["CapacityLimiter", "LimiterStats"]


@dataclass(frozen=True, slots=True)
class LimiterStats:
    """A snapshot of a :class:`CapacityLimiter` (``limiter.statistics()``)."""

    total: float
    borrowed: int
    waiting: int
    admitted: int
    rejected: int


def _bad_count(n: int, total: float) -> ValueError:
    if n < 1:
        return ValueError(f"places must be >= 1, got {n!r}")
    return ValueError(f"{n} places asked of a limiter of {_fmt(total)}")


class CapacityLimiter:
    """At most ``total`` places held at once; see the module docstring.

    ``total`` may be ``math.inf`` (no limit: nothing is ever rejected or waits,
    but places are still counted).
    """

    __slots__ = ("_total", "_waiters", "admitted", "borrowed", "rejected")

    def __init__(self, total: float) -> None:
        self._total = _check_total(total)
        #: places held now
        self.borrowed = 0
        #: acquisitions granted (each counts once, whatever its ``n``)
        self.admitted = 0
        #: fail-fast acquisitions refused
        self.rejected = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def __repr__(self) -> str:
        return (
            f"<CapacityLimiter {self.borrowed}/{self._total} held, "
            f"{len(self._waiters)} waiting, {self.rejected} rejected>"
        )

    # ------------------------------------------------------------ size

    @property
    def total(self) -> float:
        """The most places held at once; assign to resize (waiters wake at once)."""
        return self._total

    @total.setter
    def total(self, value: float) -> None:
        self._total = _check_total(value)
        self._wake()

    @property
    def available(self) -> float:
        """Places free now (never negative, even after a shrink)."""
        return max(self._total - self.borrowed, 0)

    @property
    def waiting(self) -> int:
        """Acquisitions waiting in line."""
        return sum(1 for _, fut in self._waiters if not fut.done())

    def statistics(self) -> LimiterStats:
        return LimiterStats(
            total=self._total,
            borrowed=self.borrowed,
            waiting=self.waiting,
            admitted=self.admitted,
            rejected=self.rejected,
        )

    # ------------------------------------------------------------ entry

    def try_acquire(self, n: int = 1) -> bool:
        """Take ``n`` places now and return True, or count a rejection and return False."""
        if self.take_free(n):
            return True
        self.rejected += 1
        return False

    def take_free(self, n: int = 1) -> bool:
        """Take ``n`` places if they are free now and nobody waits in line;
        False otherwise, counting no rejection: for a caller that will wait
        in line (:meth:`acquire`) when this fails, so that the places free
        now cost it no trip through the line."""
        if not self._waiters and self.borrowed + n <= self._total:
            self.borrowed += n
            self.admitted += 1
            return True
        return False

    def acquire_nowait(self, n: int = 1) -> None:
        """Take ``n`` places now or raise :class:`~flowbatch.Overloaded`
        (``ValueError``: ``n`` below 1 or above the total, which never fits)."""
        if not 1 <= n <= self._total:
            raise _bad_count(n, self._total)
        if not self.try_acquire(n):
            raise Overloaded(
                f"at capacity: {self.borrowed} of {_fmt(self._total)} items in flight"
                + (f", {len(self._waiters)} waiting" if self._waiters else "")
            )

    async def acquire(self, n: int = 1) -> None:
        """Take ``n`` places, waiting in line for them (cancellation-safe)."""
        if not 1 <= n <= self._total:
            raise _bad_count(n, self._total)
        if not self._waiters and self.borrowed + n <= self._total:
            self.borrowed += n
            self.admitted += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted as we were cancelled: give it back
            else:
                with contextlib.suppress(ValueError):  # _wake may have dropped it
                    self._waiters.remove(entry)
                self._wake()  # those behind us may fit now
            raise

    def release(self, n: int = 1) -> None:
        """Give back ``n`` places."""
        if n < 1:
            raise _bad_count(n, self._total)
        if n > self.borrowed:
            raise RuntimeError(f"released {n} places but only {self.borrowed} are held")
        self.borrowed -= n
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            n, fut = waiters[0]
            if fut.done():  # cancelled while waiting
                waiters.popleft()
                continue
            if self.borrowed + n > self._total:
                return
            waiters.popleft()
            self.borrowed += n
            self.admitted += 1
            fut.set_result(None)


def _check_total(total: float) -> float:
    if isinstance(total, bool) or not isinstance(total, int | float):
        raise TypeError(f"a limiter's total must be a number, got {type(total).__name__}")
    if total != math.inf and (not float(total).is_integer() or total < 1):
        raise ValueError(f"a limiter's total must be an integer >= 1 or math.inf, got {total!r}")
    return total if total == math.inf else int(total)


def _fmt(total: float) -> str:
    return "unlimited" if total == math.inf else str(int(total))
