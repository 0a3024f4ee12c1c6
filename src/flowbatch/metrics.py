"""Statistics: what each stage and the whole pipeline did, and the bottleneck.

The runner updates a :class:`StageMetrics` per stage on its hot path (plain
counters and bounded sample rings, no locks: everything runs on the event
loop). :meth:`Runner.stats` turns them into immutable records that
exporters and reports read.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

__all__ = ["PipelineStats", "StageMetrics", "StageStats", "Summary"]

# How many recent samples the percentiles are computed over.
SAMPLE_WINDOW = 4096


@dataclass(frozen=True, slots=True)
class Summary:
    """Count, mean and percentiles of a duration, in seconds.

    The mean is over every sample; the percentiles over the most recent
    ``SAMPLE_WINDOW`` samples.
    """

    count: int = 0
    mean: float = 0.0
    p50: float = 0.0
    p99: float = 0.0

    @classmethod
    def of(cls, count: int, total: float, recent: deque[float]) -> Summary:
        if not count:
            return cls()
        ordered = sorted(recent)
        return cls(
            count=count,
            mean=total / count,
            p50=_percentile(ordered, 0.50),
            p99=_percentile(ordered, 0.99),
        )


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    k = max(0, math.ceil(q * len(ordered)) - 1)
    return ordered[k]


@dataclass(frozen=True, slots=True)
class StageStats:
    """One stage's figures since the runner opened."""

    name: str
    executor: str
    workers: int
    done: int
    failed: int
    retried: int
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
    """Mutable accumulators for one stage, updated by the runner only.

    The runner writes these fields inline on its hot path. ``running[i]`` is
    the start time of worker ``i``'s current call (0.0 when idle) and
    ``holding[i]`` the number of items in it; busy time is the sum of
    finished calls' service times plus the running calls so far.
    """

    __slots__ = (
        "batch_sizes",
        "batched_items",
        "batches",
        "done",
        "dropped",
        "executor",
        "failed",
        "holding",
        "name",
        "retried",
        "running",
        "service_n",
        "service_recent",
        "service_total",
        "wait_n",
        "wait_recent",
        "wait_total",
        "workers",
    )

    def __init__(self, name: str, executor: str, workers: int) -> None:
        self.name = name
        self.executor = executor
        self.workers = workers
        self.done = 0
        self.failed = 0
        self.retried = 0
        self.dropped = 0
        self.running = [0.0] * workers
        self.holding = [0] * workers
        self.service_n = 0
        self.service_total = 0.0
        self.service_recent: deque[float] = deque(maxlen=SAMPLE_WINDOW)
        self.wait_n = 0
        self.wait_total = 0.0
        self.wait_recent: deque[float] = deque(maxlen=SAMPLE_WINDOW)
        self.batches = 0
        self.batched_items = 0
        self.batch_sizes: dict[int, int] = {}

    def served(self, slot: int, started: float, now: float) -> None:
        """Worker ``slot``'s call that began at ``started`` has returned."""
        self.running[slot] = 0.0
        self.holding[slot] = 0
        d = now - started
        self.service_n += 1
        self.service_total += d
        self.service_recent.append(d)

    def waited(self, d: float) -> None:
        self.wait_n += 1
        self.wait_total += d
        self.wait_recent.append(d)

    def batch(self, size: int) -> None:
        self.batches += 1
        self.batched_items += size
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1

    def snapshot(self, now: float, elapsed: float, queued: int) -> StageStats:
        busy = self.service_total + sum(now - t for t in self.running if t)
        capacity = self.workers * elapsed
        return StageStats(
            name=self.name,
            executor=self.executor,
            workers=self.workers,
            done=self.done,
            failed=self.failed,
            retried=self.retried,
            dropped=self.dropped,
            queued=queued,
            in_flight=sum(self.holding),
            utilization=min(1.0, busy / capacity) if capacity > 0 else 0.0,
            busy_seconds=busy,
            service_time=Summary.of(self.service_n, self.service_total, self.service_recent),
            queue_wait=Summary.of(self.wait_n, self.wait_total, self.wait_recent),
            batches=self.batches,
            mean_batch_size=self.batched_items / self.batches if self.batches else 0.0,
            batch_sizes=dict(sorted(self.batch_sizes.items())),
        )


def find_bottleneck(stages: tuple[StageStats, ...]) -> str | None:
    """The stage with the highest utilization; queue length breaks ties."""
    worked = [s for s in stages if s.busy_seconds > 0]
    if not worked:
        return None
    return max(worked, key=lambda s: (round(s.utilization, 2), s.queued)).name
