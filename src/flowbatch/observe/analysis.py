"""Advice about a pipeline's limits, worded from its statistics.

Shared by the bench report, the live dashboard and ``flowbatch top``, so the
three say the same thing about the same figures. Everything here is pure (no
I/O, no clock). The figures themselves (quantiles, utilization, the
bottleneck, recent figures from two snapshots, JSON) come from
:mod:`flowbatch.metrics`; this module only reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from flowbatch.metrics import find_bottleneck

if TYPE_CHECKING:
    from flowbatch.metrics import PipelineStats
    from flowbatch.pipeline import Pipeline

__all__ = ["BUSY", "IDLE", "advise"]

#: A stage whose workers are busy at least this fraction of the time limits throughput.
BUSY = 0.8
#: Below this, every stage has room: the load, not the pipeline, is the limit.
IDLE = 0.5


def _max_size(pipeline: Pipeline | None, name: str) -> int | None:
    for s in pipeline.stages if pipeline is not None else ():
        if s.name == name and s.batch is not None:
            return s.batch.max_size
    return None


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
    out: list[str] = []
    neck = find_bottleneck(stats.stages, util)
    if neck is not None:
        top = stats.stage(neck)
        u = util[top.name]
        max_size = top.batch_max_size or _max_size(pipeline, top.name)
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
