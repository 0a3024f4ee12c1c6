"""Engine rules: backpressure, fan-out, retries, deadlines, cancellation, order, drain, stats."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import flowbatch as fb
from corehelpers import Gate
from polling import until


async def inc(x: int) -> int:
    return x + 1


def double(x: int) -> int:
    return x * 2


# ------------------------------------------------------------- backpressure


def test_map_over_a_million_items_pulls_only_as_fast_as_it_drains() -> None:
    pulled = 0

    def source() -> Iterator[int]:
        nonlocal pulled
        for i in range(1_000_000):
            pulled += 1
            yield i

    pipe = fb.Pipeline(
        [fb.stage(inc, name="a"), fb.stage(inc, name="b"), fb.stage(inc, name="c")]
    )
    worst = 0

    async def main() -> int:
        nonlocal worst
        count = 0
        async with pipe.open(queue_size=256, window=1000) as runner:
            async for y in runner.map(source()):
                assert y == count + 3
                count += 1
                # Items pulled but not yet yielded: bounded by the window.
                worst = max(worst, pulled - count)
                if count % 50_000 == 0:
                    assert runner.stats().in_flight <= 1000
        return count

    assert asyncio.run(main()) == 1_000_000
    assert worst <= 1001


def test_submit_waits_for_room_and_submit_nowait_is_overloaded() -> None:
    gate = Gate()
    pipe = fb.Pipeline([fb.stage(gate.wait, name="slow")])

    async def main() -> None:
        async with pipe.open(queue_size=2) as runner:
            first = asyncio.create_task(runner.submit(0))
            await gate.wait_entered()
            queued = [runner.submit_nowait(1), runner.submit_nowait(2)]
            with pytest.raises(fb.Overloaded, match="'slow'.*queue_size=2"):
                runner.submit_nowait(3)
            waiting = asyncio.create_task(runner.submit(4))
            for _ in range(10):  # loop turns: let it reach the full queue
                await asyncio.sleep(0)
            assert not waiting.done()
            assert runner.stats().submitted == 3  # it waits for room, not yet admitted
            gate.open()
            await asyncio.gather(first, *queued, waiting)
            assert runner.stats().completed == 4

    asyncio.run(main())


# ------------------------------------------------------------------ fan-out


def split(doc: str) -> list[str]:
    return [w for w in doc.split() if w]


def test_fan_out_children_flow_and_batch_with_others() -> None:
    batches: list[int] = []

    def upper(xs: list[str]) -> list[str]:
        batches.append(len(xs))
        return [x.upper() for x in xs]

    pipe = fb.Pipeline(
        [fb.stage(split, fan_out=True), fb.stage(upper, batch=fb.Batch(max_size=64))]
    )
    docs = ["a b c", "", "d", "e f g h i j"]
    out = pipe.run(docs, progress=False)
    assert out == [["A", "B", "C"], [], ["D"], ["E", "F", "G", "H", "I", "J"]]
    assert sum(batches) == 10
    assert max(batches) > 3  # children of different documents share batches


def test_nested_fan_out_and_async_generator() -> None:
    async def chars(word: str) -> AsyncIterator[str]:
        for c in word:
            yield c

    pipe = fb.Pipeline(
        [fb.stage(split, fan_out=True), fb.stage(chars, fan_out=True), fb.stage(str.upper)]
    )
    assert pipe.run(["ab c", "de"], progress=False) == [[["A", "B"], ["C"]], [["D", "E"]]]


def test_fan_out_as_last_stage_and_one_failing_child() -> None:
    def parts(x: int) -> range:
        return range(x)

    def check(x: int) -> int:
        if x == 2:
            raise ValueError("two is bad")
        return x

    assert fb.Pipeline([fb.stage(parts, fan_out=True)]).run([3, 0], progress=False) == [
        [0, 1, 2],
        [],
    ]
    pipe = fb.Pipeline([fb.stage(parts, fan_out=True), fb.stage(check)])
    out = pipe.run([2, 5], progress=False, return_exceptions=True)
    assert out[0] == [0, 1]
    assert isinstance(out[1], fb.ItemFailed) and out[1].stage == "check"


def test_fan_out_must_return_an_iterable() -> None:
    def bad(x: int) -> int:
        return x

    pipe = fb.Pipeline([fb.stage(bad, fan_out=True)])
    with pytest.raises(fb.ItemFailed, match="fan_out stage must return an iterable"):
        pipe.run([1], progress=False)


# ------------------------------------------------------------------ retries


def test_retries_with_backoff_then_success() -> None:
    tries: dict[int, int] = {}

    def flaky(x: int) -> int:
        tries[x] = tries.get(x, 0) + 1
        if tries[x] < 3:
            raise ConnectionError("try again")
        return x

    pipe = fb.Pipeline([fb.stage(flaky, retry=fb.Retry(attempts=3, backoff=0.001))])

    async def main() -> None:
        async with pipe.open() as runner:
            assert [y async for y in runner.map(range(5))] == list(range(5))
            s = runner.stats().stage("flaky")
            assert s.retried == 10 and s.done == 5 and s.failed == 0

    asyncio.run(main())


def test_retries_exhausted_and_filtered() -> None:
    def always(x: int) -> int:
        raise ConnectionError(f"down {x}")

    def wrong(x: int) -> int:
        raise KeyError(x)

    net = fb.Retry(attempts=3, backoff=0, on=(ConnectionError,))
    pipe = fb.Pipeline([fb.stage(always, retry=net)])
    with pytest.raises(fb.ItemFailed) as info:
        pipe.run([1], progress=False)
    assert info.value.attempts == 3 and isinstance(info.value.__cause__, ConnectionError)
    assert "3 attempts" in str(info.value)
    pipe = fb.Pipeline([fb.stage(wrong, retry=net)])
    with pytest.raises(fb.ItemFailed) as info:
        pipe.run([1], progress=False)
    assert info.value.attempts == 1


# ------------------------------------------------------- deadlines / cancel


def test_deadline_while_inside_a_stage_then_dropped() -> None:
    gate = Gate()
    after: list[Any] = []

    def record(x: Any) -> Any:
        after.append(x)
        return x

    pipe = fb.Pipeline([fb.stage(gate.wait, name="slow"), fb.stage(record, name="next")])

    async def main() -> None:
        async with pipe.open() as runner:
            with pytest.raises(fb.DeadlineExceeded, match="timeout of 0.05s"):
                await runner.submit("late", timeout=0.05)
            assert gate.calls == ["late"]  # it was inside the stage
            gate.open()
            await until(lambda: runner.stats().stage("next").dropped == 1)
            s = runner.stats()
            assert s.expired == 1 and s.failed == 0 and s.completed == 0

    asyncio.run(main())
    assert after == []


def test_deadline_of_an_item_waiting_in_a_queue() -> None:
    gate = Gate()
    pipe = fb.Pipeline([fb.stage(gate.wait, name="slow")])

    async def main() -> None:
        async with pipe.open() as runner:
            first = asyncio.create_task(runner.submit("first"))
            await gate.wait_entered()
            with pytest.raises(fb.DeadlineExceeded):
                await runner.submit("queued", timeout=0.05)
            gate.open()
            await first
            await until(lambda: runner.stats().stage("slow").dropped == 1)

    asyncio.run(main())
    assert gate.calls == ["first"]


def test_cancelled_submit_is_removed_from_the_work_ahead() -> None:
    gate = Gate()
    pipe = fb.Pipeline([fb.stage(gate.wait, name="slow")])

    async def main() -> None:
        async with pipe.open() as runner:
            first = asyncio.create_task(runner.submit("first"))
            await gate.wait_entered()
            doomed = asyncio.create_task(runner.submit("doomed"))
            await until(lambda: runner.stats().stage("slow").queued == 1)
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            gate.open()
            await first
            await until(lambda: runner.stats().stage("slow").dropped == 1)

    asyncio.run(main())
    assert gate.calls == ["first"]


def test_stage_timeout_async_and_thread() -> None:
    async def hang(x: int) -> int:
        await asyncio.Event().wait()
        return x

    release = threading.Event()

    def block(x: int) -> int:
        release.wait(30)
        return x

    async def main() -> None:
        pipe = fb.Pipeline([fb.stage(hang, timeout=0.05)])
        async with pipe.open() as runner:
            with pytest.raises(fb.ItemFailed, match="longer than 0.05s") as info:
                await runner.submit(1)
            assert isinstance(info.value.__cause__, TimeoutError)
        pipe = fb.Pipeline([fb.stage(block, timeout=0.05)])
        async with pipe.open() as runner:
            with pytest.raises(fb.ItemFailed, match="longer than 0.05s"):
                await runner.submit(1)
            release.set()
            assert await runner.submit(2) == 2

    asyncio.run(main())


# -------------------------------------------------------------------- order


def test_ordered_and_unordered_map() -> None:
    events: dict[int, asyncio.Event] = {}

    async def wait_turn(x: int) -> int:
        await events[x].wait()
        return x

    pipe = fb.Pipeline([fb.stage(wait_turn, concurrency=4)])

    async def run(ordered: bool) -> list[int]:
        """Finish the items in the order 3, 1, 2, 0, one at a time."""
        events.update({i: asyncio.Event() for i in range(4)})
        got: list[int] = []
        async with pipe.open() as runner:

            async def consume() -> None:
                async for y in runner.map(range(4), ordered=ordered):
                    got.append(y)

            task = asyncio.create_task(consume())
            for n, i in enumerate((3, 1, 2, 0), start=1):
                events[i].set()
                await until(lambda n=n: runner.stats().completed == n)
                if not ordered:
                    await until(lambda n=n: len(got) == n)
                elif n < 4:
                    assert got == []  # item 0 is not done: nothing may be yielded yet
            await task
        return got

    async def main() -> None:
        assert await run(ordered=True) == [0, 1, 2, 3]
        assert await run(ordered=False) == [3, 1, 2, 0]

    asyncio.run(main())


def test_map_raises_on_failure_or_returns_exceptions() -> None:
    def odd_fails(x: int) -> int:
        if x % 2:
            raise ValueError(f"odd {x}")
        return x

    pipe = fb.Pipeline([fb.stage(odd_fails)])

    async def main() -> None:
        async with pipe.open() as runner:
            got: list[int] = []
            with pytest.raises(fb.ItemFailed, match="odd 1"):
                async for y in runner.map(range(10)):
                    got.append(y)
            assert got == [0]
            out = [y async for y in runner.map(range(4), return_exceptions=True)]
            assert out[0] == 0 and out[2] == 2
            assert isinstance(out[1], fb.ItemFailed) and isinstance(out[3], fb.ItemFailed)
        assert runner.stats().in_flight == 0

    asyncio.run(main())


def test_failing_input_iterator_is_reported_after_earlier_results() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError("disk gone")

    pipe = fb.Pipeline([fb.stage(inc)])

    async def main() -> None:
        async with pipe.open() as runner:
            got: list[int] = []
            with pytest.raises(OSError, match="disk gone"):
                async for y in runner.map(source()):
                    got.append(y)
            assert got == [2, 3]

    asyncio.run(main())


def test_async_iterable_input_and_early_break() -> None:
    async def source() -> AsyncIterator[int]:
        for i in range(10_000):
            yield i

    pipe = fb.Pipeline([fb.stage(inc)])

    async def main() -> None:
        async with pipe.open() as runner:
            results = runner.map(source())
            async for y in results:
                if y == 5:
                    break
            await results.aclose()  # type: ignore[attr-defined]
            assert await runner.submit(1) == 2
        s = runner.stats()
        assert s.in_flight == 0

    asyncio.run(main())


# -------------------------------------------------------------------- drain


def test_leaving_the_block_drains_in_flight_items() -> None:
    release = threading.Event()

    def slow(x: int) -> int:
        release.wait(30)
        return x

    pipe = fb.Pipeline([fb.stage(slow, concurrency=2), fb.stage(inc)])

    async def main() -> list[Any]:
        async with pipe.open() as runner:
            tasks = [asyncio.create_task(runner.submit(i)) for i in range(10)]
            await until(lambda: runner.stats().submitted == 10)

            async def release_once_draining() -> None:
                await until(lambda: runner.closed)
                assert not any(t.done() for t in tasks)  # all still in flight
                release.set()

            releaser = asyncio.create_task(release_once_draining())
        await releaser
        return [t.result() for t in tasks]

    assert asyncio.run(main()) == list(range(1, 11))


def test_exception_in_the_block_still_drains() -> None:
    pipe = fb.Pipeline([fb.stage(double)])
    tasks: list[asyncio.Task[Any]] = []

    async def main() -> None:
        async with pipe.open() as runner:
            tasks.extend(asyncio.create_task(runner.submit(i)) for i in range(5))
            await until(lambda: runner.stats().submitted == 5)
            raise KeyError("user code failed")

    with pytest.raises(KeyError):
        asyncio.run(main())
    assert [t.result() for t in tasks] == [0, 2, 4, 6, 8]


def test_cancelled_runner_resolves_every_future() -> None:
    gate = Gate()
    pipe = fb.Pipeline([fb.stage(gate.wait, name="slow")])
    futs: list[asyncio.Future[Any]] = []

    async def body(started: asyncio.Event) -> None:
        async with pipe.open() as runner:
            futs.extend(runner.submit_nowait(i) for i in range(3))
            started.set()
            await asyncio.Event().wait()

    async def main() -> None:
        started = asyncio.Event()
        task = asyncio.create_task(body(started))
        await started.wait()
        await gate.wait_entered()
        task.cancel()
        gate.open()
        with pytest.raises(asyncio.CancelledError):
            await task
        for f in futs:
            assert f.done()
            assert isinstance(f.exception(), fb.PipelineClosed)

    asyncio.run(main())


# ----------------------------------------------------------- setup, stats


class Model:
    """A stateful stage: setup once per worker thread, a replica each."""

    instances: list[Model] = []
    lock = threading.Lock()

    def __init__(self) -> None:
        self.thread: int | None = None
        self.calls = 0

    def setup(self) -> None:
        with Model.lock:
            self.thread = threading.get_ident()
            Model.instances.append(self)

    def __call__(self, xs: list[int]) -> list[int]:
        assert self.thread == threading.get_ident()
        self.calls += 1
        return xs


def test_setup_runs_once_per_worker_on_its_own_replica() -> None:
    Model.instances.clear()
    pipe = fb.Pipeline([fb.stage(Model(), concurrency=3, batch=fb.Batch(max_size=4), executor="thread")])
    assert pipe.run(range(100), progress=False) == list(range(100))
    assert len(Model.instances) == 3
    assert len({id(m) for m in Model.instances}) == 3
    assert len({m.thread for m in Model.instances}) == 3


def test_at_low_load_one_warm_thread_replica_takes_every_call() -> None:
    Model.instances.clear()
    pipe = fb.Pipeline([fb.stage(Model(), concurrency=3, batch=fb.Batch(max_size=4), executor="thread")])

    async def main() -> None:
        async with pipe.open() as runner:
            for i in range(20):  # one at a time
                assert await runner.submit(i) == i

    asyncio.run(main())
    # The most recently used idle replica goes first; the others stay cold.
    assert sorted(m.calls for m in Model.instances) == [0, 0, 20]


def test_setup_failure_is_a_pipeline_error() -> None:
    class Broken:
        def setup(self) -> None:
            raise FileNotFoundError("weights.bin")

        def __call__(self, x: int) -> int:
            return x

    pipe = fb.Pipeline([fb.stage(Broken(), name="model")])

    async def main() -> None:
        with pytest.raises(fb.PipelineError, match="'model': setup\\(\\) failed.*weights.bin"):
            async with pipe.open():
                pass

    asyncio.run(main())


def test_stats_and_bottleneck() -> None:
    import time

    def slow(x: int) -> int:
        time.sleep(0.002)
        return x

    pipe = fb.Pipeline([fb.stage(inc, name="fast"), fb.stage(slow, name="slow")])

    async def main() -> None:
        async with pipe.open() as runner:
            assert runner.stats().bottleneck is None
            out = [y async for y in runner.map(range(200))]
            assert out == list(range(1, 201))
            s = runner.stats()
        assert s.completed == 200 and s.submitted == 200 and s.failed == 0
        assert s.items_per_s > 0 and s.latency.count == 200
        assert s.latency.p50 <= s.latency.p99
        slow_s = s.stage("slow")
        assert slow_s.done == 200 and slow_s.service_time.count == 200
        assert 0.0 < slow_s.utilization <= 1.0
        assert slow_s.service_time.mean >= 0.002
        assert s.bottleneck == "slow"
        with pytest.raises(KeyError, match="no stage named 'nope'"):
            s.stage("nope")

    asyncio.run(main())


def test_a_stage_raising_base_exceptions_fails_the_item_only() -> None:
    def exits(x: int) -> int:
        if x == 1:
            raise SystemExit(3)
        return x

    pipe = fb.Pipeline([fb.stage(exits)])
    out = pipe.run([0, 1, 2], progress=False, return_exceptions=True)
    assert out[0] == 0 and out[2] == 2
    assert isinstance(out[1], fb.ItemFailed) and isinstance(out[1].__cause__, SystemExit)


def test_a_map_stopped_early_drops_the_items_a_worker_already_holds() -> None:
    # The stage's only worker takes what waits in chunks: items it holds but
    # has not started are dropped too, not only those still in its queue.
    gate = Gate()
    pipe = fb.Pipeline([fb.stage(gate.wait, name="slow")])

    async def main() -> fb.PipelineStats:
        async with pipe.open() as runner:
            results = runner.map(range(10))
            first = asyncio.ensure_future(anext(results))  # type: ignore[arg-type]
            await gate.wait_entered()
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            await results.aclose()  # type: ignore[attr-defined]
            gate.open()
        return runner.stats()

    stats = asyncio.run(main())
    assert gate.calls == [0]
    assert stats.cancelled == 10
    assert stats.in_flight == 0


def test_leaving_does_not_wait_forever_for_a_call_whose_caller_has_gone() -> None:
    # A call that can never end (here an event nobody sets; on Ray, an actor
    # the cluster cannot place) for an item whose caller already has its
    # answer: the drain cancels it instead of hanging.
    cancelled: list[bool] = []

    async def stuck(x: int) -> int:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return x

    async def main() -> fb.PipelineStats:
        async with fb.Pipeline([fb.stage(stuck)], name="stuck").open() as runner:
            with pytest.raises(fb.DeadlineExceeded):
                await runner.submit(1, timeout=0.05)
        return runner.stats()

    stats = asyncio.run(asyncio.wait_for(main(), 30))  # was: a hang on leaving
    assert cancelled == [True]
    assert (stats.expired, stats.completed) == (1, 0)
