"""Helpers for the core tests: waiting on conditions, never on the clock."""

from __future__ import annotations

import threading

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
