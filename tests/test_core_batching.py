"""Dynamic batching: dispatch when a worker is free, max_wait, cost budgets, splitting."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import flowbatch as fb
from corehelpers import Gate
from polling import until


class Recorder:
    """A batched stage that records the batches it was called with."""

    def __init__(self, gate: Gate | None = None, poison: Any = None) -> None:
        self.batches: list[list[Any]] = []
        self.gate = gate
        self.poison = poison

    def __call__(self, xs: list[Any]) -> list[Any]:
        self.batches.append(list(xs))
        if self.gate is not None and len(self.batches) == 1:
            self.gate.wait(xs)
        if self.poison is not None and self.poison in xs:
            raise ValueError(f"cannot handle {self.poison!r}")
        return [x * 10 for x in xs]


def test_lone_item_is_dispatched_at_once() -> None:
    rec = Recorder()
    pipe = fb.Pipeline([fb.stage(rec, name="model", batch=fb.Batch(max_size=64))])

    async def main() -> None:
        async with pipe.open() as runner:
            assert await runner.submit(3) == 30
            assert await runner.submit(4) == 40

    asyncio.run(main())
    assert rec.batches == [[3], [4]]


def test_batches_grow_while_the_worker_is_busy() -> None:
    gate = Gate()
    rec = Recorder(gate)
    pipe = fb.Pipeline([fb.stage(rec, name="model", batch=fb.Batch(max_size=8))])

    async def main() -> None:
        async with pipe.open() as runner:
            first = asyncio.create_task(runner.submit(0))
            await gate.wait_entered()
            rest = [asyncio.create_task(runner.submit(i)) for i in range(1, 12)]
            await until(lambda: runner.stats().stage("model").queued == 11)
            gate.open()
            assert await first == 0
            assert await asyncio.gather(*rest) == [i * 10 for i in range(1, 12)]
            s = runner.stats().stage("model")
            assert s.batch_sizes == {1: 1, 8: 1, 3: 1}
            assert s.done == 12 and s.batches == 3

    asyncio.run(main())
    assert rec.batches == [[0], list(range(1, 9)), [9, 10, 11]]


def test_max_wait_holds_a_batch_until_full() -> None:
    rec = Recorder()
    # A huge max_wait: the batch can only close because it is full.
    pipe = fb.Pipeline([fb.stage(rec, name="m", batch=fb.Batch(max_size=4, max_wait=1000))])

    async def main() -> None:
        async with pipe.open() as runner:
            tasks = [asyncio.create_task(runner.submit(i)) for i in range(4)]
            assert await asyncio.gather(*tasks) == [0, 10, 20, 30]

    asyncio.run(main())
    assert rec.batches == [[0, 1, 2, 3]]


def test_drain_flushes_a_partial_batch() -> None:
    rec = Recorder()
    pipe = fb.Pipeline([fb.stage(rec, name="m", batch=fb.Batch(max_size=64, max_wait=1000))])

    async def main() -> list[Any]:
        async with pipe.open() as runner:
            tasks = [asyncio.create_task(runner.submit(i)) for i in range(3)]
            await until(lambda: runner.stats().submitted == 3)
        # Leaving the block drained: the open batch ran, nothing was lost.
        return [t.result() for t in tasks]

    assert asyncio.run(main()) == [0, 10, 20]
    assert rec.batches == [[0, 1, 2]]


def test_cost_budget_and_grouping() -> None:
    gate = Gate()
    rec = Recorder(gate)
    opts = fb.Batch(max_size=16, cost=len, max_cost=20)
    pipe = fb.Pipeline([fb.stage(rec, name="m", batch=opts)])
    # Short (1) and long (8) strings interleaved.
    items = ["x"] + [("a" if i % 2 else "bbbbbbbb") for i in range(12)]

    async def main() -> None:
        async with pipe.open() as runner:
            first = asyncio.create_task(runner.submit(items[0]))
            await gate.wait_entered()
            rest = [asyncio.create_task(runner.submit(x)) for x in items[1:]]
            await until(lambda: runner.stats().stage("m").queued == 12)
            gate.open()
            await first
            assert await asyncio.gather(*rest) == [x * 10 for x in items[1:]]

    asyncio.run(main())
    later = rec.batches[1:]
    for batch in later:
        assert sum(len(x) for x in batch) <= 20
        assert len({len(x) for x in batch}) == 1, f"mixed lengths in {batch}"
    assert sorted(x for b in later for x in b) == sorted(items[1:])


def test_item_over_budget_runs_alone() -> None:
    rec = Recorder()
    pipe = fb.Pipeline([fb.stage(rec, name="m", batch=fb.Batch(max_size=8, cost=len, max_cost=4))])
    assert pipe.run(["toolong"], progress=False) == ["toolong" * 10]


def test_failing_cost_function_fails_that_item() -> None:
    def cost(x: Any) -> float:
        return float(len(x))

    pipe = fb.Pipeline([fb.stage(Recorder(), name="m", batch=fb.Batch(cost=cost, max_cost=100))])

    async def main() -> None:
        async with pipe.open() as runner:
            with pytest.raises(fb.ItemFailed, match="'m'") as info:
                await runner.submit(5)
            assert isinstance(info.value.__cause__, TypeError)
            assert await runner.submit("ok") == "ok" * 10
            out = [r async for r in runner.map(["a", 7, "b"], return_exceptions=True)]
            assert out[0] == "a" * 10 and out[2] == "b" * 10
            assert isinstance(out[1], fb.ItemFailed)

    asyncio.run(main())


def test_a_failing_cost_function_counts_alike_through_submit_submit_nowait_and_map() -> None:
    def cost(x: Any) -> float:
        return float(len(x))

    pipe = fb.Pipeline([fb.stage(Recorder(), name="m", batch=fb.Batch(cost=cost, max_cost=100))])

    async def main() -> None:
        async with pipe.open() as runner:
            with pytest.raises(fb.ItemFailed, match="'m'"):
                await runner.submit(5)
            s = runner.stats()
            assert (s.submitted, s.failed, s.in_flight) == (1, 1, 0)
            with pytest.raises(fb.ItemFailed, match="'m'"):
                await runner.submit_nowait(6)
            s = runner.stats()
            assert (s.submitted, s.failed, s.in_flight) == (2, 2, 0)
            out = [r async for r in runner.map([7], return_exceptions=True)]
            assert isinstance(out[0], fb.ItemFailed)
            s = runner.stats()
            assert (s.submitted, s.failed, s.in_flight) == (3, 3, 0)

    asyncio.run(main())


def test_a_raising_batch_is_split_to_find_the_bad_item() -> None:
    gate = Gate()
    rec = Recorder(gate, poison=13)
    pipe = fb.Pipeline([fb.stage(rec, name="model", batch=fb.Batch(max_size=32))])

    async def main() -> list[Any]:
        async with pipe.open() as runner:
            first = asyncio.create_task(runner.submit(0))
            await gate.wait_entered()
            rest = [asyncio.create_task(runner.submit(i)) for i in range(1, 21)]
            await until(lambda: runner.stats().stage("model").queued == 20)
            gate.open()
            await first
            return await asyncio.gather(*rest, return_exceptions=True)

    results = asyncio.run(main())
    for i, r in zip(range(1, 21), results, strict=True):
        if i == 13:
            assert isinstance(r, fb.ItemFailed)
            assert r.stage == "model" and isinstance(r.__cause__, ValueError)
            assert "cannot handle 13" in str(r)
        else:
            assert r == i * 10
    assert [13] in rec.batches


class Outage:
    """A batched model that fails its first ``outage`` calls with ``error``,
    and any batch holding ``poison`` with a ValueError."""

    def __init__(self, error: BaseException | None = None, outage: int = 0, poison: Any = None):
        self.calls: list[list[int]] = []
        self.error = error
        self.outage = outage
        self.poison = poison

    def __call__(self, xs: list[int]) -> list[int]:
        self.calls.append(list(xs))
        if len(self.calls) <= self.outage:
            assert self.error is not None
            raise self.error
        if self.poison is not None and self.poison in xs:
            raise ValueError(f"cannot handle {self.poison!r}")
        return [x * 10 for x in xs]


def _run_eight(model: Outage, retry: fb.Retry, **batch: Any) -> list[Any]:
    # map admits all 8 before the idle worker runs: its first batch holds all 8.
    opts = fb.Batch(max_size=8, **batch)
    pipe = fb.Pipeline([fb.stage(model, name="m", batch=opts, retry=retry)])
    return pipe.run(range(8), progress=False, return_exceptions=True)


def test_a_batch_failing_with_a_retried_error_is_retried_whole_not_split() -> None:
    model = Outage(ConnectionError("model server: 503"), outage=2)
    net = fb.Retry(attempts=3, backoff=0.001, on=(ConnectionError,))
    assert _run_eight(model, net) == [x * 10 for x in range(8)]
    assert model.calls == [list(range(8))] * 3


def test_a_batch_failing_with_an_error_not_retried_is_still_split() -> None:
    model = Outage(poison=5)
    net = fb.Retry(attempts=3, backoff=0, on=(ConnectionError,))
    out = _run_eight(model, net)
    for i, r in enumerate(out):
        if i == 5:
            assert isinstance(r, fb.ItemFailed) and r.attempts == 1
        else:
            assert r == i * 10
    assert model.calls[0] == list(range(8)) and [5] in model.calls
    assert model.calls.count([5]) == 1  # split at once, the bad item tried once


def test_split_on_splits_a_batch_at_once_even_for_a_retried_error() -> None:
    model = Outage(poison=5)
    retry = fb.Retry(attempts=2, backoff=0)  # retries every Exception
    out = _run_eight(model, retry, split_on=(ValueError,))
    assert isinstance(out[5], fb.ItemFailed) and out[5].attempts == 2
    assert [r for i, r in enumerate(out) if i != 5] == [i * 10 for i in range(8) if i != 5]
    assert model.calls.count(list(range(8))) == 1  # not retried whole
    assert model.calls.count([5]) == 2  # the bad item alone gets its retry


def test_a_batch_that_fails_on_its_last_attempt_is_split_to_spare_the_others() -> None:
    model = Outage(poison=5)
    retry = fb.Retry(attempts=2, backoff=0)  # ValueError is retried: whole first
    out = _run_eight(model, retry)
    assert isinstance(out[5], fb.ItemFailed) and out[5].attempts == 2
    assert [r for i, r in enumerate(out) if i != 5] == [i * 10 for i in range(8) if i != 5]
    assert model.calls[:2] == [list(range(8))] * 2
    assert model.calls.count([5]) == 1  # its attempts were spent with the batch


def test_batch_split_on_is_validated() -> None:
    assert fb.Batch(split_on=ValueError).split_on == (ValueError,)
    assert fb.Batch().split_on == (fb.WorkerCrashed,)
    with pytest.raises(ValueError, match="split_on"):
        fb.Batch(split_on=("ValueError",))  # type: ignore[arg-type]


def test_wrong_length_fails_those_items_with_a_clear_message() -> None:
    def short(xs: list[int]) -> list[int]:
        return xs[:-1]

    pipe = fb.Pipeline([fb.stage(short, batch=fb.Batch(max_size=8))])

    async def main() -> None:
        async with pipe.open() as runner:
            with pytest.raises(fb.ItemFailed) as info:
                await asyncio.wait_for(runner.submit(1), 10)
            cause = info.value.__cause__
            assert isinstance(cause, fb.BatchContractError)
            assert "'short' returned 0 results for a batch of 1 items" in str(cause)

    asyncio.run(main())


def test_non_list_result_is_a_contract_error() -> None:
    def bad(xs: list[int]) -> int:
        return 5

    pipe = fb.Pipeline([fb.stage(bad, batch=fb.Batch())])
    out = pipe.run([1, 2], progress=False, return_exceptions=True)
    assert all(isinstance(r, fb.ItemFailed) for r in out)
    assert "returned int" in str(out[0].__cause__)


def test_exception_in_result_list_fails_one_item() -> None:
    def some(xs: list[int]) -> list[Any]:
        return [ValueError(f"odd {x}") if x % 2 else x for x in xs]

    pipe = fb.Pipeline([fb.stage(some, batch=fb.Batch(max_size=16))])
    out = pipe.run(range(6), progress=False, return_exceptions=True)
    assert out[0::2] == [0, 2, 4]
    assert all(isinstance(e, fb.ItemFailed) and "odd" in str(e) for e in out[1::2])


def test_async_batched_stage_and_sequence_results() -> None:
    class Rows:
        """A result like a 2-D numpy array: has a length and iterates rows."""

        def __init__(self, xs: list[int]) -> None:
            self.xs = xs

        def __len__(self) -> int:
            return len(self.xs)

        def __iter__(self) -> Any:
            return iter([x * 2 for x in self.xs])

    async def embed(xs: list[int]) -> Rows:
        return Rows(xs)

    pipe = fb.Pipeline([fb.stage(embed, batch=fb.Batch(max_size=4))])
    assert pipe.run(range(10), progress=False) == [x * 2 for x in range(10)]


def test_pick_batch_respects_a_fair_share_limit() -> None:
    from collections import deque

    from flowbatch.batching import pick_batch

    q: deque[int] = deque(range(10))
    assert pick_batch(q, fb.Batch(max_size=8), limit=3) == [0, 1, 2]
    assert pick_batch(q, fb.Batch(max_size=4), limit=100) == [3, 4, 5, 6]
    assert list(q) == [7, 8, 9]


class AsyncRecorder:
    """An async batched stage; each call waits until the test releases it."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.releases: list[asyncio.Event] = []
        self.hold = True

    async def __call__(self, xs: list[int]) -> list[int]:
        self.batches.append(list(xs))
        release = asyncio.Event()
        self.releases.append(release)
        if self.hold:
            await release.wait()
        return [x * 10 for x in xs]

    def release_all(self) -> None:
        self.hold = False
        for r in self.releases:
            r.set()


async def settle() -> None:
    """Let every task that can run, run (loop turns, not time)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def _answer_a_batch_of_four(runner: fb.Runner, rec: AsyncRecorder) -> None:
    """Leaves the stage's one worker free, its previous batch [1, 2, 3, 4]."""
    first = asyncio.create_task(runner.submit(0))
    await until(lambda: len(rec.batches) == 1)
    four = [asyncio.create_task(runner.submit(i)) for i in range(1, 5)]
    await until(lambda: runner.stats().stage("m").queued == 4)
    rec.release_all()
    assert await first == 0
    assert await asyncio.gather(*four) == [10, 20, 30, 40]
    assert rec.batches == [[0], [1, 2, 3, 4]]


def test_under_load_a_free_worker_waits_for_the_burst_its_batch_answered() -> None:
    rec = AsyncRecorder()
    # A linger far longer than the test: only the burst can end the wait.
    pipe = fb.Pipeline([fb.stage(rec, name="m", batch=fb.Batch(max_size=8, linger=600))])

    async def main() -> None:
        async with pipe.open() as runner:
            await _answer_a_batch_of_four(runner, rec)
            tasks = []
            for i in range(5, 9):  # the callers come back one at a time
                tasks.append(asyncio.create_task(runner.submit(i)))
                await settle()
                if i < 8:  # fewer than its last batch: the worker keeps waiting
                    assert runner.stats().stage("m").queued == i - 4
            assert await asyncio.gather(*tasks) == [50, 60, 70, 80]

    asyncio.run(main())
    assert rec.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]


def test_a_lone_caller_never_waits_for_the_linger() -> None:
    rec = AsyncRecorder()
    rec.hold = False
    pipe = fb.Pipeline([fb.stage(rec, name="m", batch=fb.Batch(max_size=8, linger=600))])

    async def main() -> None:
        async with pipe.open() as runner:
            for i in range(3):
                call = asyncio.create_task(runner.submit(i))
                await settle()
                assert len(rec.batches) == i + 1  # dispatched at once, not after a linger
                assert await call == i * 10

    asyncio.run(main())
    assert rec.batches == [[0], [1], [2]]


def test_the_linger_ends_when_no_more_items_come() -> None:
    rec = AsyncRecorder()
    pipe = fb.Pipeline([fb.stage(rec, name="m", batch=fb.Batch(max_size=8, linger=0.02))])

    async def main() -> None:
        async with pipe.open() as runner:
            await _answer_a_batch_of_four(runner, rec)
            assert await runner.submit(5) == 50  # alone, once nothing else came

    asyncio.run(main())
    assert rec.batches == [[0], [1, 2, 3, 4], [5]]


def test_drain_dispatches_a_lingering_batch_at_once() -> None:
    rec = AsyncRecorder()
    pipe = fb.Pipeline([fb.stage(rec, name="m", batch=fb.Batch(max_size=8, linger=600))])

    async def main() -> int:
        async with pipe.open() as runner:
            await _answer_a_batch_of_four(runner, rec)
            late = asyncio.create_task(runner.submit(5))
            await settle()
            assert runner.stats().stage("m").queued == 1  # held open by the linger
        return await late  # leaving the block drained: the held batch ran

    assert asyncio.run(main()) == 50
    assert rec.batches == [[0], [1, 2, 3, 4], [5]]


class FakeClock:
    """A clock the test moves by hand (``pipe.open(clock=...)``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SlowOnTheClock(AsyncRecorder):
    """Each batch takes 10 minutes on the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    async def __call__(self, xs: list[int]) -> list[int]:
        self.clock.now += 600.0
        return await super().__call__(xs)


@pytest.mark.parametrize("linger", [0, None])
def test_the_automatic_linger_follows_the_measured_service_time(linger: float | None) -> None:
    clock = FakeClock()
    rec = SlowOnTheClock(clock)
    pipe = fb.Pipeline([fb.stage(rec, name="m", batch=fb.Batch(max_size=8, linger=linger))])

    async def main() -> None:
        async with pipe.open(clock=clock) as runner:
            await _answer_a_batch_of_four(runner, rec)
            assert runner.stats().stage("m").service_time.mean == pytest.approx(600, rel=0.1)
            first = asyncio.create_task(runner.submit(5))
            await settle()
            if linger == 0:
                assert len(rec.batches) == 3  # went out alone, at once
                assert await first == 50
            else:
                # Batches take 10 minutes: the automatic linger (a minute) holds it.
                assert len(rec.batches) == 2
                assert runner.stats().stage("m").queued == 1
        assert await first == 50  # leaving the block drained: the held batch ran

    asyncio.run(main())
    assert rec.batches[2] == [5]


def test_the_dispatch_policy() -> None:
    from flowbatch.batching import (
        fair_share,
        holds_open,
        linger_bound,
        linger_target,
        next_service_time,
    )

    auto = fb.Batch(max_size=8)
    assert linger_target(auto, waiting=1, last=4) == 4  # under load: wait for the burst
    assert linger_target(auto, waiting=4, last=4) == 0  # as many as last time: go
    assert linger_target(auto, waiting=1, last=1) == 0  # a lone caller never waits
    assert linger_target(fb.Batch(max_size=2), waiting=1, last=4) == 2
    assert linger_target(fb.Batch(max_size=8, linger=0), waiting=1, last=4) == 0
    assert linger_target(fb.Batch(max_size=8, max_wait=1), waiting=1, last=4) == 0
    assert linger_bound(auto, service_time=2.0) == pytest.approx(0.2)
    assert linger_bound(fb.Batch(linger=0.5), service_time=2.0) == 0.5
    assert holds_open(fb.Batch(max_size=8, max_wait=1), waiting=3)
    assert not holds_open(fb.Batch(max_size=8, max_wait=1), waiting=8)
    assert not holds_open(auto, waiting=3)
    assert fair_share(10, [0]) is None
    assert fair_share(10, [0, 1]) == 6
    assert fair_share(3, [0, 0, 0]) == 1
    assert next_service_time(0.0, 2.0) == 2.0
    assert next_service_time(2.0, 4.0) == pytest.approx(2.4)


def test_a_free_replica_takes_a_fair_share_of_the_work() -> None:
    rec = AsyncRecorder()
    stage = fb.stage(rec, name="m", batch=fb.Batch(max_size=16), concurrency=2)

    async def main() -> None:
        async with fb.Pipeline([stage]).open() as runner:
            both = [asyncio.create_task(runner.submit(i)) for i in range(2)]
            await until(lambda: len(rec.batches) == 2)  # one item each
            rest = [asyncio.create_task(runner.submit(i)) for i in range(2, 12)]
            await until(lambda: runner.stats().stage("m").queued == 10)
            rec.releases[0].set()  # one replica comes free; the other holds 1 item
            try:
                await until(lambda: len(rec.batches) == 3)
                # Half of the 11 items in the stage, not all 10 that wait.
                assert len(rec.batches[2]) == 6
                assert runner.stats().stage("m").queued == 4
            finally:
                rec.release_all()  # so that a failure does not hang the drain
            assert await asyncio.gather(*both, *rest) == [i * 10 for i in range(12)]

    asyncio.run(main())
    assert sorted(x for b in rec.batches for x in b) == list(range(12))


# ------------------------------------------------------ why a batch went out


def test_dispatch_reason_policy() -> None:
    from flowbatch.batching import REASONS, dispatch_reason

    assert dispatch_reason(None, 3, 0, 8, False) == "worker_free"
    assert dispatch_reason(None, 8, 0, 8, False) == "full"
    assert dispatch_reason(None, 3, 5, 8, False) == "full"  # a share or a budget cut it
    assert dispatch_reason("max_wait", 3, 0, 8, False) == "max_wait"
    assert dispatch_reason("max_wait", 8, 0, 8, False) == "full"  # the hold filled it
    assert dispatch_reason("linger", 2, 0, 8, False) == "linger"
    assert dispatch_reason("linger", 2, 0, 8, True) == "drain"
    assert dispatch_reason(None, 2, 0, 8, True) == "drain"
    assert dispatch_reason(None, 8, 0, 8, True) == "full"
    assert dispatch_reason("deadline", 3, 5, 8, False) == "deadline"
    assert set(REASONS) == {"full", "worker_free", "max_wait", "linger", "deadline", "drain"}


def test_reasons_full_and_worker_free_with_their_mean_sizes() -> None:
    clock = FakeClock()
    rec = AsyncRecorder()
    pipe = fb.Pipeline([fb.stage(rec, name="m", batch=fb.Batch(max_size=8))])

    async def main() -> fb.StageStats:
        async with pipe.open(clock=clock) as runner:
            first = asyncio.create_task(runner.submit(0))
            await until(lambda: len(rec.batches) == 1)
            rest = [asyncio.create_task(runner.submit(i)) for i in range(1, 12)]
            await until(lambda: runner.stats().stage("m").queued == 11)
            rec.release_all()
            await asyncio.gather(first, *rest)
            return runner.stats().stage("m")

    s = asyncio.run(main())
    assert rec.batches == [[0], list(range(1, 9)), [9, 10, 11]]
    assert s.batch_reasons == {"worker_free": 2, "full": 1}
    assert s.mean_batch_size_by_reason() == {"worker_free": 2.0, "full": 8.0}
    assert s.to_dict()["batch_reasons"] == [["full", 1], ["worker_free", 2]]  # REASONS order


@pytest.mark.parametrize(("size", "reason"), [(1, "max_wait"), (4, "full")])
def test_reason_max_wait_when_it_runs_out_and_full_when_it_filled(size: int, reason: str) -> None:
    rec = Recorder()
    # 1 item: only max_wait can end the hold; 4: only a full batch (it could wait 1000 s).
    wait = 0.01 if size == 1 else 1000
    pipe = fb.Pipeline([fb.stage(rec, name="m", batch=fb.Batch(max_size=4, max_wait=wait))])

    async def main() -> dict[str, int]:
        async with pipe.open(clock=FakeClock()) as runner:
            await asyncio.gather(*[runner.submit(i) for i in range(size)])
            return runner.stats().stage("m").batch_reasons

    assert asyncio.run(main()) == {reason: 1}
    assert rec.batches == [list(range(size))]


def test_reason_linger_when_a_worker_lingered_under_load() -> None:
    rec = AsyncRecorder()
    pipe = fb.Pipeline([fb.stage(rec, name="m", batch=fb.Batch(max_size=8, linger=0.02))])

    async def main() -> dict[str, int]:
        async with pipe.open(clock=FakeClock()) as runner:
            await _answer_a_batch_of_four(runner, rec)
            assert runner.stats().stage("m").batch_reasons == {"worker_free": 2}
            assert await runner.submit(5) == 50  # lingered for the burst, none came
            return runner.stats().stage("m").batch_reasons

    assert asyncio.run(main()) == {"worker_free": 2, "linger": 1}


@pytest.mark.parametrize("held", ["linger", "max_wait"])
def test_reason_drain_when_a_drain_cut_a_hold(held: str) -> None:
    rec = AsyncRecorder()
    batch = fb.Batch(max_size=8, linger=600) if held == "linger" else fb.Batch(max_wait=1000)
    pipe = fb.Pipeline([fb.stage(rec, name="m", batch=batch)])

    async def main() -> tuple[fb.Runner, asyncio.Task[int]]:
        async with pipe.open(clock=FakeClock()) as runner:
            if held == "linger":
                await _answer_a_batch_of_four(runner, rec)
            rec.hold = False
            late = asyncio.create_task(runner.submit(5))
            await until(lambda: runner.stats().stage("m").queued == 1)
            await settle()
            assert runner.stats().stage("m").queued == 1  # held open
        return runner, late

    runner, late = asyncio.run(main())
    assert late.result() == 50
    reasons = runner.stats().stage("m").batch_reasons
    assert reasons == ({"worker_free": 2, "drain": 1} if held == "linger" else {"drain": 1})


def test_reasons_over_an_interval_are_the_increases() -> None:
    rec = Recorder()
    pipe = fb.Pipeline([fb.stage(rec, name="m", batch=fb.Batch(max_size=4, max_wait=1000))])

    async def main() -> tuple[fb.PipelineStats, fb.PipelineStats]:
        async with pipe.open(clock=FakeClock()) as runner:
            await asyncio.gather(*[runner.submit(i) for i in range(4)])  # full, at once
            before = runner.stats()
            await asyncio.gather(*[runner.submit(i) for i in range(8)])  # two more, full
            return before, runner.stats()

    before, after = asyncio.run(main())
    assert after.stage("m").batch_reasons == {"full": 3}
    recent = after.since(before).stage("m")
    assert recent.batch_reasons == {"full": 2} and recent.batch_reason_items == {"full": 8}
    assert recent.mean_batch_size_by_reason() == {"full": 4.0}


# ------------------------------------------------------- grouping by length


class _Queued:
    """A queued item as pick_batch sees it: the payload in ``.value``, queued at ``.t_enq``."""

    def __init__(self, value: Any, t_enq: float = 0.0) -> None:
        self.value = value
        self.t_enq = t_enq


def _queue(values: list[Any]) -> Any:
    from collections import deque

    return deque(_Queued(v, float(i)) for i, v in enumerate(values))


def test_a_free_worker_among_several_takes_the_oldest_and_those_closest_in_length() -> None:
    from flowbatch.batching import GROUPED_MIN, pick_batch

    texts = [("x" * n) for n in (5, 40, 6, 41, 7, 42, 5, 43, 6, 44, 7, 45, 5, 46, 6, 47,
                                 7, 48, 5, 49, 6, 50, 7, 51)]
    q = _queue(texts)
    picked = pick_batch(q, fb.Batch(max_size=64), limit=len(texts))  # a fair share of 24
    # Half the share (12), the oldest first, the rest nearest its length, in arrival order.
    assert [len(x.value) for x in picked] == [5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6, 7]
    assert [len(x.value) for x in q] == list(range(40, 52))  # the others wait, in order
    assert GROUPED_MIN == 8
    q = _queue(texts[:12])  # a share of 4 still takes GROUPED_MIN: the 7 nearest the oldest
    assert [len(x.value) for x in pick_batch(q, fb.Batch(max_size=64), limit=4)] == [
        5, 40, 6, 41, 7, 5, 6, 7]
    assert [len(x.value) for x in q] == [42, 43, 44, 45]
    # Two batches' worth waiting (a backlog under overload): the full share, grouped.
    q = _queue(texts)
    picked = pick_batch(q, fb.Batch(max_size=64), limit=12)
    assert sorted(len(x.value) for x in picked) == [5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7]


def test_items_passed_over_long_enough_go_first_whatever_their_length() -> None:
    from flowbatch.batching import pick_batch

    # Queued at times 0..23: the short ones are grouped with the oldest (5)...
    texts = [("x" * n) for n in (5, 40, 6, 41, 7, 42, 5, 43, 6, 44, 7, 45, 5, 46, 6, 47,
                                 7, 48, 5, 49, 6, 50, 7, 51)]
    q = _queue(texts)
    picked = pick_batch(q, fb.Batch(max_size=64), limit=24, due=3.0)
    # ...but those queued at or before time 3 (40 and 41 among them) are due:
    # they go first, and the batch is filled with the lengths nearest the oldest.
    assert [x.t_enq for x in picked][:4] == [0.0, 1.0, 2.0, 3.0]
    assert [len(x.value) for x in picked] == [5, 40, 6, 41, 7, 5, 6, 7, 5, 6, 5, 6]
    assert sorted(len(x.value) for x in q) == [7, 7, *range(42, 52)]
    assert [x.t_enq for x in q] == sorted(x.t_enq for x in q)  # the rest wait, in order
    # When more are due than the batch takes, it is arrival order.
    q = _queue(texts)
    picked = pick_batch(q, fb.Batch(max_size=64), limit=24, due=20.0)
    assert [x.value for x in picked] == texts[:12]


def test_with_a_cost_function_items_passed_over_long_enough_go_first_within_max_cost() -> None:
    from flowbatch.batching import pick_batch

    costs = [1, 8, 1, 8, 1, 8, 1, 8, 1, 8]
    q = _queue(["x"] * len(costs))
    for item, c in zip(q, costs, strict=True):
        item.cost = float(c)
    options = fb.Batch(max_size=4, cost=len, max_cost=32)
    picked = pick_batch(q, options, due=1.0)  # queued at 0..9: the first two are due
    # The oldest (1), the due 8, then the closest in cost to the oldest while
    # the padded cost (4 x 8 = 32) fits.
    assert [(x.t_enq, x.cost) for x in picked] == [(0.0, 1.0), (1.0, 8.0), (2.0, 1.0), (4.0, 1.0)]
    assert [x.t_enq for x in q] == [3.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    q = _queue(["x"] * len(costs))  # none due: the costs nearest the oldest only
    for item, c in zip(q, costs, strict=True):
        item.cost = float(c)
    assert [x.cost for x in pick_batch(q, options, due=-1.0)] == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("options", "limit", "values"),
    [
        (fb.Batch(max_size=64), None, ["a" * n for n in range(30, 0, -1)]),  # a lone worker
        (fb.Batch(max_size=64, group_lengths=False), 30, ["a" * n for n in range(30, 0, -1)]),
        (fb.Batch(max_size=64), 30, [{"n": n} for n in range(30)]),  # no length: no grouping
        (fb.Batch(max_size=64), 30, ["a" * n for n in range(8, 0, -1)]),  # no choice to make
    ],
)
def test_arrival_order_when_grouping_does_not_apply(
    options: fb.Batch, limit: int | None, values: list[Any]
) -> None:
    from flowbatch.batching import pick_batch

    q = _queue(values)
    picked = pick_batch(q, options, limit=limit)
    n = min(len(values), options.max_size, limit or options.max_size)
    assert [x.value for x in picked] == values[:n]
    assert [x.value for x in q] == values[n:]


def test_group_lengths_is_checked() -> None:
    with pytest.raises(TypeError, match="group_lengths must be True or False"):
        fb.Batch(group_lengths="yes")  # type: ignore[arg-type]
