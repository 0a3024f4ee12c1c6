"""Dead letters you can act on (`flowbatch dlq`) and queue depth (`flowbatch queue stats`).

Against the real servers (SQLite, Redis, RabbitMQ, NATS): a job fails its
one attempt and is dead-lettered, `dlq list` shows it, `replay` with a
pipeline that now works gives a success result under the same job id,
`purge` empties the dead-letter queue, and `queue stats` agrees at each step.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import brokerpipes
import pytest
from brokerservices import Service
from click.testing import CliRunner, Result

import flowbatch as fb
from conftest import make_service
from flowbatch.brokers import Client, JobFailed, MemoryBroker, Worker, WorkerConfig, make_broker
from flowbatch.brokers.base import encode_job
from flowbatch.cli import main

pytestmark = pytest.mark.timeout(180)

# What `queue stats` can report on each backend (the others are None).
REPORTS: dict[str, set[str]] = {
    "sqlite": {"waiting", "in_flight", "delayed", "dead", "results", "oldest_waiting_age"},
    "redis": {"waiting", "in_flight", "dead", "results", "oldest_waiting_age"},
    "amqp": {"waiting", "dead"},
    "nats": {"waiting", "in_flight", "dead", "results", "oldest_waiting_age"},
}


@pytest.fixture(params=sorted(REPORTS))
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Service:
    # Named `service` so that conftest's queue_name removes the queue afterwards.
    return make_service(request.param, request, tmp_path)


async def boom(x: Any) -> Any:
    raise ValueError(f"boom {x['n']}")


FAILING = fb.Pipeline([fb.stage(boom)], name="failing")


def cli(*args: str, expect: int = 0) -> Result:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


async def run_worker_until(pipe: fb.Pipeline, url: str, queue: str, done: Any) -> None:
    worker = Worker(pipe, make_broker(url, queue), WorkerConfig(retry=fb.Retry(attempts=1), poll=0.05))
    running = asyncio.create_task(worker.run())
    try:
        await worker.wait_started()
        await done()
    finally:
        worker.stop()
        await running


def check_stats(service: Service, queue: str, **expected: Any) -> dict[str, Any]:
    stats = json.loads(cli("queue", "stats", "--broker", service.url, "--queue", queue, "--json").stdout)
    reports = REPORTS[service.name]
    for name, value in stats.items():
        if name not in reports:
            assert value is None, (name, stats)
        elif name in expected:
            assert value == expected[name], (name, stats)
    return dict(stats)


def test_dead_letters_are_listed_shown_replayed_and_purged(service: Service, queue_name: str) -> None:
    url, q = service.url, queue_name
    ids = [f"{q}-a", f"{q}-b"]
    on = ("--broker", url, "--queue", q)

    async def fail_both() -> None:
        async with Client(url, q) as client:
            await client.submit_many([{"n": 1}, {"n": 2}], keys=ids)

            async def both_failed() -> None:
                for job_id in ids:
                    with pytest.raises(JobFailed, match="boom"):
                        await client.result(job_id, timeout=60)

            await run_worker_until(FAILING, url, q, both_failed)

    asyncio.run(fail_both())

    listed = [json.loads(line) for line in cli("dlq", "list", "--json", *on).stdout.splitlines()]
    assert sorted(row["id"] for row in listed) == ids
    for row in listed:
        assert row["attempts"] == 1
        assert "ValueError: boom" in row["error"]
        assert row["first_seen"] > 0
    table = cli("dlq", "list", *on).stdout
    assert all(job_id in table for job_id in ids)
    check_stats(service, q, waiting=0, in_flight=0, dead=2, results=2, oldest_waiting_age=None)

    key_a = next(row["key"] for row in listed if row["id"] == ids[0])
    shown = json.loads(cli("dlq", "show", key_a, *on).stdout)
    assert shown["id"] == ids[0] and shown["ok"] is False
    assert json.loads(shown["body"])["payload"] == {"n": 1}

    replayed = cli("dlq", "replay", key_a, *on).stdout
    assert ids[0] in replayed and ids[1] not in replayed
    stats = check_stats(service, q, waiting=1, dead=1, results=1)
    if "oldest_waiting_age" in REPORTS[service.name]:
        assert stats["oldest_waiting_age"] >= 0

    async def replayed_job_succeeds() -> None:
        async with Client(url, q) as client:

            async def done() -> None:
                value = await client.result(ids[0], timeout=60)
                assert value["n"] == 1
                record = await client.record(ids[0])
                assert record is not None and record.ok and record.attempts == 1
                with pytest.raises(JobFailed):  # the other one was not replayed
                    await client.result(ids[1], timeout=60)

            await run_worker_until(brokerpipes.noop(), url, q, done)

    asyncio.run(replayed_job_succeeds())

    assert "purged 1 dead letter" in cli("dlq", "purge", "--all", "--yes", *on).stdout
    assert cli("dlq", "list", "--json", *on).stdout.strip() == ""
    check_stats(service, q, waiting=0, in_flight=0, dead=0, results=2)


# ------------------------------------------------------- without a server


def test_the_memory_broker_replays_with_attempts_reset_and_the_same_id() -> None:
    async def main_() -> None:
        broker = MemoryBroker("dlq")
        async with Client(broker) as client:
            await client.submit({"n": 5}, key="job-5")
            pipe = FAILING
            worker = Worker(pipe, broker, WorkerConfig(retry=fb.Retry(attempts=1), poll=0.02))
            running = asyncio.create_task(worker.run())
            with pytest.raises(JobFailed):
                await client.result("job-5", timeout=30)
            worker.stop()
            await running
            stats = await broker.queue_stats()
            assert (stats.waiting, stats.in_flight, stats.dead, stats.results) == (0, 0, 1, 1)

            done = await broker.replay_dead_letters()
            assert done.job_ids == ["job-5"] and not done.skipped
            stats = await broker.queue_stats()
            assert (stats.waiting, stats.dead, stats.results) == (1, 0, 0)
            assert stats.oldest_waiting_age is not None and stats.oldest_waiting_age >= 0

            worker = Worker(brokerpipes.noop(), broker, WorkerConfig(poll=0.02))
            running = asyncio.create_task(worker.run())
            assert (await client.result("job-5", timeout=30))["n"] == 5
            worker.stop()
            await running
            record = await client.record("job-5")
            assert record is not None and record.attempts == 1

    asyncio.run(main_())


def test_a_dead_letter_that_is_no_job_is_skipped_not_replayed() -> None:
    async def main_() -> None:
        broker = MemoryBroker("dlq")
        async with Client(broker) as client:
            await broker.publish([b"not json", encode_job("ok-1", {"n": 1})])
            worker = Worker(FAILING, broker, WorkerConfig(retry=fb.Retry(attempts=1), poll=0.02))
            running = asyncio.create_task(worker.run())
            await broker.join()
            worker.stop()
            await running
            assert len(await client.dead_letters()) == 2
            done = await broker.replay_dead_letters()
            assert done.job_ids == ["ok-1"]
            assert len(done.skipped) == 1 and "not a job envelope" in done.skipped[0][1]
            assert len(await broker.dead_letters()) == 1  # the skipped one stays
            assert await broker.purge_dead_letters() == 1

    asyncio.run(main_())


def test_replay_and_purge_need_keys_or_all() -> None:
    for command in ("replay", "purge"):
        result = CliRunner().invoke(main, ["dlq", command, "--broker", "memory://"])
        assert result.exit_code == 2
        assert "--all" in result.output


def test_an_unreachable_broker_is_exit_2_with_one_line(tmp_path: Path) -> None:
    from brokerservices import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    for args in (["queue", "stats"], ["dlq", "list"]):
        result = CliRunner().invoke(main, [*args, "--broker", url, "--connect-timeout", "0.5"])
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines()[-1].startswith("Error: broker unreachable at")


def test_kafka_lists_dead_letters_and_says_why_it_cannot_replay_them(
    tansu: Any, queue_name: str
) -> None:
    url, q = tansu.url, queue_name
    on = ("--broker", url, "--queue", q)

    async def fail_one() -> None:
        async with Client(url, q) as client:
            await client.submit({"n": 3}, key=f"{q}-k")

            async def failed() -> None:
                with pytest.raises(JobFailed, match="boom"):
                    await client.result(f"{q}-k", timeout=120)

            await run_worker_until(FAILING, url, q, failed)

    asyncio.run(fail_one())
    listed = [json.loads(line) for line in cli("dlq", "list", "--json", *on).stdout.splitlines()]
    assert [(row["key"], row["id"], row["attempts"]) for row in listed] == [("0", f"{q}-k", 1)]
    stats = json.loads(cli("queue", "stats", "--json", *on).stdout)
    assert (stats["waiting"], stats["dead"], stats["results"]) == (0, 1, None)
    for command in (("replay", "0"), ("purge", "--all", "--yes")):
        result = cli("dlq", *command, *on, expect=1)
        assert "append-only" in result.output
