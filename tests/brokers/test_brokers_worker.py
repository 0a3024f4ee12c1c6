"""The worker loop against the in-memory broker: the contract without a server."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import msgspec
import pytest

import flowbatch as fb
from flowbatch.brokers import (
    Client,
    JobFailed,
    MemoryBroker,
    ResultTimeout,
    Worker,
    WorkerConfig,
)
from flowbatch.brokers.base import decode_record, encode_job
from polling import until

FAST = fb.Retry(attempts=3, backoff=0.01, max_backoff=0.02)


def batched(fn: Any, size: int = 16, concurrency: int = 1) -> fb.Pipeline:
    return fb.Pipeline(
        [fb.stage(fn, batch=fb.Batch(max_size=size), concurrency=concurrency)], name="t"
    )


def config(**kw: Any) -> WorkerConfig:
    """Test settings: short polls so that stop() returns promptly, fast retries."""
    kw.setdefault("retry", FAST)
    kw.setdefault("poll", 0.02)
    kw.setdefault("stop_timeout", 10.0)
    return WorkerConfig(**kw)


async def run_until_joined(
    pipe: fb.Pipeline, broker: MemoryBroker, cfg: WorkerConfig | None = None
) -> Worker:
    worker = Worker(pipe, broker, cfg or config(prefetch=64))
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(worker.run())
        await worker.wait_started()
        await broker.join()
        worker.stop()
    assert task.result() == worker.statistics()
    return worker


def test_messages_are_batched_together_and_each_gets_its_result() -> None:
    sizes: list[int] = []

    async def square(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        await asyncio.sleep(0)
        return [x * x for x in xs]

    async def main() -> None:
        broker = MemoryBroker("q")
        async with Client(broker) as client:
            ids = await client.submit_many(range(500))
            await run_until_joined(batched(square), broker)
            for i, job_id in enumerate(ids):
                assert await client.result(job_id, timeout=5) == i * i
        assert max(sizes) > 1  # messages from the broker shared batches
        assert sum(sizes) == 500

    asyncio.run(main())


def test_a_poison_message_in_a_batch_fails_alone_and_is_dead_lettered() -> None:
    async def check(xs: list[int]) -> list[int]:
        if 13 in xs:
            raise ValueError("thirteen is unlucky")
        return xs

    async def main() -> None:
        broker = MemoryBroker("q")
        async with Client(broker) as client:
            ids = await client.submit_many(range(100))
            worker = await run_until_joined(batched(check), broker)
            for i, job_id in enumerate(ids):
                if i == 13:
                    with pytest.raises(JobFailed, match="thirteen is unlucky") as info:
                        await client.result(job_id, timeout=5)
                    assert info.value.attempts == 3
                else:
                    assert await client.result(job_id, timeout=5) == i
            dead = await client.dead_letters()
        assert [d.id for d in dead] == [ids[13]]
        letter = dead[0]
        assert letter.attempts == 3
        assert "ValueError: thirteen is unlucky" in (letter.error or "")
        assert letter.first_seen > 0 and letter.finished_at >= letter.first_seen
        assert msgspec.json.decode(letter.body or "")["payload"] == 13
        stats = worker.statistics()
        assert (stats.dead, stats.retried, stats.succeeded) == (1, 2, 99)

    asyncio.run(main())


def test_a_transient_failure_is_retried_with_backoff_and_then_succeeds() -> None:
    seen: dict[int, int] = {}

    async def flaky(xs: list[int]) -> list[Any]:
        out: list[Any] = []
        for x in xs:
            seen[x] = seen.get(x, 0) + 1
            out.append(ConnectionError("blip") if seen[x] == 1 and x % 2 else x)
        return out

    async def main() -> None:
        broker = MemoryBroker("q")
        async with Client(broker) as client:
            ids = await client.submit_many(range(20))
            await run_until_joined(batched(flaky), broker)
            records = [await client.record(i) for i in ids]
        assert [r.value for r in records if r] == list(range(20))
        assert [r.attempts for r in records if r] == [1 if i % 2 == 0 else 2 for i in range(20)]

    asyncio.run(main())


def test_errors_outside_retry_on_go_to_the_dead_letter_queue_at_once() -> None:
    async def boom(xs: list[int]) -> list[Any]:
        return [KeyError("no such thing") for _ in xs]

    async def main() -> None:
        broker = MemoryBroker("q")
        cfg = config(retry=fb.Retry(attempts=5, backoff=0.01, on=(ConnectionError,)))
        async with Client(broker) as client:
            job = await client.submit(1)
            await run_until_joined(batched(boom), broker, cfg)
            with pytest.raises(JobFailed) as info:
                await client.result(job, timeout=5)
        assert info.value.attempts == 1
        assert "KeyError" in info.value.error

    asyncio.run(main())


def test_malformed_messages_are_dead_lettered_and_the_worker_keeps_running() -> None:
    async def ident(xs: list[Any]) -> list[Any]:
        return xs

    async def main() -> None:
        broker = MemoryBroker("q")
        cfg = config(max_message_bytes=1000, payload_type=int)
        await broker.publish(
            [
                b"this is not json",
                b'{"payload": 1}',
                b'{"id": 7, "payload": 1}',
                b"[1, 2, 3]",
                encode_job("big", "x" * 2000),
                encode_job("str", "not an int"),
                encode_job("ok", 5),
            ]
        )
        await run_until_joined(batched(ident), broker, cfg)
        dead = [decode_record(x) for x in await broker.dead_letters()]
        errors = [d.error or "" for d in dead]
        assert len(dead) == 6
        assert "not a JSON job envelope" in errors[0]
        assert "wrong schema" in errors[1] and "`id`" in errors[1]
        assert "wrong schema" in errors[2] and "Expected `str`" in errors[2]
        assert "wrong schema" in errors[3]
        assert "MessageTooLarge" in errors[4] and "1000" in errors[4]
        assert "wrong schema" in errors[5] and dead[5].id == "str"
        assert dead[0].body == "this is not json"
        results = await broker.results()
        assert decode_record(results["ok"]).value == 5

    asyncio.run(main())


def test_the_worker_fetches_only_what_the_pipeline_has_room_for() -> None:
    release = asyncio.Event()

    async def slow(xs: list[int]) -> list[int]:
        await release.wait()
        return xs

    async def main() -> None:
        broker = MemoryBroker("q")
        await broker.publish([encode_job(str(i), i) for i in range(300)])
        worker = Worker(batched(slow, 8), broker, config(prefetch=20))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(worker.run())
            await until(lambda: broker.unacked == 20)
            assert broker.ready == 280
            release.set()
            await broker.join()
            worker.stop()
        assert broker.max_unacked <= 20

    asyncio.run(main())


def test_leases_of_messages_in_a_long_batch_are_renewed() -> None:
    gate = threading.Event()

    def slow(xs: list[int]) -> list[int]:
        gate.wait(30)
        return xs

    async def main() -> None:
        broker = MemoryBroker("q")
        await broker.publish([encode_job(str(i), i) for i in range(4)])
        worker = Worker(batched(slow), broker, config(lease=0.06))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(worker.run())
            await until(lambda: len(broker.extended) == 4 and min(broker.extended.values()) >= 2)
            gate.set()
            await broker.join()
            worker.stop()

    asyncio.run(main())


def test_stop_finishes_in_flight_messages_and_releases_held_retries() -> None:
    gate = asyncio.Event()
    calls: list[int] = []

    async def work(xs: list[int]) -> list[int]:
        calls.extend(xs)
        await gate.wait()
        return xs

    async def main() -> None:
        broker = MemoryBroker("q")
        # Job "later" is a retry not due for a minute: the worker holds it.
        later = encode_job("later", -1, attempt=2, not_before=time.time() + 60)
        await broker.publish([later] + [encode_job(str(i), i) for i in range(9)])
        worker = Worker(batched(work, 4), broker, config())
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(worker.run())
            await until(lambda: len(calls) >= 4 and broker.unacked == 10)
            worker.stop()
            gate.set()
        stats = task.result()
        assert (stats.fetched, stats.succeeded, stats.released) == (10, 9, 1)
        assert broker.unacked == 0 and broker.ready == 1  # "later" is back, undelivered
        [msg] = await broker.fetch(1, 0.01)
        assert msg.deliveries == 1 and not msg.redelivered
        assert len(await broker.results()) == 9

    asyncio.run(main())


def test_a_lost_connection_is_reconnected_and_nothing_is_lost() -> None:
    go = asyncio.Event()

    async def ident(xs: list[int]) -> list[int]:
        if max(xs) >= 100:  # hold the second half until the connection is failing
            await go.wait()
        return xs

    async def main() -> None:
        broker = MemoryBroker("q")
        await broker.publish([encode_job(str(i), i) for i in range(200)])
        worker = Worker(batched(ident), broker, config(prefetch=16, reconnect_backoff=0.001))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(worker.run())
            await until(lambda: len(broker._results) >= 50)
            broker.fail_next(3)  # more than 100 messages are still to fetch, run and ack
            go.set()
            await broker.join()
            worker.stop()
        assert len(await broker.results()) == 200
        assert worker.statistics().reconnects >= 1

    asyncio.run(main())


def test_a_stalled_consumer_is_detected_and_reconnected() -> None:
    async def ident(xs: list[int]) -> list[int]:
        return xs

    async def main() -> None:
        broker = MemoryBroker("q")
        broker.stall()
        await broker.publish([encode_job(str(i), i) for i in range(10)])
        cfg = config(stall_after=0.05)
        worker = await run_until_joined(batched(ident), broker, cfg)
        assert worker.statistics().reconnects == 1
        assert len(await broker.results()) == 10

    asyncio.run(main())


def test_a_redelivered_message_keeps_its_first_result() -> None:
    gate = asyncio.Event()
    runs: list[int] = []

    async def work(xs: list[int]) -> list[Any]:
        runs.extend(xs)
        mine = f"run{len(runs)}"
        await gate.wait()
        return [mine for _ in xs]

    async def main() -> None:
        broker = MemoryBroker("q")
        async with Client(broker) as client:
            await client.submit(1, key="job-1")
            worker = Worker(batched(work, concurrency=2), broker, config())
            async with asyncio.TaskGroup() as tg:
                tg.create_task(worker.run())
                await until(lambda: broker.unacked == 1)
                assert broker.crash() == 1  # the lease "expired": delivered again
                await until(lambda: len(runs) == 2)
                gate.set()
                await broker.join()
                worker.stop()
            assert await client.result("job-1", timeout=5) == "run1"
            # the same idempotency key again: still one result
            await client.submit(2, key="job-1")
            assert await client.result("job-1", timeout=5) == "run1"
        assert worker.statistics().redelivered == 1

    asyncio.run(main())


def test_a_message_that_keeps_killing_workers_is_dead_lettered() -> None:
    async def ident(xs: list[int]) -> list[int]:
        return xs

    async def main() -> None:
        broker = MemoryBroker("q")
        await broker.publish([encode_job("j", 1)])
        for _ in range(3):
            assert (await broker.fetch(1, 0.01))[0].deliveries >= 1
            broker.crash()
        await run_until_joined(batched(ident), broker, config())
        [letter] = [decode_record(x) for x in await broker.dead_letters()]
        assert letter.attempts == 4 and "Undeliverable" in (letter.error or "")

    asyncio.run(main())


def test_results_that_json_cannot_hold_are_dead_lettered() -> None:
    async def weird(xs: list[int]) -> list[Any]:
        return [object() for _ in xs]

    async def main() -> None:
        broker = MemoryBroker("q")
        await broker.publish([encode_job("j", 1)])
        await run_until_joined(batched(weird), broker)
        [letter] = [decode_record(x) for x in await broker.dead_letters()]
        assert "UnserializableResult" in (letter.error or "")

    asyncio.run(main())


def test_a_dead_lettered_message_with_a_readable_id_fails_its_job_at_once() -> None:
    async def ident(xs: list[Any]) -> list[Any]:
        return xs

    async def main() -> None:
        broker = MemoryBroker("q")
        async with Client(broker) as client:
            await client.submit("x" * 500, key="too-big")
            await broker.publish([b'{"id": "bad-schema", "payload": 1, "attempt": 0}'])
            await broker.publish([b'{"id": "not-json", "payload": '])
            await run_until_joined(batched(ident), broker, config(max_message_bytes=200))
            with pytest.raises(JobFailed, match="MessageTooLarge"):
                await client.result("too-big", timeout=5)
            with pytest.raises(JobFailed, match="wrong schema"):
                await client.result("bad-schema", timeout=5)
            with pytest.raises(JobFailed, match="not a JSON job envelope"):
                await client.result("not-json", timeout=5)
        assert len(await broker.dead_letters()) == 3

    asyncio.run(main())


def test_released_messages_keep_the_attempts_their_crashed_deliveries_cost() -> None:
    # A message handed back unstarted costs no attempt, but the deliveries
    # before it that were never settled (crashes) still count.
    from flowbatch.brokers.base import Delivery, decode_job, requeue_body

    body = encode_job("j", 1, attempt=2)
    assert requeue_body(Delivery(body, 1)) == body
    assert decode_job(requeue_body(Delivery(body, 1, deliveries=3))).attempt == 4
    assert requeue_body(Delivery(b"not json", 1, deliveries=3)) == b"not json"


def test_a_result_for_an_unknown_job_says_no_such_job() -> None:
    async def main() -> None:
        async with Client(MemoryBroker("q")) as client:
            with pytest.raises(ResultTimeout, match="no such job") as err:
                await client.result("nope", timeout=0.05)
            assert isinstance(err.value, TimeoutError) and err.value.job_id == "nope"
            job = await client.submit(1)
            with pytest.raises(TimeoutError, match="submitted by this client"):
                await client.result(job, timeout=0.05)

    asyncio.run(main())


def test_the_worker_logs_one_startup_line_with_its_name_and_no_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def ident(xs: list[int]) -> list[int]:
        return xs

    caplog.set_level(logging.INFO, logger="flowbatch.brokers")

    async def main() -> Worker:
        broker = MemoryBroker("jobs", url="memory://user:secret@host/")
        await broker.publish([encode_job("1", 1)])
        return await run_until_joined(batched(ident), broker, config(prefetch=32, name="w-7"))

    worker = asyncio.run(main())
    assert worker.broker.consumer_name == "w-7"
    lines = [r.getMessage() for r in caplog.records if "consuming" in r.getMessage()]
    assert lines == [
        (
            "worker w-7: consuming queue 'jobs' at memory://user:***@host/ into pipeline 't': "
            "concurrency=32 max_attempts=3 lease=30s result_ttl=604800s metrics=off"
        )
    ]


def test_a_new_worker_finishes_a_crashed_workers_messages_with_no_new_traffic() -> None:
    gate = asyncio.Event()

    async def stuck(xs: list[int]) -> list[int]:
        await gate.wait()
        return xs

    async def ident(xs: list[int]) -> list[int]:
        return xs

    async def main() -> None:
        broker = MemoryBroker("q")
        async with Client(broker) as client:
            ids = await client.submit_many(range(300))
            first = Worker(batched(stuck), broker, config(prefetch=32))
            async with asyncio.TaskGroup() as tg:
                tg.create_task(first.run())
                await until(lambda: broker.unacked == 32)
                assert broker.crash() == 32  # the first worker "died" holding 32
                await run_until_joined(batched(ident), broker, config(prefetch=32))
                first.stop()
                gate.set()
            results = await client.results()
        assert sorted(results) == sorted(ids) and all(r.ok for r in results.values())
        assert not await broker.dead_letters()

    asyncio.run(main())


def test_a_graceful_stop_costs_no_attempt_with_max_attempts_1() -> None:
    gate = asyncio.Event()

    async def work(xs: list[int]) -> list[int]:
        await gate.wait()
        return xs

    async def ident(xs: list[int]) -> list[int]:
        return xs

    async def main() -> None:
        once = fb.Retry(attempts=1)
        broker = MemoryBroker("q")
        async with Client(broker) as client:
            # two jobs due in a second, held by the first worker when it
            # stops, and 20 jobs of which it has 8 in flight
            due = time.time() + 1.0
            await broker.publish([encode_job(f"later-{i}", i, not_before=due) for i in range(2)])
            ids = await client.submit_many(range(20))
            first = Worker(batched(work, 4), broker, config(prefetch=8, retry=once))
            async with asyncio.TaskGroup() as tg:
                tg.create_task(first.run())
                await until(lambda: broker.unacked == 8)
                first.stop()
                gate.set()
            assert first.statistics().released == 2
            await run_until_joined(batched(ident), broker, config(prefetch=8, retry=once))
            results = await client.results()
        assert set(results) == {*ids, "later-0", "later-1"}
        assert all(r.ok and r.attempts == 1 for r in results.values())

    asyncio.run(main())


def test_prefetch_is_the_runners_limiter_and_counts_every_unsettled_message() -> None:
    release = asyncio.Event()

    async def slow(xs: list[int]) -> list[int]:
        await release.wait()
        return xs

    async def main() -> None:
        broker = MemoryBroker("q")
        # 3 retries not due for a long while (held by the worker), then 20 to run now
        later = time.time() + 3600
        await broker.publish(
            [encode_job(f"later-{i}", i, attempt=2, not_before=later) for i in range(3)]
        )
        await broker.publish([encode_job(str(i), i) for i in range(20)])
        worker = Worker(batched(slow, 4), broker, config(prefetch=8))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(worker.run())
            await until(lambda: broker.unacked == 8)
            limiter = worker.runners["t"].limiter
            assert limiter is not None and limiter.total == 8
            # one count: the 3 held retries and the 5 items in the runner hold its places
            assert limiter.borrowed == worker.in_flight() == 8
            assert worker.runners["t"].stats().in_flight == 5
            release.set()
            await until(lambda: broker.ready == 0 and worker.in_flight() == 3)
            assert limiter.borrowed == 3  # the retries still wait for their time
            worker.stop()
        assert broker.max_unacked <= 8
        assert worker.statistics().succeeded == 20

    asyncio.run(main())
