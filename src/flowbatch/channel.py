"""A bounded FIFO between two stages, built for handing items on in bulk.

Unlike :class:`asyncio.Queue`, a consumer that finds items waiting takes
them straight from the deque (``items.popleft()``) without a future or a
scheduler round trip; it only parks when the channel is empty. So a stage
that wakes up once drains the whole backlog in one go (items move between
stages in chunks when a backlog exists), while a lone item still moves at
once. Sizing: the bound is the backlog a stage may build before its
producer waits; a few batches' worth is enough to keep a batched stage fed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Generic, TypeVar

__all__ = ["Channel", "ChannelClosed"]

T = TypeVar("T")


class ChannelClosed(Exception):
    """Put into a closed channel."""


class Channel(Generic[T]):
    """Bounded FIFO with bulk-friendly access; runs on one event loop only."""

    __slots__ = ("_closed", "getters", "items", "maxsize", "putters")

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"channel size must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self.items: deque[T] = deque()
        self.getters: deque[asyncio.Future[None]] = deque()
        self.putters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    def __len__(self) -> int:
        return len(self.items)

    @property
    def closed(self) -> bool:
        return self._closed

    def full(self) -> bool:
        return len(self.items) >= self.maxsize

    # -- producing ---------------------------------------------------------

    def put_nowait(self, item: T) -> bool:
        """Append if there is room; return False when full."""
        if self._closed:
            raise ChannelClosed
        if len(self.items) >= self.maxsize:
            return False
        self.items.append(item)
        if self.getters:
            self._wake(self.getters)
        return True

    def put_force(self, item: T) -> None:
        """Append even past the bound (retries re-entering their own stage)."""
        self.items.append(item)
        if self.getters:
            self._wake(self.getters)

    async def put(self, item: T) -> None:
        """Append, waiting while the channel is full."""
        while len(self.items) >= self.maxsize:
            if self._closed:
                raise ChannelClosed
            await self._park(self.putters)
        if self._closed:
            raise ChannelClosed
        self.items.append(item)
        if self.getters:
            self._wake(self.getters)

    # -- consuming ---------------------------------------------------------

    async def wait_nonempty(self) -> bool:
        """Wait for an item; False once the channel is closed and empty."""
        while not self.items:
            if self._closed:
                return False
            await self._park(self.getters)
        return True

    async def wait_put(self) -> None:
        """Wait for the next put (or a :meth:`poke`, or close)."""
        if self._closed:
            return
        await self._park(self.getters)
        # Other consumers may be waiting too: pass the wake-up on.
        if self.getters and self.items:
            self._wake(self.getters)

    def poke(self) -> None:
        """Wake every waiting consumer so it re-checks its condition."""
        while self.getters:
            self._wake(self.getters)

    def taken(self) -> None:
        """Tell waiting producers that items were removed."""
        if self.putters:
            room = self.maxsize - len(self.items)
            while room > 0 and self.putters:
                if self._wake(self.putters):
                    room -= 1

    def close(self) -> None:
        """No more puts; wake everybody so that consumers can finish."""
        self._closed = True
        for waiters in (self.getters, self.putters):
            while waiters:
                fut = waiters.popleft()
                if not fut.done():
                    fut.set_result(None)

    # -- internals -----------------------------------------------------------

    def wake_getter(self) -> None:
        """Wake one waiting consumer (after appending to ``items`` directly)."""
        self._wake(self.getters)

    @staticmethod
    def _wake(waiters: deque[asyncio.Future[None]]) -> bool:
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return True
        return False

    async def _park(self, waiters: deque[asyncio.Future[None]]) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # We were woken but will not act on it: hand the wake-up on.
                self._wake(waiters)
            else:
                with contextlib.suppress(ValueError):
                    waiters.remove(fut)
            raise
