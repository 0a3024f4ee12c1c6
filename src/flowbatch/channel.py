"""A bounded FIFO between two stages, built for handing items on in bulk.

Unlike :class:`asyncio.Queue`, a consumer that finds items waiting takes
them at once (a chunk with ``take_many()``, or a whole batch with ``take()``) without a
future or a scheduler round trip; it only parks when the channel is empty. So a stage
that wakes up once drains the whole backlog in one go (items move between
stages in chunks when a backlog exists), while a lone item still moves at
once. Sizing: the bound is the backlog a stage may build before its
producer waits; a few batches' worth is enough to keep a batched stage fed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from itertools import repeat
from typing import Generic, TypeVar

__all__ = ["Channel", "ChannelClosed"]

T = TypeVar("T")


class ChannelClosed(Exception):
    """Put into a closed channel."""


class Channel(Generic[T]):
    """Bounded FIFO with bulk-friendly access; runs on one event loop only."""

    __slots__ = ("_bound", "_closed", "_getters", "_items", "_putters", "maxsize")

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"channel size must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        # maxsize while open, 0 once closed: put_nowait's one test covers both.
        self._bound = maxsize
        self._items: deque[T] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        """The waiting items, oldest first (do not put or take while iterating)."""
        return iter(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def full(self) -> bool:
        return len(self._items) >= self.maxsize

    # -- producing ---------------------------------------------------------

    def put_nowait(self, item: T) -> bool:
        """Append if there is room; return False when full."""
        items = self._items
        if len(items) >= self._bound:
            if self._closed:
                raise ChannelClosed
            return False
        items.append(item)
        if self._getters:
            self._wake(self._getters)
        return True

    def put_many(self, items: list[T]) -> bool:
        """Append all of ``items`` if there is room for all; return False,
        appending none, when there is not (the bulk form of :meth:`put_nowait`:
        one call and at most one wake-up for the lot)."""
        if self._closed:
            raise ChannelClosed
        queued = self._items
        if len(queued) + len(items) > self.maxsize:
            return False
        queued.extend(items)
        if self._getters:
            self._wake(self._getters)
        return True

    def put_force(self, item: T) -> None:
        """Append even past the bound (retries re-entering their own stage)."""
        self._items.append(item)
        if self._getters:
            self._wake(self._getters)

    async def put(self, item: T) -> None:
        """Append, waiting while the channel is full."""
        while len(self._items) >= self.maxsize:
            if self._closed:
                raise ChannelClosed
            await self._park(self._putters)
        if self._closed:
            raise ChannelClosed
        self._items.append(item)
        if self._getters:
            self._wake(self._getters)

    # -- consuming ---------------------------------------------------------

    def take_many(self, limit: int) -> list[T]:
        """Remove and return up to ``limit`` of the oldest items (``[]`` when empty).

        For a consumer that works through what waits one item at a time:
        one call (and one wake-up of waiting
        producers) per chunk instead of per item. Keep ``limit`` small: what
        a consumer holds is no longer counted in ``len()`` nor bounded by
        ``maxsize``.
        """
        items = self._items
        if not items:
            return []
        if limit >= len(items):
            taken = list(items)
            items.clear()
        else:
            taken = list(map(deque.popleft, repeat(items, limit)))  # no bytecode per item
        if self._putters:
            self._taken()
        if items and self._getters:
            self._wake(self._getters)
        return taken

    def take(self, pick: Callable[[deque[T]], list[T]]) -> list[T]:
        """Remove the items ``pick`` chooses (it pops them from the deque it is given).

        ``pick`` is a batch picker such as :func:`flowbatch.batching.pick_batch`;
        items it looks at but leaves must stay in the deque, in order. Producers
        waiting for room, and another consumer if items remain, are woken.
        """
        taken = pick(self._items)
        if self._putters:
            self._taken()
        if self._items and self._getters:
            self._wake(self._getters)
        return taken

    async def wait_nonempty(self) -> bool:
        """Wait for an item; False once the channel is closed and empty."""
        while not self._items:
            if self._closed:
                return False
            await self._park(self._getters)
        return True

    async def wait_put(self) -> None:
        """Wait for the next put (or a :meth:`poke`, or close)."""
        if self._closed:
            return
        await self._park(self._getters)
        # Other consumers may be waiting too: pass the wake-up on.
        if self._getters and self._items:
            self._wake(self._getters)

    def poke(self) -> None:
        """Wake every waiting consumer so it re-checks its condition."""
        while self._getters:
            self._wake(self._getters)

    def _taken(self) -> None:
        """Tell waiting producers that items were removed."""
        if self._putters:
            room = self.maxsize - len(self._items)
            while room > 0 and self._putters:
                if self._wake(self._putters):
                    room -= 1

    def close(self) -> None:
        """No more puts; wake everybody so that consumers can finish."""
        self._closed = True
        self._bound = 0
        for waiters in (self._getters, self._putters):
            while waiters:
                fut = waiters.popleft()
                if not fut.done():
                    fut.set_result(None)

    # -- internals -----------------------------------------------------------

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
