"""The broker worker's own Prometheus series: the depth of the queue it consumes.

The worker reads the queue's lag off the hot path every
``WorkerConfig.lag_interval`` seconds (:attr:`Worker.lag`, from
``Broker.queue_lag``); this collector writes the last reading into the
worker's ``/metrics`` page, next to the engine's figures, through the same
writer (:func:`flowbatch.prometheus.render`). A figure the broker cannot
give (RabbitMQ's unacked count, Kafka's in-flight messages) is left out, as
are all of them before the first reading and after a failed one. See
``docs/autoscaling.md`` for what to scale on.

Usage::

    async with serve_metrics(lambda: worker.runners, 9100, more=[WorkerCollector(worker)]): ...
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["WorkerCollector"]


class WorkerCollector:
    """The queue depth a :class:`~flowbatch.brokers.Worker` last read, as gauges."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def describe(self) -> list[Metric]:
        return []  # the series depend on what the broker can report

    def collect(self) -> Iterator[Metric]:
        labels = ["queue"]
        lag = GaugeMetricFamily(
            "flowbatch_broker_lag_messages",
            "Messages in the queue no worker has been handed yet (Redis: stream entries "
            "past the group's pending ones; Kafka: end offsets minus committed; "
            "JetStream: num_pending; RabbitMQ: ready; SQLite: visible rows).",
            labels=labels,
        )
        in_flight = GaugeMetricFamily(
            "flowbatch_broker_in_flight_messages",
            "Messages handed to workers and not yet acknowledged (Redis: pending; "
            "JetStream: num_ack_pending; SQLite: leased rows).",
            labels=labels,
        )
        delayed = GaugeMetricFamily(
            "flowbatch_broker_delayed_messages",
            "Retries the broker holds until they are due (SQLite).",
            labels=labels,
        )
        age = GaugeMetricFamily(
            "flowbatch_broker_oldest_waiting_age_seconds",
            "Seconds since the oldest waiting job was first submitted.",
            labels=labels,
        )
        worker = self._worker
        stats = worker.lag
        if stats is not None:
            queue = [worker.broker.queue]
            for family, value in (
                (lag, stats.waiting),
                (in_flight, stats.in_flight),
                (delayed, stats.delayed),
                (age, stats.oldest_waiting_age),
            ):
                if value is not None:
                    family.add_metric(queue, value)
        yield from (lag, in_flight, delayed, age)
