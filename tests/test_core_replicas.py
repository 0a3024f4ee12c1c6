"""Replicas that follow the load: the controller on a fake clock, the process
executor's resize, and a runner whose process stage grows and shrinks."""

from __future__ import annotations

import asyncio
import math
import os
import random
import threading
import time
from collections.abc import AsyncIterator
from itertools import pairwise
from typing import Any

import pytest

import flowbatch as fb
from flowbatch.processes import ProcessExecutor
from flowbatch.prometheus import render
from flowbatch.replicas import DEFAULT_REPLICA_RULE, ReplicaController, ReplicaRule, can_resize
from polling import until

# ------------------------------------------------------------ the controller


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Simulated:
    """A stage of ``replicas`` servers of ``rate`` items/s each, fed ``load``
    items/s (a fluid model), observed every ``dt`` seconds by a controller
    whose wishes are carried out at once."""

    def __init__(self, ctl: ReplicaController, clock: FakeClock, rate: float = 100.0) -> None:
        self.ctl = ctl
        self.clock = clock
        self.rate = rate
        self.backlog = 0.0
        self.history: list[tuple[float, int]] = []

    def run(self, seconds: float, load: float, noise: float = 0.0, dt: float = 0.5,
            rng: random.Random | None = None) -> None:
        for _ in range(round(seconds / dt)):
            self.clock.now += dt
            offered = load * (1 + noise * (2 * rng.random() - 1)) if rng else load
            n = self.ctl.replicas
            work = self.backlog + offered * dt
            done = min(work, n * self.rate * dt)
            self.backlog = work - done
            want = self.ctl.observe(
                backlog=int(self.backlog), busy=done / (self.rate * dt), throughput=done / dt
            )
            if want != n:
                self.ctl.resized(want)
            self.history.append((self.clock.now, self.ctl.replicas))

    def first_time(self, after: float, replicas: int) -> float:
        return next(t for t, n in self.history if t > after and n == replicas) - after


def controller(lo: int = 1, hi: int = 4, start: int = 1, **rule: Any) -> tuple[
    ReplicaController, FakeClock
]:
    clock = FakeClock()
    return ReplicaController(lo, hi, start, ReplicaRule(**rule), clock), clock


def test_replicas_follow_a_load_step_up_and_back_down() -> None:
    ctl, clock = controller(hi=4)
    sim = Simulated(ctl, clock)
    t0 = clock.now
    sim.run(30, load=40)  # 10% of 4 x 100/s
    assert ctl.replicas == 1
    up = clock.now
    sim.run(60, load=400)  # 100%
    assert ctl.replicas == 4
    assert sim.first_time(up, 4) <= 10.0
    down = clock.now
    sim.run(60, load=40)  # back to 10%
    assert ctl.replicas == 1
    # ~5 s to work off the backlog built while growing, then down_after (5 s).
    assert sim.first_time(down, 1) <= 11.0
    # Each direction in few steps, never back and forth.
    counts = [n for t, n in sim.history if t > t0]
    ups = [b for a, b in pairwise(counts) if b > a]
    downs = [b for a, b in pairwise(counts) if b < a]
    assert 1 <= len(ups) <= 3 and 1 <= len(downs) <= 3
    peak = counts.index(4)  # up, then down: never a step against the load
    assert counts[: peak + 1] == sorted(counts[: peak + 1])
    assert counts[peak:] == sorted(counts[peak:], reverse=True)


def test_the_step_up_is_sized_by_the_arrival_rate() -> None:
    ctl, clock = controller(hi=8)
    sim = Simulated(ctl, clock)
    sim.run(3, load=380)  # 3.8 replicas' worth while one runs
    grown = [n for _, n in sim.history if n > 1]
    assert grown and grown[0] == 2  # at most doubling per step
    sim.run(30, load=380)
    # Enough for the load and to work off the backlog built meanwhile; not max.
    assert 4 <= ctl.replicas <= 6 and sim.backlog == 0
    settled = ctl.replicas
    sim.run(120, load=380)
    assert ctl.replicas == settled  # steady load, steady count


@pytest.mark.parametrize("load", [170.0, 60.0])
def test_no_thrash_under_noisy_load_near_a_threshold(load: float) -> None:
    # 170/s on 2 x 100/s sits at the up threshold (85%); 60/s is where one
    # replica fewer would sit at the down threshold (60%).
    ctl, clock = controller(hi=4, start=2)
    sim = Simulated(ctl, clock)
    sim.run(600, load=load, noise=0.15, rng=random.Random(7))
    counts = [n for _, n in sim.history]
    steps = [b - a for a, b in pairwise(counts) if b != a]
    assert len(steps) <= 1, steps  # at most one move, never back


def test_bounds_are_kept() -> None:
    ctl, clock = controller(lo=2, hi=3, start=2)
    sim = Simulated(ctl, clock)
    sim.run(60, load=400)  # 4 replicas' worth
    assert ctl.replicas == 3 and max(n for _, n in sim.history) == 3
    sim.run(120, load=0)
    assert ctl.replicas == 2 and min(n for _, n in sim.history) == 2
    ctl.resized(9)
    assert ctl.replicas == 3
    with pytest.raises(ValueError, match="outside"):
        ReplicaController(1, 2, 3)
    with pytest.raises(ValueError, match="min <= max"):
        ReplicaController(3, 2, 2)


def test_rule_values_are_checked() -> None:
    with pytest.raises(ValueError, match="must be below up_util"):
        ReplicaRule(up_util=0.5, down_util=0.6)
    with pytest.raises(ValueError, match="tick must be > 0"):
        ReplicaRule(tick=0)
    with pytest.raises(ValueError, match="up_util must be a number in"):
        ReplicaRule(up_util=1.5)


def test_cooldown_after_a_change_and_a_break_in_the_load_resets_the_wait() -> None:
    ctl, clock = controller(hi=4, up_after=2.0, cooldown=5.0)

    def tick(busy: float, backlog: int) -> int:
        clock.now += 0.5
        want = ctl.observe(backlog=backlog, busy=busy, throughput=100.0 * busy)
        if want != ctl.replicas:
            ctl.resized(want)
        return ctl.replicas

    for _ in range(3):  # saturated for 1.5 s: not yet
        assert tick(1.0, 50) == 1
    assert tick(0.5, 0) == 1  # a break: the wait starts again
    for _ in range(4):
        assert tick(1.0, 50) == 1
    assert tick(1.0, 50) == 2  # saturated for 2 s
    for _ in range(9):  # 4.5 s of cool-down: saturated, no change
        assert tick(2.0, 500) == 2
    for _ in range(6):
        tick(2.0, 500)
    assert ctl.replicas > 2


def test_a_backlog_that_drains_by_itself_adds_nothing() -> None:
    def wishes(backlogs: list[int]) -> list[int]:
        ctl, clock = controller(hi=4, up_after=2.0)
        out = []
        for b in backlogs:
            clock.now += 0.5
            out.append(ctl.observe(backlog=b, busy=1.0, throughput=300.0))
        return out

    # Saturated with a backlog for 2 s, but it falls 200/s and is nearly gone.
    assert wishes([420, 320, 220, 120, 20, 0, 0]) == [1] * 7
    # The same backlog, standing still: one more replica.
    assert wishes([420] * 5)[-1] == 2


# ------------------------------------------------------- process executor


def worker_pid(x: int) -> int:
    return os.getpid()


def spin(x: int) -> int:
    """A CPU call of about 10 ms."""
    end = time.perf_counter() + 0.01
    while time.perf_counter() < end:
        pass
    return x * 2


def crash_on_13(x: int) -> int:
    if x == 13:
        os._exit(7)
    return x


class FailingSetup:
    def setup(self) -> None:
        if os.environ.get("FB_TEST_FAIL_SETUP") == "1":
            raise RuntimeError("no model here")

    def __call__(self, x: int) -> int:
        return x


def test_process_executor_grows_and_shrinks_between_its_bounds() -> None:
    st = fb.stage(worker_pid, executor="process", concurrency=fb.Adaptive(min=1, max=3))
    ex = ProcessExecutor(worker_pid, 3, "w")
    assert can_resize(ex)

    async def main() -> None:
        await ex.start(st)
        try:
            assert ex.replicas == 1 and len(ex._procs) == 1
            await ex.resize(3)
            assert ex.replicas == 3
            pids = set(await asyncio.gather(*(ex.call(i, None) for i in range(30))))
            assert len(pids) >= 2  # calls spread over the new workers
            procs = list(ex._procs)
            await ex.shrink()
            assert ex.replicas == 2
            gone = [p for p in procs if p.dead]
            assert len(gone) == 1 and not gone[0].process.is_alive()
            await ex.resize(1)
            assert ex.replicas == 1 and len(ex._procs) == 1
            assert ex.restarts == 0  # retired, not crashed
            with pytest.raises(ValueError, match=r"outside \[min=1, max=3\]"):
                await ex.resize(0)
            with pytest.raises(ValueError, match="fewest worker processes"):
                await ex.shrink()
            assert await ex.call(5, None) == next(iter(ex._procs)).process.pid
        finally:
            await ex.stop()

    asyncio.run(main())


def test_a_grow_whose_setup_fails_keeps_the_stage_running(monkeypatch: Any) -> None:
    st = fb.stage(FailingSetup(), executor="process", concurrency=fb.Adaptive(min=1, max=2))
    ex = ProcessExecutor(FailingSetup(), 2, "m")

    async def main() -> None:
        await ex.start(st)
        try:
            monkeypatch.setenv("FB_TEST_FAIL_SETUP", "1")  # the next spawn inherits it
            with pytest.raises(fb.PipelineError, match="no model here"):
                await ex.grow()
            assert ex.replicas == 1 and ex.restarts == 0
            assert await ex.call(4, None) == 4
        finally:
            await ex.stop()

    asyncio.run(main())


def test_a_crash_while_growing_fails_only_its_call() -> None:
    st = fb.stage(crash_on_13, executor="process", concurrency=fb.Adaptive(min=1, max=2))
    ex = ProcessExecutor(crash_on_13, 2, "c")

    async def main() -> None:
        await ex.start(st)
        try:
            grow = asyncio.ensure_future(ex.grow())
            got = await asyncio.gather(*(ex.call(i, None) for i in (12, 13, 14)),
                                       return_exceptions=True)
            await grow
            assert got[0] == 12 and got[2] == 14
            assert isinstance(got[1], fb.WorkerCrashed)
            assert ex.replicas == 2
            await until(lambda: ex.restarts == 1 and len(ex._procs) == 2)
            assert await ex.call(1, None) == 1
        finally:
            await ex.stop()

    asyncio.run(main())


# ------------------------------------------------------------- in a runner


def test_a_process_stage_grows_under_a_backlog_then_shrinks_when_idle() -> None:
    clock = FakeClock()
    pipe = fb.Pipeline([
        fb.stage(spin, name="cpu", executor="process", concurrency=fb.Adaptive(min=1, max=2))
    ])

    async def main() -> None:
        async with pipe.open(clock=clock) as runner:
            assert runner.stats().stage("cpu").replicas == 1
            grown = False

            async def source() -> AsyncIterator[int]:
                i = 0
                while not grown or i % 50:  # keep a backlog until it has grown
                    yield i
                    i += 1

            async def consume() -> list[int]:
                return [y async for y in runner.map(source(), window=8)]

            results = asyncio.ensure_future(consume())

            def advanced(replicas: int) -> bool:
                clock.now += 0.05  # the runner's clock: the scaler's seconds
                return runner.stats().stage("cpu").replicas == replicas

            await until(lambda: advanced(2), what="a second replica")
            grown = True
            out = await results
            assert out == [2 * i for i in range(len(out))]  # every item answered
            text = render({"p": runner}).decode()
            assert 'flowbatch_stage_replicas{pipeline="p",stage="cpu"} 2.0' in text
            # Idle now: after the quiet period the extra replica goes.
            await until(lambda: advanced(1), what="back to one replica")
            stats = runner.stats().stage("cpu")
            assert stats.restarts == 0 and stats.workers == 2
            assert await runner.submit(21) == 42

    asyncio.run(main())


class Blocking:
    """A batched thread stage whose calls wait until released."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = threading.Event()

    def __call__(self, xs: list[int]) -> list[int]:
        self.calls += 1
        self.release.wait(30)
        return xs


def test_a_batched_stage_runs_no_more_batches_than_its_gate_allows() -> None:
    fn = Blocking()
    pipe = fb.Pipeline([
        fb.stage(fn, name="b", executor="thread", batch=fb.Batch(max_size=2),
                 concurrency=fb.Adaptive(min=1, max=2))
    ])

    async def main() -> None:
        # A clock that stands still: the stage's replica scaler never moves the gate.
        async with pipe.open(clock=FakeClock()) as runner:
            sr = runner._stages[0]
            assert sr.scaler is not None and not sr.scaler.resizes
            gate = sr.gate
            assert gate is not None and gate.total == 1
            futs = [runner.submit_nowait(i) for i in range(4)]
            await until(lambda: fn.calls == 1 and gate.waiting == 1, what="one batch, one waiter")
            assert fn.calls == 1  # the second slot waits at the gate, not in a call
            gate.total = 2  # what a controller does when it allows one more
            await until(lambda: fn.calls == 2, what="the second batch")
            fn.release.set()
            assert sorted(await asyncio.gather(*futs)) == [0, 1, 2, 3]
            assert gate.borrowed == 0

    asyncio.run(main())


class Elastic(fb.Executor):
    """An executor whose replica count the runner sets with a plain ``resize(n)``
    (as Ray's is): it starts at its most, refuses more than ``cap``, and its
    calls wait until the test releases them."""

    def __init__(self, cap: int) -> None:
        self.replicas = 3
        self.cap = cap
        self.sizes: list[int] = []
        self.refused: list[int] = []
        self.running = 0
        self.release: asyncio.Event | None = None

    def resize(self, n: int) -> None:
        if n > self.cap:
            self.refused.append(n)
            raise ValueError(f"resize({n}) is over the cap of {self.cap}")
        self.sizes.append(n)
        self.replicas = n

    async def start(self, stage: Any) -> None:
        self.release = asyncio.Event()

    async def call(self, arg: Any, timeout: float | None, carrier: Any = None) -> Any:
        assert self.release is not None
        self.running += 1
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return arg

    async def stop(self) -> None:
        pass


def test_the_runner_drives_any_executor_that_can_resize(caplog: Any) -> None:
    clock = FakeClock()
    ex = Elastic(cap=2)
    pipe = fb.Pipeline([
        fb.stage(worker_pid, name="e", executor=ex, concurrency=fb.Adaptive(min=1, max=3))
    ])

    def advanced(cond: Any) -> Any:
        clock.now += 0.05
        return cond()

    async def main() -> None:
        async with pipe.open(clock=clock) as runner:
            await until(lambda: ex.sizes == [1], what="the executor set to Adaptive.start")
            futs = [runner.submit_nowait(i) for i in range(10)]
            await until(lambda: ex.running == 1)
            await until(lambda: advanced(lambda: ex.sizes[-1] == 2), what="a second replica")
            assert runner.stats().stage("e").replicas == 2
            await until(lambda: ex.running == 2, what="a second call in flight")
            # Still saturated: it asks for a third, which the executor refuses.
            await until(lambda: advanced(lambda: ex.refused), what="a refused resize")
            assert runner.stats().stage("e").replicas == 2 and runner._stages[0].gate.total == 2
            assert "could not resize to 3 replicas" in caplog.text
            assert ex.release is not None
            ex.release.set()
            assert await asyncio.gather(*futs) == list(range(10))
            await until(lambda: advanced(lambda: ex.sizes[-1] == 1), what="back to one")
            assert runner.stats().stage("e").replicas == 1

    asyncio.run(main())


@pytest.mark.parametrize(
    ("rule", "after_1s"),
    [
        (ReplicaRule(up_after=0.5, tick=0.01), [1, 2]),  # its own, shorter up_after
        (ReplicaRule(tick=0.01), [1]),  # the default up_after (2 s); a short tick
        (None, [1]),  # no rule given: DEFAULT_REPLICA_RULE
    ],
)
def test_a_stage_s_own_replica_rule_sets_when_a_replica_is_added(
    rule: ReplicaRule | None, after_1s: list[int]
) -> None:
    clock = FakeClock()
    ex = Elastic(cap=3)
    pipe = fb.Pipeline([
        fb.stage(worker_pid, name="e", executor=ex,
                 concurrency=fb.Adaptive(min=1, max=3, replicas=rule))
    ])

    async def main() -> None:
        async with pipe.open(clock=clock) as runner:
            sr = runner._stages[0]
            scaler = sr.scaler
            assert scaler is not None
            assert scaler.controller.rule is (rule if rule is not None else DEFAULT_REPLICA_RULE)
            await until(lambda: ex.sizes == [1], what="the executor set to Adaptive.start")
            futs = [runner.submit_nowait(i) for i in range(10)]
            await until(lambda: ex.running == 1 and len(sr.inq) > 0, what="a call and a backlog")
            t0 = clock.now

            async def observed_at(t: float) -> None:
                clock.now = t  # the scaler's next tick observes this time
                await until(lambda: scaler._t == t, what=f"a tick at +{t - t0:.1f} s")

            await observed_at(t0 + 0.1)  # saturated with a backlog from here
            await observed_at(t0 + 1.0)
            assert ex.sizes == after_1s
            await observed_at(t0 + 2.2)  # past the default up_after too
            assert ex.sizes == [1, 2]
            assert runner.stats().stage("e").replicas == 2
            assert ex.release is not None
            ex.release.set()
            assert await asyncio.gather(*futs) == list(range(10))

    asyncio.run(main())


def test_a_replica_rule_is_refused_where_it_cannot_apply() -> None:
    with pytest.raises(TypeError, match=r"Adaptive.replicas must be a flowbatch.ReplicaRule"):
        fb.Adaptive(min=1, max=4, replicas={"up_after": 1.0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"down_util \(0.9\) must be below up_util \(0.85\)"):
        fb.ReplicaRule(down_util=0.9)
    for bad in (-1.0, math.nan, math.inf):  # nan or inf: a rule that would never act
        with pytest.raises(ValueError, match="ReplicaRule.up_after must be a finite number >= 0"):
            fb.ReplicaRule(up_after=bad)
    rule = fb.ReplicaRule(up_after=1.0, down_after=30.0)
    # An unbatched stage on threads or async follows latency: no replicas to scale.
    with pytest.raises(fb.PipelineError, match="'t'.*thread workers has no replicas to scale"):
        fb.stage(worker_pid, name="t", executor="thread",
                 concurrency=fb.Adaptive(min=1, max=4, replicas=rule))

    async def call(x: int) -> int:
        return x

    with pytest.raises(fb.PipelineError, match="async workers has no replicas to scale"):
        fb.stage(call, concurrency=fb.Adaptive(min=1, max=4, replicas=rule))
    # Where the replicas follow the load, the rule is taken.
    for s in (
        fb.stage(worker_pid, executor="process", concurrency=fb.Adaptive(1, 4, replicas=rule)),
        fb.stage(Blocking(), executor="thread", batch=fb.Batch(max_size=2),
                 concurrency=fb.Adaptive(1, 4, replicas=rule)),
        fb.stage(worker_pid, executor=Elastic(cap=4), concurrency=fb.Adaptive(1, 4, replicas=rule)),
    ):
        assert s.adaptive is not None and s.adaptive.replicas is rule
    # Without a rule, an unbatched thread stage keeps its latency-driven limit.
    assert fb.stage(worker_pid, executor="thread", concurrency=fb.Adaptive(1, 4)).adaptive


def test_a_batched_thread_stage_lets_another_worker_in_under_a_backlog() -> None:
    # Threads cannot resize: all max workers are set up, and the count sets
    # how many take calls.
    fn = Blocking()
    clock = FakeClock()
    pipe = fb.Pipeline([
        fb.stage(fn, name="b", executor="thread", batch=fb.Batch(max_size=2),
                 concurrency=fb.Adaptive(min=1, max=2))
    ])

    async def main() -> None:
        async with pipe.open(clock=clock) as runner:

            def advanced() -> bool:
                clock.now += 0.05
                return runner.stats().stage("b").replicas == 2

            futs = [runner.submit_nowait(i) for i in range(6)]
            await until(lambda: fn.calls == 1)
            await until(advanced, what="a second worker let in")
            await until(lambda: fn.calls == 2, what="a second batch in flight")
            fn.release.set()
            assert sorted(await asyncio.gather(*futs)) == list(range(6))

    asyncio.run(main())


class PushesBackOnce(Elastic):
    """Its first call raises ``fb.Backpressure``; the others answer at once."""

    def __init__(self) -> None:
        super().__init__(cap=3)
        self.pushed = False

    async def call(self, arg: Any, timeout: float | None, carrier: Any = None) -> Any:
        if not self.pushed:
            self.pushed = True
            raise fb.Backpressure(retry_after=0.001)
        return arg


def test_backpressure_on_a_scaled_stage_leaves_its_replicas_alone() -> None:
    ex = PushesBackOnce()
    pipe = fb.Pipeline([
        fb.stage(worker_pid, name="e", executor=ex,
                 concurrency=fb.Adaptive(min=1, max=3, initial=2))
    ])

    async def main() -> None:
        async with pipe.open(clock=FakeClock()) as runner:  # a still clock: no ticks act
            await until(lambda: ex.sizes == [2], what="the executor set to Adaptive.start")
            assert await runner.submit(7) == 7  # pushed back once, then answered
            assert ex.pushed
            stats = runner.stats().stage("e")
            assert stats.replicas == 2 and runner._stages[0].gate.total == 2
            assert stats.backpressured == 1

    asyncio.run(main())
