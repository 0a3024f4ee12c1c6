"""The queue's lag for autoscalers, against the real brokers.

``Broker.queue_lag`` on each backend (SQLite, Redis, RabbitMQ, NATS, Kafka
on tansu): N messages published with no worker read back as a lag of N.
Then ``flowbatch worker --metrics-port`` serves the lag gauges next to the
pipeline's signals: a worker that holds one message (``--concurrency 1``,
a stage that never returns) shows a lag of N - 1.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from brokerservices import Service, WorkerProcess
from prometheus_client.parser import text_string_to_metric_families

from conftest import make_service
from flowbatch.brokers import Client, make_broker
from polling import until, wait_until

pytestmark = pytest.mark.timeout(180)

N = 7


def test_published_messages_read_back_as_the_lag(service: Service, queue_name: str) -> None:
    async def main() -> None:
        async with Client(service.url, queue_name) as client:
            if service.name == "kafka":
                # tansu (the test's Kafka) advances a partition's end offset by
                # one per record *batch*, not per record as Kafka does: publish
                # one record per batch so that offsets count messages.
                for i in range(N):
                    await client.submit({"n": i})
            else:
                await client.submit_many([{"n": i} for i in range(N)])
        broker: Any = make_broker(service.url, queue_name)
        async with broker:

            async def lag_is_n() -> bool:
                lag = await broker.queue_lag()
                return bool(lag.waiting == N)

            await until(lag_is_n, 60, f"a lag of {N}")
            lag = await broker.queue_lag()
            assert lag.in_flight in (0, None)  # nothing handed out
            assert (lag.dead, lag.results) == (None, None)  # the scans are queue_stats'
            # queue_stats builds on the same reading.
            stats = await broker.queue_stats()
            assert stats.waiting == N and stats.dead == 0

    asyncio.run(main())


@pytest.fixture(params=["sqlite", "redis"])
def worker_service(request: pytest.FixtureRequest, tmp_path: Path) -> Service:
    return make_service(request.param, request, tmp_path)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_the_worker_metrics_page_carries_the_lag(
    worker_service: Service, queue_name: str, tmp_path: Path
) -> None:
    service = worker_service

    async def publish() -> None:
        async with Client(service.url, queue_name) as client:
            await client.submit_many([{"n": i} for i in range(N)])

    asyncio.run(publish())
    log = tmp_path / "worker.log"
    proc = WorkerProcess(
        service.url, queue_name,
        ("--concurrency", "1", "--metrics-port", "0", "--lag-interval", "0.1"),
        target="brokerpipes:held", log=log,
    )
    try:
        wait_until(lambda: "metrics: http" in log.read_text(), 60, "the metrics line")
        m = re.search(r"metrics: (http://\S+)", log.read_text())
        assert m is not None
        url = m.group(1)
        q = (("queue", queue_name),)
        p = (("pipeline", "held"),)

        def held_one() -> bool:
            got = scrape(url)
            return got.get(("flowbatch_broker_lag_messages", q)) == N - 1 and got.get(
                ("flowbatch_pipeline_in_flight", p)) == 1

        wait_until(held_one, 60, f"a lag of {N - 1} with one message held")
        got = scrape(url)
        assert got[("flowbatch_broker_in_flight_messages", q)] == 1  # leased / pending
        assert got[("flowbatch_broker_oldest_waiting_age_seconds", q)] >= 0
        # The pipeline's own signals, on the same page: one item per worker of
        # its one stage; no drain time while that stage has finished nothing.
        workers = got[("flowbatch_stage_workers", (("pipeline", "held"), ("stage", "hold")))]
        assert got[("flowbatch_pipeline_backlog_per_replica", p)] == 1 / workers
        assert ("flowbatch_pipeline_drain_seconds", p) not in got
    finally:
        proc.ensure_dead()
        # conftest's queue_name removes the queue from a shared server only
        # for tests that use its `service` fixture.
        if service.name == "redis":
            asyncio.run(_delete(service.url, queue_name))


async def _delete(url: str, queue: str) -> None:
    broker: Any = make_broker(url, queue)
    async with asyncio.timeout(30), broker:
        await broker.delete()
