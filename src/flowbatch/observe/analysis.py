"""Reading the engine's statistics: JSON records, recent figures, and advice.

Shared by the bench report, the live dashboard and ``flowbatch top``, so the
three say the same thing about the same figures. Everything here is pure
(no I/O, no clock): it turns :class:`~flowbatch.PipelineStats` into JSON-safe
dicts, computes rates and percentiles over the difference of two snapshots,
and words the advice about the bottleneck.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowbatch.metrics import PipelineStats, StageStats, Summary
    from flowbatch.pipeline import Pipeline

__all__ = [
    "BUSY",
    "advise",
    "bucket_quantile",
    "max_batch_sizes",
    "stats_dict",
    "summary_dict",
]

#: A stage whose workers are busy at least this fraction of the time limits throughput.
BUSY = 0.8
#: Below this, every stage has room: the load, not the pipeline, is the limit.
IDLE = 0.5


def summary_dict(s: Summary) -> dict[str, Any]:
    """A :class:`~flowbatch.Summary` as JSON: buckets as ``[upper, cumulative]``
    pairs, ``+Inf`` written as ``null``."""
    return {
        "count": s.count,
        "total": s.total,
        "mean": s.mean,
        "p50": s.p50,
        "p99": s.p99,
        "buckets": [[None if math.isinf(b) else b, c] for b, c in s.buckets],
    }


def max_batch_sizes(pipeline: Pipeline | None) -> dict[str, int]:
    """``max_size`` of each batched stage of ``pipeline``."""
    if pipeline is None:
        return {}
    return {s.name: s.batch.max_size for s in pipeline.stages if s.batch is not None}


def _stage_dict(st: StageStats, max_batch: int | None) -> dict[str, Any]:
    return {
        "name": st.name,
        "executor": st.executor,
        "workers": st.workers,
        "done": st.done,
        "failed": st.failed,
        "retried": st.retried,
        "expired": st.expired,
        "dropped": st.dropped,
        "queued": st.queued,
        "in_flight": st.in_flight,
        "utilization": st.utilization,
        "busy_seconds": st.busy_seconds,
        "service": summary_dict(st.service_time),
        "wait": summary_dict(st.queue_wait),
        "batches": st.batches,
        "mean_batch_size": st.mean_batch_size,
        "max_batch_size": max_batch,
        "batch_sizes": [[k, v] for k, v in st.batch_sizes.items()],
        "padding_waste": st.padding_waste,
    }


def stats_dict(stats: PipelineStats, pipeline: Pipeline | None = None) -> dict[str, Any]:
    """The pipeline's figures as a JSON-safe dict (what the dashboard serves)."""
    maxes = max_batch_sizes(pipeline)
    return {
        "name": stats.name,
        "elapsed": stats.elapsed,
        "submitted": stats.submitted,
        "completed": stats.completed,
        "failed": stats.failed,
        "expired": stats.expired,
        "cancelled": stats.cancelled,
        "in_flight": stats.in_flight,
        "items_per_s": stats.items_per_s,
        "latency": summary_dict(stats.latency),
        "bottleneck": stats.bottleneck,
        "stages": [_stage_dict(st, maxes.get(st.name)) for st in stats.stages],
    }


def bucket_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float:
    """The ``q`` quantile from cumulative ``(upper bound, count)`` buckets, by
    linear interpolation inside the bucket it falls in (as Prometheus'
    ``histogram_quantile``). Feed it the difference of two scrapes for a
    recent figure. 0.0 when there are no observations."""
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
                return lower  # the open top bucket: its lower bound is all we know
            return lower + (upper - lower) * (rank - below) / (cum - below)
        if not math.isinf(upper):
            lower = upper
        below = cum
    return lower


def _pct(x: float) -> str:
    return f"{x * 100:.0f}%"


def advise(
    stats: PipelineStats,
    pipeline: Pipeline | None = None,
    *,
    utilization: Mapping[str, float] | None = None,
    load: str | None = None,
    callers: int | None = None,
) -> list[str]:
    """Plain-language advice about the pipeline's limits, most useful first.

    ``utilization`` overrides the since-start figures with recent ones (the
    live views pass them); ``load`` describes the offered load (e.g.
    ``"--concurrency 8"``) for the advice given when no stage is busy;
    ``callers`` is the number of closed-loop callers, when known (a batch
    cannot hold more items than are in flight).
    """
    util = {s.name: s.utilization for s in stats.stages}
    if utilization:
        util.update(utilization)
    maxes = max_batch_sizes(pipeline)
    out: list[str] = []
    worked = [s for s in stats.stages if s.busy_seconds > 0 or s.done or s.failed]
    if worked:
        top = max(worked, key=lambda s: (round(util[s.name], 2), s.queued))
        u = util[top.name]
        max_size = maxes.get(top.name)
        if u >= BUSY:
            if top.batches and max_size:
                mean = top.mean_batch_size
                if callers and mean >= 0.9 * callers and mean < 0.9 * max_size:
                    out.append(
                        f"stage {top.name} is {_pct(u)} busy with mean batch {mean:.0f} of "
                        f"{max_size}, which is every item in flight ({callers} callers): "
                        "more concurrent load would fill its batches and raise throughput; "
                        "so would more replicas"
                    )
                elif mean < 0.9 * max_size:
                    out.append(
                        f"stage {top.name} is {_pct(u)} busy with mean batch {mean:.0f} of "
                        f"{max_size}: more replicas or a larger max_wait would raise throughput"
                    )
                else:
                    out.append(
                        f"stage {top.name} is {_pct(u)} busy with full batches (mean "
                        f"{mean:.0f} of {max_size}): more replicas (concurrency is "
                        f"{top.workers}) or a larger max_size would raise throughput"
                    )
            elif top.executor == "async":
                out.append(
                    f"stage {top.name} is {_pct(u)} busy with {top.workers} calls in flight: "
                    "a larger concurrency would raise throughput"
                )
            else:
                hint = (
                    "; if it is pure-Python CPU work, executor='process' escapes the GIL"
                    if top.executor == "thread"
                    else ""
                )
                out.append(
                    f"stage {top.name} is {_pct(u)} busy on {top.workers} {top.executor} "
                    f"worker{'s' if top.workers != 1 else ''}: more workers (concurrency) "
                    f"or batching would raise throughput{hint}"
                )
        elif u < IDLE:
            where = f" ({load})" if load else ""
            out.append(
                f"no stage is more than {_pct(u)} busy (the busiest is {top.name}): the "
                f"pipeline has spare capacity; the offered load{where} or the input limits "
                "throughput"
            )
        else:
            out.append(
                f"stage {top.name} is the busiest at {_pct(u)}: it will limit throughput "
                "first as load grows"
            )
    for s in stats.stages:
        calls = s.done + s.failed
        if s.failed:
            out.append(
                f"stage {s.name} failed {s.failed} item{'s' if s.failed != 1 else ''} "
                f"({_pct(s.failed / calls)} of those it finished); the error log lines name "
                "the pipeline, stage, item and attempt"
            )
        if s.retried:
            out.append(f"stage {s.name} retried {s.retried} attempt{'s' if s.retried != 1 else ''}")
        if s.expired:
            out.append(
                f"{s.expired} item{'s' if s.expired != 1 else ''} passed their deadline "
                f"before stage {s.name}: the timeout is too short for the load, or an "
                "earlier stage is the bottleneck"
            )
        if s.batch_cost.count and s.padding_waste >= 0.25:
            out.append(
                f"batches of stage {s.name} spend {_pct(s.padding_waste)} of their cost on "
                "padding: a smaller max_cost, or a larger max_wait (more items to group "
                "by length), would cut it"
            )
    return out
