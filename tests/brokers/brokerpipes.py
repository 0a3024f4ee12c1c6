"""Pipelines the broker tests run, in-process and as `python -m flowbatch.brokers worker` targets."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import flowbatch as fb

BATCH_SIZES: list[int] = []


class Poison(ValueError):
    """Raised for a payload marked poison; the whole batch fails until it is split."""


async def echo_batch(items: list[Any]) -> list[Any]:
    BATCH_SIZES.append(len(items))
    for x in items:
        if isinstance(x, dict) and x.get("poison"):
            raise Poison(f"poison payload {x.get('n')}")
    return [{"n": x.get("n") if isinstance(x, dict) else x, "pid": os.getpid()} for x in items]


def noop() -> fb.Pipeline:
    """A CPU-light batched pipeline: returns each payload's n and the worker's pid."""
    return fb.Pipeline([fb.stage(echo_batch, batch=fb.Batch(max_size=64))], name="noop")


async def slow_batch(items: list[Any]) -> list[Any]:
    # Stands in for model work, so that consumption is still going on while
    # a test restarts the broker or starts a second worker.
    await asyncio.sleep(0.02)
    return await echo_batch(items)


def slow() -> fb.Pipeline:
    """Like noop, but each batch of at most 8 takes about 20 ms."""
    return fb.Pipeline([fb.stage(slow_batch, batch=fb.Batch(max_size=8))], name="slow")


async def steady_batch(items: list[Any]) -> list[Any]:
    # About 1,300 messages/s: a 5,000-message stream lasts a few seconds, so
    # a worker can be killed mid-stream on every broker.
    await asyncio.sleep(0.05)
    return await echo_batch(items)


def steady() -> fb.Pipeline:
    """Like noop, at a bounded rate: batches of up to 64, 50 ms each."""
    return fb.Pipeline([fb.stage(steady_batch, batch=fb.Batch(max_size=64))], name="steady")


async def crawl_batch(items: list[Any]) -> list[Any]:
    # About 160 messages/s: a few hundred messages take seconds, so a
    # worker is still busy when a test kills or stops it.
    await asyncio.sleep(0.05)
    return await echo_batch(items)


def crawl() -> fb.Pipeline:
    """Like noop, slowly: batches of up to 8, 50 ms each."""
    return fb.Pipeline([fb.stage(crawl_batch, batch=fb.Batch(max_size=8))], name="crawl")


async def hold(x: Any) -> Any:
    # Never returns: the message stays in flight until the worker is killed.
    await asyncio.Event().wait()
    return x


def held() -> fb.Pipeline:
    """A stage that never returns: each message fetched stays held (in flight)."""
    return fb.Pipeline([fb.stage(hold)], name="held")
