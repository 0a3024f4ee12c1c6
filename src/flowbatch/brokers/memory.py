"""An in-memory broker: the test double of every backend (``memory://``).

It keeps the whole contract in one process, and tests wait on it instead of
sleeping::

    broker = MemoryBroker("jobs")
    async with Client(broker) as client:
        ids = await client.submit_many(range(100))
    ...  # run a Worker on the same broker object
    await broker.join()   # every message settled, none ready, none held

``crash()`` hands every unsettled delivery out again (a worker that died),
``fail_next(n)`` makes the next ``n`` calls raise ``BrokerError`` (a lost
connection), ``stall()`` makes ``fetch`` return nothing until the next
``reconnect`` (a consumer that stopped consuming after a reconnect).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections import deque
from collections.abc import Sequence

from .base import (
    Broker,
    BrokerError,
    Delivery,
    Outcome,
    QueueStats,
    age_of,
    decode_record,
    digest_key,
)

__all__ = ["MemoryBroker"]


class _Msg:
    __slots__ = ("body", "deliveries", "id")

    def __init__(self, msg_id: int, body: bytes) -> None:
        self.id = msg_id
        self.body = body
        self.deliveries = 0


class MemoryBroker(Broker):
    """One queue held in this process. Not durable; for tests and examples."""

    scheme = "memory"

    def __init__(self, queue: str = "default", url: str = "memory://") -> None:
        super().__init__(url, queue)
        self._ids = itertools.count(1)
        self._ready: deque[_Msg] = deque()
        self._unacked: dict[int, _Msg] = {}
        self._delayed: dict[int, asyncio.TimerHandle] = {}
        self._results: dict[str, bytes] = {}
        self._dead: list[bytes] = []
        self._changed = asyncio.Event()
        self._fail = 0
        self._stalled = False
        #: calls seen, for assertions: {"fetch": n, "settle": n, "extend": n, ...}
        self.calls: dict[str, int] = {}
        #: deliveries whose lease was extended, by message id
        self.extended: dict[int, int] = {}
        self.published = 0
        self.max_unacked = 0

    # ---------------------------------------------------------- test hooks

    def crash(self) -> int:
        """Put every unsettled delivery back, as if its worker died; returns how many."""
        msgs = list(self._unacked.values())
        self._unacked.clear()
        self._ready.extendleft(reversed(msgs))
        self._notify()
        return len(msgs)

    def fail_next(self, n: int = 1) -> None:
        """Make the next ``n`` broker calls raise ``BrokerError``."""
        self._fail = n

    def stall(self) -> None:
        """Make ``fetch`` return nothing until ``reconnect`` is called."""
        self._stalled = True

    @property
    def ready(self) -> int:
        return len(self._ready)

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    async def join(self, timeout: float = 30.0) -> None:
        """Wait until no message is ready, delayed or unsettled."""
        async with asyncio.timeout(timeout):
            while self._ready or self._unacked or self._delayed:
                self._changed.clear()
                await self._changed.wait()

    async def wait_for(self, results: int, timeout: float = 30.0) -> None:
        """Wait until at least ``results`` results are stored."""
        async with asyncio.timeout(timeout):
            while len(self._results) < results:
                self._changed.clear()
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()

    def _call(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self._fail > 0:
            self._fail -= 1
            raise BrokerError(f"memory broker: injected failure in {name}")

    # ------------------------------------------------------------ lifetime

    async def open(self) -> None:
        self._call("open")

    async def close(self) -> None:
        self.calls["close"] = self.calls.get("close", 0) + 1

    async def reconnect(self) -> None:
        self._call("reconnect")
        self._stalled = False
        self.epoch += 1

    # ------------------------------------------------------------ producer

    async def publish(self, bodies: Sequence[bytes]) -> None:
        self._call("publish")
        for body in bodies:
            self._ready.append(_Msg(next(self._ids), bytes(body)))
        self.published += len(bodies)
        self._notify()

    async def get_result(self, job_id: str) -> bytes | None:
        self._call("get_result")
        return self._results.get(job_id)

    # ------------------------------------------------------------ consumer

    async def fetch(self, max_messages: int, wait: float) -> list[Delivery]:
        self._call("fetch")
        if not self._ready or self._stalled:
            self._changed.clear()
            try:
                async with asyncio.timeout(wait):
                    while not self._ready or self._stalled:
                        await self._changed.wait()
                        self._changed.clear()
            except TimeoutError:
                return []
        out: list[Delivery] = []
        while self._ready and len(out) < max_messages:
            msg = self._ready.popleft()
            msg.deliveries += 1
            self._unacked[msg.id] = msg
            out.append(
                Delivery(
                    msg.body,
                    msg.id,
                    deliveries=msg.deliveries,
                    redelivered=msg.deliveries > 1,
                    epoch=self.epoch,
                )
            )
        self.max_unacked = max(self.max_unacked, len(self._unacked))
        return out

    async def settle(self, outcomes: Sequence[Outcome]) -> None:
        self._call("settle")
        loop = asyncio.get_running_loop()
        for o in outcomes:
            msg = self._unacked.pop(o.delivery.tag, None)
            if o.result is not None and o.job_id is not None:
                self._results.setdefault(o.job_id, o.result)
            if o.dead is not None:
                self._dead.append(o.dead)
            if o.retry is not None:
                again = _Msg(next(self._ids), o.retry)
                if o.delay > 0:
                    self._delayed[again.id] = loop.call_later(o.delay, self._due, again)
                else:
                    self._ready.append(again)
            del msg
        self._notify()

    def _due(self, msg: _Msg) -> None:
        self._delayed.pop(msg.id, None)
        self._ready.append(msg)
        self._notify()

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        self._call("extend")
        for d in deliveries:
            self.extended[d.tag] = self.extended.get(d.tag, 0) + 1

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        self._call("release")
        for d in reversed(deliveries):
            msg = self._unacked.pop(d.tag, None)
            if msg is not None:
                msg.deliveries -= 1
                self._ready.appendleft(msg)
        self._notify()

    async def backlog(self) -> int | None:
        return len(self._ready)

    # ---------------------------------------------------------- inspection

    async def results(self) -> dict[str, bytes]:
        return dict(self._results)

    async def dead_letters(self) -> list[bytes]:
        return list(self._dead)

    async def remove_dead_letters(self, keys: Sequence[str]) -> int:
        gone = set(keys)
        before = len(self._dead)
        self._dead[:] = [r for r in self._dead if digest_key(r) not in gone]
        return before - len(self._dead)

    async def forget_failed_result(self, job_id: str) -> bool:
        data = self._results.get(job_id)
        if data is None or decode_record(data).ok:
            return False
        del self._results[job_id]
        return True

    async def queue_stats(self) -> QueueStats:
        lag = await self.queue_lag()
        return dataclasses.replace(lag, dead=len(self._dead), results=len(self._results))

    async def queue_lag(self) -> QueueStats:
        return QueueStats(
            waiting=len(self._ready),
            in_flight=len(self._unacked),
            delayed=len(self._delayed),
            oldest_waiting_age=_oldest(self._ready),
        )

    def close_timers(self) -> None:
        """Cancel pending delayed retries (end of a test)."""
        for handle in self._delayed.values():
            handle.cancel()
        self._delayed.clear()


def _oldest(ready: deque[_Msg]) -> float | None:
    ages = [a for a in (age_of(m.body) for m in ready) if a is not None]
    return max(ages, default=None)
