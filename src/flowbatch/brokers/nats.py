"""NATS JetStream broker (``nats://host:port``), on nats-py.

Created for queue ``q``: the work-queue stream ``FB_q`` (subject
``fb.q.jobs``, file storage), its durable pull consumer ``fb`` (explicit
ack, ``ack_wait`` = the worker's lease), the dead-letter stream ``FB_q_DEAD``
(subject ``fb.q.dead``) and the key-value bucket ``FB_q_results``, whose
entries expire after the worker's ``result_ttl`` (the bucket's ``max_age``,
set when a worker opens it).

How it keeps the contract:

- fetch pulls at most as many messages as the pipeline has room for;
  ``num_delivered`` counts every delivery, so a message whose workers keep
  dying is dead-lettered after the last attempt;
- settle writes each result with the bucket's ``create`` (which fails if the
  key exists: the first result of a job wins) and each dead letter with a
  JetStream publish (the server's ack means it is stored), then acks;
- a retry is ``nak(delay=backoff)``: the server redelivers the same message
  after the backoff and ``num_delivered`` carries the attempt count;
- ``extend`` sends ``+WPI`` (in progress), which restarts ``ack_wait``;
- ``release`` publishes a copy of the message and acks the original (a nak
  would count a delivery, and so an attempt);
- the client reconnects by itself after a server restart; a consumer that
  receives nothing while ``num_pending`` says messages wait is re-created
  by the worker (stall detection).

Job ids that are not valid key names (``[-/_=.a-zA-Z0-9]``) are stored
under ``h_`` + their SHA-256.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import re
from collections.abc import Sequence
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

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

__all__ = ["NATSBroker"]

_KEY = re.compile(r"^[-/_=a-zA-Z0-9]+(\.[-/_=a-zA-Z0-9]+)*$")
DURABLE = "fb"
_CONNECT_TIMEOUT = 15.0

log = logging.getLogger("flowbatch.brokers")


def kv_key(job_id: str) -> str:
    if _KEY.match(job_id) and len(job_id) <= 200:
        return job_id
    return "h_" + hashlib.sha256(job_id.encode()).hexdigest()


class NATSBroker(Broker):
    """One queue on NATS JetStream; see the module docstring."""

    scheme = "nats"

    def __init__(self, url: str, queue: str) -> None:
        super().__init__(url, queue)
        self.stream = f"FB_{queue}"
        self.subject = f"fb.{queue}.jobs"
        self.dead_stream = f"FB_{queue}_DEAD"
        self.dead_subject = f"fb.{queue}.dead"
        self.bucket = f"FB_{queue}_results"
        self._nc: Any = None
        self._js: Any = None
        self._kv: Any = None
        self._sub: Any = None

    async def open(self) -> None:
        if self._nc is not None:
            return
        nc = await self._connect()
        try:
            js = nc.jetstream(timeout=10)
            await _ensure_stream(
                js,
                StreamConfig(
                    name=self.stream, subjects=[self.subject],
                    retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
                ),
            )
            await _ensure_stream(
                js,
                StreamConfig(name=self.dead_stream, subjects=[self.dead_subject], storage=StorageType.FILE),
            )
            try:
                self._kv = await js.key_value(self.bucket)
            except nats.js.errors.BucketNotFoundError:
                self._kv = await js.create_key_value(
                    bucket=self.bucket, storage=StorageType.FILE, ttl=self.ttl or None
                )
            else:
                if self.result_ttl is not None:  # a worker's setting, not a producer's
                    await self._apply_ttl(js)
        except BaseException:
            await nc.close()
            raise
        self._nc, self._js = nc, js
        self._sub = None
        self.epoch += 1

    async def _apply_ttl(self, js: Any) -> None:
        """Results are kept ``result_ttl``: the bucket's stream's ``max_age``."""
        info = await js.stream_info(f"KV_{self.bucket}")
        config = info.config
        if float(config.max_age or 0) != self.ttl:
            config.max_age = self.ttl
            if self.ttl:  # JetStream wants a duplicates window within max_age
                config.duplicate_window = min(float(config.duplicate_window or self.ttl), self.ttl)
            await js.update_stream(config)

    async def _connect(self) -> Any:
        """``nats.connect``, bounded, that fails on its first error.

        nats-py retries a refused first connection (and a refused login) for
        as long as ``max_reconnect_attempts`` allows, forever here, reporting
        each failure only to ``error_cb``: the first one ends the attempt
        (``BrokerRefused`` for a refused login), so that the worker retries
        with its own backoff and says what it waits for.
        """
        first_error: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

        async def on_error(exc: Exception) -> None:
            if not first_error.done():
                first_error.set_result(exc)
            # The worker logs what it waits for; the library's own errors
            # (every failed reconnect) only at DEBUG, without tracebacks.
            log.debug("nats at %s: %s: %s", redact(self.url), type(exc).__name__, exc)

        connecting = asyncio.ensure_future(
            nats.connect(
                self.url,
                connect_timeout=5,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                allow_reconnect=True,
                reconnected_cb=self._on_reconnected,
                error_cb=on_error,
                name=self.consumer_name or None,
            )
        )
        waiters: set[asyncio.Future[Any]] = {connecting, first_error}
        try:
            await asyncio.wait(
                waiters, timeout=_CONNECT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not connecting.done():
                connecting.cancel()
                await asyncio.wait({connecting})
        if not connecting.cancelled() and connecting.exception() is None:
            return connecting.result()
        where = f"nats at {redact(self.url)}"
        if first_error.done():
            exc = first_error.result()
            if _is_refusal(exc):
                raise BrokerRefused(f"{where} refused us: {exc}") from exc
            raise BrokerError(f"{where}: {type(exc).__name__}: {exc}") from exc
        if connecting.cancelled():
            raise BrokerError(f"{where}: no connection within {_CONNECT_TIMEOUT:g}s")
        raise BrokerError(f"{where}: {connecting.exception()}") from connecting.exception()

    async def _on_reconnected(self) -> None:
        self.auto_reconnects += 1

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        self._js = self._kv = self._sub = None
        if nc is not None:
            # close() flushes pending writes, which waits forever on a
            # connection that is down (mid-reconnect): bound it.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_CONNECT_TIMEOUT):
                    await nc.close()

    def _connected(self) -> Any:
        if self._nc is None or self._js is None:
            raise BrokerError(f"{self!r} is not open")
        return self._js

    # ------------------------------------------------------------ producer

    async def publish(self, bodies: Sequence[bytes]) -> None:
        js = self._connected()
        await asyncio.gather(*(js.publish(self.subject, bytes(b), stream=self.stream) for b in bodies))

    async def get_result(self, job_id: str) -> bytes | None:
        self._connected()
        try:
            entry = await self._kv.get(kv_key(job_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        value = entry.value
        return None if value is None else bytes(value)

    # ------------------------------------------------------------ consumer

    async def _consumer(self) -> Any:
        js = self._connected()
        if self._sub is None:
            config = ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.lease,
                max_deliver=-1,
                max_ack_pending=max(1000, 4 * self.prefetch),
            )
            self._sub = await js.pull_subscribe(
                self.subject, durable=DURABLE, stream=self.stream, config=config
            )
        return self._sub

    async def fetch(self, max_messages: int, wait: float) -> list[Delivery]:
        sub = await self._consumer()
        try:
            msgs = await sub.fetch(batch=max_messages, timeout=max(wait, 0.01))
        except TimeoutError:  # nats' own, or a plain one when its probe answers late
            return []
        epoch = self.epoch
        out: list[Delivery] = []
        for m in msgs:
            n = int(m.metadata.num_delivered or 1)
            out.append(Delivery(m.data, m, deliveries=n, redelivered=n > 1, epoch=epoch))
        return out

    async def settle(self, outcomes: Sequence[Outcome]) -> None:
        js = self._connected()
        writes: list[Any] = []
        for o in outcomes:
            if o.result is not None and o.job_id:
                writes.append(self._create(o.job_id, o.result))
            if o.dead is not None:
                writes.append(js.publish(self.dead_subject, o.dead, stream=self.dead_stream))
        await asyncio.gather(*writes)  # stored (acked by the server) before any ack
        for o in outcomes:
            if o.retry is not None:
                delay = int(o.delay * 1e9)
                await self._reply(o.delivery, b'-NAK {"delay": %d}' % delay)
            else:
                await self._reply(o.delivery, b"+ACK")

    async def _reply(self, d: Delivery, ack: bytes) -> None:
        # An ack is a publish to the message's reply subject. Sent on the
        # current connection, it also settles messages fetched before a
        # reconnect (a message's own .ack() would use the closed one).
        reply = d.tag.reply
        if reply:
            await self._nc.publish(reply, ack)

    async def _create(self, job_id: str, record: bytes) -> None:
        with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
            await self._kv.create(kv_key(job_id), record)

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        self._connected()
        for d in deliveries:
            await self._reply(d, b"+WPI")

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        # A -NAK would count a delivery (an attempt) on the redelivery: put a
        # copy back (stored once the server acks it), then ack the original.
        js = self._connected()
        await asyncio.gather(
            *(js.publish(self.subject, requeue_body(d), stream=self.stream) for d in deliveries)
        )
        for d in deliveries:
            await self._reply(d, b"+ACK")

    async def backlog(self) -> int | None:
        sub = await self._consumer()
        info = await sub.consumer_info()
        return int(info.num_pending or 0)

    # ---------------------------------------------------------- inspection

    async def results(self) -> dict[str, bytes]:
        self._connected()
        from .base import decode_record

        js = self._connected()
        for _ in range(3):
            watcher = await self._kv.watchall(ignore_deletes=True)
            out: dict[str, bytes] = {}
            try:
                async with asyncio.timeout(60):
                    async for entry in watcher:
                        if entry is None:
                            break  # every current value has been seen
                        out[decode_record(entry.value).id] = bytes(entry.value)
            finally:
                await watcher.stop()
            # nats-py's watcher can report "nothing pending" before the first
            # entry of a non-empty bucket arrives (seen on a loaded machine):
            # an empty answer is checked against the bucket's stream.
            if out or not (await js.stream_info(f"KV_{self.bucket}")).state.messages:
                return out
        return out

    async def dead_letters(self) -> list[bytes]:
        js = self._connected()
        info = await js.stream_info(self.dead_stream)
        out: list[bytes] = []
        first, last = int(info.state.first_seq), int(info.state.last_seq)
        if not info.state.messages:
            return out
        for seq in range(first, last + 1):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                msg = await js.get_msg(self.dead_stream, seq)
                out.append(bytes(msg.data))
        return out

    # ------------------------------------ dead letters and depth (tools)

    async def list_dead_letters(self) -> list[DeadLetter]:
        js = self._connected()
        info = await js.stream_info(self.dead_stream)
        out: list[DeadLetter] = []
        if not info.state.messages:
            return out
        for seq in range(int(info.state.first_seq), int(info.state.last_seq) + 1):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                msg = await js.get_msg(self.dead_stream, seq)
                out.append(DeadLetter(str(seq), bytes(msg.data)))
        return out

    async def remove_dead_letters(self, keys: Sequence[str]) -> int:
        js = self._connected()
        removed = 0
        for key in keys:
            if key.isdigit():
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    removed += bool(await js.delete_msg(self.dead_stream, int(key)))
        return removed

    async def forget_failed_result(self, job_id: str) -> bool:
        data = await self.get_result(job_id)
        if data is None or decode_record(data).ok:
            return False
        await self._kv.delete(kv_key(job_id))  # a later create() succeeds again
        return True

    async def queue_stats(self) -> QueueStats:
        js = self._connected()
        dead = await js.stream_info(self.dead_stream)
        # The bucket counts delete markers as values: count the live keys.
        try:
            results = len(await self._kv.keys())
        except nats.js.errors.NoKeysError:
            results = 0
        lag = await self.queue_lag()
        return dataclasses.replace(lag, dead=int(dead.state.messages), results=results)

    async def queue_lag(self) -> QueueStats:
        # The durable consumer's num_pending (not yet delivered) and
        # num_ack_pending (delivered, not acked).
        js = self._connected()
        try:
            info = await js.consumer_info(self.stream, DURABLE)
        except nats.js.errors.NotFoundError:  # no worker has consumed yet
            stream = await js.stream_info(self.stream)
            waiting, in_flight, next_seq = int(stream.state.messages), 0, int(stream.state.first_seq)
        else:
            waiting, in_flight = int(info.num_pending or 0), int(info.num_ack_pending or 0)
            next_seq = int(info.delivered.stream_seq or 0) + 1
        oldest = None
        if waiting:
            # Every message after the last one delivered waits (the stream
            # keeps only unacked messages); released ones are not seen here.
            with contextlib.suppress(nats.js.errors.NotFoundError):
                oldest = age_of(bytes((await js.get_msg(self.stream, next_seq)).data))
        return QueueStats(waiting=waiting, in_flight=in_flight, oldest_waiting_age=oldest)

    async def delete(self) -> None:
        """Remove the queue's streams and results bucket (tests, tools)."""
        js = self._connected()
        for name in (self.stream, self.dead_stream):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(name)
        with contextlib.suppress(Exception):
            await js.delete_key_value(self.bucket)


async def _ensure_stream(js: Any, config: StreamConfig) -> None:
    try:
        await js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        with contextlib.suppress(nats.js.errors.BadRequestError):
            await js.add_stream(config)  # another process may have created it first


def _is_refusal(exc: BaseException) -> bool:
    if isinstance(exc, nats.errors.AuthorizationError):
        return True
    text = str(exc).lower()
    return "authorization violation" in text or "authentication" in text
