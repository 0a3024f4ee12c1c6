"""Adaptive concurrency (flowbatch.adaptive.GradientLimit) and fb.Backpressure.

The controller is driven on a fake clock by a simulated service (a
discrete-event loop, no sleeps): calls are started while fewer than the
limit are in flight, and each takes ``base * max(1, in_flight / knee)``
seconds (with a little seeded jitter): below the knee the service answers in
``base``, past it calls queue. The end-to-end tests run a real pipeline
against an in-process service.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import pickle
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

import flowbatch as fb
from flowbatch.adaptive import DEFAULT_RETRY_AFTER, GradientLimit
from flowbatch.prometheus import render

BASE = 0.05  # the simulated service's latency below its knee (seconds)


@dataclass
class Sim:
    """A service with ``knee(t)`` parallel slots, driven by a controller on a fake clock."""

    ctl: GradientLimit
    knee: Callable[[float], int]
    #: calls started while ``pushback(t)`` is true answer Backpressure(retry_after)
    pushback: Callable[[float], bool] = lambda t: False
    retry_after: float = 1.0
    #: the most calls the client has to make at once (its own load)
    demand: int = 10**9
    t: float = 0.0
    done: int = 0
    trace: list[tuple[float, int]] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    pushes: list[float] = field(default_factory=list)
    _heap: list[tuple[float, int, float, bool]] = field(default_factory=list)
    _rnd: random.Random = field(default_factory=lambda: random.Random(7))
    _seq: int = 0

    def run(self, until: float) -> None:
        ctl, heap = self.ctl, self._heap
        while self.t < until:
            want = min(ctl.value, self.demand)
            while len(heap) < want and self.t >= ctl.resume_at:
                c = len(heap) + 1
                pushed = self.pushback(self.t)
                jitter = 1 + 0.1 * (self._rnd.random() - 0.5)
                lat = 0.001 if pushed else BASE * max(1.0, c / self.knee(self.t)) * jitter
                self._seq += 1
                heapq.heappush(heap, (self.t + lat, self._seq, lat, pushed))
                self.starts.append(self.t)
            if not heap:
                self.t = ctl.resume_at
                continue
            if ctl.resume_at > self.t and ctl.resume_at < heap[0][0] and len(heap) < want:
                self.t = ctl.resume_at  # the pause ends before the next answer
                continue
            end, _, lat, pushed = heapq.heappop(heap)
            self.t = end
            if pushed:
                self.pushes.append(end)
                ctl.backpressure(self.retry_after, now=end)
            else:
                self.done += 1
                ctl.sample(lat, len(heap) + 1, now=end)
            self.trace.append((end, ctl.value))

    def limits(self, start: float, end: float) -> list[int]:
        return [v for t, v in self.trace if start <= t < end]

    def settled(self, start: float, end: float) -> float:
        """The median limit over [start, end) (probes are brief dips)."""
        return statistics.median(self.limits(start, end))


def near(knee: int) -> tuple[float, float]:
    """Where the limit should settle for a knee: above it by the latency
    tolerance (1.25) and the queue allowance (sqrt), well below max (256)."""
    return knee, 1.25 * knee + 2 * math.sqrt(knee) + 2


def clock_never() -> float:
    raise AssertionError("the controller read its clock though `now` was given")


# ------------------------------------------------------------- controller


@pytest.mark.parametrize("knee", [8, 32, 64])
def test_the_limit_settles_near_the_knee_not_at_min_or_max(knee: int) -> None:
    ctl = GradientLimit(fb.Adaptive(min=1, max=256), clock=clock_never)
    sim = Sim(ctl, lambda t: knee)
    sim.run(30.0)
    counted = sim.done
    sim.run(60.0)
    lo, hi = near(knee)
    assert lo <= sim.settled(30.0, 60.0) <= hi, (knee, sim.settled(30.0, 60.0), ctl)
    # the service was kept busy: its knee's throughput, less a little for probes
    assert (sim.done - counted) / 30.0 >= 0.95 * knee / BASE
    # the baseline did not drift into the queue the allowance keeps (the probe)
    assert ctl.long_rtt < 1.5 * BASE


def test_the_limit_follows_a_step_change_of_the_knee() -> None:
    ctl = GradientLimit(fb.Adaptive(min=1, max=256))
    steps = {0.0: 32, 30.0: 8, 60.0: 64}
    sim = Sim(ctl, lambda t: steps[max(s for s in steps if s <= t)])
    sim.run(90.0)
    for start, knee in steps.items():
        lo, hi = near(knee)
        got = sim.settled(start + 15.0, start + 30.0)
        assert lo <= got <= hi, (knee, got)
    # after the knee rose to 64 the limit is at 90% of it within a few seconds
    reached = next(t for t, v in sim.trace if t >= 60.0 and v >= 0.9 * 64)
    assert reached - 60.0 <= 5.0
    # after it fell to 8 the limit is within its band within a few seconds
    fell = next(t for t, v in sim.trace if t >= 30.0 and v <= near(8)[1])
    assert fell - 30.0 <= 5.0


def test_backpressure_cuts_the_limit_at_once_pauses_and_recovers() -> None:
    ctl = GradientLimit(fb.Adaptive(min=1, max=256))
    sim = Sim(ctl, lambda t: 32, pushback=lambda t: 20.0 <= t < 25.0, retry_after=1.0)
    sim.run(20.0)
    before = ctl.value
    assert before >= 32
    sim.run(20.0 + 2 * BASE)  # the first answers after 20 s are 429s
    assert ctl.backpressured >= 1
    assert ctl.value <= 0.55 * before  # cut at once, not after a window
    # no call started during the pause the first 429 asked for
    first = sim.pushes[0]
    sim.run(25.0)
    assert not [t for t in sim.starts if first <= t < first + 1.0 - 1e-9]
    assert [t for t in sim.starts if first + 1.0 - 1e-9 <= t < first + 1.1]  # then resumed
    assert ctl.value < 8  # pushed back again after each pause: cut again
    sim.run(60.0)
    lo, hi = near(32)
    assert lo <= sim.settled(45.0, 60.0) <= hi


def test_each_429_episode_cuts_once_however_many_calls_answer_it() -> None:
    ctl = GradientLimit(fb.Adaptive(min=1, max=256, initial=64))
    now = 10.0
    for _ in range(40):  # 40 calls in flight all answer 429 within a millisecond
        ctl.backpressure(0.5, now=now)
        now += 0.000_025
    assert ctl.value == 32
    assert ctl.resume_at == pytest.approx(10.5, abs=0.01)
    ctl.backpressure(None, now=11.0)  # a new episode after the pause
    assert ctl.value == 16
    assert ctl.resume_at == pytest.approx(11.0 + DEFAULT_RETRY_AFTER)


def test_the_limit_is_held_when_the_stage_does_not_use_it() -> None:
    # The client only ever has 5 calls to make: no evidence to grow on, and a
    # slow service at 5 calls is no reason to shrink a limit not in use.
    for knee in (100, 2):
        ctl = GradientLimit(fb.Adaptive(min=1, max=256, initial=40))
        sim = Sim(ctl, lambda t, k=knee: k, demand=5)
        sim.run(30.0)
        assert ctl.windows > 20
        assert set(sim.limits(0.0, 30.0)) == {40}, knee


def test_a_timed_out_call_halves_the_limit_when_its_window_closes() -> None:
    ctl = GradientLimit(fb.Adaptive(min=1, max=256, initial=40), min_samples=8)
    for i in range(39):
        ctl.sample(BASE, 40, now=1.0 + i * 0.001)
    ctl.sample(5.0, 40, now=1.1, dropped=True)  # a timeout
    ctl.sample(BASE, 40, now=1.2)  # the 40th answer closes the window
    assert ctl.value == 20


def test_the_limit_stays_within_min_and_max() -> None:
    ctl = GradientLimit(fb.Adaptive(min=4, max=12))
    sim = Sim(ctl, lambda t: 64 if t < 20 else 1)
    sim.run(40.0)
    assert max(v for _, v in sim.trace) == 12
    assert min(v for _, v in sim.trace) == 4


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"smoothing": 0.0}, "smoothing must be in"),
        ({"tolerance": 0.9}, "tolerance must be >= 1"),
        ({"backoff": 1.0}, "backoff must be in"),
        ({"min_samples": 0}, "min_samples must be >= 1"),
        ({"probe_every": 1}, "probe_every must be >= 2"),
    ],
)
def test_bad_controller_settings_are_refused(kw: dict[str, float], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        GradientLimit(fb.Adaptive(), **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------- Backpressure


def test_backpressure_from_an_http_answer() -> None:
    bp = fb.Backpressure.from_response(429, {"Retry-After": "2"})
    assert bp is not None
    assert bp.retry_after == 2.0
    assert "HTTP 429" in str(bp)
    assert "retry after 2s" in str(bp)
    lower = fb.Backpressure.from_response(503, {"retry-after": "0.5"})
    assert lower is not None
    assert lower.retry_after == 0.5
    dated = fb.Backpressure.from_response(503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert dated is not None
    assert dated.retry_after == 0.0  # a date in the past: at once
    for headers in ({}, {"Retry-After": "soon"}, {"Retry-After": "-3"}, None):
        got = fb.Backpressure.from_response(429, headers)
        assert got is not None
        assert got.retry_after is None
    assert fb.Backpressure.from_response(200, {"Retry-After": "2"}) is None
    assert fb.Backpressure.from_response(500, {}) is None


def test_backpressure_checks_its_argument_and_pickles() -> None:
    for bad in (-1, math.inf, "2", True):
        with pytest.raises(ValueError, match="retry_after must be seconds"):
            fb.Backpressure(bad)  # type: ignore[arg-type]
    bp = pickle.loads(pickle.dumps(fb.Backpressure(1.5, "busy")))
    assert (bp.retry_after, str(bp)) == (1.5, "busy; retry after 1.5s")
    assert bp.http_status == 503
    assert isinstance(bp, fb.FlowbatchError)


# ------------------------------------------------------------- end to end


class Service:
    """An in-process service: ``knee`` parallel slots of ``base`` seconds each,
    past which calls queue; optionally answers the first ``push`` calls with
    Backpressure."""

    def __init__(self, knee: int, base: float, push: int = 0) -> None:
        self.slots = asyncio.Semaphore(knee)
        self.base = base
        self.push = push
        self.calls = 0
        self.in_flight = 0
        self.most = 0

    async def __call__(self, x: int) -> int:
        self.calls += 1
        if self.calls <= self.push:
            raise fb.Backpressure(retry_after=0.001)
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            async with self.slots:
                await asyncio.sleep(self.base)
        finally:
            self.in_flight -= 1
        return x * 2


def test_an_adaptive_stage_answers_every_item_and_shows_its_limit() -> None:
    async def main() -> None:
        svc = Service(knee=8, base=0.002)
        pipe = fb.Pipeline(
            [fb.stage(svc, name="api", concurrency=fb.Adaptive(min=2, max=64, initial=4))],
            name="p",
        )
        async with pipe.open() as runner:
            st = runner.stats().stages[0]
            assert st.concurrency_limit == 4
            assert st.workers == 64
            out = [y async for y in runner.map(range(600), ordered=True)]
            assert out == [x * 2 for x in range(600)]
            st = runner.stats().stages[0]
            assert st.concurrency_limit is not None
            assert 2 <= st.concurrency_limit <= 64
            assert (st.done, st.failed, st.retried) == (600, 0, 0)
            # the gate held calls to the limit: far fewer than the 64 workers
            assert svc.most <= 32
            body = render({"p": runner}).decode()
            assert (
                f'flowbatch_stage_concurrency_limit{{pipeline="p",stage="api"}} '
                f"{float(st.concurrency_limit)}"
            ) in body

    asyncio.run(main())


@pytest.mark.parametrize("adaptive", [True, False])
def test_backpressure_requeues_the_item_without_spending_an_attempt(adaptive: bool) -> None:
    async def main() -> None:
        svc = Service(knee=4, base=0.0005, push=5)
        conc: int | fb.Adaptive = fb.Adaptive(min=1, max=8, initial=8) if adaptive else 4
        pipe = fb.Pipeline(
            [fb.stage(svc, name="api", concurrency=conc, retry=fb.Retry(attempts=1))], name="p"
        )
        async with pipe.open() as runner:
            out = [y async for y in runner.map(range(20), return_exceptions=True)]
            assert sorted(out) == [x * 2 for x in range(20)]  # type: ignore[type-var]
            st = runner.stats().stages[0]
            assert (st.backpressured, st.retried, st.failed) == (5, 0, 0)
            if adaptive:
                assert st.concurrency_limit is not None
                assert st.concurrency_limit < 8  # cut from its initial 8
            else:
                assert st.concurrency_limit is None

    asyncio.run(main())


def test_slow_start_reaches_the_knee_in_a_few_windows_then_stops_at_the_first_queue() -> None:
    ctl = GradientLimit(fb.Adaptive())  # starts at 1
    sim = Sim(ctl, lambda t: 32)
    sim.run(2.0)
    reached = next(t for t, v in sim.trace if v >= 32)
    assert reached <= 1.5  # ~30 calls' time: 8 windows x 1.5, not 5 s of +sqrt steps
    assert max(v for _, v in sim.trace) < 2 * 32  # left slow start at the first queue
    slow = GradientLimit(fb.Adaptive(), slow_start=1.0)  # off: +sqrt(limit) steps only
    Sim(slow, lambda t: 32).run(2.0)
    assert slow.value < 32
