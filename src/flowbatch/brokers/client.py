"""The producer side: enqueue jobs and read their results.

Usage::

    async with fb.Client("redis://127.0.0.1:6379/0", queue="embed") as client:
        job_id = await client.submit({"text": "hello"})
        vector = await client.result(job_id, timeout=30)

``key`` makes a submission idempotent: the job id *is* the key, results are
stored first-write-wins under it, so submitting the same key twice yields
one result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from flowbatch.retry import Retry

from .base import (
    Broker,
    BrokerRefused,
    JobFailed,
    ResultRecord,
    ResultTimeout,
    decode_record,
    encode_job,
    new_job_id,
    redact,
)
from .connect import DEFAULT_RECONNECT
from .registry import DEFAULT_BROKER_URL, DEFAULT_QUEUE, make_broker

__all__ = ["Client"]

# How many envelopes go to the broker in one publish call.
_PUBLISH_CHUNK = 500
# Waiting for a result polls the store from 2 ms up to 250 ms apart, and
# retries a lost broker from 0.1 s up to 5 s apart (both jittered).
_POLL = Retry(backoff=0.002, max_backoff=0.25)
_RECONNECT = DEFAULT_RECONNECT

log = logging.getLogger("flowbatch.brokers")
# How many submitted job ids a client remembers (to tell "no such job" apart).
_REMEMBERED = 100_000


class Client:
    """Submit jobs to a queue and wait for their results.

    ``broker`` is a URL (``sqlite:///jobs.db``, ``redis://``, ``amqp://``,
    ``nats://``, ``kafka://``) or a ``Broker`` object (e.g. a ``MemoryBroker``
    shared with a worker in tests). Use as ``async with``; a client also opens
    itself on first use and is closed with ``close()``.
    """

    def __init__(self, broker: str | Broker = DEFAULT_BROKER_URL, queue: str = DEFAULT_QUEUE) -> None:
        self.broker = broker if isinstance(broker, Broker) else make_broker(broker, queue)
        self._opened = False
        self._lock = asyncio.Lock()
        self._connects = 0  # bumped on each reconnect: waiters share one connection
        self._submitted: OrderedDict[str, None] = OrderedDict()

    async def __aenter__(self) -> Client:
        await self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _open(self) -> Broker:
        if not self._opened:
            async with self._lock:
                if not self._opened:
                    await self.broker.open()
                    self._opened = True
        return self.broker

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            await self.broker.close()

    async def submit(self, payload: Any, key: str | None = None) -> str:
        """Enqueue one job; returns its id (``key`` when given)."""
        return (await self.submit_many([payload], None if key is None else [key]))[0]

    async def submit_many(
        self, payloads: Iterable[Any], keys: Sequence[str] | None = None
    ) -> list[str]:
        """Enqueue many jobs in few round trips; returns their ids in order."""
        broker = await self._open()
        items = list(payloads)
        if keys is not None and len(keys) != len(items):
            raise ValueError(f"got {len(keys)} keys for {len(items)} payloads")
        ids: list[str] = []
        bodies: list[bytes] = []
        now = time.time()
        for i, payload in enumerate(items):
            job_id = new_job_id() if keys is None else keys[i]
            if not isinstance(job_id, str) or not job_id:
                raise ValueError(f"a job key must be a non-empty string, got {job_id!r}")
            ids.append(job_id)
            bodies.append(encode_job(job_id, payload, first_seen=now))
        for start in range(0, len(bodies), _PUBLISH_CHUNK):
            await broker.publish(bodies[start : start + _PUBLISH_CHUNK])
        for job_id in ids:  # remembered for ResultTimeout's message, boundedly
            self._submitted[job_id] = None
            self._submitted.move_to_end(job_id)
        while len(self._submitted) > _REMEMBERED:
            self._submitted.popitem(last=False)
        return ids

    async def record(self, job_id: str) -> ResultRecord | None:
        """The stored outcome of ``job_id`` (success or failure), or None if not done."""
        broker = await self._open()
        seen = self._connects
        try:
            data = await broker.get_result(job_id)
        except Exception:
            # A lost connection (a broker restart): one fresh connection, then give up.
            await self._reconnect(seen)
            data = await broker.get_result(job_id)
        return None if data is None else decode_record(data)

    async def _reconnect(self, seen: int) -> None:
        """Reconnect once for all the calls that saw the connection ``seen`` fail.

        Many ``result()`` calls share one connection: each reconnecting on its
        own would close the connection the others are using, in a storm.
        """
        async with self._lock:
            if self._connects == seen:
                await self.broker.reconnect()
                self._connects += 1

    async def result(self, job_id: str, timeout: float | None = None) -> Any:
        """Wait for ``job_id``'s result and return it.

        Raises ``JobFailed`` when the job failed (dead-lettered) and
        ``ResultTimeout`` (a ``TimeoutError``; its message says "no such job"
        for an id this client did not submit) when ``timeout`` seconds pass
        first.
        """
        deadline = asyncio.timeout(timeout)
        end = None if timeout is None else asyncio.get_running_loop().time() + timeout
        try:
            async with deadline:
                rec = await self._wait_record(job_id, end)
        except TimeoutError as exc:
            if timeout is None or not (deadline.expired() or isinstance(exc, _PastDeadline)):
                raise  # a broker call's own timeout
            raise ResultTimeout(
                job_id, self.broker.queue, timeout, submitted=job_id in self._submitted
            ) from None
        if not rec.ok:
            raise JobFailed(job_id, rec.error or "", rec.attempts, rec.first_seen)
        return rec.value

    async def _wait_record(self, job_id: str, end: float | None) -> ResultRecord:
        polls = failures = 0
        loop = asyncio.get_running_loop()
        while True:
            # The deadline is checked here too, not only by asyncio.timeout: a
            # client library that turns the timeout's cancellation into its own
            # error (caught below) would otherwise leave this loop polling forever.
            if end is not None and loop.time() >= end:
                raise _PastDeadline
            try:
                rec = await self.record(job_id)
            except BrokerRefused:
                raise
            except Exception as exc:
                # The broker is down or restarting: keep trying to reconnect
                # (within the caller's timeout), backing off with jitter.
                failures += 1
                delay = _RECONNECT.delay(failures)
                log.warning(
                    "client: broker unreachable at %s (%s: %s); retrying in %.1f s",
                    redact(self.broker.url), type(exc).__name__, exc, delay,
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            if rec is not None:
                return rec
            polls += 1
            await asyncio.sleep(_POLL.delay(polls))  # polls the result store with backoff

    async def dead_letters(self) -> list[ResultRecord]:
        """Every dead-letter record of the queue (error, attempts, first seen, body)."""
        broker = await self._open()
        return [decode_record(x) for x in await broker.dead_letters()]

    async def results(self) -> dict[str, ResultRecord]:
        """Every stored result record of the queue, by job id (tools and tests)."""
        broker = await self._open()
        return {k: decode_record(v) for k, v in (await broker.results()).items()}


class _PastDeadline(TimeoutError):
    """``result()``'s own deadline passed between two polls."""
