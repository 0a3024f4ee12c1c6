"""The broker contract against real servers: crashes, restarts, poison, sharing, bad input.

Workers run as ``python -m flowbatch.brokers worker`` processes (SIGKILL,
SIGTERM) or in-process; the pipeline is CPU-light (brokerpipes.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import brokerpipes
import pytest
from brokerservices import Service, WorkerProcess

import flowbatch as fb
from flowbatch.brokers import Client, JobFailed, Worker, WorkerConfig, make_broker
from polling import until

pytestmark = pytest.mark.timeout(240)


async def stored(client: Client) -> int:
    return len(await client.broker.results())


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(f"\n  {line}")


# ----------------------------------------------------------- crash a worker


def test_sigkill_a_worker_mid_stream_and_every_message_gets_one_result(
    service: Service, queue_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 5000
    args = ("--concurrency", "256", "--lease", "2", "--backoff", "0.05")
    log = tmp_path / "workers.log"

    async def main() -> tuple[list[str], dict[str, Any]]:
        async with Client(service.url, queue_name) as client:
            ids = await client.submit_many({"n": i} for i in range(n))
            first = WorkerProcess(service.url, queue_name, args, target="brokerpipes:steady", log=log)
            try:
                await until(lambda: _at_least(client, n // 5), 120, "first results", every=0.01)
                first.kill()
            finally:
                first.ensure_dead()
            killed_at = await stored(client)
            assert killed_at < n, "the first worker finished before it was killed"
            second = WorkerProcess(service.url, queue_name, args, target="brokerpipes:steady", log=log)
            try:
                await until(lambda: _at_least(client, n), 180, "all results")
                stats = second.stop()
            finally:
                second.ensure_dead()
            results = await client.results()
            dead = await client.dead_letters()
            # Brokers whose results are a log (RabbitMQ stream, Kafka topic)
            # keep every copy; the first per job is the stored result.
            stats["duplicates"] = getattr(client.broker, "duplicate_results", 0)
            stats["killed_at"] = killed_at
        assert not dead, dead[:3]
        assert sorted(results) == sorted(ids)
        assert sorted(r.value["n"] for r in results.values()) == list(range(n))
        return ids, stats

    _, stats = asyncio.run(main())
    report(capsys, f"[{service.name}] SIGKILL test: {n} messages, killed with "
                   f"{stats['killed_at']} stored; the second worker saw "
                   f"{stats['redelivered']} redeliveries, settled {stats['succeeded']}, "
                   f"duplicate results in the log: {stats['duplicates']}")


async def _at_least(client: Client, n: int) -> bool:
    return await stored(client) >= n


async def open_client(url: str, queue: str, limit: float = 120) -> Client:
    """A connected client; right after a broker restart, retry until it accepts one."""
    async with asyncio.timeout(limit):
        while True:
            client = Client(url, queue)
            try:
                await client.__aenter__()
            except Exception:
                await asyncio.sleep(0.5)  # the broker is still starting
                continue
            return client


# -------------------------------------------------------- restart the broker


def test_the_worker_survives_a_broker_restart(
    restartable: Service, queue_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    service = restartable
    assert service.restart is not None
    n = 1500
    args = ("--concurrency", "32", "--lease", "5", "--stall-after", "5")
    log = tmp_path / "worker.log"

    async def main() -> dict[str, Any]:
        async with Client(service.url, queue_name) as client:
            ids = await client.submit_many({"n": i} for i in range(n))
            await client.close()
            worker = WorkerProcess(service.url, queue_name, args, target="brokerpipes:slow", log=log)
            try:
                async with Client(service.url, queue_name) as probe:
                    await until(lambda: _at_least(probe, 200), 120, "results before restart")
                await asyncio.to_thread(service.restart)
            finally:
                if worker.proc.poll() is not None:
                    pytest.fail(f"worker died during the restart; see {log}")
            try:
                async with await open_client(service.url, queue_name) as after:
                    await until(lambda: _at_least(after, n), 180, "all results after restart")
                    results = await after.results()
                    assert sorted(results) == sorted(ids)
                    assert not await after.dead_letters()
                stats = worker.stop()
            finally:
                worker.ensure_dead()
        return stats

    stats = asyncio.run(main())
    assert stats["reconnects"] >= 1
    report(capsys, f"[{service.name}] restart test: reconnects={stats['reconnects']} "
                   f"redelivered={stats['redelivered']}")


# ------------------------------------------------------------------- poison


def test_one_percent_poison_messages_land_in_the_dead_letter_queue(
    service: Service, queue_name: str
) -> None:
    n = 1000
    poison = {i for i in range(n) if i % 100 == 37}
    cfg = WorkerConfig(
        prefetch=128, poll=0.05, lease=10,
        retry=fb.Retry(attempts=3, backoff=0.02, max_backoff=0.05),
    )

    async def main() -> None:
        async with Client(service.url, queue_name) as client:
            ids = await client.submit_many({"n": i, "poison": i in poison} for i in range(n))
            worker = Worker(brokerpipes.noop(), make_broker(service.url, queue_name), cfg)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(worker.run())
                await until(lambda: _at_least(client, n), 120, "all outcomes")
                worker.stop()
            results = await client.results()
            dead = await client.dead_letters()
        assert sorted(results) == sorted(ids)
        failed = {k for k, r in results.items() if not r.ok}
        assert failed == {ids[i] for i in poison}
        assert sorted(d.id for d in dead) == sorted(failed)
        for d in dead:
            assert d.attempts == 3
            assert "Poison: poison payload" in (d.error or "")
            assert d.first_seen > 0 and '"poison":true' in (d.body or "")
        ok = [r.value["n"] for r in results.values() if r.ok]
        assert sorted(ok) == sorted(set(range(n)) - poison)

    asyncio.run(main())


# ------------------------------------------------------------ share the load


def test_two_workers_share_a_queue_and_complete_each_message_once(
    service: Service, queue_name: str
) -> None:
    n = 1000
    cfg = WorkerConfig(prefetch=32, poll=0.05, lease=30)

    async def main() -> None:
        async with Client(service.url, queue_name) as client:
            ids = await client.submit_many({"n": i} for i in range(n))
            workers = [
                Worker(brokerpipes.slow(), make_broker(service.url, queue_name), cfg)
                for _ in range(2)
            ]
            async with asyncio.TaskGroup() as tg:
                for w in workers:
                    tg.create_task(w.run())
                try:
                    # Generous: a Kafka group (tansu) can take a session
                    # timeout (30 s here) or two to settle when the second
                    # member joins under the full suite's load.
                    await until(lambda: _at_least(client, n), 300, "all results")
                except AssertionError as exc:
                    got = await stored(client)
                    stats = [w.statistics() for w in workers]
                    raise AssertionError(f"{exc}: {got} of {n} stored; workers: {stats}") from None
                finally:
                    for w in workers:
                        w.stop()
            results = await client.results()
        assert sorted(results) == sorted(ids)
        done = [w.statistics().succeeded for w in workers]
        assert all(d > 0 for d in done), done
        assert sum(done) == n  # nothing completed twice: no crash happened
        assert sum(w.statistics().redelivered for w in workers) == 0

    asyncio.run(main())


# ---------------------------------------------------------------- bad input


def test_malformed_messages_are_dead_lettered_and_the_worker_keeps_running(
    service: Service, queue_name: str
) -> None:
    cfg = WorkerConfig(prefetch=16, poll=0.05, max_message_bytes=2000)
    bad = [b"not json at all", b'{"payload": 1}', b'{"id": 5, "payload": 1}', b"x" * 5000]

    async def main() -> None:
        broker = make_broker(service.url, queue_name)
        async with Client(service.url, queue_name) as client:
            await client.broker.publish(bad)
            ids = await client.submit_many({"n": i} for i in range(20))
            worker = Worker(brokerpipes.noop(), broker, cfg)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(worker.run())
                await until(lambda: _at_least(client, 20), 60, "good results")

                async def all_dead() -> bool:
                    return len(await client.dead_letters()) >= len(bad)

                await until(all_dead, 60, "dead letters")
                worker.stop()
            results = await client.results()
            dead = await client.dead_letters()
        assert sorted(results) == sorted(ids)
        errors = sorted(d.error or "" for d in dead)
        assert len(errors) == 4
        assert sum("not a JSON job envelope" in e for e in errors) == 1
        assert sum("wrong schema" in e for e in errors) == 2
        assert sum("MessageTooLarge" in e and "2000" in e for e in errors) == 1

    asyncio.run(main())


# ------------------------------------ restart after a crash, nothing new comes


def test_a_worker_restarted_after_sigkill_finishes_the_queue_with_no_new_traffic(
    service: Service, queue_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The dead worker's unsettled messages must be reclaimed and processed
    # by the next worker although nothing new arrives to wake it up. Both
    # workers run with `--lease 2` (what a user sets to recover in seconds
    # rather than the default 30 s); everything else is the default.
    n = 300
    args = ("--lease", "2")
    log = tmp_path / "workers.log"

    async def main() -> dict[str, Any]:
        async with Client(service.url, queue_name) as client:
            ids = await client.submit_many({"n": i} for i in range(n))
            first = WorkerProcess(
                service.url, queue_name, (*args, "--concurrency", "32"),
                target="brokerpipes:crawl", log=log,
            )
            try:
                await until(lambda: _at_least(client, 40), 120, "first results", every=0.01)
                first.kill()
            finally:
                first.ensure_dead()
            killed_at = await stored(client)
            assert killed_at < n, "the first worker finished before it was killed"
            second = WorkerProcess(service.url, queue_name, args, target="brokerpipes:noop", log=log)
            try:
                await until(lambda: _at_least(client, n), 60, "every result after the restart")
                stats = second.stop()
            finally:
                second.ensure_dead()
            results = await client.results()
            dead = await client.dead_letters()
        assert not dead, dead[:3]
        assert sorted(results) == sorted(ids)
        assert all(r.ok for r in results.values())
        assert sorted(r.value["n"] for r in results.values()) == list(range(n))
        assert stats["dead"] == 0
        stats["killed_at"] = killed_at
        return stats

    stats = asyncio.run(main())
    report(capsys, f"[{service.name}] restart with no new traffic: killed with "
                   f"{stats['killed_at']} stored; the new worker settled {stats['succeeded']} "
                   f"({stats['redelivered']} redelivered)")


# ------------------------------------------- a graceful stop costs no attempt


def test_a_graceful_stop_costs_no_attempt(
    service: Service, queue_name: str, tmp_path: Path
) -> None:
    # With --max-attempts 1, every message the stopped worker had fetched or
    # had prefetched by the broker must still get its one attempt.
    n = 300
    args = ("--concurrency", "64", "--max-attempts", "1")
    log = tmp_path / "workers.log"

    async def main() -> None:
        async with Client(service.url, queue_name) as client:
            ids = await client.submit_many({"n": i} for i in range(n))
            first = WorkerProcess(service.url, queue_name, args, target="brokerpipes:crawl", log=log)
            try:
                await until(lambda: _at_least(client, 40), 120, "first results", every=0.01)
                stats = first.stop()
            finally:
                first.ensure_dead()
            assert stats["dead"] == 0
            assert await stored(client) < n, "the first worker finished before it was stopped"
            second = WorkerProcess(service.url, queue_name, args, target="brokerpipes:noop", log=log)
            try:
                await until(lambda: _at_least(client, n), 60, "every result")
                second.stop()
            finally:
                second.ensure_dead()
            results = await client.results()
            dead = await client.dead_letters()
        assert not dead, dead[:3]
        assert sorted(results) == sorted(ids)
        assert all(r.ok and r.attempts == 1 for r in results.values())

    asyncio.run(main())


# ------------------------------------- a dead letter is a failed job at once


def test_a_dead_lettered_job_fails_for_its_producer_at_once(
    service: Service, queue_name: str
) -> None:
    cfg = WorkerConfig(prefetch=16, poll=0.05, max_message_bytes=2000)

    async def main() -> None:
        async with Client(service.url, queue_name) as client:
            await client.submit("x" * 5000, key="too-big")
            # readable id, but attempt 0 breaks the envelope's schema
            await client.broker.publish([b'{"id": "bad-schema", "payload": 1, "attempt": 0}'])
            good = await client.submit({"n": 1})
            worker = Worker(brokerpipes.noop(), make_broker(service.url, queue_name), cfg)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(worker.run())
                assert (await client.result(good, timeout=60))["n"] == 1
                try:
                    async with asyncio.timeout(15):
                        with pytest.raises(JobFailed, match="MessageTooLarge") as big:
                            await client.result("too-big")
                        with pytest.raises(JobFailed, match="wrong schema"):
                            await client.result("bad-schema")
                finally:
                    worker.stop()
        assert big.value.job_id == "too-big" and big.value.attempts == 1

    asyncio.run(main())
