"""Batches sized to deadlines (``Batch(latency_target=...)``): the cost model,
earliest deadline first, late items failed before they cost model time.

The end-to-end tests run on a fake clock (``pipe.open(clock=...)``) with a
simulated model whose batch of ``n`` moves that clock by ``a + b*n``.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Any

import pytest

import flowbatch as fb
from flowbatch.batching import CostModel, deadline_hold, pick_by_deadline
from polling import until

A, B = 2.0, 0.5  # the simulated model: a batch of n takes 2 + 0.5 n (fake) seconds
TARGET = 20.2  # so a batch of at most 36 meets a fresh item's deadline


class FakeClock:
    """A clock the test and the simulated model move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SimModel:
    """A batched model whose batch of ``n`` takes ``a + b*n`` on the fake clock.

    Records each batch, and the clock when each item's batch finished. With
    ``hold`` set, a call waits (on no clock) until the test releases it.
    """

    def __init__(self, clock: FakeClock, a: float = A, b: float = B) -> None:
        self.clock = clock
        self.a, self.b = a, b
        self.calls: list[list[int]] = []
        self.finished: dict[int, float] = {}
        self.hold = False
        self.releases: list[asyncio.Event] = []

    async def __call__(self, xs: list[int]) -> list[int]:
        self.calls.append(list(xs))
        self.clock.now += self.a + self.b * len(xs)
        for x in xs:
            self.finished[x] = self.clock.now
        if self.hold:
            release = asyncio.Event()
            self.releases.append(release)
            await release.wait()
        return [x * 10 for x in xs]

    def release(self) -> None:
        self.hold = False
        for r in self.releases:
            r.set()

    def seen(self) -> set[int]:
        return {x for call in self.calls for x in call}


def _pipe(model: SimModel, **batch: Any) -> fb.Pipeline:
    opts = fb.Batch(max_size=batch.pop("max_size", 64), latency_target=TARGET, **batch)
    return fb.Pipeline([fb.stage(model, name="m", batch=opts)])


async def _while_busy(
    runner: fb.Runner, model: SimModel, first: int, items: list[int], **kw: Any
) -> tuple[asyncio.Task[Any], list[asyncio.Task[Any]]]:
    """Keeps the worker in a batch of ``[first]`` while ``items`` queue up
    (at one fake instant), then releases it."""
    model.hold = True
    calls = len(model.calls)
    head = asyncio.create_task(runner.submit(first))
    await until(lambda: len(model.calls) == calls + 1)
    tasks = [asyncio.create_task(runner.submit(x, **kw)) for x in items]
    await until(lambda: runner.stats().stage("m").queued == len(items))
    model.release()
    return head, tasks


async def _learn(runner: fb.Runner, model: SimModel) -> None:
    """Batches of 1, 1 and 6: the model is then known exactly (a=2, b=0.5).

    (After two batches of one, 2.5 s each, it is proportional: 6 items are
    predicted to take 15 s, within the 20 s target; 8 would not fit.)"""
    assert await runner.submit(0) == 0
    head, rest = await _while_busy(runner, model, 100, list(range(1, 7)))
    assert await head == 1000
    assert await asyncio.gather(*rest) == [x * 10 for x in range(1, 7)]
    assert model.calls[-1] == list(range(1, 7))


# ----------------------------------------------------------- the option


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "1", True])
def test_latency_target_must_be_a_positive_number(bad: Any) -> None:
    with pytest.raises(ValueError, match="latency_target must be a number of seconds > 0"):
        fb.Batch(latency_target=bad)


def test_latency_target_does_not_mix_with_max_wait_or_a_linger() -> None:
    with pytest.raises(ValueError, match="set one of them"):
        fb.Batch(latency_target=0.1, max_wait=0.01)
    with pytest.raises(ValueError, match="linger is not used with Batch.latency_target"):
        fb.Batch(latency_target=0.1, linger=0.01)
    assert fb.Batch(latency_target=0.1, linger=0).linger == 0  # 0: never hold
    assert fb.Batch(latency_target=1).latency_target == 1


# ------------------------------------------------------- the cost model


def test_the_cost_model_fits_a_and_b_and_follows_a_change() -> None:
    m = CostModel()
    assert (m.predict(10), m.largest(1.0, 64)) == (0.0, 64)  # nothing known: no limit
    for i in range(200):
        n = 1 + (i * 7) % 32
        noise = 1 + 0.02 * math.sin(i)  # +-2%, deterministic
        m.observe(n, (0.004 + 0.0005 * n) * noise)
    assert m.a == pytest.approx(0.004, rel=0.15)
    assert m.b == pytest.approx(0.0005, rel=0.05)
    for i in range(150):  # the model got twice as slow
        n = 1 + (i * 7) % 32
        m.observe(n, 0.008 + 0.001 * n)
    assert (m.a, m.b) == (pytest.approx(0.008, rel=0.02), pytest.approx(0.001, rel=0.02))
    assert m.spread < 0.001  # the recent batches fit the line (3% of a batch of 20)
    assert 1.1 * 0.028 <= m.budget(20) <= 1.1 * 0.028 + 0.002  # 10% to spare, and 2 x spread
    assert m.largest(0.008 + 0.001 * 20, 64) == 20
    assert m.largest(0.0085, 64) == 0  # not even one item fits


def test_the_cost_model_falls_back_to_proportional_with_one_batch_size() -> None:
    m = CostModel()
    for _ in range(3):
        m.observe(8, 0.016)
    assert (m.a, m.b) == (0.0, pytest.approx(0.002))
    assert m.predict(16) == pytest.approx(0.032)  # errs long for larger batches
    m.observe(9, 0.0)
    m.observe(1, 0.5)  # time falls as batches grow (noise): never a negative b
    assert m.b >= 0 and m.a >= 0


# ------------------------------------------------------------ the policy


class Waiting:
    def __init__(self, name: str, slack: float, cost: float = 1.0) -> None:
        self.name, self.slack, self.cost = name, slack, cost

    def __repr__(self) -> str:
        return self.name


def _known(a: float = A, b: float = B) -> CostModel:
    m = CostModel()
    m.observe(1, a + b)
    m.observe(9, a + 9 * b)
    assert (m.a, m.b) == (pytest.approx(a), pytest.approx(b))
    return m


def test_pick_by_deadline_fails_the_late_and_takes_the_most_urgent_that_fit() -> None:
    model = _known()  # a batch of one takes 2.5
    q = deque(
        [Waiting("p", 30), Waiting("late1", 2.4), Waiting("q", 5.0), Waiting("r", 4.0),
         Waiting("late0", 0.0), Waiting("s", 50)]
    )
    p = pick_by_deadline(q, fb.Batch(max_size=8), model, lambda x: x.slack)
    assert [x.name for x in p.late] == ["late0", "late1"]
    # r is the most urgent: 4.0 s left fits a batch of 4 (2 + 0.5*4); r, q, p, s
    assert [x.name for x in p.batch] == ["r", "q", "p", "s"] and not p.cut
    assert not q

    q = deque([Waiting(f"x{i}", 4.0 + i) for i in range(6)])
    p = pick_by_deadline(q, fb.Batch(max_size=8), model, lambda x: x.slack)
    assert [x.name for x in p.batch] == ["x0", "x1", "x2", "x3"] and p.cut  # 2 + 0.5*4 = 4.0
    assert [x.name for x in q] == ["x4", "x5"]  # the rest stays, in order

    q = deque([Waiting(f"x{i}", 100) for i in range(6)])
    p = pick_by_deadline(q, fb.Batch(max_size=8), model, lambda x: x.slack, limit=2)
    assert len(p.batch) == 2 and not p.cut  # a fair share, not the deadline, cut it
    costed = fb.Batch(max_size=8, cost=len, max_cost=10)
    q = deque([Waiting("a", 9, 3), Waiting("b", 10, 3), Waiting("c", 11, 5), Waiting("d", 12, 1)])
    p = pick_by_deadline(q, costed, model, lambda x: x.slack)
    assert [x.name for x in p.batch] == ["a", "b"] and not p.cut  # 3 x 5 > 10: the budget
    assert [x.name for x in q] == ["c", "d"]


def test_deadline_hold_waits_while_one_more_item_still_fits() -> None:
    model = _known()
    opts = fb.Batch(max_size=64, latency_target=TARGET)
    # The most urgent (10 s left) can wait while a batch of 3 (3.5 s, 10% to spare) fits.
    assert deadline_hold(opts, model, 2, 10.0) == pytest.approx(10 - 3.5 * 1.1)
    assert deadline_hold(opts, model, 3, 10.0) == pytest.approx(10 - 4.0 * 1.1)
    assert deadline_hold(opts, model, 14, 10.0) == 0.0  # a 15th: 1.1 x 9.5 > 10 s, go
    assert deadline_hold(opts, model, 2, 2.0) == 0.0  # it cannot make it (2.5 s): go, fail it
    assert deadline_hold(fb.Batch(max_size=2, latency_target=TARGET), model, 2, 10.0) == 0.0
    assert deadline_hold(fb.Batch(latency_target=TARGET, linger=0), model, 1, 10.0) == 0.0
    assert deadline_hold(opts, CostModel(), 1, 10.0) == 0.0  # nothing measured: never hold
    model.woke_late(1.0)  # a wake-up came 1 s late (a busy loop): hold with more room
    assert model.lag == pytest.approx(0.2)
    assert deadline_hold(opts, model, 2, 10.0) == pytest.approx(10 - 3.5 * 1.1 - 0.2)
    assert model.largest(4.0, 8) == 4  # batches are still sized by the plain prediction


# ------------------------------------------------------------- end to end


def test_the_stage_learns_a_and_b_and_sizes_batches_to_the_target() -> None:
    clock = FakeClock()
    model = SimModel(clock)
    submitted: dict[int, float] = {}

    async def main() -> list[Any]:
        async with _pipe(model, linger=0).open(clock=clock) as runner:
            await _learn(runner, model)
            fit = runner.stats().stage("m").batch_time_fit
            assert fit == (pytest.approx(A), pytest.approx(B))
            items = list(range(200, 240))  # 40 items, all at one instant
            submitted.update(dict.fromkeys(items, clock.now + A + B))  # after [300] began
            head, tasks = await _while_busy(runner, model, 300, items)
            assert await head == 3000
            out = await asyncio.gather(*tasks, return_exceptions=True)
            s = runner.stats().stage("m")
            assert s.expired == 4 and s.batch_reasons.get("deadline") == 1
            return out

    out = asyncio.run(main())
    # 2 + 0.5 n <= 20.2: the largest batch that meets the target is 36.
    assert model.calls[-1] == list(range(200, 236))
    assert out[:36] == [x * 10 for x in range(200, 236)]
    for late in out[36:]:  # 20 s gone, 0.2 s left: cannot make it, failed without a call
        assert isinstance(late, fb.DeadlineExceeded)
        assert "cannot meet its deadline in stage 'm'" in str(late)
    assert model.seen().isdisjoint(range(236, 240))
    for x in range(200, 236):
        assert model.finished[x] - submitted[x] <= TARGET


def test_earliest_deadline_first_across_and_within_batches() -> None:
    clock = FakeClock()
    model = SimModel(clock)
    pipe = fb.Pipeline(
        [fb.stage(model, name="m", batch=fb.Batch(max_size=2, latency_target=1e6, linger=0))]
    )
    timeouts = {1: 500.0, 2: 50.0, 3: 5000.0, 4: 100.0}  # real seconds, none passes here

    async def main() -> None:
        async with pipe.open(clock=clock) as runner:
            model.hold = True
            head = asyncio.create_task(runner.submit(0))
            await until(lambda: len(model.calls) == 1)
            tasks = [asyncio.create_task(runner.submit(x, timeout=t)) for x, t in timeouts.items()]
            await until(lambda: runner.stats().stage("m").queued == 4)
            model.release()
            assert await head == 0
            assert await asyncio.gather(*tasks) == [10, 20, 30, 40]

    asyncio.run(main())
    assert model.calls == [[0], [2, 4], [1, 3]]


def test_an_item_whose_own_timeout_is_too_short_fails_before_the_call() -> None:
    clock = FakeClock()
    model = SimModel(clock, a=40.0, b=1.0)  # a batch of one takes 41 (fake) seconds
    pipe = fb.Pipeline([fb.stage(model, name="m", batch=fb.Batch(latency_target=1e6, linger=0))])

    async def main() -> None:
        async with pipe.open(clock=clock) as runner:
            model.hold = True
            head = asyncio.create_task(runner.submit(0))
            await until(lambda: len(model.calls) == 1)
            short = asyncio.create_task(runner.submit(2, timeout=30))  # real seconds
            ok = asyncio.create_task(runner.submit(3, timeout=600))
            await until(lambda: runner.stats().stage("m").queued == 2)
            model.release()  # the batch of one measured: 41 s
            assert await head == 0
            with pytest.raises(fb.DeadlineExceeded, match="cannot meet its deadline in stage"):
                await short
            assert await ok == 30
            assert runner.stats().stage("m").expired == 1

    asyncio.run(main())
    assert model.calls == [[0], [3]]


def test_under_load_a_batch_is_held_until_one_more_would_miss_the_oldest_deadline() -> None:
    clock = FakeClock()
    model = SimModel(clock)

    async def main() -> None:
        async with _pipe(model).open(clock=clock) as runner:
            await _learn(runner, model)  # its last batch held 6: under load
            calls = len(model.calls)
            t0 = clock.now
            tasks = [asyncio.create_task(runner.submit(1000))]
            await until(lambda: runner.stats().stage("m").queued == 1)
            clock.now += 10.0  # the oldest has 10.2 s left: 1.1 x (2 + 0.5 x 15) > 10.2
            for x in range(1001, 1013):
                tasks.append(asyncio.create_task(runner.submit(x)))
                await until(lambda: runner.stats().stage("m").queued == len(tasks))
                assert len(model.calls) == calls  # still held: one more still fits
            tasks.append(asyncio.create_task(runner.submit(1013)))  # the 14th: go
            assert await asyncio.gather(*tasks) == [x * 10 for x in range(1000, 1014)]
            s = runner.stats().stage("m")
            assert s.batch_reasons["deadline"] == 1
            assert s.mean_batch_size_by_reason()["deadline"] == 14.0
            assert model.finished[1000] - t0 == pytest.approx(19.0)  # within the 20 s

    asyncio.run(main())
    assert model.calls[-1] == list(range(1000, 1014))


def test_a_lone_request_is_not_held_and_a_drain_ends_a_hold() -> None:
    clock = FakeClock()
    model = SimModel(clock)

    async def main() -> tuple[fb.Runner, asyncio.Task[Any]]:
        async with _pipe(model).open(clock=clock) as runner:
            assert await runner.submit(0) == 0  # its last batch held 1: dispatched at once
            assert await runner.submit(1) == 10
            head, rest = await _while_busy(runner, model, 2, list(range(3, 9)))
            await asyncio.gather(head, *rest)
            late = asyncio.create_task(runner.submit(11))  # under load now: held
            await until(lambda: runner.stats().stage("m").queued == 1)
            assert model.calls[-1] == list(range(3, 9))
        return runner, late

    runner, late = asyncio.run(main())
    assert late.result() == 110  # leaving the block drained: the held batch ran
    assert model.calls[-1] == [11]
    assert runner.stats().stage("m").batch_reasons == {"worker_free": 4, "drain": 1}


def test_cost_that_grows_faster_than_the_batch_is_detected_and_not_underestimated() -> None:
    def quadratic(n: int) -> float:  # padding or attention: time grows as n**2
        return 0.001 + 0.0001 * n * n

    m = CostModel()
    for i in range(100):
        n = 4 + (i * 5) % 45  # the stage has run batches of 4..48
        m.observe(n, quadratic(n))
    assert m.exponent is not None and m.exponent > 1.5
    line_only = int((0.2 - m.a) / m.b)  # the line alone: a batch that misses 0.2 s by 50%
    assert quadratic(line_only) > 1.4 * 0.2
    n = m.largest(0.2, 128)  # a batch that must finish within 0.2 s
    assert 35 <= n < line_only and quadratic(n) <= 0.2 * 1.1
    assert m.predict(64) > m.a + m.b * 64

    linear = CostModel()  # a line's log-log slope is at most 1: never flagged
    for i in range(100):
        n = 1 + (i * 7) % 64
        linear.observe(n, 0.004 + 0.0005 * n)
    assert linear.exponent is None
    proportional = CostModel()
    for n in (1, 2, 4, 8, 16, 32) * 5:
        proportional.observe(n, 0.001 * n)
    assert proportional.exponent is None


def test_several_workers_with_a_latency_target_answer_everything() -> None:
    clock = FakeClock()
    model = SimModel(clock, a=0.001, b=0.0001)
    opts = fb.Batch(max_size=8, latency_target=1e6)
    pipe = fb.Pipeline([fb.stage(model, name="m", batch=opts, concurrency=3)])

    async def main() -> tuple[list[Any], fb.StageStats]:
        async with pipe.open(clock=clock) as runner:
            out = [y async for y in runner.map(range(200))]
            return out, runner.stats().stage("m")

    out, s = asyncio.run(main())
    assert out == [x * 10 for x in range(200)]
    assert s.expired == 0 and sum(s.batch_reason_items.values()) == 200
    assert max(len(c) for c in model.calls) <= 8
    assert s.batch_time_fit is not None
