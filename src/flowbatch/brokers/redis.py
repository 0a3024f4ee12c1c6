"""Redis Streams broker (``redis://host:port/db``), on redis-py's asyncio client.

Keys for queue ``q``: the stream ``fb:q`` with the consumer group ``fb``,
the results hash ``fb:q:results`` (job id -> result record) and the
dead-letter stream ``fb:q:dead``.

How it keeps the contract:

- fetch first reclaims, with ``XAUTOCLAIM``, entries that have been pending
  longer than the lease on a consumer that stopped renewing them (a dead or
  stalled worker), then reads new ones with ``XREADGROUP ... BLOCK``;
- settle is one ``MULTI``/``EXEC`` transaction: ``HSETNX`` the results (the
  first result of a job wins), ``XADD`` dead letters and retries, then
  ``XACK`` + ``XDEL`` the entries; it is all or nothing;
- ``extend`` is ``XCLAIM ... JUSTID`` of the worker's own entries to itself,
  which resets their idle time without counting a delivery;
- a retry is a new entry with ``attempt + 1`` and ``not_before`` = now +
  backoff; the worker that reads it holds it (lease renewed) until then;
- ``release`` re-adds the entries at the end of the stream and acks the old
  ones, so another worker gets them at once.

Durability is what the server is configured for: with AOF
(``appendonly yes``, ``appendfsync everysec`` or ``always``) an acked write
survives a server crash; without persistence it survives only a clean
restart (``SHUTDOWN SAVE``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from .base import Broker, BrokerError, Delivery, Outcome

__all__ = ["RedisBroker"]

GROUP = "fb"


class RedisBroker(Broker):
    """One queue on a Redis stream; see the module docstring."""

    scheme = "redis"

    def __init__(self, url: str, queue: str) -> None:
        super().__init__(url, queue)
        self.stream = f"fb:{queue}"
        self.results_key = f"fb:{queue}:results"
        self.dead_key = f"fb:{queue}:dead"
        self.consumer = ""
        self._r: aioredis.Redis | None = None
        self._claim_cursor = "0-0"
        self._next_claim = 0.0

    @property
    def _redis(self) -> aioredis.Redis:
        if self._r is None:
            raise BrokerError(f"{self!r} is not open")
        return self._r

    async def open(self) -> None:
        if self._r is not None:
            return
        from .worker import worker_name

        r = aioredis.from_url(self.url, socket_connect_timeout=5, health_check_interval=10)
        try:
            await r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                await r.aclose()
                raise
        except BaseException:
            await r.aclose()
            raise
        self._r = r
        self.consumer = self.consumer or worker_name()
        self.epoch += 1

    async def close(self) -> None:
        r, self._r = self._r, None
        if r is not None:
            await r.aclose()

    # ------------------------------------------------------------ producer

    async def publish(self, bodies: Sequence[bytes]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for body in bodies:
                pipe.xadd(self.stream, {"b": body})
            await pipe.execute()

    async def get_result(self, job_id: str) -> bytes | None:
        data: Any = await self._redis.hget(self.results_key, job_id)
        return None if data is None else bytes(data)

    # ------------------------------------------------------------ consumer

    async def fetch(self, max_messages: int, wait: float) -> list[Delivery]:
        r = self._redis
        epoch = self.epoch
        out: list[Delivery] = []
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_claim:
            out = await self._reclaim(max_messages)
        if len(out) < max_messages:
            block = 0 if out else max(1, int(wait * 1000))
            reply: Any = await r.xreadgroup(
                GROUP, self.consumer, {self.stream: ">"}, count=max_messages - len(out), block=block
            )
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    out.append(Delivery(_body(fields), entry_id, epoch=epoch))
        return out

    async def _reclaim(self, count: int) -> list[Delivery]:
        """Entries idle longer than the lease on another (dead) consumer become ours."""
        r = self._redis
        loop = asyncio.get_running_loop()
        reply: Any = await r.xautoclaim(
            self.stream, GROUP, self.consumer, int(self.lease * 1000),
            start_id=self._claim_cursor, count=count,
        )
        cursor, entries = reply[0], reply[1]
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        if self._claim_cursor == "0-0":
            # A full pass over the pending list: look again in a fraction of the lease.
            self._next_claim = loop.time() + self.lease / 4
        claimed = [(eid, fields) for eid, fields in entries if fields]
        if not claimed:
            return []
        async with r.pipeline(transaction=False) as pipe:
            for eid, _ in claimed:
                pipe.xpending_range(self.stream, GROUP, min=eid, max=eid, count=1)
            pending = await pipe.execute()
        out: list[Delivery] = []
        for (eid, fields), info in zip(claimed, pending, strict=True):
            n = int(info[0]["times_delivered"]) if info else 2
            out.append(Delivery(_body(fields), eid, deliveries=n, redelivered=True, epoch=self.epoch))
        return out

    async def settle(self, outcomes: Sequence[Outcome]) -> None:
        ids = [o.delivery.tag for o in outcomes]
        async with self._redis.pipeline(transaction=True) as pipe:
            for o in outcomes:
                if o.result is not None and o.job_id:
                    pipe.hsetnx(self.results_key, o.job_id, o.result)
                if o.dead is not None:
                    pipe.xadd(self.dead_key, {"b": o.dead})
                if o.retry is not None:
                    pipe.xadd(self.stream, {"b": o.retry})
            pipe.xack(self.stream, GROUP, *ids)
            pipe.xdel(self.stream, *ids)
            await pipe.execute()

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        ids = [d.tag for d in deliveries]
        for start in range(0, len(ids), 1000):
            await self._redis.xclaim(
                self.stream, GROUP, self.consumer, 0, ids[start : start + 1000], justid=True
            )

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        ids = [d.tag for d in deliveries]
        async with self._redis.pipeline(transaction=True) as pipe:
            for d in deliveries:
                pipe.xadd(self.stream, {"b": d.body})
            pipe.xack(self.stream, GROUP, *ids)
            pipe.xdel(self.stream, *ids)
            await pipe.execute()

    async def backlog(self) -> int | None:
        groups: Any = await self._redis.xinfo_groups(self.stream)
        for g in groups:
            name = g.get("name")
            if name in (GROUP, GROUP.encode()):
                lag = g.get("lag")
                return int(lag) if lag is not None else None
        return None

    # ---------------------------------------------------------- inspection

    async def results(self) -> dict[str, bytes]:
        raw: Any = await self._redis.hgetall(self.results_key)
        return {k.decode(): v for k, v in raw.items()}

    async def dead_letters(self) -> list[bytes]:
        entries: Any = await self._redis.xrange(self.dead_key)
        return [_body(fields) for _eid, fields in entries]

    async def delete(self) -> None:
        """Remove the queue's stream, results and dead letters (tests, tools)."""
        await self._redis.delete(self.stream, self.results_key, self.dead_key)


def _body(fields: dict[Any, Any]) -> bytes:
    body = fields.get(b"b", fields.get("b", b""))
    return body if isinstance(body, bytes) else str(body).encode()
