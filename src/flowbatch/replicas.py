"""Replicas that follow the load: ``concurrency=fb.Adaptive(min, max)`` on a stage
whose executor can resize (process workers; Ray actors; any executor with
``resize(n)`` and ``replicas``), or on a batched stage.

Two parts:

- :class:`ReplicaController`, a pure object on an injected clock: fed one
  observation per tick (the backlog in the stage's queue, how many replicas
  were busy on average, the throughput), it says how many replicas the
  stage should run. Tested on a fake clock.
- :class:`ReplicaScaler`, the glue: each tick it reads the stage's metrics,
  asks the controller, and resizes the executor and the stage's gate (the
  limiter that holds the worker slots to the replicas running). The runner
  owns one task per scaled stage (:func:`start_scalers`).

The rule (:class:`ReplicaRule`, exported as ``fb.ReplicaRule``; a stage sets
its own with ``fb.Adaptive(min, max, replicas=fb.ReplicaRule(...))``, else
:data:`DEFAULT_REPLICA_RULE`):

- **Up** while the stage is the bottleneck with a backlog: every tick for
  ``up_after`` seconds saw its replicas busy at least ``up_util`` of the
  time and items waiting, and the backlog is not draining fast enough to
  be gone within ``up_after`` at the rate it falls. It adds as many
  replicas as the measured arrival rate needs (``n * arrivals /
  throughput``, arrivals = throughput + the backlog's growth), at least
  one, at most doubling.
- **Down** after a sustained idle period: every tick for ``down_after``
  seconds the stage would have been busy at most ``down_util`` of the time
  with one replica fewer. It removes down to what that busy time needs
  at ``down_util``, at least one.
- **Hysteresis**: ``down_util < up_util``, and each test projects the
  utilization onto the count it would leave, so a change never lands in
  the other change's condition (no flapping around one threshold).
- **Cool-down**: after each change (counted from when the replicas are
  running), ``cooldown`` seconds with no change; the observations start
  afresh.
- **Bounds**: never below ``min`` nor above ``max``.

Usage (the runner does this for every adaptive stage that can resize)::

    ctl = ReplicaController(lo=1, hi=4, replicas=1, clock=time.monotonic)
    want = ctl.observe(backlog=len(queue), busy=1.0, throughput=120.0)
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .metrics import StageMetrics
    from .stagerun import StageRun

__all__ = [
    "DEFAULT_REPLICA_RULE",
    "ReplicaController",
    "ReplicaRule",
    "ReplicaScaler",
    "can_resize",
    "start_scalers",
]

log = logging.getLogger("flowbatch")


@dataclass(frozen=True, slots=True)
class ReplicaRule:
    """When a stage's replica count changes; see the module docstring.

    - ``up_util``: the busy fraction of its replicas at and above which a
      stage with a backlog counts as saturated (default 0.85).
    - ``down_util``: the busy fraction it must stay at or below with one
      replica fewer for one to go (default 0.6; below ``up_util``: hysteresis).
    - ``up_after`` / ``down_after``: seconds the condition must hold.
    - ``cooldown``: seconds after a change before the next.
    - ``tick``: seconds between observations (on the event loop's time).

    Usage: ``ReplicaRule(up_after=1.0, down_after=30.0)``.
    """

    up_util: float = 0.85
    down_util: float = 0.6
    up_after: float = 2.0
    down_after: float = 5.0
    cooldown: float = 3.0
    tick: float = 0.5

    def __post_init__(self) -> None:
        for name in ("up_util", "down_util"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not 0 < v <= 1:
                raise ValueError(f"ReplicaRule.{name} must be a number in (0, 1], got {v!r}")
        if self.down_util >= self.up_util:
            raise ValueError(
                f"ReplicaRule.down_util ({self.down_util}) must be below up_util "
                f"({self.up_util}): the gap between them is what keeps the count from flapping"
            )
        for name in ("up_after", "down_after", "cooldown", "tick"):
            v = getattr(self, name)
            # also rejects nan and inf (a rule that would never act)
            if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v < math.inf:
                raise ValueError(
                    f"ReplicaRule.{name} must be a finite number >= 0 (seconds), got {v!r}"
                )
        if self.tick <= 0:
            raise ValueError(f"ReplicaRule.tick must be > 0, got {self.tick!r}")


#: The rule the runner uses.
DEFAULT_REPLICA_RULE = ReplicaRule()


class ReplicaController:
    """How many replicas a stage should run, from per-tick observations.

    A pure object: it reads only ``clock`` and what :meth:`observe` is given.
    :meth:`observe` returns the count wanted (the current one when nothing
    should change); once the change is made, :meth:`resized` says what the
    stage runs now, and the cool-down starts.
    """

    __slots__ = (
        "_cold",
        "_cold_since",
        "_hold_until",
        "_hot",
        "_hot_since",
        "changes",
        "clock",
        "hi",
        "lo",
        "replicas",
        "rule",
    )

    def __init__(
        self,
        lo: int,
        hi: int,
        replicas: int,
        rule: ReplicaRule = DEFAULT_REPLICA_RULE,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not 1 <= lo <= hi:
            raise ValueError(f"replica bounds must satisfy 1 <= min <= max, got {lo}, {hi}")
        if not lo <= replicas <= hi:
            raise ValueError(f"replicas={replicas} is outside [min={lo}, max={hi}]")
        self.lo = lo
        self.hi = hi
        #: The replicas the stage runs now.
        self.replicas = replicas
        self.rule = rule
        self.clock: Callable[[], float] = clock if clock is not None else _monotonic
        #: Changes made so far (for tests and logs).
        self.changes = 0
        self._hold_until = -math.inf
        self._hot_since: float | None = None
        # The streaks' ticks, the last up_after / down_after seconds of them:
        self._hot: deque[tuple[float, int, float]] = deque()  # (time, backlog, throughput)
        self._cold_since: float | None = None
        self._cold: deque[tuple[float, float]] = deque()  # (time, busy replicas)

    def observe(self, backlog: int, busy: float, throughput: float) -> int:
        """One tick: ``backlog`` items waiting in the stage's queue, ``busy``
        replicas busy on average since the last tick (0 to ``replicas``),
        ``throughput`` items per second it finished since then.

        Returns the replica count wanted now.
        """
        now = self.clock()
        n = self.replicas
        rule = self.rule
        if now < self._hold_until:
            return n
        util = min(max(busy / n, 0.0), 1.0)
        if util >= rule.up_util and backlog > 0:
            if self._hot_since is None:
                self._hot_since = now
            self._hot.append((now, backlog, throughput))
            while now - self._hot[0][0] > rule.up_after:
                self._hot.popleft()
        else:
            self._hot_since = None
            self._hot.clear()
        if n > self.lo and util * n / (n - 1) <= rule.down_util:
            if self._cold_since is None:
                self._cold_since = now
            self._cold.append((now, util * n))
            while now - self._cold[0][0] > rule.down_after:
                self._cold.popleft()
        else:
            self._cold_since = None
            self._cold.clear()
        if self._hot_since is not None and now - self._hot_since >= rule.up_after and n < self.hi:
            return self._up(n)
        if self._cold_since is not None and now - self._cold_since >= rule.down_after:
            return self._down(n)
        return n

    def _up(self, n: int) -> int:
        t0, b0, _ = self._hot[0]
        t1, b1, _ = self._hot[-1]
        span = t1 - t0
        growth = (b1 - b0) / span if span > 0 else 0.0
        if growth < 0 and b1 / -growth < self.rule.up_after:
            return n  # draining by itself soon: wait and see
        done = sum(x for _, _, x in self._hot) / len(self._hot)
        need = n + 1
        if done > 0:
            need = math.ceil(n * (done + max(growth, 0.0)) / done)
        return min(self.hi, max(n + 1, min(need, 2 * n)))

    def _down(self, n: int) -> int:
        busy = sum(b for _, b in self._cold) / len(self._cold)
        need = math.ceil(busy / self.rule.down_util) if busy > 0 else self.lo
        return max(self.lo, min(n - 1, need))

    def resized(self, replicas: int) -> None:
        """The stage runs ``replicas`` now: start the cool-down, observe afresh."""
        if replicas != self.replicas:
            self.changes += 1
        self.replicas = min(max(replicas, self.lo), self.hi)
        self._hold_until = self.clock() + self.rule.cooldown
        self._hot_since = self._cold_since = None
        self._hot.clear()
        self._cold.clear()


def _monotonic() -> float:
    return asyncio.get_running_loop().time()


def can_resize(executor: Any) -> bool:
    """Whether the runner can change ``executor``'s replica count: it has a
    ``resize(n)`` method (plain or async) and an int ``replicas``."""
    return callable(getattr(executor, "resize", None)) and isinstance(
        getattr(executor, "replicas", None), int
    )


def busy_seconds(m: StageMetrics, now: float) -> float:
    """The stage's worker time spent in calls since it opened, as of ``now``."""
    service = m.service
    return service.total + sum(service.buf) + sum(now - t for t in m.running if t)


class ReplicaScaler:
    """Drives one stage's replicas: each tick, observe its metrics, ask the
    :class:`ReplicaController`, resize the executor and the stage's gate.

    Growing: the new replicas are started (their ``setup()`` done) before
    the gate lets more calls in. Shrinking: the gate is lowered first, then
    the executor retires replicas as they come idle. An executor that cannot
    resize (a batched stage in threads, say) keeps its ``max`` workers set
    up; the count then only sets how many of them take calls.
    """

    def __init__(
        self,
        sr: StageRun,
        clock: Callable[[], float],
        rule: ReplicaRule | None = None,
    ) -> None:
        adaptive = sr.spec.adaptive
        if adaptive is None or sr.gate is None:
            raise ValueError(f"stage {sr.name!r} has no concurrency=fb.Adaptive(...) to follow")
        if rule is None:  # the stage's fb.Adaptive(replicas=...), else the default
            rule = adaptive.replicas if adaptive.replicas is not None else DEFAULT_REPLICA_RULE
        self.sr = sr
        #: False: the executor keeps all ``max`` workers; only the gate follows.
        self.resizes = can_resize(sr.executor)
        self.gate = sr.gate
        self.clock = clock
        start = int(sr.gate.total)
        self.controller = ReplicaController(adaptive.min, adaptive.max, start, rule, clock)
        self._t = clock()
        self._busy = busy_seconds(sr.metrics, self._t)
        self._done = sr.metrics.done + sr.metrics.failed

    @property
    def replicas(self) -> int:
        """The replicas taking calls now."""
        return self.controller.replicas

    async def run(self) -> None:
        """Tick until cancelled (the runner cancels it when it stops)."""
        ex: Any = self.sr.executor
        if self.resizes and ex.replicas != self.replicas:  # started at another count
            await self._resize(self.replicas)
        while True:
            await asyncio.sleep(self.controller.rule.tick)
            try:
                await self.step()
            except Exception:
                # A fault here must not take the stage's workers down with
                # it (they share the runner's task group): log, keep going.
                log.exception("flowbatch: the replica scaler of stage %r failed", self.sr.name)

    async def step(self) -> None:
        """One observation, and the change it calls for."""
        now = self.clock()
        dt = now - self._t
        if dt <= 0:
            return
        m = self.sr.metrics
        busy = busy_seconds(m, now)
        done = m.done + m.failed
        ctl = self.controller
        want = ctl.observe(
            backlog=len(self.sr.inq),
            busy=(busy - self._busy) / dt,
            throughput=(done - self._done) / dt,
        )
        self._t, self._busy, self._done = now, busy, done
        if want != ctl.replicas:
            await self.apply(want)

    async def apply(self, n: int) -> None:
        """Run ``n`` replicas (within the stage's bounds)."""
        ctl = self.controller
        n = min(max(n, ctl.lo), ctl.hi)
        before = ctl.replicas
        if n < before:
            self.gate.total = n  # at most n calls from now; the others finish first
        now = await self._resize(n)
        self.gate.total = now
        self.sr.metrics.set_limit(now, self.clock())  # stats()' concurrency_limit
        ctl.resized(now)
        if now != before:
            log.info("flowbatch: stage %r runs %d replicas (was %d)", self.sr.name, now, before)

    async def _resize(self, n: int) -> int:
        """Ask the executor for ``n`` replicas; the count to admit calls for.

        ``n`` once the executor has taken the order (an executor whose
        ``resize`` returns before busy replicas have gone, as Ray's does,
        still counts them in ``replicas`` for a while); what it runs when
        the order failed.
        """
        ex: Any = self.sr.executor
        if not self.resizes:
            return n
        try:
            done = ex.resize(n)
            if inspect.isawaitable(done):
                await done
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "flowbatch: stage %r could not resize to %d replicas: %r", self.sr.name, n, exc
            )
            ctl = self.controller
            return min(max(int(ex.replicas), ctl.lo), ctl.hi)
        return n


def start_scalers(
    tg: asyncio.TaskGroup,
    stages: list[StageRun],
    clock: Callable[[], float],
    rule: ReplicaRule | None = None,
) -> list[asyncio.Task[None]]:
    """One :class:`ReplicaScaler` task in ``tg`` per adaptive stage that is
    batched or whose executor can resize (set as ``sr.scaler``); the caller
    cancels the tasks when it stops. (An unbatched stage on an executor that
    cannot resize has its limit set from latency instead: adaptive.py; a
    ``replicas=`` rule there has no effect.) ``rule``: for every stage; None
    (the runner's): each stage's ``fb.Adaptive(replicas=...)``, else
    :data:`DEFAULT_REPLICA_RULE`."""
    tasks: list[asyncio.Task[None]] = []
    for sr in stages:
        if sr.gate is None or sr.spec.adaptive is None:
            continue
        if can_resize(sr.executor) or sr.batch is not None:
            sr.scaler = scaler = ReplicaScaler(sr, clock, rule)
            tasks.append(tg.create_task(scaler.run()))
    return tasks
