"""Reaching a broker: bounded, interruptible waits with the one backoff.

Usage::

    stop = asyncio.Event()   # set it (e.g. on SIGTERM) to give up at once
    if not await open_within(broker, 30.0, stop=stop, who="worker w1"):
        return               # stopped before the broker answered

``open_within`` retries an unreachable broker with ``Retry.delay`` (jittered)
until ``timeout`` passes (``BrokerUnreachable``), raises ``BrokerRefused``
at once for refused settings, and logs what it waits for. ``pause`` and
``unless_stopped`` are the waits the worker's reconnect loop uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from flowbatch.retry import Retry

from .base import Broker, BrokerRefused, BrokerUnreachable, redact

__all__ = ["DEFAULT_RECONNECT", "Stopped", "open_within", "pause", "unless_stopped"]

log = logging.getLogger("flowbatch.brokers")

T = TypeVar("T")

#: Waits between connection attempts: 0.1 s doubling to 5 s, with jitter.
DEFAULT_RECONNECT = Retry(backoff=0.1, max_backoff=5.0)


class Stopped(Exception):
    """The stop event was set while waiting."""


async def pause(seconds: float, stop: asyncio.Event | None) -> bool:
    """Sleep ``seconds``; False (at once) if ``stop`` is set meanwhile."""
    if stop is None:
        await asyncio.sleep(seconds)
        return True
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return not stop.is_set()


async def unless_stopped(aw: Awaitable[T], timeout: float | None, stop: asyncio.Event | None) -> T:
    """Await ``aw``; cancelled once ``stop`` is set (``Stopped``) or after ``timeout`` s."""
    task = asyncio.ensure_future(aw)
    waiters: set[asyncio.Future[Any]] = {task}
    stopper = None if stop is None else asyncio.ensure_future(stop.wait())
    if stopper is not None:
        waiters.add(stopper)
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if stopper is not None:
            stopper.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if not task.cancelled():
        return task.result()
    if stop is not None and stop.is_set():
        raise Stopped
    raise TimeoutError(f"no answer from the broker within {timeout:g}s")


async def open_within(
    broker: Broker,
    timeout: float,
    *,
    backoff: Retry = DEFAULT_RECONNECT,
    stop: asyncio.Event | None = None,
    who: str = "flowbatch",
) -> bool:
    """Open ``broker``, retrying an unreachable one for ``timeout`` s.

    Returns True once open, False if ``stop`` was set first; raises
    ``BrokerRefused`` at once (credentials, virtual host) and
    ``BrokerUnreachable`` once ``timeout`` passes.
    """
    url = redact(broker.url)
    deadline = time.monotonic() + timeout
    failures = 0
    last: Exception | None = None
    while True:
        try:
            await unless_stopped(broker.open(), max(0.0, deadline - time.monotonic()), stop)
        except Stopped:
            return False
        except BrokerRefused:
            raise
        except Exception as exc:
            failures += 1
            if not (isinstance(exc, TimeoutError) and last is not None):
                last = exc  # a try cut short by the deadline hides nothing
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerUnreachable(
                    f"broker unreachable at {url} within the connect timeout "
                    f"({timeout:g}s): {brief(last)}"
                ) from last
            delay = min(left, backoff.delay(failures))
            log.warning(
                "%s: broker unreachable at %s (%s); retrying in %.1f s", who, url, brief(exc), delay
            )
            if not await pause(delay, stop):
                return False
        else:
            return True


def brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]
