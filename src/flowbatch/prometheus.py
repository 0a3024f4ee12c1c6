"""Prometheus export of the engine's statistics, for any front end.

Every figure comes from :meth:`Runner.stats` (the one source the live view
and the reports read too); nothing is counted twice. Metric names follow
Prometheus conventions; see ``docs/metrics.md`` for the table.

Usage::

    from flowbatch.prometheus import CONTENT_TYPE, render
    body = render({"embed": runner})            # bytes in the text format

    registry.register(RunnerCollector(lambda: {"embed": runner}))  # or a collector
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .metrics import PipelineStats, Summary
    from .runner import Runner

__all__ = ["CONTENT_TYPE", "RunnerCollector", "render", "serve_metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

Runners = Mapping[str, "Runner"] | Callable[[], Mapping[str, "Runner"]]


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


def _hist_buckets(s: Summary) -> list[tuple[str, float]]:
    # Every bucket of the engine's histogram, so that histogram_quantile and
    # `flowbatch top` read the same figure as Runner.stats().
    if not s.buckets:
        return [("+Inf", 0.0)]
    return [(_le(b), float(c)) for b, c in s.buckets]


def _size_buckets(sizes: Mapping[int, int]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative batch-size buckets at powers of two, and the sum of sizes."""
    top = max(sizes, default=1)
    bounds = [1 << k for k in range(max(1, top.bit_length() + 1))]
    out = [(str(b), float(sum(c for s, c in sizes.items() if s <= b))) for b in bounds]
    out.append(("+Inf", float(sum(sizes.values()))))
    return out, float(sum(s * c for s, c in sizes.items()))


class RunnerCollector:
    """A prometheus_client collector over one or more named runners."""

    def __init__(self, runners: Runners) -> None:
        self._runners = runners

    def _current(self) -> Mapping[str, Runner]:
        r = self._runners
        return r() if callable(r) else r

    def describe(self) -> list[Metric]:
        return []  # the families depend on the pipelines: describe nothing up front

    def collect(self) -> Iterator[Metric]:
        stats = [(name, runner.stats()) for name, runner in self._current().items()]
        yield from _families(stats)


def _families(stats: list[tuple[str, PipelineStats]]) -> Iterator[Metric]:
    ps = ["pipeline"]
    pss = ["pipeline", "stage"]
    submitted = CounterMetricFamily(
        "flowbatch_pipeline_submitted", "Items admitted into the pipeline.", labels=ps
    )
    outcomes = CounterMetricFamily(
        "flowbatch_pipeline_items",
        "Items that left the pipeline, by outcome (completed, failed, expired, cancelled).",
        labels=[*ps, "outcome"],
    )
    rejected = CounterMetricFamily(
        "flowbatch_pipeline_rejected",
        "Items refused with Overloaded (past max_in_flight, or a full first queue).",
        labels=ps,
    )
    in_flight_p = GaugeMetricFamily(
        "flowbatch_pipeline_in_flight", "Items admitted and not yet answered.", labels=ps
    )
    limit_p = GaugeMetricFamily(
        "flowbatch_pipeline_in_flight_limit",
        "The in-flight limit now: max_in_flight, or where a latency target's controller "
        "set it (absent without a limiter).",
        labels=ps,
    )
    target_p = GaugeMetricFamily(
        "flowbatch_pipeline_latency_target_seconds",
        "The p99 latency the in-flight limit keeps admitted items under (absent without "
        "one, or while an automatic target is not yet measured).",
        labels=ps,
    )
    uptime = GaugeMetricFamily(
        "flowbatch_pipeline_uptime_seconds",
        "Seconds since the runner opened, on the clock that times the stages.",
        labels=ps,
    )
    latency = HistogramMetricFamily(
        "flowbatch_pipeline_latency_seconds", "End-to-end latency of completed items.", labels=ps
    )
    # The autoscaling signals (docs/autoscaling.md), derived in metrics.py.
    per_replica = GaugeMetricFamily(
        "flowbatch_pipeline_backlog_per_replica",
        "Items admitted and not answered, per worker of the bottleneck stage.",
        labels=ps,
    )
    drain = GaugeMetricFamily(
        "flowbatch_pipeline_drain_seconds",
        "Estimated seconds to answer the items in flight at the measured capacity "
        "(absent while the capacity is unknown).",
        labels=ps,
    )
    capacity = GaugeMetricFamily(
        "flowbatch_pipeline_capacity_items_per_second",
        "Items per second the slowest stage finishes with all its workers busy, "
        "measured since start (absent before it is known).",
        labels=ps,
    )
    items = CounterMetricFamily(
        "flowbatch_stage_items",
        "Items per stage by outcome: ok, failed, expired, dropped (caller gone).",
        labels=[*pss, "outcome"],
    )
    retries = CounterMetricFamily(
        "flowbatch_stage_retries", "Failed attempts of the stage that were retried.", labels=pss
    )
    info = GaugeMetricFamily(
        "flowbatch_stage_info",
        "The stage's settings as labels (always 1).",
        labels=[*pss, "executor", "batch_max_size"],
    )
    depth = GaugeMetricFamily("flowbatch_stage_queue_depth", "Items waiting for the stage.", labels=pss)
    in_flight = GaugeMetricFamily(
        "flowbatch_stage_in_flight", "Items inside the stage's running calls.", labels=pss
    )
    workers = GaugeMetricFamily("flowbatch_stage_workers", "Workers of the stage.", labels=pss)
    restarts = CounterMetricFamily(
        "flowbatch_stage_restarts", "Workers of the stage replaced after dying.", labels=pss
    )
    pending = GaugeMetricFamily(
        "flowbatch_stage_pending_workers",
        "Workers the stage's executor waits for (a Ray actor the cluster cannot place yet).",
        labels=pss,
    )
    busy = CounterMetricFamily(
        "flowbatch_stage_busy_seconds",
        "Worker time spent in the stage function (rate / workers = utilization; an "
        "adaptive stage's: rate / rate(flowbatch_stage_limit_seconds_total)).",
        labels=pss,
    )
    busy_ratio = GaugeMetricFamily(
        "flowbatch_stage_busy_ratio",
        "Fraction of the workers' time (an adaptive stage's: of the time its limit "
        "allowed) spent in the stage function since start.",
        labels=pss,
    )
    wait = HistogramMetricFamily(
        "flowbatch_stage_queue_wait_seconds", "Time items waited for the stage.", labels=pss
    )
    service = HistogramMetricFamily(
        "flowbatch_stage_service_seconds", "Duration of one call of the stage function.", labels=pss
    )
    bsize = HistogramMetricFamily(
        "flowbatch_stage_batch_size", "Items per call of a batched stage.", labels=pss
    )
    bcost = HistogramMetricFamily(
        "flowbatch_stage_batch_cost", "Total cost per batch, where a cost function is set.", labels=pss
    )
    waste = GaugeMetricFamily(
        "flowbatch_stage_padding_waste_ratio",
        "Fraction of padded batch cost (size x largest cost) that was padding.",
        labels=pss,
    )
    bottleneck = GaugeMetricFamily(
        "flowbatch_stage_bottleneck",
        "1 for the busiest stage since the runner opened (for now, compare "
        "rate(flowbatch_stage_busy_seconds_total) / flowbatch_stage_workers).",
        labels=pss
    )
    for name, s in stats:
        submitted.add_metric([name], s.submitted)
        for outcome, n in (
            ("completed", s.completed),
            ("failed", s.failed),
            ("expired", s.expired),
            ("cancelled", s.cancelled),
        ):
            outcomes.add_metric([name, outcome], n)
        rejected.add_metric([name], s.rejected)
        in_flight_p.add_metric([name], s.in_flight)
        if s.in_flight_limit is not None and s.in_flight_limit != math.inf:
            limit_p.add_metric([name], s.in_flight_limit)
        if s.latency_target is not None:
            target_p.add_metric([name], s.latency_target)
        uptime.add_metric([name], s.elapsed)
        latency.add_metric([name], _hist_buckets(s.latency), s.latency.total)
        per_replica.add_metric([name], s.backlog_per_replica)
        if (rate := s.capacity) is not None:
            capacity.add_metric([name], rate)
        if (secs := s.drain_seconds) is not None:
            drain.add_metric([name], secs)
        for st in s.stages:
            lab = [name, st.name]
            for outcome, n in (
                ("ok", st.done),
                ("failed", st.failed),
                ("expired", st.expired),
                ("dropped", st.dropped),
            ):
                items.add_metric([*lab, outcome], n)
            retries.add_metric(lab, st.retried)
            info.add_metric([*lab, st.executor, str(st.batch_max_size)], 1.0)
            depth.add_metric(lab, st.queued)
            in_flight.add_metric(lab, st.in_flight)
            workers.add_metric(lab, st.workers)
            restarts.add_metric(lab, st.restarts)
            pending.add_metric(lab, st.pending)
            busy.add_metric(lab, st.busy_seconds)
            busy_ratio.add_metric(lab, st.utilization)
            wait.add_metric(lab, _hist_buckets(st.queue_wait), st.queue_wait.total)
            service.add_metric(lab, _hist_buckets(st.service_time), st.service_time.total)
            if st.batches:
                buckets, total = _size_buckets(st.batch_sizes)
                bsize.add_metric(lab, buckets, total)
            if st.batch_cost.count:
                bcost.add_metric(lab, _hist_buckets(st.batch_cost), st.batch_cost.total)
                waste.add_metric(lab, st.padding_waste)
            bottleneck.add_metric(lab, 1.0 if st.name == s.bottleneck else 0.0)
    yield from (
        submitted, outcomes, rejected, in_flight_p, limit_p, target_p, uptime, latency,
        per_replica, drain, capacity, items, retries, info, depth, in_flight, workers, restarts,
        pending, busy, busy_ratio, wait, service, bsize, bcost, waste, bottleneck,
    )
    yield from _device_families(stats)
    yield from _batch_families(stats)
    yield from _replica_families(stats)
    yield from _limit_families(stats)


def _replica_families(stats: list[tuple[str, PipelineStats]]) -> Iterator[Metric]:
    """``concurrency=fb.Adaptive(...)`` on a stage that resizes: its replicas now."""
    replicas = GaugeMetricFamily(
        "flowbatch_stage_replicas",
        "Replicas taking calls now, for a stage whose replica count follows the load.",
        labels=["pipeline", "stage"],
    )
    for name, s in stats:
        for st in s.stages:
            if st.replicas is not None:
                replicas.add_metric([name, st.name], st.replicas)
    yield replicas


def _limit_families(stats: list[tuple[str, PipelineStats]]) -> Iterator[Metric]:
    """``concurrency=fb.Adaptive(...)`` on a stage that calls a service: its limit now."""
    pss = ["pipeline", "stage"]
    limit = GaugeMetricFamily(
        "flowbatch_stage_concurrency_limit",
        "Calls the stage may have in flight now, for a stage whose limit follows latency.",
        labels=pss,
    )
    pushed = CounterMetricFamily(
        "flowbatch_stage_backpressure",
        "Calls of the stage that raised Backpressure (their items were queued again).",
        labels=pss,
    )
    allowed = CounterMetricFamily(
        "flowbatch_stage_limit_seconds",
        "Worker time an adaptive stage's limit allowed (its integral over time): "
        "rate(flowbatch_stage_busy_seconds_total) / rate(this) is its utilization.",
        labels=pss,
    )
    for name, s in stats:
        for st in s.stages:
            if st.concurrency_limit is not None:
                limit.add_metric([name, st.name], st.concurrency_limit)
            if st.worker_seconds is not None:
                allowed.add_metric([name, st.name], st.worker_seconds)
            pushed.add_metric([name, st.name], st.backpressured)
    yield limit
    yield pushed
    yield allowed


def _batch_families(stats: list[tuple[str, PipelineStats]]) -> Iterator[Metric]:
    """Why batches went out, and the learned batch time (``Batch(latency_target=...)``)."""
    per_reason = ["pipeline", "stage", "reason"]
    pss = ["pipeline", "stage"]
    batches = CounterMetricFamily(
        "flowbatch_stage_batches",
        "Batches dispatched, by why they went out: full, worker_free, max_wait, linger, "
        "deadline, drain.",
        labels=per_reason,
    )
    items = CounterMetricFamily(
        "flowbatch_stage_batch_items",
        "Items in the batches dispatched, by reason (mean batch size = this / batches).",
        labels=per_reason,
    )
    fixed = GaugeMetricFamily(
        "flowbatch_stage_batch_time_fixed_seconds",
        "Learned fixed time of a batch call, a in a + b*n (Batch latency_target).",
        labels=pss,
    )
    per_item = GaugeMetricFamily(
        "flowbatch_stage_batch_time_per_item_seconds",
        "Learned time per item of a batch call, b in a + b*n (Batch latency_target).",
        labels=pss,
    )
    for name, s in stats:
        for st in s.stages:
            for reason, n in st.batch_reasons.items():
                batches.add_metric([name, st.name, reason], n)
                items.add_metric([name, st.name, reason], st.batch_reason_items.get(reason, 0))
            if st.batch_time_fit is not None:
                a, b = st.batch_time_fit
                fixed.add_metric([name, st.name], a)
                per_item.add_metric([name, st.name], b)
    yield from (batches, items, fixed, per_item)


def _device_families(stats: list[tuple[str, PipelineStats]]) -> Iterator[Metric]:
    """The replicas of stages placed with ``devices=`` (see flowbatch/devices.py)."""
    per_replica = ["pipeline", "stage", "device", "replica"]
    per_device = ["pipeline", "stage", "device"]
    cap = GaugeMetricFamily(
        "flowbatch_device_batch_cap",
        "Most items per batch on the replica, learned from out-of-memory errors "
        "(absent: no cap, the batch's max_size).",
        labels=per_replica,
    )
    cost_cap = GaugeMetricFamily(
        "flowbatch_device_cost_cap",
        "Most padded cost (size x largest cost) per batch on the replica, learned "
        "from out-of-memory errors (absent: no cap).",
        labels=per_replica,
    )
    splits = CounterMetricFamily(
        "flowbatch_device_oom_splits",
        "Batches split in halves after running out of device memory.",
        labels=per_replica,
    )
    used = GaugeMetricFamily(
        "flowbatch_device_memory_used_bytes", "Device memory in use (NVML or torch).",
        labels=per_device,
    )
    total = GaugeMetricFamily(
        "flowbatch_device_memory_total_bytes", "Device memory in all.", labels=per_device
    )
    busy = GaugeMetricFamily(
        "flowbatch_device_utilization",
        "Fraction of time the device was busy (NVML), 0..1.",
        labels=per_device,
    )
    for name, s in stats:
        for st in s.stages:
            seen: set[str] = set()
            for d in st.devices:
                lab = [name, st.name, d.device, str(d.replica)]
                if d.batch_cap is not None:
                    cap.add_metric(lab, d.batch_cap)
                if d.cost_cap is not None:
                    cost_cap.add_metric(lab, d.cost_cap)
                splits.add_metric(lab, d.oom_splits)
                if d.device in seen:
                    continue
                seen.add(d.device)
                dlab = [name, st.name, d.device]
                if d.memory_used is not None:
                    used.add_metric(dlab, d.memory_used)
                if d.memory_total is not None:
                    total.add_metric(dlab, d.memory_total)
                if d.utilization is not None:
                    busy.add_metric(dlab, d.utilization)
    yield from (cap, cost_cap, splits, used, total, busy)


def render(runners: Runners, *more: Collector) -> bytes:
    """The Prometheus text exposition of the named runners' statistics.

    ``more`` are further collectors (the HTTP service's own figures) written
    into the same page. prometheus_client writes every page: names, label
    values (quotes, backslashes, newlines) and help texts are escaped there,
    and nowhere in flowbatch.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunnerCollector(runners))
    for collector in more:
        registry.register(collector)
    return generate_latest(registry)


@contextlib.asynccontextmanager
async def serve_metrics(
    runners: Runners, port: int = 0, host: str = "127.0.0.1", *, more: Sequence[Collector] = ()
) -> AsyncIterator[str]:
    """Serve ``GET /metrics`` for ``runners`` while inside the block; yields its URL.

    For front ends without an HTTP server of their own (the broker worker,
    the demo), so that ``flowbatch top URL`` can watch them. It runs on the
    event loop, where the statistics are written, so a scrape never races
    the runner. ``port=0`` picks a free port. ``more`` are further
    collectors written into the page (the broker worker's queue lag).

    Usage::

        async with serve_metrics({"embed": runner}, port=9100) as url: ...
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, _, rest = head.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
            if method != b"GET":
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path != b"/metrics":
                status, ctype, body = "404 Not Found", "text/plain", b"see /metrics\n"
            else:
                status, ctype, body = "200 OK", CONTENT_TYPE, render(runners, *more)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # a client that went away or sent garbage: nothing to answer
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    bound = server.sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}/metrics"
    finally:
        server.close()
        await server.wait_closed()
