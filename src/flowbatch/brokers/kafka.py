"""Kafka broker (``kafka://host:port[,host:port]``), on aiokafka.

Topics for queue ``q``: ``q`` (jobs, ``partitions`` partitions, 4 by
default), ``q.results`` (result records keyed by job id) and ``q.dead``
(dead letters). Workers form the consumer group ``fb-q``.

How it keeps the contract:

- no auto-commit: for each partition the worker commits only up to the last
  *contiguous* settled offset, so a crash or rebalance re-delivers every
  message not yet settled (and possibly some settled ones after a gap);
- settle produces results, dead letters and retries with ``acks=all`` and
  waits for every acknowledgement before it moves the commit point;
- leases are the consumer group's: a worker holds its partitions while its
  heartbeats (a background task of aiokafka) continue, so there is nothing
  to renew per message; a dead worker's partitions move to the others after
  ``session_timeout_ms``;
- backpressure: ``getmany(max_records=room)``;
- a retry is a new message with ``attempt + 1`` and ``not_before``; the
  worker holds it until then (the commit point waits behind it, so a retry
  delays commits of its partition by at most the backoff);
- results are a topic, not a table: ``get_result`` reads ``q.results`` into
  this process (the first result of a job wins; later ones are counted in
  ``duplicate_results``). Give ``q.results`` compaction or retention to suit.

Kafka does not count deliveries: a message that crashes every worker that
reads it is not detected as such (attempt counting covers failures the
worker sees, not crashes).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # type: ignore[import-untyped]
from aiokafka.abc import ConsumerRebalanceListener  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.errors import CommitFailedError, KafkaError, TopicAlreadyExistsError  # type: ignore[import-untyped]

from .base import (
    Broker,
    BrokerError,
    BrokerUnsupported,
    DeadLetter,
    Delivery,
    Outcome,
    QueueStats,
    Replayed,
)

__all__ = ["KafkaBroker"]

_APPEND_ONLY = (
    "kafka:// cannot remove single dead letters (a topic is an append-only log), so it "
    "cannot replay or purge them: read them with `flowbatch dlq list --json` / `dlq show`, "
    "submit the jobs again with the same key, and give the .dead topic a retention"
)

log = logging.getLogger("flowbatch.brokers")


def bootstrap(url: str) -> str:
    parts = urlsplit(url)
    hosts = parts.netloc or parts.path
    if not hosts:
        raise ValueError(f"kafka URL {url!r} names no broker: kafka://host:9092")
    return hosts


class _Tracker(ConsumerRebalanceListener):  # type: ignore[misc]
    """Per partition: offsets handed out and not settled, and the commit point."""

    def __init__(self) -> None:
        self.outstanding: dict[TopicPartition, list[int]] = {}
        self.done: dict[TopicPartition, set[int]] = {}
        self.next: dict[TopicPartition, int] = {}

    def handed(self, tp: TopicPartition, offset: int) -> None:
        heapq.heappush(self.outstanding.setdefault(tp, []), offset)
        self.next[tp] = max(self.next.get(tp, 0), offset + 1)

    def settled(self, tp: TopicPartition, offset: int) -> None:
        if tp in self.outstanding:
            self.done.setdefault(tp, set()).add(offset)

    def commit_points(self) -> dict[TopicPartition, int]:
        points: dict[TopicPartition, int] = {}
        for tp, heap in self.outstanding.items():
            done = self.done.get(tp, set())
            moved = False
            while heap and heap[0] in done:
                done.discard(heapq.heappop(heap))
                moved = True
            if moved:
                points[tp] = heap[0] if heap else self.next[tp]
        return points

    async def on_partitions_revoked(self, revoked: Any) -> None:
        for tp in revoked:
            self.outstanding.pop(tp, None)
            self.done.pop(tp, None)
            self.next.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        return


class KafkaBroker(Broker):
    """One queue on Kafka; see the module docstring."""

    scheme = "kafka"

    def __init__(self, url: str, queue: str, *, partitions: int = 4) -> None:
        super().__init__(url, queue)
        self.servers = bootstrap(url)
        self.partitions = partitions
        self.topic = queue
        self.results_topic = f"{queue}.results"
        self.dead_topic = f"{queue}.dead"
        self.group = f"fb-{queue}"
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._tracker = _Tracker()
        self._results: dict[str, bytes] = {}
        self._reader: AIOKafkaConsumer | None = None
        #: result messages seen again for a job that already had one
        self.duplicate_results = 0

    async def open(self) -> None:
        if self._producer is not None:
            return
        await self._create_topics()
        producer = AIOKafkaProducer(bootstrap_servers=self.servers, acks="all", linger_ms=2)
        await producer.start()
        self._producer = producer
        self._tracker = _Tracker()
        self.epoch += 1

    async def _create_topics(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.servers)
        await admin.start()
        try:
            for name, n in ((self.topic, self.partitions), (self.results_topic, 1), (self.dead_topic, 1)):
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics([NewTopic(name, num_partitions=n, replication_factor=1)])
        finally:
            await admin.close()

    async def close(self) -> None:
        producer, consumer, reader = self._producer, self._consumer, self._reader
        self._producer = self._consumer = self._reader = None
        for client in (consumer, reader, producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()

    def _prod(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise BrokerError(f"{self!r} is not open")
        return self._producer

    # ------------------------------------------------------------ producer

    async def publish(self, bodies: Sequence[bytes]) -> None:
        producer = self._prod()
        sent = [await producer.send(self.topic, bytes(b)) for b in bodies]
        await asyncio.gather(*sent)

    async def get_result(self, job_id: str) -> bytes | None:
        if job_id not in self._results:
            await self._read_results(to_end=False)
        return self._results.get(job_id)

    async def _read_results(self, *, to_end: bool) -> None:
        self._prod()
        if self._reader is None:
            reader = AIOKafkaConsumer(
                bootstrap_servers=self.servers, enable_auto_commit=False, group_id=None,
                auto_offset_reset="earliest",
            )
            await reader.start()
            tp = TopicPartition(self.results_topic, 0)
            reader.assign([tp])
            await reader.seek_to_beginning(tp)
            self._reader = reader
        reader = self._reader
        tp = TopicPartition(self.results_topic, 0)
        end = (await reader.end_offsets([tp]))[tp] if to_end else None
        while True:
            batch = await reader.getmany(tp, timeout_ms=50, max_records=10_000)
            for msg in batch.get(tp, ()):
                job_id = (msg.key or b"").decode()
                if job_id in self._results:
                    self.duplicate_results += 1
                else:
                    self._results[job_id] = msg.value or b""
            if end is None:
                if not batch:
                    return
            elif await reader.position(tp) >= end:
                return

    # ------------------------------------------------------------ consumer

    async def _group_consumer(self) -> AIOKafkaConsumer:
        self._prod()
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.servers,
                group_id=self.group,
                client_id=self.consumer_name or "flowbatch",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=max(6000, int(self.lease * 1000)),
                heartbeat_interval_ms=1000,
                max_poll_interval_ms=600_000,
            )
            await consumer.start()
            consumer.subscribe([self.topic], listener=self._tracker)
            self._consumer = consumer
        return self._consumer

    async def fetch(self, max_messages: int, wait: float) -> list[Delivery]:
        consumer = await self._group_consumer()
        batch = await consumer.getmany(timeout_ms=int(wait * 1000), max_records=max_messages)
        epoch = self.epoch
        out: list[Delivery] = []
        for tp, msgs in batch.items():
            for m in msgs:
                self._tracker.handed(tp, m.offset)
                out.append(Delivery(m.value or b"", (tp, m.offset), epoch=epoch))
        return out

    async def settle(self, outcomes: Sequence[Outcome]) -> None:
        producer = self._prod()
        sent: list[Any] = []
        for o in outcomes:
            key = o.job_id.encode() if o.job_id else None
            if o.result is not None and o.job_id:
                sent.append(await producer.send(self.results_topic, o.result, key=key))
            if o.dead is not None:
                sent.append(await producer.send(self.dead_topic, o.dead, key=key))
            if o.retry is not None:
                sent.append(await producer.send(self.topic, o.retry, key=key))
        await asyncio.gather(*sent)  # acks=all for every write before the commit moves
        self._mark([o.delivery for o in outcomes])
        await self._commit()

    def _mark(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            if d.epoch == self.epoch:
                tp, offset = d.tag
                self._tracker.settled(tp, offset)

    async def _commit(self) -> None:
        points = self._tracker.commit_points()
        if points and self._consumer is not None:
            try:
                await self._consumer.commit(points)
            except CommitFailedError as exc:
                # A rebalance took the partition: its new owner re-reads from
                # the last commit; results already written win.
                log.warning("kafka %s: commit failed after a rebalance: %s", self.topic, exc)

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        return  # the group session (heartbeats) holds the partitions

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        return  # not committed: re-read by whoever consumes the partition next

    async def backlog(self) -> int | None:
        consumer = await self._group_consumer()
        assigned = list(consumer.assignment())
        if not assigned:
            return None
        ends = await consumer.end_offsets(assigned)
        total = 0
        for tp in assigned:
            with contextlib.suppress(KafkaError, AssertionError):
                total += max(0, ends[tp] - await consumer.position(tp))
        return total

    # ---------------------------------------------------------- inspection

    async def results(self) -> dict[str, bytes]:
        await self._read_results(to_end=True)
        return dict(self._results)

    async def dead_letters(self) -> list[bytes]:
        return [x.record for x in await self.list_dead_letters()]

    # ------------------------------------ dead letters and depth (tools)

    async def list_dead_letters(self) -> list[DeadLetter]:
        """The dead-letter topic's records, keyed by offset."""
        self._prod()
        reader = AIOKafkaConsumer(
            bootstrap_servers=self.servers, enable_auto_commit=False, group_id=None
        )
        await reader.start()
        try:
            tp = TopicPartition(self.dead_topic, 0)
            reader.assign([tp])
            await reader.seek_to_beginning(tp)
            end = (await reader.end_offsets([tp]))[tp]
            out: list[DeadLetter] = []
            while await reader.position(tp) < end:
                batch = await reader.getmany(tp, timeout_ms=200)
                out.extend(DeadLetter(str(m.offset), m.value or b"") for m in batch.get(tp, ()))
            return out
        finally:
            await reader.stop()

    async def remove_dead_letters(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        raise BrokerUnsupported(_APPEND_ONLY)

    async def replay_dead_letters(self, keys: Sequence[str] | None = None) -> Replayed:
        raise BrokerUnsupported(_APPEND_ONLY)

    async def queue_stats(self) -> QueueStats:
        """Waiting: the group's lag (end offsets minus committed ones); dead:
        the dead-letter topic's length. In flight, delayed, results and ages
        are not counted (the topics would have to be read)."""
        return await self._depth(with_dead=True)

    async def queue_lag(self) -> QueueStats:
        """Waiting: the group's consumer lag, end offsets minus committed ones
        (messages fetched and not yet committed count too: Kafka cannot tell
        them apart)."""
        return await self._depth(with_dead=False)

    async def _depth(self, *, with_dead: bool) -> QueueStats:
        self._prod()
        reader = AIOKafkaConsumer(
            bootstrap_servers=self.servers, enable_auto_commit=False, group_id=self.group
        )
        await reader.start()
        try:
            await reader.topics()  # fetches the cluster's metadata
            parts = reader.partitions_for_topic(self.topic) or set()
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            dead_tp = TopicPartition(self.dead_topic, 0)
            asked = [*tps, dead_tp] if with_dead else tps
            ends = await reader.end_offsets(asked) if asked else {}
            starts = await reader.beginning_offsets(asked) if asked else {}
            waiting = 0
            for tp in tps:
                committed = await reader.committed(tp)
                waiting += max(0, ends[tp] - (starts[tp] if committed is None else committed))
            if not with_dead:
                return QueueStats(waiting=waiting)
            return QueueStats(waiting=waiting, dead=max(0, ends[dead_tp] - starts[dead_tp]))
        finally:
            await reader.stop()
