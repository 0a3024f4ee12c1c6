"""The tests' one way to wait for a condition: poll a state, bounded by a limit.

Tests wait on events and states, never on the clock; where no event exists
(another process, a real server) they poll the state with these two:

    await until(lambda: runner.stats().completed == 10)          # in a coroutine
    await until(server_answers, limit=60, what="the server")      # an async check
    wait_until(lambda: path.exists(), what="the file")            # blocking (fixtures)

A check may be a plain function or one that returns an awaitable (``until``
awaits it). Past ``limit`` seconds both fail with an ``AssertionError`` that
names ``what`` was awaited.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["until", "wait_until"]


async def until(
    cond: Callable[[], Any | Awaitable[Any]],
    limit: float = 30.0,
    what: str = "condition",
    every: float = 0.002,
) -> None:
    """Wait until ``cond()`` is truthy (awaiting it if it returns an awaitable)."""
    try:
        async with asyncio.timeout(limit):
            while True:
                ok = cond()
                if inspect.isawaitable(ok):
                    ok = await ok
                if ok:
                    return
                await asyncio.sleep(every)
    except TimeoutError:
        raise AssertionError(f"timed out after {limit}s waiting for {what}") from None


def wait_until(
    cond: Callable[[], Any], limit: float = 30.0, what: str = "condition", every: float = 0.01
) -> None:
    """Block until ``cond()`` is truthy (for fixtures and threads outside a loop)."""
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        time.sleep(every)
