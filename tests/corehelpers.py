"""Helpers for the core tests: waiting on conditions, never on the clock."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable


async def until(cond: Callable[[], bool], limit: float = 20.0) -> None:
    """Wait until ``cond()`` holds (polling the loop); fail after ``limit`` s."""
    async with asyncio.timeout(limit):
        while not cond():  # noqa: ASYNC110 - polls a condition, not a clock
            await asyncio.sleep(0.001)


class Gate:
    """A blocking point for thread stages: calls wait until ``open()``."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self.entered = threading.Event()
        self.calls: list[object] = []

    def wait(self, arg: object) -> None:
        self.calls.append(arg)
        self.entered.set()
        if not self._open.wait(30):
            raise RuntimeError("gate was never opened")

    def open(self) -> None:
        self._open.set()

    async def wait_entered(self) -> None:
        await until(self.entered.is_set)
