"""The runner's in-flight limit: pipe.open(max_in_flight=...)."""

from __future__ import annotations

import asyncio

import pytest

import flowbatch as fb
from corehelpers import Gate
from polling import until


async def settle() -> None:
    """Let every task that can run, run (loop turns, not time)."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_past_max_in_flight_submit_nowait_is_overloaded_and_submit_waits() -> None:
    gate = Gate()
    pipe = fb.Pipeline([fb.stage(gate.wait, name="slow", concurrency=4)])

    async def main() -> None:
        async with pipe.open(max_in_flight=2) as runner:
            held = [runner.submit_nowait(1), runner.submit_nowait(2)]
            with pytest.raises(fb.Overloaded, match="max_in_flight=2"):
                runner.submit_nowait(3)
            assert runner.stats().rejected == 1
            waiting = asyncio.create_task(runner.submit(4))
            await settle()
            assert not waiting.done()
            assert runner.stats().submitted == 2  # the third waits for a place
            gate.open()
            await asyncio.gather(*held, waiting)
            s = runner.stats()
            assert (s.completed, s.rejected, s.in_flight) == (3, 1, 0)
            assert runner.limiter is not None and runner.limiter.borrowed == 0

    asyncio.run(main())


def test_a_full_queue_counts_as_a_rejection_too() -> None:
    gate = Gate()
    pipe = fb.Pipeline([fb.stage(gate.wait, name="slow")])

    async def main() -> None:
        async with pipe.open(queue_size=1) as runner:
            first = runner.submit_nowait(0)
            await gate.wait_entered()
            second = runner.submit_nowait(1)
            with pytest.raises(fb.Overloaded, match="queue_size=1"):
                runner.submit_nowait(2)
            assert runner.stats().rejected == 1
            gate.open()
            await asyncio.gather(first, second)

    asyncio.run(main())


def test_map_keeps_within_max_in_flight() -> None:
    peak = 0
    runner_ref: list[fb.Runner] = []

    async def work(x: int) -> int:
        nonlocal peak
        peak = max(peak, runner_ref[0].stats().in_flight)
        await asyncio.sleep(0)
        return x * 2

    pipe = fb.Pipeline([fb.stage(work, concurrency=16)])

    async def main() -> list[int]:
        async with pipe.open(max_in_flight=3) as runner:
            runner_ref.append(runner)
            return [y async for y in runner.map(range(50))]

    assert asyncio.run(main()) == [x * 2 for x in range(50)]
    assert 1 <= peak <= 3


def test_a_caller_waiting_for_a_place_can_time_out_or_be_cancelled_without_leaking_it() -> None:
    gate = Gate()
    pipe = fb.Pipeline([fb.stage(gate.wait, name="slow", concurrency=2)])

    async def main() -> None:
        async with pipe.open(max_in_flight=1) as runner:
            first = runner.submit_nowait(0)
            await gate.wait_entered()
            with pytest.raises(fb.DeadlineExceeded, match="no room"):
                await runner.submit(1, timeout=0.01)
            cancelled = asyncio.create_task(runner.submit(2))
            await settle()
            cancelled.cancel()
            await asyncio.gather(cancelled, return_exceptions=True)
            assert runner.limiter is not None and runner.limiter.borrowed == 1
            gate.open()
            await first
            await runner.submit(3)  # the places of the two that left came back
            assert runner.limiter.borrowed == 0

    asyncio.run(main())


def test_a_drain_admits_callers_waiting_for_a_place_and_finishes_them() -> None:
    gate = Gate()
    pipe = fb.Pipeline([fb.stage(gate.wait, name="slow")])

    async def main() -> None:
        async with pipe.open(max_in_flight=1) as runner:
            first = runner.submit_nowait(0)
            await gate.wait_entered()
            later = asyncio.create_task(runner.submit(1))
            await settle()
            draining = asyncio.create_task(runner.drain())
            await settle()
            assert not draining.done()
            gate.open()
            await draining
            await asyncio.gather(first, later)
            assert runner.stats().completed == 2

    asyncio.run(main())


def test_stopping_the_runner_answers_callers_waiting_for_a_place() -> None:
    gate = Gate()
    pipe = fb.Pipeline([fb.stage(gate.wait, name="slow")])

    async def main() -> None:
        tasks: list[asyncio.Future[object]] = []

        async def body() -> None:
            async with pipe.open(max_in_flight=1) as runner:
                tasks.append(runner.submit_nowait(0))
                await gate.wait_entered()
                tasks.append(asyncio.create_task(runner.submit(1)))
                await until(lambda: runner.limiter is not None and runner.limiter.waiting == 1)
                gate.open()  # so that stopping does not wait for the thread
                raise KeyboardInterrupt  # stops the runner at once

        with pytest.raises(KeyboardInterrupt):
            await body()
        for task in tasks:
            with pytest.raises(fb.PipelineClosed):
                await task

    asyncio.run(main())


def test_admit_many_nowait_admits_a_request_whole_or_not_at_all() -> None:
    gate = Gate()
    pipe = fb.Pipeline([fb.stage(gate.wait, name="slow", concurrency=4)])

    async def main() -> None:
        async with pipe.open(max_in_flight=3) as runner:
            held = runner.admit_many_nowait([1, 2])
            with pytest.raises(fb.Overloaded, match="max_in_flight=3"):
                runner.admit_many_nowait([3, 4])  # 2 + 2 > 3: neither goes in
            s = runner.stats()
            assert (s.submitted, s.rejected) == (2, 2)
            assert runner.limiter is not None and runner.limiter.borrowed == 2
            held += runner.admit_many_nowait([5])  # the one place left
            assert runner.admit_many_nowait([]) == []
            gate.open()
            assert await asyncio.gather(*held) == [None, None, None]
            assert runner.limiter.borrowed == 0
            assert sorted(gate.calls) == [1, 2, 5]  # type: ignore[type-var]

    asyncio.run(main())


def test_admit_many_waits_in_line_for_all_places_and_a_cancel_admits_nothing() -> None:
    gate = Gate()
    pipe = fb.Pipeline([fb.stage(gate.wait, name="slow", concurrency=4)])

    async def main() -> None:
        async with pipe.open(max_in_flight=3) as runner:
            first = runner.admit_many_nowait([0, 1])
            waiting = asyncio.create_task(runner.admit_many([2, 3]))
            gone = asyncio.create_task(runner.admit_many([4]))
            await until(lambda: runner.limiter is not None and runner.limiter.waiting == 2)
            # a place is free, but the two-item request ahead is not overtaken
            assert runner.stats().submitted == 2
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
            with pytest.raises(ValueError, match="never be admitted at once"):
                await runner.admit_many([9, 9, 9, 9])
            gate.open()
            await asyncio.gather(*first)
            later = await waiting
            assert await asyncio.gather(*later) == [None, None]
            assert runner.stats().submitted == 4  # the cancelled request never went in
            assert 4 not in gate.calls

    asyncio.run(main())


def test_map_and_submit_nowait_share_the_limiter() -> None:
    gate = Gate()
    pipe = fb.Pipeline([fb.stage(gate.wait, name="slow", concurrency=4)])

    async def main() -> None:
        async with pipe.open(max_in_flight=2) as runner:
            results = runner.map(range(5))
            first = asyncio.ensure_future(anext(results))
            await until(lambda: runner.limiter is not None and runner.limiter.borrowed == 2)
            with pytest.raises(fb.Overloaded, match="max_in_flight=2"):
                runner.submit_nowait(99)  # map holds every place
            gate.open()
            assert await first is None
            assert [y async for y in results] == [None] * 4

    asyncio.run(main())


def test_an_item_its_cost_function_fails_on_fails_alone_and_gives_its_place_back() -> None:
    def model(xs: list[str]) -> list[int]:
        return [len(x) for x in xs]

    def cost(x: str) -> float:
        if x == "bad":
            raise ValueError("no cost")
        return float(len(x))

    pipe = fb.Pipeline(
        [fb.stage(model, name="m", batch=fb.Batch(max_size=8, cost=cost, max_cost=100))]
    )

    async def main() -> None:
        async with pipe.open(max_in_flight=3) as runner:
            for admit in (runner.admit_many_nowait, runner.admit_many):
                got = admit(["a", "bad", "ccc"])
                futs = await got if asyncio.iscoroutine(got) else got
                out = await asyncio.gather(*futs, return_exceptions=True)
                assert out[0] == 1 and out[2] == 3
                assert isinstance(out[1], fb.ItemFailed)
                assert runner.limiter is not None and runner.limiter.borrowed == 0
            s = runner.stats()
            assert (s.submitted, s.completed, s.failed) == (6, 4, 2)

    asyncio.run(main())


def test_a_map_waiting_in_the_limiters_line_counts_no_rejection() -> None:
    # map reads its input in chunks and admits each chunk at once when it
    # can; past max_in_flight it waits in line, which is not a refusal.
    pipe = fb.Pipeline([fb.stage(_double_later, concurrency=4)])

    async def main() -> tuple[list[int], int, int]:
        async with pipe.open(max_in_flight=3) as runner:
            out = [y async for y in runner.map(range(40))]
            assert runner.limiter is not None
            return out, runner.limiter.rejected, runner.stats().rejected

    out, limiter_rejected, rejected = asyncio.run(main())
    assert out == [x * 2 for x in range(40)]
    assert (limiter_rejected, rejected) == (0, 0)


def test_a_map_takes_free_places_a_chunk_at_a_time_not_item_by_item() -> None:
    # Below the limit, a map's chunks (FEED_CHUNK items) each take their
    # places in one acquisition, as without a limiter: not one trip through
    # the limiter's line per item.
    from flowbatch.runner import FEED_CHUNK

    pipe = fb.Pipeline([fb.stage(_double_later, concurrency=4)])

    async def main() -> tuple[list[int], int]:
        async with pipe.open(max_in_flight=1000) as runner:
            out = [y async for y in runner.map(range(4 * FEED_CHUNK), window=1000)]
            assert runner.limiter is not None
            return out, runner.limiter.admitted

    out, acquisitions = asyncio.run(main())
    assert out == [x * 2 for x in range(4 * FEED_CHUNK)]
    assert acquisitions == 4


def test_a_free_place_is_not_taken_ahead_of_a_caller_waiting_in_line() -> None:
    gate = Gate()
    pipe = fb.Pipeline([fb.stage(gate.wait, name="slow", concurrency=8)])

    async def main() -> None:
        async with pipe.open(max_in_flight=4) as runner:
            lim = runner.limiter
            assert lim is not None
            held = [runner.submit_nowait(i) for i in range(4)]  # every place held
            waiting = asyncio.ensure_future(lim.acquire(2))  # a caller in line
            await until(lambda: lim.waiting == 1)
            assert not lim.take_free(1)  # a free place or not, the line comes first
            assert lim.rejected == 0  # and a miss is no refusal
            gate.open()
            await asyncio.gather(*held)
            await waiting
            lim.release(2)

    asyncio.run(main())


async def _double_later(x: int) -> int:
    await asyncio.sleep(0)
    return x * 2
