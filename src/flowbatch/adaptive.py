"""Limits that follow the load: the ``fb.Adaptive`` option and its controller.

``fb.stage(call_api, concurrency=fb.Adaptive(min=1, max=256))`` lets the
runner choose a stage's concurrency between ``min`` and ``max`` from what it
measures, instead of a number the user guesses.

Usage::

    fb.stage(call_api, concurrency=fb.Adaptive(min=1, max=256))

The controller: :class:`GradientLimit`
--------------------------------------

An unbatched stage with ``concurrency=fb.Adaptive(...)`` has ``max`` worker
slots and a resizable gate (``StageRun.gate``); the worker loop feeds each
call's latency to the stage's :class:`GradientLimit`, which sets the gate's
total. It follows Netflix concurrency-limits' *Gradient2* (long-term against
short-term latency), with these choices, each a constructor argument:

- **Windows.** Samples are pooled in a window that closes after
  ``max(min_samples, limit)`` calls (one round of every slot, like TCP's
  per-RTT update) or after ``max_window`` seconds with at least one sample.
  ``min_samples`` = 8, ``max_window`` = 1.0 s. The window's mean latency is
  the *short-term* latency.
- **Long-term latency.** An exponential moving average of the windows'
  short-term latency over ``long_window`` = 500 windows while latency rises
  (a window counts as at most twice the long term), and ``fall`` = 0.5 of the
  gap per window when it falls (Gradient2 falls slowly, then cuts its long
  term by 5% per update once it is twice the short term; falling fast is that
  rule made continuous), and set outright by each probe (below). A standing
  queue is thus absorbed only slowly, a burst of queueing hardly at all, and a
  service that got faster is believed within a few windows.
- **Gradient.** ``g = clamp(tolerance * long / short, 0.5, 1.0)``,
  ``tolerance`` = 1.25 (Gradient2's default is 1.5: it tolerates 50% more
  latency before it backs off; 1.0 keeps the least queue, but loses a few
  percent of throughput where latency also rises with the client's own load).
  The floor 0.5 keeps one noisy window from halving the limit.
- **Queue allowance.** ``new = limit * g + queue(limit)`` with ``queue`` =
  ``sqrt`` by default: the limit keeps probing upward by about ``sqrt(limit)``
  calls per window while latency stays at its long-term level, and settles
  where that many calls wait in the service's queue.
- **Smoothing.** ``limit += smoothing * (new - limit)``, ``smoothing`` = 0.2.
- **Held when unused.** A window in which the most calls in flight stayed
  below half the limit leaves the limit as it is (the stage is limited by its
  input, not by the service: no evidence to grow or shrink on).
- **Slow start.** Until the first window whose latency is ``SLOW_START_EXIT``
  (1.1) times the long term, or a drop or backpressure, the limit grows by
  ``slow_start`` = 1.5 times per window instead (TCP's slow start;
  ``Adaptive()`` starts at 1). 1.0 turns it off.
- **Probe.** Every ``probe_every`` = 50 windows in use, the limit is cut to
  ``limit / (2 * tolerance)`` for one window of calls started after the cut
  (below the service's knee: its queue drains); their mean latency becomes the
  long-term latency and the limit is restored. An average alone slowly absorbs
  the standing queue the allowance keeps, and the limit then drifts up for
  ever (Gradient2 has that drift); the probe (as in Netflix's Gradient, Envoy's
  adaptive concurrency, BBR's ProbeRTT) bounds it, for about one window at a
  lower limit every 50. A service that got uniformly slower is learned there.
- **Drops.** A window with a dropped call (a timeout, ``dropped=True``)
  multiplies the limit by ``backoff`` = 0.5 instead of the gradient step.
- **Backpressure.** :meth:`GradientLimit.backpressure` (a call raised
  :class:`~flowbatch.Backpressure`: the service said it is overloaded) cuts the
  limit by ``backoff`` at once, discards the open window, ends slow start and
  any probe, and sets :attr:`~GradientLimit.resume_at` (``retry_after``
  later, ``DEFAULT_RETRY_AFTER`` when None): the stage starts no call before
  it. Once per episode: other answers within ``max(retry_after, a call's
  time)`` of the cut (calls that were already in flight) do not cut again.

The limit is a float inside; :attr:`GradientLimit.value` (an int between
``min`` and ``max``) is what the gate gets. The controller is a plain object:
feed it ``sample(rtt, inflight, now=..., dropped=...)`` and read the value; it
reads ``clock`` only when ``now`` is not given, so a test drives it on a fake
clock without sleeping.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from .replicas import ReplicaRule

__all__ = ["Adaptive", "GradientLimit"]


@dataclass(frozen=True, slots=True)
class Adaptive:
    """A stage's concurrency chosen at run time, between ``min`` and ``max``.

    - ``min``: the fewest calls in flight (workers, replicas) ever allowed.
    - ``max``: the most; the stage's workers are sized for it.
    - ``initial``: where the limit starts (default: ``min``).
    - ``replicas``: a :class:`~flowbatch.ReplicaRule`, when the replica count
      changes on a stage whose replicas follow the load (a batched stage, or
      one whose executor can resize; see flowbatch.replicas). Default None:
      ``DEFAULT_REPLICA_RULE``. An unbatched stage on threads, async or
      devices= follows latency instead and refuses it; on an
      ``fb.Executor`` of your own that cannot resize, it has no effect.

    Usage: ``Adaptive(min=1, max=4, replicas=ReplicaRule(up_after=1.0))``.
    """

    min: int = 1
    max: int = 256
    initial: int | None = None
    replicas: ReplicaRule | None = None

    def __post_init__(self) -> None:
        for name in ("min", "max"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Adaptive.{name} must be an int >= 1, got {v!r}")
        if self.max < self.min:
            raise ValueError(f"Adaptive.max ({self.max}) must be >= Adaptive.min ({self.min})")
        if self.initial is not None and (
            not isinstance(self.initial, int)
            or isinstance(self.initial, bool)
            or not self.min <= self.initial <= self.max
        ):
            raise ValueError(
                f"Adaptive.initial must be an int between min ({self.min}) and max "
                f"({self.max}), got {self.initial!r}"
            )
        if self.replicas is not None and not isinstance(self.replicas, ReplicaRule):
            raise TypeError(
                "Adaptive.replicas must be a flowbatch.ReplicaRule (e.g. "
                f"fb.ReplicaRule(up_after=1.0)) or None, got {self.replicas!r}"
            )

    @property
    def start(self) -> int:
        """The limit the stage starts with."""
        return self.initial if self.initial is not None else self.min


#: Slow start ends at the first window whose latency is this much above the long term.
SLOW_START_EXIT = 1.1

#: Seconds a stage waits after a :class:`~flowbatch.Backpressure` that gave no
#: ``retry_after``.
DEFAULT_RETRY_AFTER = 0.05


class GradientLimit:
    """A concurrency limit driven by latency (Gradient2-style; see the module docstring).

    Usage::

        ctl = GradientLimit(Adaptive(min=1, max=256))
        limit = ctl.sample(rtt=0.012, inflight=7, now=clock())  # after each call
        limit = ctl.backpressure(retry_after=2.0, now=clock())   # on a 429/503
    """

    __slots__ = (
        "_calm_at",
        "_dropped",
        "_inflight",
        "_n",
        "_probe_from",
        "_probe_left",
        "_probe_start",
        "_rtt_sum",
        "_slow",
        "_t_start",
        "backoff",
        "backpressured",
        "clock",
        "fall",
        "limit",
        "long_rtt",
        "long_window",
        "max",
        "max_window",
        "min",
        "min_samples",
        "probe_every",
        "queue",
        "resume_at",
        "short_rtt",
        "slow_start",
        "smoothing",
        "tolerance",
        "value",
        "windows",
    )

    def __init__(
        self,
        bounds: Adaptive | None = None,
        *,
        smoothing: float = 0.2,
        tolerance: float = 1.25,
        long_window: int = 500,
        fall: float = 0.5,
        min_samples: int = 8,
        max_window: float = 1.0,
        backoff: float = 0.5,
        probe_every: int = 50,
        slow_start: float = 1.5,
        queue: Callable[[float], float] = math.sqrt,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        b = bounds if bounds is not None else Adaptive()
        checks = (
            ("smoothing", smoothing, 0.0 < smoothing <= 1.0, "in (0, 1]"),
            ("tolerance", tolerance, tolerance >= 1.0, ">= 1"),
            ("long_window", long_window, long_window >= 1, ">= 1"),
            ("fall", fall, 0.0 < fall <= 1.0, "in (0, 1]"),
            ("min_samples", min_samples, min_samples >= 1, ">= 1"),
            ("max_window", max_window, max_window > 0, "> 0"),
            ("backoff", backoff, 0.0 < backoff < 1.0, "in (0, 1)"),
            ("probe_every", probe_every, probe_every >= 2, ">= 2"),
            ("slow_start", slow_start, slow_start >= 1.0, ">= 1"),
        )
        for name, v, ok, want in checks:
            if not ok:
                raise ValueError(f"GradientLimit {name} must be {want}, got {v!r}")
        self.min = b.min
        self.max = b.max
        self.smoothing = smoothing
        self.tolerance = tolerance
        self.long_window = long_window
        self.fall = fall
        self.min_samples = min_samples
        self.max_window = max_window
        self.backoff = backoff
        self.probe_every = probe_every
        self.slow_start = slow_start
        self.queue = queue
        self.clock = clock
        #: the limit (a float; :attr:`value` is the int the gate gets)
        self.limit = float(b.start)
        self.value = b.start
        #: long-term and last window's short-term latency (seconds; 0.0 before any)
        self.long_rtt = 0.0
        self.short_rtt = 0.0
        #: no call may start before this time (after a Backpressure)
        self.resume_at = -math.inf
        #: windows closed and Backpressure signals met, for the curious
        self.windows = 0
        self.backpressured = 0
        self._t_start: float | None = None
        self._calm_at = -math.inf
        self._probe_left = probe_every
        self._probe_start: float | None = None  # set while probing
        self._probe_from = 0.0
        self._slow = slow_start > 1.0  # until the first window that shows a queue
        self._n = 0
        self._rtt_sum = 0.0
        self._inflight = 0
        self._dropped = False

    def __repr__(self) -> str:
        return (
            f"<GradientLimit {self.value} in [{self.min}, {self.max}], "
            f"long {self.long_rtt * 1e3:.2f} ms, short {self.short_rtt * 1e3:.2f} ms>"
        )

    def sample(
        self, rtt: float, inflight: int, now: float | None = None, dropped: bool = False
    ) -> int:
        """A call took ``rtt`` seconds with ``inflight`` calls in flight (itself
        included); ``dropped``: it timed out. Returns the limit."""
        if now is None:
            now = self.clock()
        if self._probe_start is not None and now - rtt < self._probe_start:
            return self.value  # started before the probe: queued behind the old limit
        if self._t_start is None:
            self._t_start = now
        if dropped:
            self._dropped = True
        else:
            self._n += 1
            self._rtt_sum += rtt
        self._inflight = max(self._inflight, inflight)
        n = self._n
        if (n >= self.min_samples and n >= self.limit) or (
            now - self._t_start >= self.max_window and (n or self._dropped)
        ):
            self._close_window(now)
        return self.value

    def backpressure(self, retry_after: float | None = None, now: float | None = None) -> int:
        """The service said it is overloaded: cut the limit at once and pause
        new calls for ``retry_after`` seconds (``DEFAULT_RETRY_AFTER`` when
        None). Returns the limit."""
        if now is None:
            now = self.clock()
        wait = DEFAULT_RETRY_AFTER if retry_after is None else max(retry_after, 0.0)
        self.resume_at = max(self.resume_at, now + wait)
        self.backpressured += 1
        # Calls started before the cut answer the same within about a call's
        # time: one cut per episode, not one per answer.
        self._slow = False
        if now >= self._calm_at:
            self._set(self.limit * self.backoff)
            self._calm_at = now + max(wait, self.long_rtt, self.short_rtt)
        self._probe_start = None  # an overloaded service is no baseline
        self._reset(now)
        return self.value

    # ------------------------------------------------------------ internals

    def _close_window(self, now: float) -> None:
        n = self._n
        short = self._rtt_sum / n if n else self.short_rtt
        inflight = self._inflight
        dropped = self._dropped
        probed = self._probe_start is not None
        self.windows += 1
        self._reset(None)
        if probed:
            self._probe_start = None
            self._set(self._probe_from)
        if dropped:
            self._slow = False
            self._set(self.limit * self.backoff)
            return
        self.short_rtt = short
        long = self.long_rtt
        if long <= 0.0 or probed:
            long = short  # the latency without a standing queue
        elif short < long:
            long += (short - long) * self.fall
        else:  # at most twice the long term counts: a burst of queueing is no baseline
            long += (min(short, 2.0 * long) - long) / self.long_window
        self.long_rtt = long
        limit = self.limit
        if inflight < limit / 2 or short <= 0.0:
            return  # not using its limit: hold
        gradient = min(1.0, max(0.5, self.tolerance * long / short))
        if self._slow:
            if short <= SLOW_START_EXIT * long:
                self._set(max(limit * self.slow_start, limit + 1.0))
                return
            self._slow = False
        target = limit * gradient + self.queue(limit)
        self._set(limit + self.smoothing * (target - limit))
        self._probe_left -= 1
        if self._probe_left <= 0 and not probed:
            # Measure the latency without the queue the allowance keeps:
            # halve the limit for one window of calls started from now.
            self._probe_left = self.probe_every
            self._probe_from = self.limit
            self._probe_start = now
            self._set(self.limit * 0.5 / self.tolerance)

    def _set(self, limit: float) -> None:
        limit = min(float(self.max), max(float(self.min), limit))
        self.limit = limit
        self.value = int(limit)

    def _reset(self, now: float | None) -> None:
        self._t_start = now
        self._n = 0
        self._rtt_sum = 0.0
        self._inflight = 0
        self._dropped = False
