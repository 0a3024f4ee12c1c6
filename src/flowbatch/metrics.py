"""Statistics: what each stage and the whole pipeline did, and the bottleneck.

The runner updates a :class:`StageMetrics` per stage on its hot path with
the cheapest operations there are: integer increments and one
``list.append`` per timing sample. The samples are folded into log-linear
histograms (8 buckets per octave, so about 6% resolution) in bulk with
numpy, off the hot path: periodically, and whenever statistics are read.
:meth:`Runner.stats` turns the accumulators into immutable records that
every exporter (Prometheus, the live view, reports) reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = [
    "Histogram",
    "PipelineStats",
    "StageMetrics",
    "StageStats",
    "Summary",
    "find_bottleneck",
]

_SUB = 8  # buckets per octave


class Histogram:
    """Counts of positive numbers in log-linear buckets, fed through ``buf``.

    Bucket 0 holds values below ``2 ** (min_exp - 1)`` (and zeros), the last
    bucket values of ``2 ** max_exp`` and more; in between each octave
    ``[2**(e-1), 2**e)`` is cut in 8 equal parts. Producers append to
    ``buf``; :meth:`fold` moves the samples into ``counts``.
    """

    __slots__ = ("buf", "counts", "max_exp", "min_exp", "n", "total", "uppers")

    def __init__(self, min_exp: int = -20, max_exp: int = 8) -> None:
        self.min_exp = min_exp
        self.max_exp = max_exp
        size = (max_exp - min_exp) * _SUB + 2
        self.buf: list[float] = []
        self.counts: npt.NDArray[np.int64] = np.zeros(size, dtype=np.int64)
        self.n = 0
        self.total = 0.0
        k = np.arange(1, size - 1)
        e = (k - 1) // _SUB + min_exp
        sub = (k - 1) % _SUB
        inner = (0.5 + (sub + 1) / (2 * _SUB)) * np.exp2(e.astype(np.float64))
        self.uppers: npt.NDArray[np.float64] = np.concatenate(
            ([2.0 ** (min_exp - 1)], inner, [math.inf])
        )

    def fold(self) -> None:
        """Move buffered samples into the bucket counts."""
        buf = self.buf
        if not buf:
            return
        a = np.array(buf, dtype=np.float64)
        buf.clear()  # in place: producers hold a reference to this list
        self.n += int(a.size)
        self.total += float(a.sum())
        m, e = np.frexp(a)
        idx = (e - self.min_exp) * _SUB + ((m - 0.5) * (2 * _SUB)).astype(np.int64) + 1
        idx[a <= 0] = 0
        np.clip(idx, 0, self.counts.size - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.counts.size)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile, as the middle of the bucket it falls in."""
        if not self.n:
            return 0.0
        cum = np.cumsum(self.counts)
        k = int(np.searchsorted(cum, q * self.n, side="left"))
        k = min(k, self.counts.size - 1)
        if k == 0:
            return 0.0
        upper = float(self.uppers[k])
        lower = float(self.uppers[k - 1])
        return lower if math.isinf(upper) else (lower + upper) / 2

    def buckets(self) -> tuple[tuple[float, int], ...]:
        """Cumulative counts at each octave boundary ``2**e``, then ``+Inf``."""
        cum = np.cumsum(self.counts)
        out: list[tuple[float, int]] = []
        for e in range(self.min_exp, self.max_exp):
            k = (e - self.min_exp) * _SUB + _SUB  # the bucket whose upper bound is 2**e
            out.append((2.0**e, int(cum[k])))
        out.append((math.inf, int(cum[-1])))
        return tuple(out)

    def summary(self) -> Summary:
        self.fold()
        if not self.n:
            return Summary()
        return Summary(
            count=self.n,
            total=self.total,
            mean=self.total / self.n,
            p50=self.quantile(0.50),
            p99=self.quantile(0.99),
            buckets=self.buckets(),
        )


@dataclass(frozen=True, slots=True)
class Summary:
    """Count, sum, mean and percentiles of a measure (seconds for durations).

    Percentiles come from the histogram (within about 6%); ``buckets`` are
    cumulative counts at each octave boundary, ready for a Prometheus
    histogram.
    """

    count: int = 0
    total: float = 0.0
    mean: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    buckets: tuple[tuple[float, int], ...] = ()


@dataclass(frozen=True, slots=True)
class StageStats:
    """One stage's figures since the runner opened.

    Outcomes: ``done`` (passed the stage), ``failed`` (failed for good
    here), ``retried`` (attempts that failed and were retried), ``expired``
    (dropped here because the deadline had passed), ``dropped`` (skipped
    because its caller had gone: cancelled, or a sibling failed).
    ``batch_max_size`` is 0 for an unbatched stage. ``utilization`` is the
    fraction of the workers' time spent in the stage function since the runner
    opened; ``padding_waste`` the fraction of a cost-bounded batch's padded
    cost that was padding.
    """

    name: str
    executor: str
    workers: int
    batch_max_size: int
    done: int
    failed: int
    retried: int
    expired: int
    dropped: int
    queued: int
    in_flight: int
    utilization: float
    busy_seconds: float
    service_time: Summary
    queue_wait: Summary
    batches: int
    mean_batch_size: float
    batch_sizes: dict[int, int] = field(default_factory=dict)
    batch_cost: Summary = field(default_factory=Summary)
    padding_waste: float = 0.0


@dataclass(frozen=True, slots=True)
class PipelineStats:
    """The whole pipeline's figures, with one :class:`StageStats` per stage.

    ``bottleneck`` names the stage whose workers are busiest (the one to
    give more workers or larger batches), or is ``None`` before any work.
    """

    name: str
    elapsed: float
    submitted: int
    completed: int
    failed: int
    expired: int
    cancelled: int
    in_flight: int
    items_per_s: float
    latency: Summary
    stages: tuple[StageStats, ...]
    bottleneck: str | None

    def stage(self, name: str) -> StageStats:
        """The figures of the stage called ``name``."""
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage named {name!r}; stages: {[s.name for s in self.stages]}")


class StageMetrics:
    """Mutable accumulators for one stage, written by the runner only.

    ``running[i]`` is the start time of worker ``i``'s current call (0.0
    when idle) and ``holding[i]`` the number of items in it; busy time is the
    total service time of finished calls plus the running calls so far.
    """

    __slots__ = (
        "batch_cost",
        "batch_max_size",
        "batch_sizes",
        "batched_items",
        "batches",
        "done",
        "dropped",
        "executor",
        "expired",
        "failed",
        "holding",
        "name",
        "padded_cost",
        "retried",
        "running",
        "service",
        "wait",
        "workers",
    )

    def __init__(self, name: str, executor: str, workers: int, batch_max_size: int = 0) -> None:
        self.name = name
        self.executor = executor
        self.workers = workers
        self.batch_max_size = batch_max_size
        self.done = 0
        self.failed = 0
        self.retried = 0
        self.expired = 0
        self.dropped = 0
        self.running = [0.0] * workers
        self.holding = [0] * workers
        self.service = Histogram()
        self.wait = Histogram()
        self.batches = 0
        self.batched_items = 0
        self.batch_sizes: dict[int, int] = {}
        self.batch_cost = Histogram(min_exp=0, max_exp=24)
        self.padded_cost = 0.0

    def served(self, slot: int, started: float, now: float) -> None:
        """Worker ``slot``'s call that began at ``started`` has returned."""
        self.running[slot] = 0.0
        self.holding[slot] = 0
        self.service.buf.append(now - started)

    def batch(self, size: int, costs: list[float] | None) -> None:
        self.batches += 1
        self.batched_items += size
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1
        if costs:
            self.batch_cost.buf.append(sum(costs))
            self.padded_cost += size * max(costs)

    def fold(self) -> None:
        self.service.fold()
        self.wait.fold()
        self.batch_cost.fold()

    def snapshot(self, now: float, elapsed: float, queued: int) -> StageStats:
        service = self.service.summary()
        busy = service.total + sum(now - t for t in self.running if t)
        capacity = self.workers * elapsed
        cost = self.batch_cost.summary()
        return StageStats(
            name=self.name,
            executor=self.executor,
            workers=self.workers,
            batch_max_size=self.batch_max_size,
            done=self.done,
            failed=self.failed,
            retried=self.retried,
            expired=self.expired,
            dropped=self.dropped,
            queued=queued,
            in_flight=sum(self.holding),
            utilization=min(1.0, busy / capacity) if capacity > 0 else 0.0,
            busy_seconds=busy,
            service_time=service,
            queue_wait=self.wait.summary(),
            batches=self.batches,
            mean_batch_size=self.batched_items / self.batches if self.batches else 0.0,
            batch_sizes=dict(sorted(self.batch_sizes.items())),
            batch_cost=cost,
            padding_waste=1.0 - cost.total / self.padded_cost if self.padded_cost else 0.0,
        )


def find_bottleneck(stages: tuple[StageStats, ...]) -> str | None:
    """The stage with the highest utilization; queue length breaks ties."""
    worked = [s for s in stages if s.busy_seconds > 0]
    if not worked:
        return None
    return max(worked, key=lambda s: (round(s.utilization, 2), s.queued)).name
