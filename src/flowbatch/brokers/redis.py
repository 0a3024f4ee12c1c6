"""Redis Streams broker (``redis://host:port/db``), on redis-py's asyncio client.

Keys for queue ``q``: the stream ``fb:q`` with the consumer group ``fb``,
one key per result, ``fb:q:result:<job id>`` (expiring after the worker's
``result_ttl``; results written by older versions, in the hash
``fb:q:results``, are still read), and the dead-letter stream ``fb:q:dead``.
Each worker is a consumer named as the worker is in its log lines.

How it keeps the contract:

- fetch first reclaims, with ``XAUTOCLAIM``, entries that have been pending
  longer than the lease on a consumer that stopped renewing them (a dead or
  stalled worker), then reads new ones with ``XREADGROUP ... BLOCK wait``
  (without ``BLOCK`` when it reclaimed some: they are returned at once);
  reclaimed entries are kept until a fetch returns them, so a cancelled
  fetch does not claim them again (which would count another delivery);
- settle is one ``MULTI``/``EXEC`` transaction: ``SET NX PX`` the results
  (the first result of a job wins; kept ``result_ttl``), ``XADD`` dead letters and retries, then
  ``XACK`` + ``XDEL`` the entries; it is all or nothing;
- ``extend`` is ``XCLAIM ... JUSTID`` of the worker's own entries to itself,
  which resets their idle time without counting a delivery;
- a retry is a new entry with ``attempt + 1`` and ``not_before`` = now +
  backoff; the worker that reads it holds it (lease renewed) until then;
- ``release`` re-adds the entries at the end of the stream and acks the old
  ones, so another worker gets them at once, without counting an attempt.

Durability is what the server is configured for: with AOF
(``appendonly yes``, ``appendfsync everysec`` or ``always``) an acked write
survives a server crash; without persistence it survives only a clean
restart (``SHUTDOWN SAVE``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from .base import (
    Broker,
    BrokerError,
    BrokerRefused,
    DeadLetter,
    Delivery,
    Outcome,
    QueueStats,
    age_of,
    decode_record,
    redact,
    requeue_body,
)

__all__ = ["RedisBroker"]

GROUP = "fb"
# Connections one broker object opens at most (its pool blocks past this).
MAX_CONNECTIONS = 64


class RedisBroker(Broker):
    """One queue on a Redis stream; see the module docstring."""

    scheme = "redis"

    def __init__(self, url: str, queue: str) -> None:
        super().__init__(url, queue)
        self.stream = f"fb:{queue}"
        # results written before result TTLs: one hash, read as a fallback
        self.results_key = f"fb:{queue}:results"
        self.result_prefix = f"fb:{queue}:result:"
        self.dead_key = f"fb:{queue}:dead"
        self.consumer = ""
        self._r: aioredis.Redis | None = None
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        # (entry id, body, delivery count or None) reclaimed, not yet handed out
        self._claimed: list[tuple[Any, bytes, int | None]] = []

    @property
    def _redis(self) -> aioredis.Redis:
        if self._r is None:
            raise BrokerError(f"{self!r} is not open")
        return self._r

    async def open(self) -> None:
        if self._r is not None:
            return
        from .worker import worker_name

        # A bounded pool: a Client with thousands of result() calls waiting
        # would otherwise hold a connection per call (commands queue for one of
        # these instead).
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=MAX_CONNECTIONS,
            timeout=None,
            socket_connect_timeout=5,
            health_check_interval=10,
        )
        r = aioredis.Redis.from_pool(pool)
        try:
            await r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except (AuthenticationError, NoPermissionError) as exc:
            await r.aclose()
            raise BrokerRefused(f"redis at {redact(self.url)} refused us: {exc}") from exc
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                await r.aclose()
                raise
        except BaseException:
            await r.aclose()
            raise
        self._r = r
        self.consumer = self.consumer or self.consumer_name or worker_name()
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
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self.result_prefix + job_id)
            pipe.hget(self.results_key, job_id)
            data, legacy = await pipe.execute()
        data = legacy if legacy is not None else data
        return None if data is None else bytes(data)

    # ------------------------------------------------------------ consumer

    async def fetch(self, max_messages: int, wait: float) -> list[Delivery]:
        r = self._redis
        epoch = self.epoch
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_claim and len(self._claimed) < max_messages:
            await self._reclaim(max_messages - len(self._claimed))
        out = await self._take_claimed(max_messages)
        if len(out) < max_messages:
            # BLOCK 0 would wait forever: with reclaimed entries in hand, only
            # look for new ones without blocking.
            block = None if out else max(1, int(wait * 1000))
            try:
                reply: Any = await r.xreadgroup(
                    GROUP, self.consumer, {self.stream: ">"}, count=max_messages - len(out), block=block
                )
            except BaseException:
                self._claimed[:0] = [(d.tag, d.body, d.deliveries) for d in out]
                raise
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    out.append(Delivery(_body(fields), entry_id, epoch=epoch))
        return out

    async def _reclaim(self, count: int) -> None:
        """Entries idle longer than the lease on another (dead) consumer become ours.

        They are kept in ``_claimed`` until a fetch hands them out: a fetch
        cancelled after ``XAUTOCLAIM`` (which counts a delivery) loses none,
        so the next one hands them out without claiming them again.
        """
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
        known = {eid for eid, _, _ in self._claimed}
        self._claimed.extend(
            (eid, _body(fields), None) for eid, fields in entries if fields and eid not in known
        )

    async def _take_claimed(self, count: int) -> list[Delivery]:
        """Up to ``count`` reclaimed entries, with their delivery counts."""
        if not self._claimed:
            return []
        r = self._redis
        take = self._claimed[:count]
        unknown = [eid for eid, _, n in take if n is None]
        counts: dict[Any, int] = {}
        if unknown:
            async with r.pipeline(transaction=False) as pipe:
                for eid in unknown:
                    pipe.xpending_range(self.stream, GROUP, min=eid, max=eid, count=1)
                pending = await pipe.execute()
            counts = {
                eid: int(info[0]["times_delivered"]) if info else 2
                for eid, info in zip(unknown, pending, strict=True)
            }
        del self._claimed[: len(take)]
        return [
            Delivery(body, eid, deliveries=n if n is not None else counts[eid], redelivered=True, epoch=self.epoch)
            for eid, body, n in take
        ]

    async def settle(self, outcomes: Sequence[Outcome]) -> None:
        ids = [o.delivery.tag for o in outcomes]
        ttl = int(self.ttl * 1000) or None
        async with self._redis.pipeline(transaction=True) as pipe:
            for o in outcomes:
                if o.result is not None and o.job_id:
                    # SET NX: the first result of a job wins; PX: kept result_ttl
                    pipe.set(self.result_prefix + o.job_id, o.result, nx=True, px=ttl)
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
                pipe.xadd(self.stream, {"b": requeue_body(d)})
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
        r = self._redis
        keys = [k async for k in r.scan_iter(match=self.result_prefix + "*", count=1000)]
        out: dict[str, bytes] = {}
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            values: Any = await r.mget(chunk)
            for key, value in zip(chunk, values, strict=True):
                if value is not None:  # expired since the scan
                    out[key.decode()[len(self.result_prefix) :]] = bytes(value)
        legacy: Any = await r.hgetall(self.results_key)
        out.update({k.decode(): bytes(v) for k, v in legacy.items()})
        return out

    async def dead_letters(self) -> list[bytes]:
        entries: Any = await self._redis.xrange(self.dead_key)
        return [_body(fields) for _eid, fields in entries]

    # ------------------------------------ dead letters and depth (tools)

    async def list_dead_letters(self) -> list[DeadLetter]:
        entries: Any = await self._redis.xrange(self.dead_key)
        return [DeadLetter(_text(eid), _body(fields)) for eid, fields in entries]

    async def remove_dead_letters(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        return int(await self._redis.xdel(self.dead_key, *keys))

    async def forget_failed_result(self, job_id: str) -> bool:
        data = await self.get_result(job_id)
        if data is None or decode_record(data).ok:
            return False
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.result_prefix + job_id)
            pipe.hdel(self.results_key, job_id)
            await pipe.execute()
        return True

    async def queue_lag(self) -> QueueStats:
        # Settled entries are deleted (XDEL), so the stream holds exactly the
        # waiting and the pending (delivered, unacked) ones. (XINFO GROUPS'
        # own "lag" needs Redis 7 and can be null after deletions.)
        r = self._redis
        async with r.pipeline(transaction=False) as pipe:
            pipe.xlen(self.stream)
            pipe.xpending(self.stream, GROUP)
            pipe.xinfo_groups(self.stream)
            length, pending, groups = await pipe.execute()
        in_flight = int(pending.get("pending", 0) if isinstance(pending, dict) else pending[0])
        last = next(
            (_text(g.get("last-delivered-id")) for g in groups if g.get("name") in (GROUP, GROUP.encode())),
            "0-0",
        )
        oldest: Any = await r.xrange(self.stream, min=f"({last}", max="+", count=1)
        return QueueStats(
            waiting=max(0, int(length) - in_flight),
            in_flight=in_flight,
            oldest_waiting_age=age_of(_body(oldest[0][1])) if oldest else None,
        )

    async def queue_stats(self) -> QueueStats:
        lag = await self.queue_lag()
        r = self._redis
        async with r.pipeline(transaction=False) as pipe:
            pipe.xlen(self.dead_key)
            pipe.hlen(self.results_key)
            dead, legacy = await pipe.execute()
        results = int(legacy)
        async for _ in r.scan_iter(match=self.result_prefix + "*", count=1000):
            results += 1
        return dataclasses.replace(lag, dead=int(dead), results=results)

    async def delete(self) -> None:
        """Remove the queue's stream, results and dead letters (tests, tools)."""
        r = self._redis
        keys = [k async for k in r.scan_iter(match=self.result_prefix + "*", count=1000)]
        await r.delete(self.stream, self.results_key, self.dead_key, *keys)


def _body(fields: dict[Any, Any]) -> bytes:
    body = fields.get(b"b", fields.get("b", b""))
    return body if isinstance(body, bytes) else str(body).encode()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
