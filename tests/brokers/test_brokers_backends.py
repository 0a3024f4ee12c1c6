"""Backend specifics against the real servers: reclaiming without blocking,
result TTLs, "no such job", and one name for a worker in its logs and its broker."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import brokerpipes
import pytest
from brokerservices import Service, WorkerProcess

from flowbatch.brokers import Client, ResultTimeout, Worker, WorkerConfig, make_broker
from flowbatch.brokers.base import DEFAULT_RESULT_TTL, encode_job
from polling import until, wait_until

pytestmark = pytest.mark.timeout(120)

# The conftest's `service` fixture, for some backends only (it also removes
# the test's queue afterwards).
on_redis = pytest.mark.parametrize("service", ["redis"], indirect=True)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------- redis reclaim


@on_redis
def test_redis_fetch_returns_reclaimed_entries_at_once_and_counts_one_delivery(
    service: Service, queue_name: str
) -> None:
    # A reclaim that finds entries used to be followed by XREADGROUP BLOCK 0,
    # which waits forever when nothing new arrives.
    async def main() -> None:
        dead: Any = make_broker(service.url, queue_name)
        alive: Any = make_broker(service.url, queue_name)
        alive.configure(lease=0.1, prefetch=16)
        async with dead, alive:
            await dead.publish([encode_job(str(i), i) for i in range(5)])
            taken = await dead.fetch(16, 0.5)  # never settled: its worker "died"
            assert len(taken) == 5
            got: list[Any] = []
            async with asyncio.timeout(10):
                while len(got) < 5:
                    got += await alive.fetch(16, 0.5)
            assert sorted(d.tag for d in got) == sorted(d.tag for d in taken)
            assert all(d.redelivered and d.deliveries == 2 for d in got)
            pending = await alive._redis.xpending_range(
                alive.stream, "fb", min="-", max="+", count=10
            )
            assert [p["times_delivered"] for p in pending] == [2] * 5
            assert {_s(p["consumer"]) for p in pending} == {alive.consumer}

    asyncio.run(main())


@on_redis
def test_redis_entries_reclaimed_by_a_cancelled_fetch_are_handed_out_without_another_claim(
    service: Service, queue_name: str
) -> None:
    async def main() -> None:
        dead: Any = make_broker(service.url, queue_name)
        alive: Any = make_broker(service.url, queue_name)
        alive.configure(lease=0.1, prefetch=16)
        async with dead, alive:
            await dead.publish([encode_job(str(i), i) for i in range(3)])
            assert len(await dead.fetch(16, 0.5)) == 3

            async def claimed() -> bool:
                await alive._reclaim(16)  # as far as a fetch cancelled after XAUTOCLAIM got
                return len(alive._claimed) == 3

            await until(claimed, 10, "the entries idle past the lease", every=0.05)
            alive.lease = 60.0  # no second claim of our own entries from here on
            got = await alive.fetch(16, 0.5)
            assert [d.deliveries for d in got] == [2, 2, 2]
            pending = await alive._redis.xpending_range(
                alive.stream, "fb", min="-", max="+", count=10
            )
            assert [p["times_delivered"] for p in pending] == [2, 2, 2]

    asyncio.run(main())


# ------------------------------------------------------------ nats fetch


@pytest.mark.parametrize("service", ["nats"], indirect=True)
def test_a_nats_fetch_on_an_empty_queue_returns_nothing_on_a_loaded_machine(
    service: Service, queue_name: str
) -> None:
    # nats-py raises a plain asyncio.TimeoutError (not its own TimeoutError)
    # when the "no messages" answer to its first probe comes after the wait
    # (a busy event loop). An idle worker took that for a broken connection:
    # "fetch failed (TimeoutError: ); reconnecting", again and again.
    async def main() -> None:
        broker: Any = make_broker(service.url, queue_name)
        async with broker:
            assert await broker.fetch(10, 0.01) == []
            for _ in range(3):
                # The loop is held up after the probe goes out, as under load.
                asyncio.get_running_loop().call_soon(time.sleep, 0.05)
                assert await broker.fetch(10, 0.01) == []

    asyncio.run(main())


@pytest.mark.parametrize("service", ["amqp"], indirect=True)
def test_many_concurrent_result_waiters_on_rabbitmq_all_get_their_results(
    service: Service, queue_name: str
) -> None:
    # A client waiting on many jobs at once (gather of Client.result) must
    # read the results stream once: each waiter used to open its own channel
    # and stream consumer, hundreds of them, and most results never arrived.
    n = 2000

    async def main() -> None:
        async with Client(service.url, queue_name) as producer:
            jobs = await producer.submit_many([{"n": i} for i in range(n)])
            worker = Worker(
                brokerpipes.noop(), make_broker(service.url, queue_name), WorkerConfig(poll=0.05)
            )
            async with asyncio.TaskGroup() as tg:
                tg.create_task(worker.run())
                try:
                    await producer.result(jobs[-1], timeout=60)
                finally:
                    worker.stop()
        async with Client(service.url, queue_name) as client:
            values = await asyncio.gather(*(client.result(j, timeout=60) for j in jobs))
        assert [v["n"] for v in values] == list(range(n))

    asyncio.run(main())


# ------------------------------------------------------------ result TTLs


@pytest.mark.parametrize("service", ["sqlite", "redis", "nats"], indirect=True)
def test_stored_results_expire_after_the_result_ttl(service: Service, queue_name: str) -> None:
    expiring = service
    cfg = WorkerConfig(prefetch=16, poll=0.05, result_ttl=1)

    async def main() -> None:
        async with Client(expiring.url, queue_name) as client:
            job = await client.submit({"n": 1})
            worker = Worker(brokerpipes.noop(), make_broker(expiring.url, queue_name), cfg)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(worker.run())
                try:
                    assert (await client.result(job, timeout=30))["n"] == 1

                    async def gone() -> bool:
                        return await client.record(job) is None

                    await until(gone, 30, "the result expiring")
                    assert job not in await client.results()
                finally:
                    worker.stop()

    asyncio.run(main())


@on_redis
def test_redis_results_are_kept_seven_days_by_default(service: Service, queue_name: str) -> None:
    async def main() -> None:
        async with Client(service.url, queue_name) as client:
            job = await client.submit({"n": 1})
            worker = Worker(
                brokerpipes.noop(), make_broker(service.url, queue_name), WorkerConfig(poll=0.05)
            )
            async with asyncio.TaskGroup() as tg:
                tg.create_task(worker.run())
                try:
                    await client.result(job, timeout=30)
                finally:
                    worker.stop()
            broker: Any = client.broker
            ttl = await broker._redis.pttl(broker.result_prefix + job)
        assert DEFAULT_RESULT_TTL * 1000 - 60_000 < ttl <= DEFAULT_RESULT_TTL * 1000

    asyncio.run(main())


@on_redis
def test_a_result_for_an_unknown_job_says_no_such_job(service: Service, queue_name: str) -> None:
    async def main() -> None:
        async with Client(service.url, queue_name) as client:
            with pytest.raises(ResultTimeout, match="no such job") as unknown:
                await client.result("never-submitted", timeout=0.3)
            assert isinstance(unknown.value, TimeoutError)
            assert "'never-submitted'" in str(unknown.value) and "0.3s" in str(unknown.value)
            job = await client.submit({"n": 1})  # no worker runs
            with pytest.raises(ResultTimeout, match="submitted by this client") as queued:
                await client.result(job, timeout=0.3)
            assert queued.value.submitted and not unknown.value.submitted

    asyncio.run(main())


@on_redis
def test_many_concurrent_result_calls_on_redis_all_end_at_their_timeout(
    service: Service, queue_name: str
) -> None:
    # Each waiter used to reconnect the shared connection on any error, which
    # broke the others' calls in a storm, and a timeout turned into the client
    # library's own error left its poll running forever.
    async def main() -> set[str]:
        async with Client(service.url, queue_name) as client:
            calls = [client.result(f"unknown-{i}", timeout=1.0) for i in range(800)]
            out = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 60)
        return {type(x).__name__ for x in out}

    assert asyncio.run(main()) == {"ResultTimeout"}


# ---------------------------------------------------- a worker you can see


@on_redis
def test_a_redis_worker_has_the_same_name_in_its_logs_and_in_the_broker(
    service: Service, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flowbatch.brokers")

    async def main() -> str:
        worker = Worker(
            brokerpipes.noop(), make_broker(service.url, queue_name), WorkerConfig(poll=0.05)
        )
        async with asyncio.TaskGroup() as tg:
            tg.create_task(worker.run())
            try:
                # Redis 7.0 lists a consumer once it has read an entry.
                async with Client(service.url, queue_name) as client:
                    await client.result(await client.submit({"n": 1}), timeout=30)
                broker: Any = worker.broker

                async def registered() -> bool:
                    consumers = await broker._redis.xinfo_consumers(broker.stream, "fb")
                    return [_s(c["name"]) for c in consumers] == [worker.name]

                await until(registered, 10, "the consumer appearing")
            finally:
                worker.stop()
        return worker.name

    name = asyncio.run(main())
    [line] = [r.getMessage() for r in caplog.records if "consuming queue" in r.getMessage()]
    assert line.startswith(f"worker {name}: consuming queue {queue_name!r} at redis://127.0.0.1")
    assert "pipeline 'noop'" in line and "concurrency=256" in line and "metrics=off" in line


def test_the_worker_command_logs_one_startup_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/q.db"
    log = tmp_path / "worker.log"
    proc = WorkerProcess(url, "jobs", ("--concurrency", "8", "--metrics-port", "0"), log=log)
    try:
        wait_until(lambda: "consuming queue" in log.read_text(), 60, "the startup line")
        proc.stop()
    finally:
        proc.ensure_dead()
    lines = [x for x in log.read_text().splitlines() if "consuming queue" in x]
    assert len(lines) == 1, lines
    [line] = lines
    assert f"at {url} into pipeline 'noop'" in line and "concurrency=8" in line
    assert "metrics=http://127.0.0.1:" in line and "result_ttl=604800s" in line
