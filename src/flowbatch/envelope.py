"""The envelopes the runner moves: an item, and where its outcome goes.

``Item`` travels through the stages (a submitted value, or one fan-out child
of it); ``FutureSink`` hands a root item's outcome to an ``asyncio.Future``
(``submit``); ``Collector`` gathers outcomes for ``map``, in or out of order.
They are the runner's private types; nothing here is public API.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Collector", "FutureSink", "Item"]


class Item:
    """The envelope of one item (or one fan-out child) inside the engine."""

    __slots__ = (
        "attempt",
        "cost",
        "deadline",
        "done",
        "id",
        "index",
        "parent",
        "pending",
        "results",
        "root",
        "sink",
        "t0",
        "t_enq",
        "trace",
        "value",
    )

    def __init__(self, value: Any, now: float) -> None:
        self.value = value
        self.id = 0
        self.trace: Any = None
        self.root = self
        self.parent: Item | None = None
        self.index = 0
        self.attempt = 1
        self.t_enq = now
        self.t0 = now
        self.deadline: float | None = None
        self.done = False
        self.sink: Callable[[Item, Any, BaseException | None], None] | None = None
        self.results: list[Any] | None = None
        self.pending = 0
        self.cost = 0.0

    def child(self, value: Any, index: int, now: float) -> Item:
        c = Item(value, now)
        c.id = self.id
        c.trace = self.trace
        c.root = self.root
        c.parent = self
        c.index = index
        return c


class FutureSink:
    """Delivers a root item's outcome to an ``asyncio.Future``.

    Items carry its bound ``__call__`` as their sink (``FutureSink(fut).__call__``):
    the interpreter inlines a call to a bound method, while a call to a
    callable instance goes through ``tp_call`` (this runs once per item).
    """

    __slots__ = ("fut",)

    def __init__(self, fut: asyncio.Future[Any]) -> None:
        self.fut = fut

    def __call__(self, item: Item, value: Any, exc: BaseException | None) -> None:
        fut = self.fut
        if fut.done():
            return
        if exc is None:
            fut.set_result(value)
        else:
            fut.set_exception(exc)


class Collector:
    """Where ``map`` results land; the consumer reads them in or out of order."""

    __slots__ = (
        "admitted",
        "by_index",
        "closed",
        "error",
        "feeder_waiter",
        "input_done",
        "next_index",
        "ordered",
        "outstanding",
        "ready",
        "waiter",
    )

    def __init__(self, ordered: bool) -> None:
        self.ordered = ordered
        self.ready: deque[tuple[Any, BaseException | None]] = deque()
        self.by_index: dict[int, tuple[Any, BaseException | None]] = {}
        self.next_index = 0
        self.admitted = 0
        self.outstanding = 0
        self.input_done = False
        self.error: BaseException | None = None
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None
        self.feeder_waiter: asyncio.Future[None] | None = None

    def __call__(self, item: Item, value: Any, exc: BaseException | None) -> None:
        if self.closed:
            return
        if self.ordered:
            self.by_index[item.index] = (value, exc)
            if item.index != self.next_index:
                return
        else:
            self.ready.append((value, exc))
        if self.waiter is not None:  # checked here: this runs once per item
            self.wake()

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    def wake_feeder(self) -> None:
        w = self.feeder_waiter
        if w is not None:
            self.feeder_waiter = None
            if not w.done():
                w.set_result(None)
