"""Helpers for the core tests: waiting on conditions, never on the clock."""

from __future__ import annotations

import asyncio
import threading

import flowbatch as fb
from polling import until


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


class ManualClock:
    """A runner clock (``pipe.open(clock=...)``) the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def adaptive_api_then_store(hold: asyncio.Event) -> fb.Pipeline:
    """``api`` (``fb.Adaptive(min=2, max=16, initial=2)``) then ``store``
    (concurrency 2); ``api`` holds items from 100 on and ``store`` those
    below 100 until ``hold`` is set: the test chooses which stage is busy."""

    async def api(x: int) -> int:
        if x >= 100:
            await hold.wait()
        return x

    async def store(x: int) -> int:
        if x < 100:
            await hold.wait()
        return x

    return fb.Pipeline(
        [
            fb.stage(api, name="api", concurrency=fb.Adaptive(min=2, max=16, initial=2)),
            fb.stage(store, name="store", concurrency=2),
        ],
        name="p",
    )
