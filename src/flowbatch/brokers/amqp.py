"""RabbitMQ broker (``amqp://user:pass@host:port/vhost``), on aio-pika.

Declared for queue ``q`` (all durable): the work queue ``q`` (its
``x-dead-letter-exchange`` is ``q.dlx``, so a message RabbitMQ rejects lands
there too), the direct exchange ``q.dlx`` bound to the dead-letter queue
``q.dead``, and the results queue ``q.results``.

How it keeps the contract:

- manual acks and a prefetch (``basic.qos``) equal to the worker's
  ``prefetch``: RabbitMQ never pushes more than the pipeline has room for;
- settle publishes every result (to ``q.results``, ``message_id`` = job
  id), dead letter (to ``q.dlx``) and retry (to ``q``) as a persistent
  message with publisher confirms, and acks a delivery only once all of its
  writes are confirmed;
- leases: an unacked message stays with its consumer for as long as the
  channel lives, so there is nothing to renew (mind the server's
  ``consumer_timeout``, 30 min by default); a worker that dies or loses its
  connection has its messages requeued at once, flagged ``redelivered``;
- acks are bound to the channel: after a reconnect the old deliveries have
  already been requeued, so their results are still published but not acked;
- a retry is a new message with ``attempt + 1`` and ``not_before``; the
  worker holds it until then;
- results go to ``q.results``, a RabbitMQ *stream* (durable, kept 7 days,
  read by any number of clients without consuming it): ``get_result`` reads
  it into this process, where the first result of a job wins (duplicates
  from redeliveries are counted in ``duplicate_results``).

The connection is not aio-pika's "robust" one: reconnection (including of a
consumer that stopped receiving) is the worker's, from its progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aiormq.exceptions import (
    AuthenticationError,
    ConnectionNotAllowed,
    InvalidFrameError,
    ProbableAuthenticationError,
)

from .base import (
    Broker,
    BrokerError,
    BrokerRefused,
    Delivery,
    Outcome,
    QueueStats,
    decode_record,
    digest_key,
    redact,
    requeue_body,
)

__all__ = ["AMQPBroker"]

_PERSISTENT = aio_pika.DeliveryMode.PERSISTENT
# Results live in a stream queue: durable, and read by any number of clients
# without taking them away from the others.
_STREAM: Any = {"x-queue-type": "stream", "x-max-age": "7D"}
# Header of a result-stream message that withdraws a job's failed result
# (published when its dead letter is replayed; a stream cannot delete).
_FORGET = "x-fb-forget"
# How long a closing broker spends putting back what it prefetched.
_RETURN_TIMEOUT = 5.0


class AMQPBroker(Broker):
    """One queue on RabbitMQ; see the module docstring."""

    scheme = "amqp"

    def __init__(self, url: str, queue: str) -> None:
        super().__init__(url, queue)
        self.dlx = f"{queue}.dlx"
        self.dead_queue = f"{queue}.dead"
        self.results_queue = f"{queue}.results"
        self._conn: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._dlx: aio_pika.abc.AbstractExchange | None = None
        self._buffer: asyncio.Queue[tuple[int, AbstractIncomingMessage]] = asyncio.Queue()
        self._consuming = False
        self._consumer_tag: str | None = None
        self._results: dict[str, bytes] = {}
        self._reading_results = False
        self._results_channel: AbstractChannel | None = None
        self._results_offset = 0
        # One reader of the results stream however many callers wait at once.
        self._results_lock = asyncio.Lock()
        #: result messages seen again for a job that already had one
        self.duplicate_results = 0

    async def open(self) -> None:
        if self._conn is not None:
            return
        conn = await _connect(self.url)
        try:
            channel = await conn.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=self.prefetch)
            self._dlx = await channel.declare_exchange(
                self.dlx, aio_pika.ExchangeType.DIRECT, durable=True
            )
            dead = await channel.declare_queue(self.dead_queue, durable=True)
            await dead.bind(self._dlx, routing_key=self.queue)
            self._queue = await channel.declare_queue(
                self.queue,
                durable=True,
                arguments={"x-dead-letter-exchange": self.dlx, "x-dead-letter-routing-key": self.queue},
            )
            await channel.declare_queue(self.results_queue, durable=True, arguments=_STREAM)
        except BaseException:
            await conn.close()
            raise
        self._conn, self._channel = conn, channel
        self._buffer = asyncio.Queue()
        self._consuming = False
        self._reading_results = False
        self.epoch += 1

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        channel, queue, tag = self._channel, self._queue, self._consumer_tag
        self._channel = self._queue = self._dlx = None
        self._consumer_tag = None
        self._consuming = self._reading_results = False
        if conn is None:
            return
        if channel is not None and queue is not None and tag is not None and not conn.is_closed:
            # Messages RabbitMQ pushed but the worker never took would come
            # back flagged redelivered (an attempt) with the channel: stop
            # the consumer and put copies back instead.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_RETURN_TIMEOUT):
                    await queue.cancel(tag)
                    await self._return_buffered(channel)
        # Unacked deliveries go back to the queue with the channel.
        await conn.close()

    async def _return_buffered(self, channel: AbstractChannel) -> None:
        epoch = self.epoch
        unstarted: list[Delivery] = []
        while not self._buffer.empty():
            d = self._wrap(*self._buffer.get_nowait())
            if d.epoch == epoch:
                unstarted.append(d)
        if unstarted:
            await self._put_back(channel, unstarted)

    async def _put_back(self, channel: AbstractChannel, deliveries: Sequence[Delivery]) -> None:
        """Publish a copy of each delivery (confirmed), then ack it: a requeue
        that RabbitMQ does not flag as a redelivery."""
        exchange = channel.default_exchange
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(requeue_body(d), delivery_mode=_PERSISTENT),
                    routing_key=self.queue,
                )
                for d in deliveries
            )
        )
        await asyncio.gather(*(d.tag.ack() for d in deliveries))

    @property
    def _ch(self) -> AbstractChannel:
        if self._channel is None or self._conn is None or self._conn.is_closed:
            raise BrokerError(f"{self!r} is not connected")
        return self._channel

    # ------------------------------------------------------------ producer

    async def publish(self, bodies: Sequence[bytes]) -> None:
        exchange = self._ch.default_exchange
        await asyncio.gather(
            *(
                exchange.publish(aio_pika.Message(b, delivery_mode=_PERSISTENT), routing_key=self.queue)
                for b in bodies
            )
        )

    async def get_result(self, job_id: str) -> bytes | None:
        await self._read_results()
        return self._results.get(job_id)

    async def _read_results(self) -> None:
        # Raises when the connection is gone, so that a Client waiting on a
        # result reconnects (a reader whose channel closed would never see
        # another result).
        self._ch  # noqa: B018
        if self._results_read():
            return
        async with self._results_lock:
            if not self._results_read():
                await self._start_reading_results()

    def _results_read(self) -> bool:
        channel = self._results_channel
        return self._reading_results and channel is not None and not channel.is_closed

    async def _start_reading_results(self) -> None:
        assert self._conn is not None
        channel = self._results_channel = await self._conn.channel()
        await channel.set_qos(prefetch_count=1000)  # a stream consumer needs a prefetch
        queue = await channel.declare_queue(self.results_queue, durable=True, arguments=_STREAM)

        async def on_result(msg: AbstractIncomingMessage) -> None:
            offset = (msg.headers or {}).get("x-stream-offset")
            if isinstance(offset, int):
                if offset < self._results_offset:
                    await msg.ack()
                    return  # already read before a reconnect
                self._results_offset = offset + 1
            job_id = msg.message_id or ""
            if (msg.headers or {}).get(_FORGET):
                # A replayed dead letter: its failed result no longer counts.
                kept = self._results.get(job_id)
                if kept is not None and not decode_record(kept).ok:
                    del self._results[job_id]
            elif job_id in self._results:
                self.duplicate_results += 1
            else:
                self._results[job_id] = msg.body
            await msg.ack()

        await queue.consume(on_result, arguments={"x-stream-offset": self._results_offset})
        self._reading_results = True

    # ------------------------------------------------------------ consumer

    async def fetch(self, max_messages: int, wait: float) -> list[Delivery]:
        channel = self._ch
        if not self._consuming:
            assert self._queue is not None
            epoch = self.epoch
            buffer = self._buffer

            async def on_message(msg: AbstractIncomingMessage) -> None:
                buffer.put_nowait((epoch, msg))

            self._consumer_tag = await self._queue.consume(
                on_message, consumer_tag=self.consumer_name or None
            )
            self._consuming = True
        out: list[Delivery] = []
        if self._buffer.empty():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    out.append(self._wrap(*(await self._buffer.get())))
        while len(out) < max_messages and not self._buffer.empty():
            out.append(self._wrap(*self._buffer.get_nowait()))
        if channel.is_closed:
            raise BrokerError(f"{self!r}: channel closed")
        return out

    @staticmethod
    def _wrap(epoch: int, msg: AbstractIncomingMessage) -> Delivery:
        redelivered = bool(msg.redelivered)
        return Delivery(msg.body, msg, deliveries=2 if redelivered else 1, redelivered=redelivered, epoch=epoch)

    async def settle(self, outcomes: Sequence[Outcome]) -> None:
        channel = self._ch
        assert self._dlx is not None
        default = channel.default_exchange
        writes: list[Any] = []
        for o in outcomes:
            if o.result is not None and o.job_id:
                msg = aio_pika.Message(o.result, delivery_mode=_PERSISTENT, message_id=o.job_id)
                writes.append(default.publish(msg, routing_key=self.results_queue))
            if o.dead is not None:
                msg = aio_pika.Message(o.dead, delivery_mode=_PERSISTENT, message_id=o.job_id)
                writes.append(self._dlx.publish(msg, routing_key=self.queue))
            if o.retry is not None:
                msg = aio_pika.Message(o.retry, delivery_mode=_PERSISTENT)
                writes.append(default.publish(msg, routing_key=self.queue))
        await asyncio.gather(*writes)  # every write confirmed before any ack
        acks = [o.delivery.tag.ack() for o in outcomes if o.delivery.epoch == self.epoch]
        await asyncio.gather(*acks)

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        return  # an unacked delivery is held for as long as its channel lives

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        # A nack with requeue would flag the message redelivered, which reads
        # as a crashed attempt; deliveries of an older channel are already
        # back in the queue.
        current = [d for d in deliveries if d.epoch == self.epoch]
        if current:
            await self._put_back(self._ch, current)

    async def backlog(self) -> int | None:
        queue = await self._ch.declare_queue(self.queue, passive=True)
        count = getattr(queue.declaration_result, "message_count", None)
        return None if count is None else int(count)

    # ---------------------------------------------------------- inspection

    async def results(self) -> dict[str, bytes]:
        await self._read_results()
        return dict(self._results)

    # ------------------------------------ dead letters and depth (tools)

    async def remove_dead_letters(self, keys: Sequence[str]) -> int:
        # Dead letters have no id in a queue: take them all, ack the chosen
        # ones (by digest), and the channel's close puts the others back.
        wanted, removed = set(keys), 0
        channel = await self._tool_channel()
        try:
            queue = await channel.declare_queue(self.dead_queue, durable=True)
            while wanted:
                msg = await queue.get(no_ack=False, fail=False)
                if msg is None:
                    break
                key = digest_key(msg.body)
                if key in wanted:
                    wanted.discard(key)
                    await msg.ack()
                    removed += 1
        finally:
            await channel.close()
        return removed

    async def forget_failed_result(self, job_id: str) -> bool:
        # A stream cannot delete: readers drop the job's failed result when
        # they meet this marker (see _read_results).
        msg = aio_pika.Message(
            b"", delivery_mode=_PERSISTENT, message_id=job_id, headers={_FORGET: 1}
        )
        await self._ch.default_exchange.publish(msg, routing_key=self.results_queue)
        if _failed(self._results.get(job_id)):
            del self._results[job_id]
        return True

    async def queue_stats(self) -> QueueStats:
        lag = await self.queue_lag()
        channel = await self._tool_channel()
        try:
            dead = await channel.declare_queue(self.dead_queue, passive=True)
        finally:
            await channel.close()
        return dataclasses.replace(lag, dead=_count(dead))

    async def queue_lag(self) -> QueueStats:
        # The ready count of a passive declare. basic.qos hides what consumers
        # hold (unacked) and a queue cannot be peeked without taking its head:
        # in_flight and the oldest age stay None.
        channel = await self._tool_channel()
        try:
            work = await channel.declare_queue(self.queue, passive=True)
        finally:
            await channel.close()
        return QueueStats(waiting=_count(work))

    async def _tool_channel(self) -> AbstractChannel:
        self._ch  # noqa: B018 - raises when not connected
        assert self._conn is not None
        return await self._conn.channel()

    async def delete(self) -> None:
        """Remove the queue, its dead-letter queue and exchange, and its results (tests, tools)."""
        assert self._conn is not None
        channel = await self._conn.channel()
        try:
            for name in (self.queue, self.dead_queue, self.results_queue):
                await channel.queue_delete(name)
            await channel.exchange_delete(self.dlx)
        finally:
            await channel.close()

    async def dead_letters(self) -> list[bytes]:
        assert self._conn is not None
        channel = await self._conn.channel()
        out: list[bytes] = []
        try:
            queue = await channel.declare_queue(self.dead_queue, durable=True)
            while True:
                msg = await queue.get(no_ack=False, fail=False)
                if msg is None:
                    break
                out.append(msg.body)
        finally:
            await channel.close()  # unacked: they stay in the dead-letter queue
        return out


async def _connect(url: str) -> AbstractConnection:
    """``aio_pika.connect``, with refused logins and virtual hosts as ``BrokerRefused``."""
    try:
        return await aio_pika.connect(url, timeout=10)
    except (ProbableAuthenticationError, AuthenticationError, ConnectionNotAllowed) as exc:
        raise BrokerRefused(f"rabbitmq at {redact(url)} refused us: {exc}") from exc
    except InvalidFrameError as exc:
        if "Connection.Close" not in str(exc):
            raise
        # RabbitMQ answers Connection.Open for a virtual host that does not
        # exist (or that the user may not use) by closing the connection.
        vhost = unquote(urlsplit(url).path[1:]) or "/"
        raise BrokerRefused(
            f"rabbitmq at {redact(url)} refused the virtual host {vhost!r}: it does not "
            "exist or this user may not use it (the server closed the connection at login)"
        ) from exc


def _count(queue: AbstractQueue) -> int | None:
    count = getattr(queue.declaration_result, "message_count", None)
    return None if count is None else int(count)


def _failed(record: bytes | None) -> bool:
    return record is not None and not decode_record(record).ok
