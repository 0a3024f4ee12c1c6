"""``fb.Backpressure`` raised by a stage, batched or not: the items are queued
again without spending an attempt, and the stage starts no call before it was told."""

from __future__ import annotations

import asyncio
import time

import pytest

import flowbatch as fb


class PushesBack:
    """A batched stage whose first ``push`` calls raise ``Backpressure``; each
    call's start is recorded on the runner's clock (perf_counter by default)."""

    def __init__(self, push: int, retry_after: float) -> None:
        self.push = push
        self.retry_after = retry_after
        self.calls: list[tuple[float, list[int]]] = []

    def __call__(self, xs: list[int]) -> list[int]:
        self.calls.append((time.perf_counter(), list(xs)))
        if len(self.calls) <= self.push:
            raise fb.Backpressure(retry_after=self.retry_after)
        return [x * 2 for x in xs]


async def _eight_answered_after_one_pause(runner: fb.Runner) -> tuple[fb.StageStats, float]:
    """Submit 0..7 through stage "m", which pushes back once for 0.05 s:
    every item answered, none retried or failed; the stage's stats and the
    end of its pause."""
    out = await asyncio.gather(*(runner.submit(i) for i in range(8)))
    assert out == [i * 2 for i in range(8)]
    st = runner.stats().stage("m")
    assert (st.backpressured, st.retried, st.failed) == (1, 0, 0)
    return st, runner._stages[0].paused_until


@pytest.mark.parametrize(
    "concurrency", [1, 3, fb.Adaptive(min=1, max=3, initial=2)], ids=["one", "three", "adaptive"]
)
def test_a_pushed_back_batch_is_queued_again_and_the_stage_waits_as_told(
    concurrency: int | fb.Adaptive,
) -> None:
    svc = PushesBack(push=1, retry_after=0.05)
    pipe = fb.Pipeline([
        fb.stage(svc, name="m", batch=fb.Batch(max_size=8), concurrency=concurrency,
                 retry=fb.Retry(attempts=1))  # a spent attempt would fail the item
    ])

    async def main() -> None:
        async with pipe.open() as runner:
            st, paused_until = await _eight_answered_after_one_pause(runner)
            pushed_at, first = svc.calls[0]
            assert paused_until >= pushed_at + 0.05
            # The pushed-back items ran again once, after the pause (other
            # workers' batches may have been dispatched before it began).
            again = [(t, xs) for t, xs in svc.calls[1:] if set(xs) & set(first)]
            assert sorted(x for _, xs in again for x in xs if x in first) == sorted(first)
            assert all(t >= paused_until for t, _ in again)
            if concurrency == 1:
                assert all(t >= paused_until for t, _ in svc.calls[1:])
            again = sorted(x for _, xs in svc.calls[1:] for x in xs)
            assert again == list(range(8)), (first, svc.calls)
            if isinstance(concurrency, fb.Adaptive):
                # its replica scaler owns the gate: the count it shows is the gate's
                assert st.concurrency_limit == st.replicas == runner._stages[0].gate.total

    asyncio.run(main())


def test_backpressure_returned_for_one_item_is_that_items_error() -> None:
    def model(xs: list[int]) -> list[object]:
        return [fb.Backpressure(0.01) if x == 3 else x for x in xs]

    pipe = fb.Pipeline([fb.stage(model, name="m", batch=fb.Batch(max_size=8))])

    async def main() -> None:
        async with pipe.open() as runner:
            out = await asyncio.gather(
                *(runner.submit(i) for i in range(5)), return_exceptions=True
            )
            assert [o for i, o in enumerate(out) if i != 3] == [0, 1, 2, 4]
            assert isinstance(out[3], fb.ItemFailed | fb.Backpressure), out[3]
            assert runner.stats().stage("m").backpressured == 0

    asyncio.run(main())


class PushesBackOne:
    """An unbatched stage whose first ``push`` calls raise ``Backpressure``."""

    def __init__(self, push: int, retry_after: float) -> None:
        self.push = push
        self.retry_after = retry_after
        self.calls: list[tuple[float, int]] = []

    def __call__(self, x: int) -> int:
        self.calls.append((time.perf_counter(), x))
        if len(self.calls) <= self.push:
            raise fb.Backpressure(retry_after=self.retry_after)
        return x * 2


@pytest.mark.parametrize(
    "concurrency", [1, 3, fb.Adaptive(min=1, max=3, initial=2)], ids=["one", "three", "adaptive"]
)
def test_an_unbatched_stage_pauses_alike_and_its_item_runs_again_after(
    concurrency: int | fb.Adaptive,
) -> None:
    svc = PushesBackOne(push=1, retry_after=0.05)
    pipe = fb.Pipeline([fb.stage(svc, name="m", executor="thread", concurrency=concurrency,
                                 retry=fb.Retry(attempts=1))])

    async def main() -> None:
        async with pipe.open() as runner:
            _, paused_until = await _eight_answered_after_one_pause(runner)
            pushed_at, first = svc.calls[0]
            assert paused_until >= pushed_at + 0.05
            [again] = [t for t, x in svc.calls[1:] if x == first]
            assert again >= paused_until
            # The only worker (and, with several, every call it starts) waits the pause out.
            if concurrency == 1:
                assert all(t >= paused_until for t, _ in svc.calls[1:])

    asyncio.run(main())
