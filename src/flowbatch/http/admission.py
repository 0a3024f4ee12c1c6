"""Admission: how many items of one pipeline the service holds at once.

A request's items are admitted all together or not at all. Requests that
hold a connection use :meth:`Admission.try_acquire` and get 503 at once when
there is no room; jobs and streams, which can wait, use :meth:`acquire` and
are served first, in order, as room frees up.

Sizing: the bound is the work an admitted request may find ahead of it.
Enough to give every worker a full batch keeps the model at full speed; much
more only lengthens every admitted request's wait under overload.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

__all__ = ["Admission"]


class Admission:
    """A counting gate with fail-fast and waiting entry; one event loop only."""

    __slots__ = ("_waiters", "capacity", "rejected", "used")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.used = 0
        self.rejected = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def try_acquire(self, n: int = 1) -> bool:
        """Take ``n`` places now, or return False (and count a rejection)."""
        if not self._waiters and self.used + n <= self.capacity:
            self.used += n
            return True
        self.rejected += 1
        return False

    async def acquire(self, n: int = 1) -> None:
        """Take ``n`` places, waiting in line for them."""
        if n > self.capacity:
            raise ValueError(f"{n} places asked of a gate of {self.capacity}")
        if not self._waiters and self.used + n <= self.capacity:
            self.used += n
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
                self._wake()
            raise

    def release(self, n: int = 1) -> None:
        """Give back ``n`` places."""
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            n, fut = waiters[0]
            if fut.done():
                waiters.popleft()
                continue
            if self.used + n > self.capacity:
                return
            waiters.popleft()
            self.used += n
            fut.set_result(None)
