"""Statistics: what each stage and the whole pipeline did, and the bottleneck.

The runner updates a :class:`StageMetrics` per stage on its hot path with
the cheapest operations there are: integer increments and one
``list.append`` per timing sample. The samples are folded into log-linear
histograms (4 buckets per octave, each at most 25% wide) in bulk with
numpy, off the hot path: periodically, and whenever statistics are read.
:meth:`Runner.stats` turns the accumulators into immutable records that
every exporter (Prometheus, the live view, reports) reads. Quantiles
(:func:`quantile`), utilization (:func:`utilization`) and the bottleneck
(:func:`find_bottleneck`) are computed here and nowhere else.

(Over 500 lines on purpose: the records, their accumulators and every formula
that derives a figure from them stay in one module, the one place to read
how a figure is made.)
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .batching import REASONS, CostModel

__all__ = [
    "PER_OCTAVE",
    "DeviceStats",
    "Histogram",
    "PipelineStats",
    "StageMetrics",
    "StageStats",
    "Summary",
    "capacity",
    "drain_seconds",
    "find_bottleneck",
    "format_seconds",
    "quantile",
    "utilization",
]

#: Buckets per octave of the duration histograms. Each bucket is at most 25%
#: wide, and a quantile is interpolated inside its bucket. Prometheus gets the
#: same buckets, so that ``stats()``, ``flowbatch top`` and
#: ``histogram_quantile`` give the same figure for the same observations.
PER_OCTAVE = 4


class Histogram:
    """Counts of positive numbers in log-linear buckets, fed through ``buf``.

    Bucket 0 holds values below ``2 ** (min_exp - 1)`` (and zeros), the last
    values of ``2 ** (max_exp - 1)`` and more; in between each octave
    ``[2**(e-1), 2**e)`` is cut in ``per_octave`` equal parts. Producers
    append to ``buf``; :meth:`fold` moves the samples into ``counts``.
    """

    __slots__ = ("buf", "counts", "max_exp", "min_exp", "n", "per_octave", "total", "uppers")

    def __init__(self, min_exp: int = -17, max_exp: int = 8, per_octave: int = PER_OCTAVE) -> None:
        self.min_exp = min_exp
        self.max_exp = max_exp
        self.per_octave = per_octave
        size = (max_exp - min_exp) * per_octave + 2
        self.buf: list[float] = []
        self.counts: npt.NDArray[np.int64] = np.zeros(size, dtype=np.int64)
        self.n = 0
        self.total = 0.0
        k = np.arange(1, size - 1)
        e = (k - 1) // per_octave + min_exp
        sub = (k - 1) % per_octave
        inner = (0.5 + (sub + 1) / (2 * per_octave)) * np.exp2(e.astype(np.float64))
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
        p = self.per_octave
        idx = (e - self.min_exp) * p + ((m - 0.5) * (2 * p)).astype(np.int64) + 1
        idx[a <= 0] = 0
        np.clip(idx, 0, self.counts.size - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.counts.size)

    def buckets(self) -> tuple[tuple[float, int], ...]:
        """Cumulative counts at every bucket's upper bound, the last ``+Inf``."""
        return tuple(zip(self.uppers.tolist(), np.cumsum(self.counts).tolist(), strict=True))

    def quantile(self, q: float) -> float:
        """The ``q`` quantile of the folded samples (see :func:`quantile`)."""
        return quantile(self.buckets(), q)

    def summary(self) -> Summary:
        self.fold()
        if not self.n:
            return Summary()
        return Summary.of(self.buckets(), self.total)


def quantile(buckets: Sequence[tuple[float, float]], q: float) -> float:
    """The ``q`` quantile of cumulative ``(upper bound, count)`` buckets.

    The one quantile method of flowbatch: :meth:`Runner.stats`, ``flowbatch
    top``, ``flowbatch bench`` and the dashboard all read figures through it.
    It interpolates linearly inside the bucket the quantile falls in, as
    Prometheus' ``histogram_quantile`` does (the first bucket starts at 0;
    in the open ``+Inf`` bucket the answer is its lower bound). 0.0 when
    there are no observations.
    """
    if not buckets:
        return 0.0
    total = buckets[-1][1]
    if total <= 0:
        return 0.0
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, cum in buckets:
        if cum >= rank and cum > below:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (cum - below)
        if not math.isinf(upper):
            lower = upper
        below = cum
    return lower


def utilization(busy_seconds: float, workers: int | float, seconds: float) -> float:
    """The fraction of ``workers``' time over ``seconds`` that was busy, in [0, 1].

    The one utilization formula: the runner's since-start figure, and the
    recent figures of ``top``, ``bench`` and the dashboard
    (:meth:`PipelineStats.since`), all come from here.
    """
    capacity = workers * seconds
    if capacity <= 0:
        return 0.0
    return min(1.0, max(0.0, busy_seconds / capacity))


def capacity(items: int | float, busy_seconds: float, workers: int | float) -> float | None:
    """Items per second ``workers`` finish when all are busy, as measured.

    ``items`` finished in ``busy_seconds`` of worker time is
    ``items / busy_seconds`` per busy worker; times ``workers``. None when
    nothing has been measured (no item finished, or no busy time): the speed
    is unknown, not zero. The one capacity formula, behind
    :attr:`StageStats.capacity` and :attr:`PipelineStats.capacity`.
    """
    if items <= 0 or busy_seconds <= 0 or workers <= 0:
        return None
    return items / busy_seconds * workers


def drain_seconds(backlog: int | float, rate: float | None) -> float | None:
    """Seconds to finish ``backlog`` items at ``rate`` items per second.

    0.0 when there is no backlog (whatever the rate); None when there is one
    and the rate is unknown. The one drain formula, behind
    :attr:`PipelineStats.drain_seconds` and the autoscaling signals
    (``docs/autoscaling.md``).
    """
    if backlog <= 0:
        return 0.0
    if rate is None or rate <= 0:
        return None
    return backlog / rate


def _increase(cur: float, prev: float) -> float:
    """A counter's increase; a counter that went down was reset (a restart)."""
    return cur - prev if cur >= prev else cur


@dataclass(frozen=True, slots=True)
class Summary:
    """Count, sum, mean and percentiles of a measure (seconds for durations).

    ``buckets`` are the histogram's cumulative counts at every bucket's
    upper bound (the last is ``+Inf``), exactly as Prometheus gets them;
    ``p50``, ``p99`` and :meth:`quantile` read them through
    :func:`quantile`.
    """

    count: int = 0
    total: float = 0.0
    mean: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    buckets: tuple[tuple[float, int], ...] = ()

    @classmethod
    def of(cls, buckets: Sequence[tuple[float, float]], total: float) -> Summary:
        """The summary of cumulative ``buckets`` whose observations sum to ``total``.

        Empty buckets below the lowest observation are left out but one (its
        bound is where that observation's bucket starts): quantiles are the
        same, and the Prometheus page is shorter. Summing such pages across
        processes stays exact, since a bucket left out counts 0 there too.
        """
        count = int(buckets[-1][1]) if buckets else 0
        if count <= 0:
            return cls()
        first = next(i for i, (_, c) in enumerate(buckets) if c > 0)
        cum = tuple((float(b), int(c)) for b, c in buckets[max(0, first - 1):])
        return cls(
            count=count,
            total=total,
            mean=total / count,
            p50=quantile(cum, 0.50),
            p99=quantile(cum, 0.99),
            buckets=cum,
        )

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0.9 for p90), by :func:`quantile`."""
        return quantile(self.buckets, q)

    def since(self, prev: Summary) -> Summary:
        """The summary of the observations made after ``prev`` was taken.

        Both must come from the same histogram; one whose counts went down was
        reset (a restart), and then this one is the answer.
        """
        if not prev.count or not self.buckets:
            return self
        bounds = [b for b, _ in prev.buckets]
        out: list[tuple[float, int]] = []
        for b, c in self.buckets:
            i = bisect.bisect_right(bounds, b)  # prev's count at b: its last bound <= b
            d = c - (prev.buckets[i - 1][1] if i else 0)
            if d < 0:
                return self
            out.append((b, d))
        return Summary.of(out, max(0.0, self.total - prev.total))

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready data: buckets as ``[upper, cumulative]``, ``+Inf`` as None."""
        return {
            "count": self.count,
            "total": self.total,
            "mean": self.mean,
            "p50": self.p50,
            "p99": self.p99,
            "buckets": [[None if math.isinf(b) else b, c] for b, c in self.buckets],
        }


@dataclass(frozen=True, slots=True)
class DeviceStats:
    """One model replica placed on a device (a stage with ``devices=``).

    ``batch_cap`` is the most items a batch may hold on this replica, learned
    from out-of-memory errors (``None``: none yet, the batch's own
    ``max_size``); ``cost_cap`` the same for the padded cost (``Batch.cost``);
    ``largest_batch`` the largest batch that ran; ``oom_splits`` the batches
    split in halves after running out of memory. ``memory_used`` /
    ``memory_total`` (bytes) and ``utilization`` (0..1) are the device's, from
    NVML (or torch's allocator, memory only), ``None`` where neither tells.
    """

    device: str
    replica: int
    batch_cap: int | None = None
    cost_cap: float | None = None
    largest_batch: int = 0
    oom_splits: int = 0
    memory_used: int | None = None
    memory_total: int | None = None
    utilization: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The figures as JSON-ready data, keyed by field name."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


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
    cost that was padding; ``restarts`` the workers replaced after dying;
    ``pending`` the workers the executor waits for (a Ray actor the cluster
    cannot place yet); ``devices`` one :class:`DeviceStats` per replica of a
    stage placed with ``devices=`` (learned batch caps, memory, utilization).
    ``concurrency_limit``: a stage with ``concurrency=fb.Adaptive(...)``, the
    calls it may have in flight now (None for a fixed concurrency);
    ``backpressured`` the calls that raised ``fb.Backpressure`` (their items
    were queued again, not counted in ``retried``).

    Why batches went out: ``batch_reasons`` counts the batches dispatched per
    reason (``full``, ``worker_free``, ``max_wait``, ``linger``, ``deadline``,
    ``drain``; see ``flowbatch.batching.REASONS``) and ``batch_reason_items``
    the items in them (:meth:`mean_batch_size_by_reason`). A batch retried
    whole or split after an error is one dispatch, though more calls
    (``batches``). ``batch_time_fit``: with ``Batch(latency_target=...)``,
    the learned ``(a, b)``: a batch of ``n`` is expected to take ``a + b*n``
    seconds (``None`` otherwise, or before a batch has run).

    ``replicas``: with ``concurrency=fb.Adaptive(...)`` on a stage whose
    executor can resize (process workers, Ray actors), the replicas taking
    calls now (between ``min`` and ``max``; ``workers`` is ``max``); None
    for other stages.

    ``worker_seconds``: with ``concurrency=fb.Adaptive(...)``, the worker
    time the stage's limit allowed over the record's span (the integral of
    ``concurrency_limit``, or of ``replicas``, over time), and ``mean_limit``
    that time per second. Such a stage's ``utilization`` and ``capacity`` are
    over them, not over ``workers`` (its ``max``): a stage held at 2 of 16
    with both busy is 100% busy. None for a fixed concurrency.
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
    restarts: int = 0
    pending: int = 0
    devices: tuple[DeviceStats, ...] = ()
    concurrency_limit: int | None = None
    backpressured: int = 0
    batch_reasons: dict[str, int] = field(default_factory=dict)
    batch_reason_items: dict[str, int] = field(default_factory=dict)
    batch_time_fit: tuple[float, float] | None = None
    replicas: int | None = None
    worker_seconds: float | None = None
    mean_limit: float | None = None

    def mean_batch_size_by_reason(self) -> dict[str, float]:
        """The mean size of the batches dispatched for each reason."""
        return {
            r: self.batch_reason_items.get(r, 0) / n for r, n in self.batch_reasons.items() if n
        }

    def since(self, prev: StageStats, seconds: float) -> StageStats:
        """What the stage did in the ``seconds`` after ``prev`` was taken.

        Counters, busy time, histograms and batches become increases (a
        counter that went down was reset: a restart), utilization is over
        ``seconds`` (an adaptive stage's: over the worker-seconds its limit
        allowed in them); gauges (``queued``, ``in_flight``, ``workers``) and
        ``padding_waste`` are as of this snapshot.
        """
        busy = _increase(self.busy_seconds, prev.busy_seconds)
        if self.batches >= prev.batches:
            batches = self.batches - prev.batches
            items = self.mean_batch_size * self.batches - prev.mean_batch_size * prev.batches
            sizes = {k: v - prev.batch_sizes.get(k, 0) for k, v in self.batch_sizes.items()}
        else:
            batches, items, sizes = self.batches, self.mean_batch_size * self.batches, {}
        reasons = _increases(self.batch_reasons, prev.batch_reasons)
        reason_items = _increases(self.batch_reason_items, prev.batch_reason_items)
        allowed = mean = None
        if self.worker_seconds is not None:
            allowed = _increase(self.worker_seconds, prev.worker_seconds or 0.0)
            mean = allowed / seconds if seconds > 0 else self.mean_limit
        return dataclasses.replace(
            self,
            done=int(_increase(self.done, prev.done)),
            failed=int(_increase(self.failed, prev.failed)),
            retried=int(_increase(self.retried, prev.retried)),
            expired=int(_increase(self.expired, prev.expired)),
            dropped=int(_increase(self.dropped, prev.dropped)),
            utilization=utilization(busy, self.workers if mean is None else mean, seconds),
            busy_seconds=busy,
            worker_seconds=allowed,
            mean_limit=mean,
            service_time=self.service_time.since(prev.service_time),
            queue_wait=self.queue_wait.since(prev.queue_wait),
            batches=batches,
            mean_batch_size=items / batches if batches else 0.0,
            batch_sizes={k: v for k, v in sizes.items() if v > 0},
            batch_cost=self.batch_cost.since(prev.batch_cost),
            batch_reasons={k: v for k, v in reasons.items() if v > 0},
            batch_reason_items={k: v for k, v in reason_items.items() if reasons.get(k)},
            restarts=int(_increase(self.restarts, prev.restarts)),
            backpressured=int(_increase(self.backpressured, prev.backpressured)),
        )

    @property
    def capacity(self) -> float | None:
        """Items per second the stage finishes with all its workers busy.

        Items that left it (done or failed) per second of busy worker time,
        times its workers (:func:`capacity`; an adaptive stage's: its
        :attr:`mean_limit`); None before it has finished an item. Over the interval for a :meth:`since` record. A batched stage's
        figure holds for the batch sizes it ran: under a backlog its batches
        grow and it serves more, so a drain estimate from it errs long.
        """
        workers = self.workers if self.mean_limit is None else self.mean_limit
        return capacity(self.done + self.failed, self.busy_seconds, workers)

    def to_dict(self) -> dict[str, Any]:
        """The figures as JSON-ready data, keyed by field name (``batch_sizes``
        as ``[size, count]`` pairs, summaries as :meth:`Summary.to_dict`),
        and the derived ``capacity``."""
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["capacity"] = self.capacity
        return out

    def __str__(self) -> str:
        batch = "-"
        if self.batches:
            batch = f"{self.mean_batch_size:.1f}" + (
                f"/{self.batch_max_size}" if self.batch_max_size else ""
            )
        return (
            f"stage {self.name} ({self.executor} x{self.workers}): {self.done} done, "
            f"{self.failed} failed, {self.utilization:.0%} busy, batch {batch}, "
            f"call p50 {format_seconds(self.service_time.p50)} "
            f"p99 {format_seconds(self.service_time.p99)}, "
            f"wait p50 {format_seconds(self.queue_wait.p50)}"
        )


@dataclass(frozen=True, slots=True)
class PipelineStats:
    """The whole pipeline's figures, with one :class:`StageStats` per stage.

    ``bottleneck`` names the stage whose workers are busiest (the one to
    give more workers or larger batches), or is ``None`` before any work.
    ``rejected`` counts items refused with ``Overloaded`` (never admitted).
    ``in_flight_limit``: the in-flight limiter's total now (``max_in_flight``,
    or where ``latency_target``'s controller has set it; None: no limiter);
    ``latency_target``: seconds (None: none, or an auto target not yet known).
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
    rejected: int = 0
    in_flight_limit: float | None = None
    latency_target: float | None = None

    def stage(self, name: str) -> StageStats:
        """The figures of the stage called ``name``."""
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage named {name!r}; stages: {[s.name for s in self.stages]}")

    # The autoscaling signals (docs/autoscaling.md): Prometheus and `flowbatch
    # top` read them here, from the same record as every other figure.

    @property
    def capacity(self) -> float | None:
        """Items per second the pipeline can finish: its slowest stage's
        :attr:`StageStats.capacity`.

        Stages that have not finished an item and hold none are left out;
        None while one that holds items has not finished any (its speed is
        unknown), or before any work.
        """
        rates: list[float] = []
        for s in self.stages:
            rate = s.capacity
            if rate is None:
                if s.queued or s.in_flight:
                    return None
                continue
            rates.append(rate)
        return min(rates, default=None)

    @property
    def backlog_per_replica(self) -> float:
        """Items admitted and not yet answered (``in_flight``: waiting in the
        stages' queues and inside their calls) per worker of the bottleneck
        stage (before any work: of the stage with the fewest workers); an
        adaptive stage's workers are its limit now (``concurrency_limit``)."""
        if self.in_flight <= 0 or not self.stages:
            return 0.0
        neck = next((s for s in self.stages if s.name == self.bottleneck), None)
        workers = (
            _now_workers(neck) if neck is not None else min(_now_workers(s) for s in self.stages)
        )
        return self.in_flight / max(1, workers)

    @property
    def drain_seconds(self) -> float | None:
        """Estimated seconds to answer every item in flight at :attr:`capacity`:
        ``in_flight / capacity`` (:func:`drain_seconds`). 0.0 with nothing in
        flight; None while the capacity is unknown."""
        return drain_seconds(self.in_flight, self.capacity)

    def since(self, prev: PipelineStats, seconds: float | None = None) -> PipelineStats:
        """What happened between ``prev`` and this snapshot of the same pipeline.

        The recent figures of ``flowbatch top``, the bench timeline and the
        dashboard: counters and histograms become increases, ``items_per_s``
        and each stage's utilization are over the interval, and
        ``bottleneck`` is the busiest stage in it. ``seconds`` defaults to
        the difference of the two snapshots' ``elapsed``.

        Usage::

            before = runner.stats(); ...; recent = runner.stats().since(before)
        """
        dt = self.elapsed - prev.elapsed if seconds is None else seconds
        if dt <= 0:
            dt = self.elapsed if seconds is None else 0.0
        before = {s.name: s for s in prev.stages}
        stages = tuple(
            s.since(before[s.name], dt) if s.name in before else s.since(_unused(s), dt)
            for s in self.stages
        )
        completed = int(_increase(self.completed, prev.completed))
        return dataclasses.replace(
            self,
            elapsed=dt,
            submitted=int(_increase(self.submitted, prev.submitted)),
            completed=completed,
            failed=int(_increase(self.failed, prev.failed)),
            expired=int(_increase(self.expired, prev.expired)),
            cancelled=int(_increase(self.cancelled, prev.cancelled)),
            rejected=int(_increase(self.rejected, prev.rejected)),
            items_per_s=completed / dt if dt > 0 else 0.0,
            latency=self.latency.since(prev.latency),
            stages=stages,
            bottleneck=find_bottleneck(stages),
        )

    def to_dict(self) -> dict[str, Any]:
        """The figures as JSON-ready data, keyed by field name; ``stages`` as a
        list of :meth:`StageStats.to_dict`; and the derived autoscaling
        signals ``capacity``, ``backlog_per_replica`` and ``drain_seconds``."""
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out.update(
            capacity=self.capacity,
            backlog_per_replica=self.backlog_per_replica,
            drain_seconds=self.drain_seconds,
        )
        return out

    def __str__(self) -> str:
        head = (
            f"pipeline {self.name}: {self.submitted} submitted, {self.completed} completed, "
            f"{self.failed} failed, {self.expired} expired, {self.cancelled} cancelled, "
            f"{self.in_flight} in flight\n"
            f"{self.items_per_s:,.1f} items/s over {self.elapsed:.2f} s; latency "
            f"p50 {format_seconds(self.latency.p50)} p99 {format_seconds(self.latency.p99)}; "
            f"bottleneck: {self.bottleneck or '-'}"
        )
        rows = [["  stage", "executor", "workers", "done", "failed", "busy", "batch",
                 "call p50", "call p99", "wait p50"]]
        for s in self.stages:
            batch = "-"
            if s.batches:
                batch = f"{s.mean_batch_size:.1f}" + (
                    f"/{s.batch_max_size}" if s.batch_max_size else ""
                )
            rows.append([
                ("> " if s.name == self.bottleneck else "  ") + s.name,
                s.executor,
                str(s.workers),
                str(s.done),
                str(s.failed),
                f"{s.utilization:.0%}",
                batch,
                format_seconds(s.service_time.p50),
                format_seconds(s.service_time.p99),
                format_seconds(s.queue_wait.p50),
            ])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
            for r in rows
        ]
        return head + "\n" + "\n".join(lines)


class StageMetrics:
    """Mutable accumulators for one stage, written by the runner only.

    ``running[i]`` is the start time of worker ``i``'s current call (0.0
    when idle) and ``holding[i]`` the number of items in it; busy time is the
    total service time of finished calls plus the running calls so far.
    """

    __slots__ = (
        "backpressured",
        "batch_cost",
        "batch_max_size",
        "batch_sizes",
        "batched_items",
        "batches",
        "cost_model",
        "done",
        "dropped",
        "executor",
        "expired",
        "failed",
        "holding",
        "limit",
        "limit_at",
        "limit_seconds",
        "name",
        "padded_cost",
        "reason_batches",
        "reason_items",
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
        self.batch_cost = Histogram(min_exp=0, max_exp=24, per_octave=1)
        self.padded_cost = 0.0
        # fb.Adaptive: the stage's current limit (its StageRun sets it)
        self.limit: int | None = None
        # ... and its integral over time: worker-seconds allowed up to limit_at
        # (set_limit moves both; a change, not a call, costs one update)
        self.limit_seconds = 0.0
        self.limit_at = 0.0
        self.backpressured = 0
        # Why batches went out (batching.REASONS), every key present: the
        # worker loop counts with one `+=` each, no method call per batch.
        self.reason_batches: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.reason_items: dict[str, int] = dict.fromkeys(REASONS, 0)
        # Batch(latency_target=...): the learned batch time (the worker loop sets it).
        self.cost_model: CostModel | None = None

    def opened(self, now: float) -> None:
        """The runner opened at ``now``: the limit's worker-seconds count from here."""
        self.limit_seconds = 0.0
        self.limit_at = now

    def set_limit(self, n: int, now: float) -> None:
        """An adaptive stage's limit (gate total, replicas) is ``n`` from ``now``."""
        if self.limit is not None:
            self.limit_seconds += self.limit * max(0.0, now - self.limit_at)
        self.limit_at = now
        self.limit = n

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
        cost = self.batch_cost.summary()
        allowed = mean = None
        if self.limit is not None:  # fb.Adaptive: over the limit's worker-seconds
            allowed = 0.0
            if elapsed > 0:
                allowed = self.limit_seconds + self.limit * max(0.0, now - self.limit_at)
            mean = allowed / elapsed if elapsed > 0 else float(self.limit)
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
            utilization=utilization(busy, self.workers if mean is None else mean, elapsed),
            busy_seconds=busy,
            worker_seconds=allowed,
            mean_limit=mean,
            service_time=service,
            queue_wait=self.wait.summary(),
            batches=self.batches,
            mean_batch_size=self.batched_items / self.batches if self.batches else 0.0,
            batch_sizes=dict(sorted(self.batch_sizes.items())),
            batch_cost=cost,
            padding_waste=1.0 - cost.total / self.padded_cost if self.padded_cost else 0.0,
            concurrency_limit=self.limit,
            backpressured=self.backpressured,
            batch_reasons={k: v for k, v in self.reason_batches.items() if v},
            batch_reason_items={k: v for k, v in self.reason_items.items() if v},
            batch_time_fit=(
                (model.a, model.b)
                if (model := self.cost_model) is not None and model.samples
                else None
            ),
        )


def find_bottleneck(
    stages: Sequence[StageStats], util: Mapping[str, float] | None = None
) -> str | None:
    """The stage with the highest utilization; queue length breaks ties.

    Only stages that worked count (``None`` before any work). ``util``
    overrides some stages' utilization (recent figures, say). The one
    bottleneck rule: ``stats()``, Prometheus, ``top``, ``bench``, the
    dashboard and the advice all name the stage it names.
    """
    worked = [s for s in stages if s.busy_seconds > 0]
    if not worked:
        return None

    def load(s: StageStats) -> tuple[float, int]:
        u = util.get(s.name, s.utilization) if util else s.utilization
        return round(u, 2), s.queued

    return max(worked, key=load).name


def format_seconds(s: float) -> str:
    """A duration for people: ``"850 us"``, ``"12.3 ms"``, ``"1.25 s"``."""
    if s < 1e-6:
        return f"{s * 1e9:.0f} ns" if s > 0 else "0"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1.0:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def _now_workers(s: StageStats) -> int:
    """The workers taking calls now: an adaptive stage's limit, else ``workers``."""
    return s.workers if s.concurrency_limit is None else s.concurrency_limit


def _unused(s: StageStats) -> StageStats:
    """``s`` before it did anything: the base of a stage a snapshot lacks."""
    return dataclasses.replace(
        s, done=0, failed=0, retried=0, expired=0, dropped=0, busy_seconds=0.0,
        service_time=Summary(), queue_wait=Summary(), batches=0, mean_batch_size=0.0,
        batch_sizes={}, batch_cost=Summary(), batch_reasons={}, batch_reason_items={},
        worker_seconds=None if s.worker_seconds is None else 0.0,
    )


def _increases(cur: Mapping[str, int], prev: Mapping[str, int]) -> dict[str, int]:
    """Per-key counter increases (a key whose counter went down was reset)."""
    return {k: int(_increase(v, prev.get(k, 0))) for k, v in cur.items()}


def _plain(v: Any) -> Any:
    """``v`` as JSON-ready data (see the ``to_dict`` methods)."""
    if isinstance(v, Summary | StageStats | DeviceStats):
        return v.to_dict()
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return [[k, x] for k, x in v.items()]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
