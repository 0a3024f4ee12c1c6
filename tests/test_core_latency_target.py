"""The admission controller (flowbatch/admission.py) on a fake clock, against a
simulated batched service; and ``pipe.open(latency_target=...)``.

The simulation: ``workers`` replicas, each taking up to ``max_size`` waiting
items at once (first come, first served) as soon as it is free, a batch of
``n`` taking ``a + b * n`` seconds. Requests arrive open loop (exponential
gaps from a seeded generator: deterministic) or closed loop (each client
sends again when answered, or a moment after a refusal); past the limit they
are refused at once. The controller is updated every 0.25 s of simulated
time, as the runner does.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest

import flowbatch as fb
from flowbatch.admission import (
    BACKOFF,
    TARGET_FLOOR,
    TARGET_MULTIPLE,
    AdmissionController,
    auto_target,
    floor_limit,
)

TICK = 0.25


@dataclass
class Service:
    """The simulated batched service and its figures since ``reset``."""

    workers: int = 2
    max_size: int = 64
    a: float = 0.02  # seconds per batch
    b: float = 0.002  # seconds per item
    queue: deque[float] = field(default_factory=deque)  # admission times
    busy_until: list[float] = field(default_factory=list)
    done: list[tuple[float, float]] = field(default_factory=list)  # (answer time, latency)
    running: list[tuple[float, int, list[float]]] = field(default_factory=list)  # heap

    def __post_init__(self) -> None:
        self.busy_until = [0.0] * self.workers

    @property
    def capacity(self) -> float:
        """Items per second at full batches."""
        return self.workers * self.max_size / (self.a + self.b * self.max_size)

    @property
    def batch_time(self) -> float:
        return self.a + self.b * self.max_size

    def in_flight(self) -> int:
        return len(self.queue) + sum(len(r[2]) for r in self.running)

    def advance(self, now: float) -> list[tuple[float, float]]:
        """Run the service up to ``now``; return (answer time, latency) of what finished."""
        out: list[tuple[float, float]] = []
        while True:
            # the next event: a batch finishing, or a free worker taking what waits
            t_done = self.running[0][0] if self.running else math.inf
            free = min(range(self.workers), key=lambda i: self.busy_until[i])
            t_start = max(self.busy_until[free], self.queue[0]) if self.queue else math.inf
            if min(t_done, t_start) > now:
                break
            if t_done <= t_start:
                end, _, items = heapq.heappop(self.running)
                out.extend((end, end - t0) for t0 in items)
                continue
            n = 0
            while n < self.max_size and n < len(self.queue) and self.queue[n] <= t_start:
                n += 1
            items = [self.queue.popleft() for _ in range(n)]
            end = t_start + self.a + self.b * n
            self.busy_until[free] = end
            heapq.heappush(self.running, (end, id(items), items))
        self.done.extend(out)
        return out


@dataclass
class Run:
    admitted: int = 0
    refused: int = 0
    limits: list[tuple[float, int]] = field(default_factory=list)


def simulate(
    ctl: AdmissionController,
    svc: Service,
    until: float,
    *,
    rate: float | None = None,
    clients: int | None = None,
    seed: int = 1,
    start: float = 0.0,
    run: Run | None = None,
) -> Run:
    """Drive ``svc`` through ``ctl``'s limit from ``start`` to ``until``."""
    rng = random.Random(seed)
    run = run if run is not None else Run()
    arrivals: list[float] = []  # heap of request times
    if rate is not None:
        t = start
        while t < until:
            t += rng.expovariate(rate)
            arrivals.append(t)
    if clients is not None:
        arrivals = [start + i * 1e-4 for i in range(clients)]
    heapq.heapify(arrivals)
    next_tick = start + TICK
    latencies: list[float] = []
    answered = 0
    refused = 0
    now = start
    while now < until:
        now = min(next_tick, arrivals[0] if arrivals else math.inf)
        for end, lat in svc.advance(now):
            latencies.append(lat)
            answered += 1
            if clients is not None:
                heapq.heappush(arrivals, end)  # the client sends again
        if arrivals and arrivals[0] <= now:
            t = heapq.heappop(arrivals)
            if svc.in_flight() < ctl.limit:
                svc.queue.append(t)
                run.admitted += 1
                svc.advance(t)
            else:
                run.refused += 1
                refused += 1
                if clients is not None:
                    heapq.heappush(arrivals, t + 0.05)  # a refused client retries soon
            continue
        if now >= next_tick:
            limit = ctl.update(
                now, latencies, answered, svc.in_flight(), refused=refused,
                service_time=svc.batch_time,  # the runner always passes it
            )
            run.limits.append((now, limit))
            latencies, answered, refused = [], 0, 0
            next_tick += TICK
    return run


def p99(svc: Service, since: float, until: float = math.inf) -> float:
    lats = sorted(lat for t, lat in svc.done if since <= t < until)
    assert len(lats) >= 100, "too few answers to read a p99"
    return lats[math.ceil(0.99 * len(lats)) - 1]


def goodput(svc: Service, since: float, until: float) -> float:
    return sum(1 for t, _ in svc.done if since <= t < until) / (until - since)


def test_at_twice_the_capacity_p99_stays_under_the_target_at_full_throughput() -> None:
    svc = Service()
    target = 0.5
    ctl = AdmissionController(target, floor=256, ceiling=100_000)
    run = simulate(ctl, svc, until=40.0, rate=2 * svc.capacity)
    assert run.refused > 0.3 * (run.admitted + run.refused)  # half the load is refused
    assert p99(svc, since=10.0) < target
    assert goodput(svc, 10.0, 40.0) >= 0.95 * svc.capacity
    # the limit settled above the floor, near Little's law: capacity * target
    settled = [lim for t, lim in run.limits if t >= 10.0]
    assert min(settled) >= ctl.floor
    assert max(settled) <= svc.capacity * target


def test_growth_is_capped_by_littles_law_where_latency_answers_late() -> None:
    # A slow model (0.84 s a full batch) and the auto target's shape (4 batch
    # times): the floor is half of capacity * target, and an item's latency
    # is seen 3 s after its admission. Additive growth alone ran past the
    # target (p99 5.6 s, limit up to 854); capped at 0.8 * X * target it stays.
    svc = Service(a=0.2, b=0.01)
    target = 4 * svc.batch_time
    ctl = AdmissionController(target, floor=256, ceiling=1024)
    run = simulate(ctl, svc, until=60.0, rate=2 * svc.capacity)
    assert p99(svc, since=0.0) < target
    assert max(lim for _, lim in run.limits) <= svc.capacity * target
    assert goodput(svc, 20.0, 60.0) >= 0.95 * svc.capacity


def test_without_a_limit_the_same_overload_misses_the_target() -> None:
    # The yardstick for the test above: the service alone cannot keep the p99.
    svc = Service()
    ctl = AdmissionController(0.5, floor=100_000, ceiling=100_000)
    simulate(ctl, svc, until=20.0, rate=2 * svc.capacity)
    assert p99(svc, since=10.0) > 5.0


def test_below_capacity_nothing_is_refused_once_measured() -> None:
    # Open loop at 80% of capacity, a target the service meets: never throttled.
    svc = Service()
    ctl = AdmissionController(0.5, floor=256, ceiling=100_000)
    run = simulate(ctl, svc, until=30.0, rate=0.8 * svc.capacity)
    assert run.refused == 0
    assert goodput(svc, 5.0, 30.0) >= 0.95 * 0.8 * svc.capacity


def test_a_closed_loop_the_service_keeps_up_with_is_admitted_whole() -> None:
    # 400 clients: more than the floor (256), fewer than capacity * target
    # (about 865/s * 1 s): after a few refusals at the start, none.
    svc = Service()
    ctl = AdmissionController(1.0, floor=256, ceiling=100_000)
    run = simulate(ctl, svc, until=10.0, clients=400)
    first = run.refused
    assert first > 0  # the limit starts at the floor
    simulate(ctl, svc, until=30.0, clients=None, start=10.0, run=run)  # idle a while
    svc2_done = len(svc.done)
    run2 = simulate(ctl, svc, until=40.0, clients=400, start=30.0)
    assert run2.refused == 0  # the limit learned in use is held while idle
    assert len(svc.done) > svc2_done
    assert goodput(svc, 32.0, 40.0) >= 0.9 * svc.capacity


def test_the_floor_closed_loop_is_never_refused() -> None:
    # 256 clients = two full batches per replica: admitted from the first request.
    svc = Service()
    ctl = AdmissionController(0.5, floor=floor_limit([fb.stage(
        lambda xs: xs, name="m", batch=fb.Batch(max_size=64), concurrency=2)]), ceiling=4096)
    assert ctl.floor == 256
    run = simulate(ctl, svc, until=20.0, clients=256)
    assert run.refused == 0


def test_a_step_change_of_service_rate_is_followed() -> None:
    svc = Service()
    target = 1.0
    ctl = AdmissionController(target, floor=256, ceiling=100_000)
    run = simulate(ctl, svc, until=20.0, rate=2 * svc.capacity, seed=1)
    fast = svc.capacity
    high = max(lim for t, lim in run.limits if t >= 10.0)
    # the model slows to half its speed (a neighbour took the GPU)
    svc.a, svc.b = 2 * svc.a, 2 * svc.b
    slow = svc.capacity
    run = simulate(ctl, svc, until=40.0, rate=2 * fast, seed=2, start=20.0, run=run)
    assert p99(svc, since=30.0, until=40.0) < target
    assert goodput(svc, 30.0, 40.0) >= 0.9 * slow
    assert max(lim for t, lim in run.limits if t >= 30.0) < BACKOFF * high
    # and back to full speed: the limit grows again, goodput with it
    svc.a, svc.b = svc.a / 2, svc.b / 2
    simulate(ctl, svc, until=60.0, rate=2 * fast, seed=3, start=40.0, run=run)
    assert goodput(svc, 50.0, 60.0) >= 0.95 * fast
    assert p99(svc, since=50.0, until=60.0) < target


def test_an_auto_target_is_a_multiple_of_the_service_time() -> None:
    svc = Service()
    ctl = AdmissionController("auto", floor=256, ceiling=100_000)
    assert ctl.target == 0.0
    run = simulate(ctl, svc, until=30.0, rate=2 * svc.capacity)
    assert ctl.target == pytest.approx(TARGET_MULTIPLE * svc.batch_time)
    assert p99(svc, since=10.0) < ctl.target
    assert goodput(svc, 10.0, 30.0) >= 0.9 * svc.capacity
    assert run.refused > 0
    assert auto_target(0.001) == TARGET_FLOOR


def test_without_a_service_time_an_auto_target_holds_the_floor() -> None:
    ctl = AdmissionController("auto", floor=8, ceiling=64)
    for i in range(1, 40):
        assert ctl.update(i * TICK, [5.0] * 30, 30, in_flight=8, refused=3) == 8
    assert ctl.target == 0.0


def test_an_unreachable_target_keeps_the_floor_not_less() -> None:
    # One batch takes longer than the target: the floor keeps the model fed.
    svc = Service(a=0.3)
    ctl = AdmissionController(0.2, floor=256, ceiling=100_000)
    simulate(ctl, svc, until=20.0, rate=2 * svc.capacity)
    assert ctl.limit == 256
    assert goodput(svc, 5.0, 20.0) >= 0.9 * svc.capacity


def test_a_target_the_floor_cannot_meet_is_marked_and_a_met_one_is_not() -> None:
    svc = Service(a=0.3)  # a full batch takes 0.43 s; the target is 0.2 s
    ctl = AdmissionController(0.2, floor=256, ceiling=100_000)
    simulate(ctl, svc, until=20.0, rate=2 * svc.capacity)
    assert ctl.limit == ctl.floor
    assert ctl.unmet_since is not None and ctl.unmet_since < 5.0  # out of reach since early on
    met = AdmissionController(10.0, floor=256, ceiling=100_000)
    simulate(met, Service(a=0.3), until=20.0, rate=2 * svc.capacity)
    assert met.unmet_since is None


def test_the_runner_warns_once_a_target_stays_out_of_reach_at_the_floor(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from flowbatch.admission import UNMET_WARN_AFTER

    t = [0.0]

    def model(xs: list[Any]) -> list[Any]:
        t[0] += 0.05  # each batch takes 50 ms of the fake clock; the target is 10 ms
        return xs

    pipe = fb.Pipeline([fb.stage(model, name="m", batch=fb.Batch(max_size=4))], name="slow")

    async def main() -> None:
        async with pipe.open(latency_target=0.01, clock=lambda: t[0]) as runner:
            adm = runner.admission
            assert adm is not None
            adm.tick(t[0])
            while t[0] < 2 * UNMET_WARN_AFTER:
                for i in range(20):  # one second of answers, each 5x the target
                    await runner.submit(i)
                adm.tick(t[0])
            assert adm.controller.unmet_since is not None

    with caplog.at_level("WARNING", logger="flowbatch"):
        asyncio.run(main())
    warned = [r.getMessage() for r in caplog.records if "is not met even at the floor" in r.getMessage()]
    assert len(warned) == 1  # once, not every tick
    assert "pipeline 'slow'" in warned[0] and "floor of 8 items" in warned[0]


def test_retry_after_is_the_time_to_drain_what_is_in_flight() -> None:
    ctl = AdmissionController(1.0, floor=4, ceiling=1000)
    assert ctl.retry_after(100) is None  # nothing measured yet
    ctl.update(0.0, [], 0, 0)
    ctl.update(1.0, [0.1] * 50, 50, in_flight=10)
    assert ctl.throughput == 50.0
    assert ctl.retry_after(10) == 1  # 0.2 s: at least 1
    assert ctl.retry_after(120) == 3  # 2.4 s, rounded up
    assert ctl.retry_after(0) == 1


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"target": 0, "floor": 1, "ceiling": 2}, "seconds > 0"),
        ({"target": -1.0, "floor": 1, "ceiling": 2}, "seconds > 0"),
        ({"target": float("nan"), "floor": 1, "ceiling": 2}, "seconds > 0"),
        ({"target": "fast", "floor": 1, "ceiling": 2}, "'auto'"),
        ({"target": 1.0, "floor": 0, "ceiling": 2}, "floor must be an int >= 1"),
        ({"target": 1.0, "floor": 4, "ceiling": 2}, r"ceiling \(2\) must be >= floor \(4\)"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises((ValueError, TypeError), match=error):
        AdmissionController(**kwargs)


def test_floor_limit_follows_the_stage_shapes() -> None:
    def model(xs: list[Any]) -> list[Any]:
        return xs

    def prep(x: Any) -> Any:
        return x

    batched = fb.stage(model, name="model", batch=fb.Batch(max_size=64), concurrency=2)
    assert floor_limit([batched]) == 256  # a batch running and one waiting, per replica
    assert floor_limit([fb.stage(prep, name="prep"), batched]) == 256
    assert floor_limit([fb.stage(prep, name="prep")]) == 4  # at least MIN_LIMIT
    assert floor_limit([fb.stage(prep, name="prep", concurrency=4)]) == 8


# --------------------------------------------------------------- the runner


def test_open_with_a_latency_target_resizes_the_limiter_and_reports_it() -> None:
    t = [0.0]

    def model(xs: list[Any]) -> list[Any]:
        t[0] += 0.01  # each batch takes 10 ms of the fake clock
        return xs

    pipe = fb.Pipeline([fb.stage(model, name="m", batch=fb.Batch(max_size=4))])

    async def main() -> None:
        async with pipe.open(latency_target=0.5, clock=lambda: t[0]) as runner:
            assert runner.limiter is not None and runner.admission is not None
            s = runner.stats()
            assert s.in_flight_limit == 8 and s.latency_target == 0.5  # the floor: 2 * 4
            assert [await runner.submit(i) for i in range(3)] == [0, 1, 2]
            got = await asyncio.gather(*(runner.submit(i) for i in range(40)))
            assert got == list(range(40))
        assert runner.stats().completed == 43

    asyncio.run(main())


def test_open_refuses_a_target_with_a_fixed_limit_and_bad_targets() -> None:
    pipe = fb.Pipeline([fb.stage(lambda x: x, name="f")])
    with pytest.raises(ValueError, match="max_in_flight.*latency_target|latency_target.*max_in"):
        pipe.open(max_in_flight=4, latency_target=1.0)
    with pytest.raises(ValueError, match="seconds > 0"):
        pipe.open(latency_target=0)
    with pytest.raises(TypeError, match="'auto'"):
        pipe.open(latency_target="soon")  # type: ignore[arg-type]


def test_without_a_target_stats_show_the_fixed_limit_or_none() -> None:
    pipe = fb.Pipeline([fb.stage(lambda x: x, name="f")])

    async def main() -> None:
        async with pipe.open(max_in_flight=7) as runner:
            assert runner.admission is None
            s = runner.stats()
            assert s.in_flight_limit == 7 and s.latency_target is None
        async with pipe.open() as runner:
            s = runner.stats()
            assert s.in_flight_limit is None and s.latency_target is None

    asyncio.run(main())


def test_the_runner_feeds_its_controller_and_resizes_the_limiter() -> None:
    t = [0.0]
    gate: list[asyncio.Event] = []

    async def model(xs: list[Any]) -> list[Any]:
        t[0] += 0.05  # each batch takes 50 ms of the fake clock
        if "hold" in xs:
            await gate[0].wait()
        return xs

    pipe = fb.Pipeline([fb.stage(model, name="m", batch=fb.Batch(max_size=4))])

    async def main() -> None:
        gate.append(asyncio.Event())
        async with pipe.open(latency_target=10.0, clock=lambda: t[0]) as runner:
            adm, limiter = runner.admission, runner.limiter
            assert adm is not None and limiter is not None and limiter.total == 8
            adm.tick(t[0])
            for i in range(24):  # 1.2 s of answers, each far under the target
                assert await runner.submit(i) == i
            held = [runner.submit_nowait("hold") for _ in range(8)]
            try:
                with pytest.raises(fb.Overloaded, match="never below 8"):
                    runner.submit_nowait("refused")
                adm.tick(t[0])  # the limit is in use, p99 far under the target: it grows
                ctl = adm.controller
                assert ctl.throughput == pytest.approx(24 / 1.2)
                assert 0 < ctl.p99 < 1.0
                assert limiter.total == ctl.limit > 8
                assert runner.stats().in_flight_limit == ctl.limit
                assert adm.retry_after() == 1  # 8 in flight at 20 answers/s: 0.4 s
                held.append(runner.submit_nowait("hold"))  # admitted now
            finally:
                gate[0].set()
            assert await asyncio.gather(*held) == ["hold"] * 9

    asyncio.run(main())


def test_an_auto_target_counts_a_slow_calls_time_not_the_mean() -> None:
    t = [0.0]

    def model(xs: list[str]) -> list[str]:
        # a batch of long texts takes 9x one of short texts (1 in 5 is long)
        t[0] += 0.09 if xs[0] == "long" else 0.01
        return xs

    pipe = fb.Pipeline([fb.stage(model, name="m", batch=fb.Batch(max_size=4))])

    async def main() -> None:
        async with pipe.open(latency_target="auto", clock=lambda: t[0]) as runner:
            adm = runner.admission
            assert adm is not None
            adm.tick(t[0])
            for i in range(40):  # one at a time: 40 batches of one
                await runner.submit("long" if i % 5 == 0 else "short")
            adm.tick(t[0])
            # the mean call is 26 ms; the 90th percentile, a long batch, 90 ms
            # (read from histogram buckets at most 25% wide)
            assert 4 * 0.07 < adm.controller.target <= TARGET_MULTIPLE * 0.09 * 1.25

    asyncio.run(main())


def test_an_unbatched_pipeline_gets_an_auto_target_too() -> None:
    t = [0.0]

    def f(x: int) -> int:
        t[0] += 0.04
        return x

    pipe = fb.Pipeline([fb.stage(f, name="f")])

    async def main() -> None:
        async with pipe.open(latency_target="auto", clock=lambda: t[0]) as runner:
            adm = runner.admission
            assert adm is not None
            adm.tick(t[0])
            assert runner.stats().latency_target is None  # nothing measured yet
            for i in range(20):
                assert await runner.submit(i) == i
            adm.tick(t[0])
            target = runner.stats().latency_target
            assert target == pytest.approx(TARGET_MULTIPLE * 0.04, rel=0.25)

    asyncio.run(main())


def test_the_limit_stays_between_floor_and_ceiling() -> None:
    ctl = AdmissionController(10.0, floor=4, ceiling=16)
    ctl.update(0.0, [], 0, 0)
    # fast answers, far under the target, the limit in use: it grows, to the ceiling only
    for i in range(1, 20):
        ctl.update(i * TICK, [0.01] * 100, 1000, in_flight=ctl.limit, refused=5)
    assert ctl.limit == 16
    # slow answers, over the target: it falls (once per latency: only items
    # admitted after a decrease judge it), to the floor only
    for i in range(20, 400):
        ctl.update(i * TICK, [12.0] * 100, 1, in_flight=ctl.limit)
    assert ctl.limit == 4
    assert 4 <= ctl.decreases <= 8


def test_admit_many_past_the_floor_of_an_adaptive_limit_is_refused_with_a_reason() -> None:
    pipe = fb.Pipeline([fb.stage(lambda x: x, name="f")])  # the floor: 4

    async def main() -> None:
        async with pipe.open(latency_target=1.0) as runner:
            with pytest.raises(ValueError, match="5 items can never be admitted at once: .*"
                               "never below 4"):
                await runner.admit_many(list(range(5)))
            futs = await runner.admit_many(list(range(4)))
            assert await asyncio.gather(*futs) == [0, 1, 2, 3]

    asyncio.run(main())
