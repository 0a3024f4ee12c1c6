"""Utilization and capacity of a stage with ``concurrency=fb.Adaptive(...)``.

Such a stage has ``max`` worker slots but takes calls only up to its current
limit (the gate's total, or its replicas): its utilization and capacity are
over the worker-seconds that limit allowed (its integral over time), not
over ``max``. Driven on an injected clock that the test moves by hand.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import flowbatch as fb
from corehelpers import ManualClock, adaptive_api_then_store
from flowbatch.metrics import StageMetrics
from flowbatch.replicas import ReplicaScaler
from flowbatch.stagerun import StageRun
from polling import until


def test_an_adaptive_stage_busy_at_its_limit_is_fully_used_and_the_bottleneck() -> None:
    clock = ManualClock()

    async def main() -> None:
        hold = asyncio.Event()
        pipe = adaptive_api_then_store(hold)
        async with pipe.open(clock=clock) as runner:
            calls = [asyncio.create_task(runner.submit(0))]  # one of store's 2 workers busy
            try:
                await until(lambda: runner.stats().stage("store").in_flight == 1)
                calls += [asyncio.create_task(runner.submit(x)) for x in (100, 101, 102)]
                await until(lambda: runner.stats().stage("api").in_flight == 2)  # 102 waits
                clock.now += 10.0
                st = runner.stats()
                a = st.stage("api")
                assert (a.concurrency_limit, a.workers, a.queued) == (2, 16, 1)
                assert a.utilization == pytest.approx(1.0)  # 2 busy of 2, not of 16
                assert st.stage("store").utilization == pytest.approx(0.5)  # fixed: 1 of 2
                assert st.bottleneck == "api"
                assert st.backlog_per_replica == pytest.approx(4 / 2)  # per worker of its limit
                assert a.worker_seconds == pytest.approx(20.0)  # 2 allowed x 10 s
                assert a.mean_limit == pytest.approx(2.0)
                assert st.stage("store").worker_seconds is None
                # The recent figures (top, bench, the dashboard) say the same.
                clock.now += 5.0
                recent = runner.stats().since(st)
                assert recent.stage("api").worker_seconds == pytest.approx(10.0)
                assert recent.stage("api").utilization == pytest.approx(1.0)
                assert recent.bottleneck == "api"
            finally:
                hold.set()  # a failed check must not leave the drain waiting
            assert sorted(await asyncio.gather(*calls)) == [0, 100, 101, 102]

    asyncio.run(main())


def test_the_limit_is_integrated_over_time_for_utilization_and_capacity() -> None:
    m = StageMetrics("s", "async", 16)
    m.limit = 4
    m.opened(100.0)
    m.set_limit(8, 110.0)  # 4 for 10 s
    m.service.buf.extend([1.0] * 60)  # 60 busy seconds
    m.done = 120
    st = m.snapshot(now=120.0, elapsed=20.0, queued=0)  # then 8 for 10 s
    assert st.worker_seconds == pytest.approx(40.0 + 80.0)
    assert st.mean_limit == pytest.approx(6.0)
    assert st.utilization == pytest.approx(60.0 / 120.0)
    # 2 items per busy second per worker, times the 6 workers it had on average (not 16)
    assert st.capacity == pytest.approx(120 / 60 * 6)
    m.set_limit(2, 130.0)  # 8 for 10 s more, then 2
    m.service.buf.extend([1.0] * 30)
    m.done = 150
    later = m.snapshot(now=140.0, elapsed=40.0, queued=0)
    assert later.worker_seconds == pytest.approx(120.0 + 80.0 + 20.0)
    recent = later.since(st, 20.0)
    assert recent.worker_seconds == pytest.approx(100.0)
    assert recent.mean_limit == pytest.approx(5.0)
    assert recent.utilization == pytest.approx(30.0 / 100.0)
    assert recent.capacity == pytest.approx(30 / 30 * 5)


def test_a_fixed_stage_is_measured_over_its_workers_as_before() -> None:
    m = StageMetrics("s", "thread", 4)
    m.opened(0.0)
    m.service.buf.extend([1.0] * 20)
    m.done = 20
    st = m.snapshot(now=10.0, elapsed=10.0, queued=0)
    assert st.worker_seconds is None and st.mean_limit is None
    assert st.utilization == pytest.approx(20.0 / 40.0)
    assert st.capacity == pytest.approx(20 / 20 * 4)


class Resizable(fb.Executor):
    """An executor whose replica count ``resize(n)`` sets at once."""

    replicas = 1

    def resize(self, n: int) -> None:
        self.replicas = n

    async def start(self, stage: Any) -> None:
        pass

    async def call(self, arg: Any, timeout: float | None, carrier: Any = None) -> Any:
        return arg

    async def stop(self) -> None:
        pass


def test_replicas_set_by_the_scaler_are_integrated_on_the_runners_clock() -> None:
    clock = ManualClock()
    spec = fb.stage(
        lambda x: x, name="e", executor=Resizable(), concurrency=fb.Adaptive(min=1, max=4)
    )
    sr = StageRun(spec, 8, None, clock)
    sr.metrics.opened(clock())
    scaler = ReplicaScaler(sr, clock)
    clock.now += 10.0  # 1 replica for 10 s
    asyncio.run(scaler.apply(3))
    clock.now += 10.0  # then 3 for 10 s
    st = sr.metrics.snapshot(clock(), 20.0, 0)
    assert (st.concurrency_limit, st.workers) == (3, 4)
    assert st.worker_seconds == pytest.approx(10.0 + 30.0)
    assert st.mean_limit == pytest.approx(2.0)
