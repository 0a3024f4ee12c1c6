"""Admission that keeps a latency target: the in-flight limit, resized as the load moves.

``pipe.open(latency_target=0.5)`` (and the HTTP service by default, see
``docs/http.md``) gives the runner's one :class:`~flowbatch.CapacityLimiter`
a controller instead of a fixed ``max_in_flight``. Every
:data:`~flowbatch.runner.FOLD_INTERVAL` the runner feeds it what happened
since the last time (the admission-to-answer latency of each item answered
with a result, how many items were answered in any way, the places held and
the refusals); the controller answers with the next limit. Past the limit a
request is refused at once (``Overloaded``; HTTP 503 with ``Retry-After`` =
:meth:`AdmissionController.retry_after`, the measured time to drain what is
in flight).

The controller (why this one):

- **Floor**: never below :func:`floor_limit`, two full batches per worker
  of the widest stage (an unbatched worker: the item in the call and the
  next): one batch running and the next one waiting, so that a worker that
  comes free takes a full batch at once. Below that, under overload, a
  worker that frees takes the few items that came since (it never waits for
  a batch to fill), and the model runs part-empty batches: a limit there
  costs throughput (measured in the simulation of
  tests/test_core_latency_target.py: 0.63x at one batch per worker). A
  closed loop of that many clients is always admitted. A target that no
  limit above the floor can meet (two batches take longer than the target)
  is missed, not enforced by starving the model; the runner logs a warning
  once it has been out of reach at the floor for :data:`UNMET_WARN_AFTER`
  seconds (``AdmissionController.unmet_since``).
- **Throughput** ``X``: items answered per second over the same window as
  the latency, ``max(WINDOW, target)`` seconds (answers come in bursts of a
  batch; nothing changes until the window spans :data:`WINDOW` seconds).
- **Latency**: the p99 of the latency samples of the last ``max(WINDOW,
  target)`` seconds (at least the last :data:`MIN_SAMPLES`; at most
  :data:`MAX_SAMPLES_PER_UPDATE` per update, evenly spaced), counting only
  items admitted after the last decrease, so that one overload is not
  punished twice for the same slow answers. It is read through
  :func:`flowbatch.metrics.quantile` from a histogram of those samples, the
  one quantile method that ``stats()``, ``/metrics`` and ``flowbatch top``
  use, so the p99 the controller acts on is the one they show.
- **Decrease** (p99 above ``HIGH * target``: a margin, since what is
  measured is a limit's effect one latency ago): jump to Little's law,
  ``limit = BACKOFF * min(limit, X * target)``: ``X * target`` items in
  flight is the population whose *mean* latency is the target at the
  measured throughput, so one step lands near the answer however far the
  limit was; the backoff leaves room for the tail.
- **Increase** (p99 below ``LOW * target``, and the limit in use: places
  at least :data:`IN_USE` full or a refusal since the last update):
  additive, :data:`INCREASE_RATE` floors per second, but at once to
  ``LITTLE_SHARE * X * target`` when that is higher (fast start: at the
  measured throughput that population waits half the target on average),
  and never past ``X * (LOW * target - service time)``: the population
  whose mean wait leaves one service time of the target for the tail (an
  item that just missed a batch waits for the next). That cap matters: an
  item's latency is only seen once it is answered, a queue's worth of time
  after it was admitted, so without it the p99 still looks good while the
  limit runs far past the target (measured on the embedding model on a
  busy machine: to the ceiling of 1024 in 8 s, then a p99 of 1.5x the
  target; pinned by a simulated slow model in the tests). An unused limit
  is held: a quiet hour does not shrink it, so a burst is not refused while
  the measurements catch up.
- **Between** ``LOW * target`` and ``HIGH * target``: held.

This is AIMD on the observed p99 with Little's law as the jump, the shape
of TCP congestion control and of Netflix's concurrency-limits "AIMD" limit,
with a jump because a serving queue, unlike a network path, tells us its
throughput directly. Throughput is not traded away: the limit only falls
when admitted requests already wait nearly the target (``HIGH``), i.e. when
more in flight would only lengthen the queue, not add answers per second,
and never below the floor that keeps every worker's batches full.

The target itself: explicit, or, with ``latency_target="auto"`` (the HTTP
default), :func:`auto_target`: ``TARGET_MULTIPLE`` times the pipeline's
measured service time as a slow item meets it (the sum over stages of the
:data:`SLOW_QUANTILE` of each stage's calls in the last :data:`SLOW_SPAN`
seconds, :meth:`Admission.slow_service_time`, smoothed over
:data:`SERVICE_TAU` seconds), at least :data:`TARGET_FLOOR`. Under overload
the batches are full, so this is a multiple of a full batch's time; at light
load it is lower, but then the limit is not in use (and is held). (Holding
the peak instead kept the slow first batches of a cold model as the target
for a minute.) Four times: an item admitted under overload waits about one
batch being served, one batch forming and its own, with a batch to spare for
the tail. A slow batch's time, not the mean's: batches grouped by length
differ in time (those of long sentences ran 2x the short ones' on
all-MiniLM-L6-v2), and a target of four *mean* batch times sat below what
the floor itself gives (measured on the served model at 2x overload: a p99
of 4.6 mean batch times at the floor, the limit pinned there and the target
missed). An unbatched stage counts its items' calls alike, so an
unbatched pipeline gets a target too.

The controller is a pure object (no clock, no event loop): tests drive
:meth:`AdmissionController.update` with a fake clock and a simulated service.

Usage::

    ctl = AdmissionController(target=0.5, floor=128, ceiling=4096)
    limit = ctl.update(now, latencies=[...], answered=250, in_flight=300, refused=12)
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from .metrics import Histogram, quantile

log = logging.getLogger("flowbatch")

if TYPE_CHECKING:
    from .ledger import Ledger
    from .limits import CapacityLimiter
    from .stage import Stage
    from .stagerun import StageRun

__all__ = [
    "BACKOFF",
    "HIGH",
    "LOW",
    "MIN_LIMIT",
    "TARGET_FLOOR",
    "TARGET_MULTIPLE",
    "AdmissionController",
    "LatencyTarget",
    "auto_target",
    "check_target",
    "floor_limit",
]

#: ``latency_target``: seconds, or ``"auto"`` (derived from the service time).
LatencyTarget = float | Literal["auto"]

#: The least floor: a request of a few inputs can always be admitted whole.
MIN_LIMIT = 4
#: The auto target is this many times the pipeline's measured service time...
TARGET_MULTIPLE = 4.0
#: ...and at least this many seconds.
TARGET_FLOOR = 0.05
#: Seconds, time constant over which the measured service time is smoothed
#: (the stages' own averages follow each batch; the target should not).
SERVICE_TAU = 10.0
#: Seconds of latency samples the p99 is taken over (at least the target).
WINDOW = 1.0
#: The p99 is read only from at least this many samples.
MIN_SAMPLES = 20
#: At most this many latency samples are kept per update (evenly spaced), so
#: that an update costs the same at 100 or 100,000 answers per second.
MAX_SAMPLES_PER_UPDATE = 256
#: The quantile held under the target.
QUANTILE = 0.99
#: Multiplicative decrease (of the limit or of the Little's-law population).
BACKOFF = 0.8
#: Decrease once the p99 is above this share of the target...
HIGH = 0.9
#: ...increase only while it is below this share.
LOW = 0.7
#: Additive increase: floors per second.
INCREASE_RATE = 0.5
#: On increase, jump to at least this share of ``throughput * target``.
LITTLE_SHARE = 0.5
#: The limit counts as in use with this share of its places held.
IN_USE = 0.8
#: The service time the auto target counts is this quantile of each stage's
#: calls (a slow call, see :meth:`Admission.slow_service_time`)...
SLOW_QUANTILE = 0.9
#: ...over the last this many seconds.
SLOW_SPAN = 10.0
#: A target out of reach at the floor for this many seconds is logged (a warning)...
UNMET_WARN_AFTER = 10.0
#: ...at most this often.
UNMET_WARN_EVERY = 60.0


def check_target(target: object, name: str = "latency_target") -> LatencyTarget | None:
    """``target`` checked: None, ``"auto"`` or seconds > 0 (a clear error otherwise)."""
    if target is None or target == "auto":
        return target
    if isinstance(target, bool) or not isinstance(target, int | float):
        raise TypeError(f"{name} must be seconds (a number > 0), 'auto' or None, got {target!r}")
    if not 0 < target < math.inf:  # also rejects nan
        raise ValueError(f"{name} must be a number of seconds > 0, got {target!r}")
    return float(target)


def floor_limit(stages: Iterable[Stage]) -> int:
    """The least in-flight limit that keeps the widest stage's workers full.

    ``2 * concurrency * batch.max_size`` per stage (a batch running and the
    next one waiting, per worker; an unbatched stage counts a batch of 1),
    the largest over the stages, at least :data:`MIN_LIMIT`:

    - one model stage, ``Batch(max_size=64)``, 2 replicas: 256;
    - one unbatched stage of 1 worker: 4 (the floor of the floor).
    """
    need = max(
        (2 * s.concurrency * (s.batch.max_size if s.batch else 1) for s in stages), default=0
    )
    return max(need, MIN_LIMIT)


def auto_target(service_time: float) -> float:
    """The derived target for a pipeline whose measured service time is
    ``service_time`` seconds: ``max(TARGET_FLOOR, TARGET_MULTIPLE * service_time)``."""
    return max(TARGET_FLOOR, TARGET_MULTIPLE * service_time)


class AdmissionController:
    """The in-flight limit that keeps admitted p99 latency under a target;
    see the module docstring for the rule.

    ``target``: seconds, or ``"auto"`` (then each :meth:`update` passes the
    measured ``service_time``; until one is known the limit stays where it
    is). ``floor`` / ``ceiling``: the limit's range; it starts at ``floor``.
    """

    __slots__ = (
        "_answered",
        "_auto",
        "_counts",
        "_last",
        "_refused",
        "_samples",
        "_service",
        "_t_decrease",
        "ceiling",
        "decreases",
        "floor",
        "increases",
        "limit",
        "p99",
        "target",
        "throughput",
        "unmet_since",
    )

    def __init__(self, target: LatencyTarget, floor: int, ceiling: int) -> None:
        checked = check_target(target)
        if checked is None:
            raise ValueError("an AdmissionController needs a target: seconds or 'auto'")
        for name, value in (("floor", floor), ("ceiling", ceiling)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if ceiling < floor:
            raise ValueError(f"ceiling ({ceiling}) must be >= floor ({floor})")
        self._auto = checked == "auto"
        #: the latency target in seconds (0.0 while an auto target is unknown)
        self.target = 0.0 if checked == "auto" else float(checked)
        self.floor = floor
        self.ceiling = ceiling
        #: the in-flight limit now
        self.limit = floor
        #: items answered per second, smoothed (0.0 until measured)
        self.throughput = 0.0
        #: the p99 of the current window (0.0 until there are enough samples)
        self.p99 = 0.0
        self.increases = 0
        #: since when (the clock) the limit has been at its floor with the
        #: p99 above the target's margin: a target the floor cannot meet
        #: (None while it is met, or the limit is above the floor)
        self.unmet_since: float | None = None
        self.decreases = 0
        self._last: float | None = None
        self._answered = 0
        self._refused = 0
        # (answer time, latency) of recent answers
        self._samples: deque[tuple[float, float]] = deque()
        self._service = 0.0  # the service time, smoothed (SERVICE_TAU)
        # (update time, answers since the previous update): the throughput window
        self._counts: deque[tuple[float, int]] = deque()
        self._t_decrease = -math.inf

    @property
    def auto(self) -> bool:
        """Whether the target is derived from the service time (``"auto"``)."""
        return self._auto

    def __repr__(self) -> str:
        return (
            f"<AdmissionController limit={self.limit} target={self.target:.3g}s "
            f"p99={self.p99:.3g}s throughput={self.throughput:.4g}/s>"
        )

    def update(
        self,
        now: float,
        latencies: Sequence[float],
        answered: int,
        in_flight: int,
        *,
        refused: int = 0,
        service_time: float = 0.0,
    ) -> int:
        """Take what happened since the last call; return the new limit.

        ``now``: the clock (seconds, monotonic). ``latencies``: admission to
        answer, in seconds, of each item answered with a result since the
        last call. ``answered``: items answered in any way since then
        (results, errors, deadlines, cancellations: places given back).
        ``in_flight``: places held now. ``refused``: refusals (and callers
        waiting in line) since then. ``service_time``: the pipeline's
        measured service time in seconds (0.0: not known); it sets an auto
        target and trims the growth cap.
        """
        samples = self._samples
        if len(latencies) > MAX_SAMPLES_PER_UPDATE:
            latencies = latencies[:: math.ceil(len(latencies) / MAX_SAMPLES_PER_UPDATE)]
        samples.extend((now, lat) for lat in latencies)
        self._answered += answered
        self._refused += refused
        last = self._last
        if last is not None and now <= last:
            return self.limit  # no time passed: keep the counts for the next call
        self._last = now
        answered, self._answered = self._answered, 0
        refused, self._refused = self._refused, 0
        if last is None:
            self._counts.append((now, 0))
            return self.limit
        dt = now - last
        if service_time > 0:
            smooth = self._service
            weight = 1.0 if not smooth else 1.0 - math.exp(-dt / SERVICE_TAU)
            service_time = self._service = smooth + weight * (service_time - smooth)
            if self._auto:
                self.target = auto_target(service_time)
        target = self.target
        # The window: the last max(WINDOW, target) seconds (at least
        # MIN_SAMPLES answers for the p99).
        start = now - max(WINDOW, target)
        counts = self._counts
        counts.append((now, answered))
        while len(counts) > 1 and counts[1][0] <= start:
            counts.popleft()  # counts[0] stays: where the span begins
        span = now - counts[0][0]
        self.throughput = sum(n for _, n in itertools.islice(counts, 1, None)) / span
        if target <= 0 or span < WINDOW:
            return self.limit  # too soon to judge: answers come in bursts of a batch
        while len(samples) > MIN_SAMPLES and samples[0][0] < start:
            samples.popleft()
        # Only answers to items admitted after the last decrease count.
        recent = [lat for t, lat in samples if t - lat >= self._t_decrease]
        if len(recent) < MIN_SAMPLES:
            self.p99 = 0.0
            return self.limit
        window = Histogram()
        window.buf.extend(recent)
        window.fold()
        p99 = self.p99 = window.quantile(QUANTILE)  # the one quantile method (metrics.py)
        limit = self.limit
        if p99 > HIGH * target:
            little = self.throughput * target
            limit = math.floor(BACKOFF * min(limit, little))
            self._t_decrease = now
            self.decreases += 1
        elif p99 < LOW * target and (refused > 0 or in_flight >= IN_USE * limit):
            # Latency answers late (an item admitted now is measured once it
            # is answered), so growth is capped by Little's law: never more
            # in flight than would wait LOW * target on average at the
            # measured throughput, less one service time for the tail (an
            # item that just missed a batch waits for the next one).
            little = self.throughput * target
            cap = self.throughput * max(0.0, LOW * target - service_time)
            step = max(1, round(INCREASE_RATE * self.floor * dt))
            grown = min(max(limit + step, math.floor(LITTLE_SHARE * little)), math.floor(cap))
            if grown > limit:
                limit = grown
                self.increases += 1
        self.limit = min(max(limit, self.floor), self.ceiling)
        if p99 > HIGH * target and self.limit == self.floor:
            if self.unmet_since is None:
                self.unmet_since = now
        else:
            self.unmet_since = None
        return self.limit

    def retry_after(self, in_flight: int) -> int | None:
        """Seconds until ``in_flight`` items are answered at the measured
        throughput, rounded up, at least 1; None while no throughput is known."""
        if self.throughput <= 0:
            return None
        return max(1, math.ceil(in_flight / self.throughput))


class _TappedHistogram(Histogram):
    """The ledger's latency histogram, also keeping its samples for the controller
    (taken when folded, so the hot path appends to one list as before)."""

    __slots__ = ("tap",)

    def __init__(self) -> None:
        super().__init__()
        self.tap: list[float] = []

    def fold(self) -> None:
        if self.buf:
            self.tap.extend(self.buf)
        super().fold()


class Admission:
    """A runner's controller, fed from its ledger and stages (``runner.admission``).

    :meth:`tick` is called every fold interval with the runner's clock.
    """

    __slots__ = (
        "_answered",
        "_ledger",
        "_rejected",
        "_snaps",
        "_stages",
        "_warned",
        "controller",
        "limiter",
        "name",
    )

    def __init__(
        self, controller: AdmissionController, limiter: CapacityLimiter, name: str = "pipeline"
    ) -> None:
        self.controller = controller
        self.limiter = limiter
        self.name = name
        self._warned = -math.inf  # when the last "target not met" warning was logged
        self._ledger: Ledger | None = None
        self._stages: Sequence[StageRun] = ()
        self._answered = 0
        self._rejected = 0
        # (tick time, each stage's service-time bucket counts then): the
        # last SLOW_SPAN seconds, for slow_service_time()
        self._snaps: deque[tuple[float, list[npt.NDArray[np.int64]]]] = deque()

    def bind(self, ledger: Ledger, stages: Sequence[StageRun]) -> None:
        """Watch ``ledger`` (its latency histogram is tapped) and ``stages``."""
        tapped = _TappedHistogram()
        tapped.buf = ledger.latency.buf  # keep the list producers may hold
        ledger.latency = tapped
        self._ledger = ledger
        self._stages = stages

    def tick(self, now: float) -> None:
        """Feed the controller what happened since the last tick; resize the limiter."""
        ledger = self._ledger
        if ledger is None:
            return
        latency = ledger.latency
        assert isinstance(latency, _TappedHistogram)
        latency.fold()
        samples, latency.tap = latency.tap, []
        answered = ledger.completed + ledger.failed + ledger.expired + ledger.cancelled
        limiter = self.limiter
        refused = limiter.rejected - self._rejected + limiter.waiting
        limit = self.controller.update(
            now,
            samples,
            answered - self._answered,
            limiter.borrowed,
            refused=refused,
            service_time=self.slow_service_time(now),
        )
        self._answered = answered
        self._rejected = limiter.rejected
        if limiter.total not in (limit, math.inf):  # inf: the runner is closing
            limiter.total = limit
        self._warn_if_unmet(now)

    def _warn_if_unmet(self, now: float) -> None:
        """Log a warning once the target has been out of reach at the floor
        for :data:`UNMET_WARN_AFTER` seconds (again at most every
        :data:`UNMET_WARN_EVERY` seconds): the controller cannot meet it, and
        nothing else says so."""
        ctl = self.controller
        since = ctl.unmet_since
        if since is None or now - since < UNMET_WARN_AFTER:
            return
        if now - self._warned < UNMET_WARN_EVERY:
            return
        self._warned = now
        log.warning(
            "pipeline %r: the latency target of %.3gs%s is not met even at the floor of "
            "%d items in flight (p99 %.3gs for %.0fs): a full batch per worker running "
            "and one waiting take longer than that. Raise the target, lower "
            "Batch.max_size or add replicas.",
            self.name, ctl.target, " (derived)" if ctl.auto else "", ctl.floor, ctl.p99,
            now - since, extra={"pipeline": self.name},
        )

    def slow_service_time(self, now: float) -> float:
        """The pipeline's service time as a slow item meets it: the sum over
        stages of the :data:`SLOW_QUANTILE` of each stage's calls in the last
        :data:`SLOW_SPAN` seconds (0.0 before any call).

        Calls differ in time: batches of long inputs (grouped by length) run
        longer than the mean, and an admitted item may meet the slow ones.
        Read from the stages' service-time histograms, so that the hot path
        pays nothing for it; a batched stage's calls are its batches, an
        unbatched one's its items.
        """
        for sr in self._stages:
            sr.metrics.service.fold()
        counts = [sr.metrics.service.counts.copy() for sr in self._stages]
        snaps = self._snaps
        snaps.append((now, counts))
        while len(snaps) > 2 and snaps[1][0] <= now - SLOW_SPAN:
            snaps.popleft()  # snaps[0] stays: where the span begins
        total = 0.0
        for sr, start, end in zip(self._stages, snaps[0][1], counts, strict=True):
            calls = np.cumsum(end - start) if len(snaps) > 1 else np.cumsum(end)
            if calls[-1]:
                uppers = sr.metrics.service.uppers.tolist()
                buckets = tuple(zip(uppers, calls.tolist(), strict=True))
                total += quantile(buckets, SLOW_QUANTILE)
        return total

    def retry_after(self) -> int | None:
        """Seconds until what is in flight now drains (see
        :meth:`AdmissionController.retry_after`)."""
        return self.controller.retry_after(self.limiter.borrowed)
