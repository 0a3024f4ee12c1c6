"""``flowbatch top URL``: a live terminal view of a running service or worker.

It reads the Prometheus ``/metrics`` endpoint every ``--interval`` seconds and
shows, from the difference between the last two scrapes, per pipeline and
per stage: throughput, queue depth, in-flight items, workers (an adaptive
stage's limit now of its max: ``2/16``), utilization (as a bar; an adaptive
stage's is of the worker time its limit allowed),
mean batch size, recent p50/p99 of the stage call, and errors; on the
pipeline's line, the items in flight against the admission limit (``212/256``)
where there is one, the latency target it keeps (``target p99 853ms``) and
items refused with ``Overloaded``. The stage whose
workers were busiest in the last interval, the bottleneck, is highlighted.
Under the table, per batched stage: why its batches went out in the interval
(full, worker_free, max_wait, linger, deadline, drain) with the mean size of
each, and the learned batch time ``a + b*n`` where ``latency_target`` is set.

A scrape is read back into :class:`~flowbatch.PipelineStats` and the interval
is :meth:`~flowbatch.PipelineStats.since`: the same quantiles, utilization and
bottleneck as ``runner.stats()``, from the same histogram buckets.

Usage::

    flowbatch top http://127.0.0.1:8000/metrics --interval 1
    python -m flowbatch.observe.top http://127.0.0.1:8000 --once
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import click
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from flowbatch.metrics import DeviceStats, PipelineStats, StageStats, Summary

__all__ = [
    "PipelineView",
    "StageView",
    "compute",
    "main",
    "parse",
    "render",
    "scrape",
    "top",
]

Buckets = list[tuple[float, float]]


# ------------------------------------------------------------------- samples


@dataclass
class _Histogram:
    buckets: Buckets = field(default_factory=list)
    total: float = 0.0

    def summary(self) -> Summary:
        return Summary.of(sorted(self.buckets), self.total)


@dataclass
class _Stage:
    """One stage's series in one scrape, as read."""

    executor: str = ""
    batch_max_size: int = 0
    counts: dict[str, float] = field(default_factory=dict)
    service: _Histogram = field(default_factory=_Histogram)
    wait: _Histogram = field(default_factory=_Histogram)
    cost: _Histogram = field(default_factory=_Histogram)
    batch_count: float = 0.0
    batch_sum: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)
    reason_items: dict[str, int] = field(default_factory=dict)
    fit: dict[str, float] = field(default_factory=dict)
    # Stages placed with devices=: figures per (device, replica), and per device.
    replicas: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)
    device_figures: dict[str, dict[str, float]] = field(default_factory=dict)

    def device_stats(self) -> tuple[DeviceStats, ...]:
        out = []
        for (device, replica), r in sorted(self.replicas.items(), key=lambda kv: kv[0][1]):
            d = self.device_figures.get(device, {})
            used, total, busy = d.get("memory_used"), d.get("memory_total"), d.get("utilization")
            cap = r.get("batch_cap")
            out.append(
                DeviceStats(
                    device=device,
                    replica=replica,
                    batch_cap=int(cap) if cap is not None else None,
                    cost_cap=r.get("cost_cap"),
                    oom_splits=int(r.get("oom_splits", 0)),
                    memory_used=int(used) if used is not None else None,
                    memory_total=int(total) if total is not None else None,
                    utilization=busy,
                )
            )
        return tuple(out)

    def stats(self, name: str, elapsed: float) -> StageStats:
        c = self.counts.get
        batches = int(self.batch_count)
        limit, replicas, allowed = c("concurrency_limit"), c("replicas"), c("worker_seconds")
        return StageStats(
            name=name,
            executor=self.executor,
            workers=int(c("workers", 0)),
            batch_max_size=self.batch_max_size,
            done=int(c("ok", 0)),
            failed=int(c("failed", 0)),
            retried=int(c("retried", 0)),
            expired=int(c("expired", 0)),
            dropped=int(c("dropped", 0)),
            queued=int(c("queued", 0)),
            in_flight=int(c("in_flight", 0)),
            utilization=c("utilization", 0.0),
            busy_seconds=c("busy_seconds", 0.0),
            service_time=self.service.summary(),
            queue_wait=self.wait.summary(),
            batches=batches,
            mean_batch_size=self.batch_sum / batches if batches else 0.0,
            batch_cost=self.cost.summary(),
            padding_waste=c("padding_waste", 0.0),
            restarts=int(c("restarts", 0)),
            pending=int(c("pending", 0)),
            devices=self.device_stats(),
            batch_reasons=dict(self.reasons),
            batch_reason_items=dict(self.reason_items),
            batch_time_fit=(self.fit["a"], self.fit["b"]) if len(self.fit) == 2 else None,
            concurrency_limit=int(limit) if limit is not None else None,
            replicas=int(replicas) if replicas is not None else None,
            backpressured=int(c("backpressured", 0)),
            worker_seconds=allowed,
            mean_limit=allowed / elapsed if allowed is not None and elapsed > 0 else None,
        )


@dataclass
class _Pipeline:
    """One pipeline's series in one scrape, as read."""

    counts: dict[str, float] = field(default_factory=dict)
    latency: _Histogram = field(default_factory=_Histogram)
    stages: dict[str, _Stage] = field(default_factory=dict)
    bottleneck: str | None = None

    def stats(self, name: str) -> PipelineStats:
        c = self.counts.get
        elapsed = c("elapsed", 0.0)
        limit = c("in_flight_limit")
        return PipelineStats(
            name=name,
            elapsed=elapsed,
            submitted=int(c("submitted", 0)),
            completed=int(c("completed", 0)),
            failed=int(c("failed", 0)),
            expired=int(c("expired", 0)),
            cancelled=int(c("cancelled", 0)),
            rejected=int(c("rejected", 0)),
            in_flight=int(c("in_flight", 0)),
            items_per_s=c("completed", 0) / elapsed if elapsed > 0 else 0.0,
            latency=self.latency.summary(),
            stages=tuple(st.stats(n, elapsed) for n, st in self.stages.items()),
            bottleneck=self.bottleneck,
            in_flight_limit=int(limit) if limit is not None else None,
            latency_target=c("latency_target"),
        )


_STAGE_OUTCOMES = {"ok", "failed", "expired", "dropped"}
_PIPELINE_OUTCOMES = {"completed", "failed", "expired", "cancelled"}
_PIPELINE_GAUGES = {
    "flowbatch_pipeline_submitted_total": "submitted",
    "flowbatch_pipeline_rejected_total": "rejected",
    "flowbatch_pipeline_in_flight": "in_flight",
    "flowbatch_pipeline_uptime_seconds": "elapsed",
    # the admission limit (max_in_flight, or latency_target's); absent without one
    "flowbatch_pipeline_in_flight_limit": "in_flight_limit",
    "flowbatch_pipeline_latency_target_seconds": "latency_target",
}
_STAGE_GAUGES = {
    "flowbatch_stage_retries_total": "retried",
    "flowbatch_stage_queue_depth": "queued",
    "flowbatch_stage_in_flight": "in_flight",
    "flowbatch_stage_workers": "workers",
    "flowbatch_stage_restarts_total": "restarts",
    "flowbatch_stage_pending_workers": "pending",
    "flowbatch_stage_busy_seconds_total": "busy_seconds",
    "flowbatch_stage_busy_ratio": "utilization",
    "flowbatch_stage_padding_waste_ratio": "padding_waste",
    # concurrency=fb.Adaptive(...): the limit now, its replicas, its worker-seconds
    "flowbatch_stage_concurrency_limit": "concurrency_limit",
    "flowbatch_stage_replicas": "replicas",
    "flowbatch_stage_limit_seconds_total": "worker_seconds",
    "flowbatch_stage_backpressure_total": "backpressured",
}
_REPLICA_GAUGES = {
    "flowbatch_device_batch_cap": "batch_cap",
    "flowbatch_device_cost_cap": "cost_cap",
    "flowbatch_device_oom_splits_total": "oom_splits",
}
_DEVICE_GAUGES = {
    "flowbatch_device_memory_used_bytes": "memory_used",
    "flowbatch_device_memory_total_bytes": "memory_total",
    "flowbatch_device_utilization": "utilization",
}
_STAGE_HISTOGRAMS = {
    "flowbatch_stage_service_seconds": "service",
    "flowbatch_stage_queue_wait_seconds": "wait",
    "flowbatch_stage_batch_cost": "cost",
}


def parse(text: str) -> dict[str, PipelineStats]:
    """flowbatch's figures from a Prometheus text exposition, per pipeline,
    read back into the records :meth:`Runner.stats` returns (batch sizes
    come back as a count and a mean only).

    Other metrics in the page (process, Python, the service's own) are
    ignored, so any ``/metrics`` that includes flowbatch's will do.
    """
    out: dict[str, _Pipeline] = {}

    def pipe(labels: dict[str, str]) -> _Pipeline:
        return out.setdefault(labels["pipeline"], _Pipeline())

    def stage(labels: dict[str, str]) -> _Stage:
        return pipe(labels).stages.setdefault(labels["stage"], _Stage())

    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith("flowbatch_"):
            continue
        for s in fam.samples:
            name, labels, v = s.name, s.labels, float(s.value)
            if "pipeline" not in labels:
                continue
            if name in _PIPELINE_GAUGES:
                pipe(labels).counts[_PIPELINE_GAUGES[name]] = v
            elif name == "flowbatch_pipeline_items_total":
                outcome = labels.get("outcome", "")
                if outcome in _PIPELINE_OUTCOMES:
                    pipe(labels).counts[outcome] = v
            elif name == "flowbatch_pipeline_latency_seconds_bucket":
                pipe(labels).latency.buckets.append((float(labels["le"]), v))
            elif name == "flowbatch_pipeline_latency_seconds_sum":
                pipe(labels).latency.total = v
            elif "stage" not in labels:
                continue
            elif name == "flowbatch_stage_items_total":
                outcome = labels.get("outcome", "")
                if outcome in _STAGE_OUTCOMES:
                    stage(labels).counts[outcome] = v
            elif name in _STAGE_GAUGES:
                stage(labels).counts[_STAGE_GAUGES[name]] = v
            elif name == "flowbatch_stage_info":
                st = stage(labels)
                st.executor = labels.get("executor", "")
                st.batch_max_size = int(labels.get("batch_max_size", "0") or 0)
            elif name == "flowbatch_stage_bottleneck":
                if v:
                    pipe(labels).bottleneck = labels["stage"]
                else:
                    stage(labels)  # keeps the stages in their order
            elif name == "flowbatch_stage_batch_size_count":
                stage(labels).batch_count = v
            elif name == "flowbatch_stage_batch_size_sum":
                stage(labels).batch_sum = v
            elif name == "flowbatch_stage_batches_total" and "reason" in labels:
                stage(labels).reasons[labels["reason"]] = int(v)
            elif name == "flowbatch_stage_batch_items_total" and "reason" in labels:
                stage(labels).reason_items[labels["reason"]] = int(v)
            elif name == "flowbatch_stage_batch_time_fixed_seconds":
                stage(labels).fit["a"] = v
            elif name == "flowbatch_stage_batch_time_per_item_seconds":
                stage(labels).fit["b"] = v
            elif name in _REPLICA_GAUGES and "device" in labels:
                key = (labels["device"], int(labels.get("replica", "0") or 0))
                stage(labels).replicas.setdefault(key, {})[_REPLICA_GAUGES[name]] = v
            elif name in _DEVICE_GAUGES and "device" in labels:
                figures = stage(labels).device_figures.setdefault(labels["device"], {})
                figures[_DEVICE_GAUGES[name]] = v
            else:
                base, _, part = name.rpartition("_")
                kind = _STAGE_HISTOGRAMS.get(base)
                if kind is not None:
                    h: _Histogram = getattr(stage(labels), kind)
                    if part == "bucket":
                        h.buckets.append((float(labels["le"]), v))
                    elif part == "sum":
                        h.total = v
    return {name: p.stats(name) for name, p in out.items()}


def scrape(url: str, timeout: float = 5.0) -> str:
    """The text of ``url`` (an ``http(s)`` URL)."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url!r}")
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - scheme checked
        body: bytes = resp.read()
    return body.decode("utf-8", errors="replace")


def metrics_url(url: str) -> str:
    """``url``, with ``/metrics`` as the path when it has none."""
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.path in ("", "/"):
        parts = parts._replace(path="/metrics")
    return urlunsplit(parts)


# ---------------------------------------------------------------------- views


@dataclass(frozen=True)
class StageView:
    """A stage over the last interval."""

    name: str
    items_per_s: float
    errors_per_s: float
    failed: float
    queued: float
    in_flight: float
    workers: float
    utilization: float
    mean_batch: float | None
    p50: float | None
    p99: float | None
    wait_p50: float | None
    bottleneck: bool = False
    devices: tuple[DeviceStats, ...] = ()
    #: Why its batches went out in the interval: (reason, batches, mean size),
    #: most batches first.
    reasons: tuple[tuple[str, int, float], ...] = ()
    #: The learned batch time (a, b): a batch of n takes a + b*n seconds.
    batch_time_fit: tuple[float, float] | None = None
    #: ``concurrency=fb.Adaptive(...)``: the calls it may have in flight now
    #: (``workers`` is its max), and whether that is its replica count.
    limit: int | None = None
    replicas: bool = False


@dataclass(frozen=True)
class PipelineView:
    """A pipeline over the last interval."""

    name: str
    items_per_s: float
    errors_per_s: float
    failed: float
    in_flight: float
    p50: float | None
    p99: float | None
    stages: tuple[StageView, ...]
    bottleneck: str | None
    #: the autoscaling signals (docs/autoscaling.md), with the interval's capacity
    #: (the since-start one when nothing finished in the interval)
    backlog_per_replica: float = 0.0
    drain_seconds: float | None = None
    #: admission: the in-flight limit now (``max_in_flight``, or where
    #: ``latency_target``'s controller set it) and that target, in seconds
    #: (None: no limit / no target); items refused with ``Overloaded``, in all
    #: and per second over the interval
    in_flight_limit: int | None = None
    latency_target: float | None = None
    rejected: float = 0.0
    rejected_per_s: float = 0.0


def _nothing(name: str) -> PipelineStats:
    return PipelineStats(
        name=name, elapsed=0.0, submitted=0, completed=0, failed=0, expired=0, cancelled=0,
        in_flight=0, items_per_s=0.0, latency=Summary(), stages=(), bottleneck=None,
    )


def compute(
    prev: dict[str, PipelineStats], cur: dict[str, PipelineStats], dt: float | None = None
) -> list[PipelineView]:
    """What happened between two scrapes, over ``dt`` seconds (default: the
    runner's own clock, from its uptime series), by :meth:`PipelineStats.since`."""
    views: list[PipelineView] = []
    for name, p in cur.items():
        w = p.since(prev.get(name) or _nothing(name), dt)
        secs = max(w.elapsed, 1e-9)
        stages: list[StageView] = []
        for s, total in zip(w.stages, p.stages, strict=True):
            stages.append(
                StageView(
                    name=s.name,
                    items_per_s=s.done / secs,
                    errors_per_s=s.failed / secs,
                    failed=total.failed,
                    queued=s.queued,
                    in_flight=s.in_flight,
                    workers=s.workers,
                    utilization=s.utilization,
                    mean_batch=s.mean_batch_size if s.batch_max_size and s.batches else None,
                    p50=s.service_time.p50 if s.service_time.count else None,
                    p99=s.service_time.p99 if s.service_time.count else None,
                    wait_p50=s.queue_wait.p50 if s.queue_wait.count else None,
                    bottleneck=s.name == w.bottleneck,
                    devices=total.devices,
                    reasons=_reasons(s),
                    batch_time_fit=total.batch_time_fit,
                    limit=total.concurrency_limit,
                    replicas=total.replicas is not None,
                )
            )
        views.append(
            PipelineView(
                name=name,
                items_per_s=w.completed / secs,
                errors_per_s=w.failed / secs,
                failed=p.failed,
                in_flight=p.in_flight,
                p50=w.latency.p50 if w.latency.count else None,
                p99=w.latency.p99 if w.latency.count else None,
                stages=tuple(stages),
                bottleneck=w.bottleneck,
                backlog_per_replica=w.backlog_per_replica,
                drain_seconds=w.drain_seconds if w.capacity is not None else p.drain_seconds,
                in_flight_limit=_limit(p.in_flight_limit),
                latency_target=p.latency_target,
                rejected=p.rejected,
                rejected_per_s=w.rejected / secs,
            )
        )
    return views


def _limit(total: float | None) -> int | None:
    """An in-flight limit to show; None without one (or an unbounded one, which
    ``runner.stats()`` gives as ``inf`` and ``/metrics`` leaves out)."""
    return int(total) if total is not None and math.isfinite(total) else None


def _reasons(s: StageStats) -> tuple[tuple[str, int, float], ...]:
    means = s.mean_batch_size_by_reason()
    return tuple(
        (r, n, means[r])
        for r, n in sorted(s.batch_reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        if n > 0
    )


# ------------------------------------------------------------------ rendering


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f}us"
    if s < 0.01:
        return f"{s * 1e3:.1f}ms"
    if s < 1.0:
        return f"{s * 1e3:.0f}ms"
    return f"{s:.2f}s"


def _workers(st: StageView) -> str:
    """``4``, or an adaptive stage's limit now of its max: ``2/16``."""
    return f"{st.workers:.0f}" if st.limit is None else f"{st.limit}/{st.workers:.0f}"


def _in_flight(v: PipelineView) -> str:
    """``48``, or against the admission limit now: ``212/256``."""
    if v.in_flight_limit is None:
        return f"{v.in_flight:.0f}"
    return f"{v.in_flight:.0f}/{v.in_flight_limit}"


def _refused(v: PipelineView) -> Text:
    """``  refused 12 +3/s``: items turned away with ``Overloaded`` (503), in all
    and the rate now; shown where there is a limit or something was refused."""
    if v.in_flight_limit is None and not v.rejected:
        return Text("")
    line = f"  refused {v.rejected:.0f}"
    if v.rejected_per_s:
        line += f" +{_rate(v.rejected_per_s)}/s"
    return Text(line, style="yellow" if v.rejected else "")


def _rate(x: float) -> str:
    if x >= 10_000:
        return f"{x / 1000:.0f}k"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.1f}"


def _bar(u: float, width: int = 8) -> Text:
    n = round(u * width) if math.isfinite(u) else 0
    style = "red" if u >= 0.8 else "yellow" if u >= 0.5 else "green"
    t = Text("█" * n, style=style)
    t.append("░" * (width - n), style="grey37")
    t.append(f" {u * 100:3.0f}%")
    return t


def _on(st: StageView) -> str:
    """What a stage's utilization is of: ``4 workers``, ``2 of 16 replicas``."""
    if st.limit is None:
        return f"{st.workers:.0f} worker{'s' if st.workers != 1 else ''}"
    return f"{st.limit} of {st.workers:.0f} {'replicas' if st.replicas else 'workers'} (adaptive)"


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def _device_lines(st: StageView) -> list[Text]:
    """One line per device of a stage placed with ``devices=``: its replicas'
    learned caps and out-of-memory splits, memory in use, utilization."""
    by_device: dict[str, list[DeviceStats]] = {}
    for d in st.devices:
        by_device.setdefault(d.device, []).append(d)
    lines = []
    for device, reps in by_device.items():
        d = reps[0]
        caps = [r.batch_cap for r in reps if r.batch_cap is not None]
        costs = [r.cost_cap for r in reps if r.cost_cap is not None]
        cap = (
            f"cap {min(caps)}" if caps else f"cost cap {min(costs):.0f}" if costs else "no cap"
        )
        splits = sum(r.oom_splits for r in reps)
        line = Text.assemble(
            f" {st.name} on {device} x{len(reps)}: {cap}, ",
            (f"{splits} oom splits", "yellow" if splits else ""),
            f", memory {_gib(d.memory_used)}/{_gib(d.memory_total)} GiB",
        )
        if d.utilization is not None:
            line.append(f", gpu {d.utilization * 100:.0f}% busy")
        lines.append(line)
    return lines


def _batch_line(st: StageView) -> Text | None:
    """Why a batched stage's batches went out in the interval, and its learned batch time."""
    if not st.reasons and st.batch_time_fit is None:
        return None
    why = ", ".join(f"{r} {n} (mean {mean:.1f})" for r, n, mean in st.reasons) or "none"
    line = Text(f" batches of {st.name}: {why}")
    if st.batch_time_fit is not None:
        a, b = st.batch_time_fit
        line.append(f"; batch time {_dur(a)} + {_dur(b)}/item")
    return line


def render(views: Iterable[PipelineView], url: str = "", note: str = "") -> RenderableType:
    """The screen for ``views``."""
    parts: list[RenderableType] = []
    for v in views:
        table = Table(box=None, pad_edge=False, collapse_padding=True, header_style="bold")
        for col, justify in (
            ("stage", "left"),
            ("items/s", "right"),
            ("queue", "right"),
            ("in fn", "right"),
            ("workers", "right"),
            ("busy", "left"),
            ("batch", "right"),
            ("p50", "right"),
            ("p99", "right"),
            ("wait", "right"),
            ("errors", "right"),
        ):
            table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        for st in v.stages:
            errors = f"{st.failed:.0f}"
            if st.errors_per_s:
                errors += f" +{st.errors_per_s:.0f}/s"
            table.add_row(
                Text(("▶" if st.bottleneck else " ") + st.name),
                _rate(st.items_per_s),
                f"{st.queued:.0f}",
                f"{st.in_flight:.0f}",
                _workers(st),
                _bar(st.utilization),
                "-" if st.mean_batch is None else f"{st.mean_batch:.1f}",
                _dur(st.p50),
                _dur(st.p99),
                _dur(st.wait_p50),
                Text(errors, style="red" if st.failed else ""),
                style="bold red" if st.bottleneck else None,
            )
        head = Text.assemble(
            (f"{_rate(v.items_per_s)} items/s", "bold"),
            f"  in flight {_in_flight(v)} ({v.backlog_per_replica:.1f}/replica, "
            f"drains in {_dur(v.drain_seconds)})  latency p50 {_dur(v.p50)} p99 {_dur(v.p99)}",
            "" if v.latency_target is None else f" (target p99 {_dur(v.latency_target)})",
            "  ",
            (f"failed {v.failed:.0f}", "red" if v.failed else ""),
            _refused(v),
        )
        placed = [line for st in v.stages for line in _device_lines(st)]
        placed += [line for st in v.stages if (line := _batch_line(st)) is not None]
        neck = next((st for st in v.stages if st.bottleneck), None)
        foot = (
            Text.assemble(
                ("bottleneck: ", "bold"),
                (neck.name, "bold red"),
                f" ({neck.utilization * 100:.0f}% busy on {_on(neck)}, "
                f"{neck.queued:.0f} queued)",
            )
            if neck is not None
            else Text("bottleneck: - (no work in the last interval)", style="dim")
        )
        parts.append(
            Panel(
                Group(head, table, *placed, foot),
                title=f"pipeline {v.name}",
                title_align="left",
                padding=(0, 1),
                subtitle="workers: now/max  busy: time in the stage fn  p50/p99: a call  "
                "wait: queue p50",
                subtitle_align="right",
                expand=False,
            )
        )
    if not parts:
        parts.append(Text("no flowbatch metrics at this endpoint yet", style="yellow"))
    title = Text.assemble(("flowbatch top ", "bold"), url, ("   " + note, "dim") if note else "")
    return Group(title, *parts)


# ------------------------------------------------------------------------ CLI


class _Watcher:
    """Scrapes, keeps the last sample, and builds the next screen."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prev: dict[str, PipelineStats] | None = None
        self.t_prev = 0.0

    def step(self, interval: float) -> RenderableType:
        try:
            cur = parse(scrape(self.url))
        except Exception as exc:
            self.prev = None
            return Group(
                Text.assemble(("flowbatch top ", "bold"), self.url),
                Text(f"cannot read {self.url}: {type(exc).__name__}: {exc}", style="red"),
            )
        now = time.monotonic()
        prev, self.prev = self.prev, cur
        dt, self.t_prev = now - self.t_prev, now
        if prev is None:
            return render(compute(cur, cur, 1.0), self.url, "(first scrape; rates next)")
        # The runner's own clock (its uptime series) times the interval when it has one.
        clock = None if cur and all(p.elapsed > 0 for p in cur.values()) else dt
        return render(compute(prev, cur, clock), self.url, f"every {interval:g}s, ctrl-c quits")


@click.command(name="top", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("url")
@click.option("--interval", "-n", default=1.0, show_default=True,
              type=click.FloatRange(min=0.1), help="Seconds between scrapes.")
@click.option("--once", is_flag=True,
              help="Scrape twice, --interval apart, print one screen and exit.")
def top(url: str, interval: float, once: bool) -> None:
    """Watch a running flowbatch service or worker through its /metrics URL.

    Per stage: throughput, queue depth, in-flight items, utilization, mean
    batch size, p50/p99 of a call, errors; the bottleneck in red.
    """
    url = metrics_url(url)
    w = _Watcher(url)
    console = Console()
    if once:
        first = w.step(interval)
        if w.prev is None:
            console.print(first)
            raise SystemExit(1)
        time.sleep(interval)
        console.print(w.step(interval))
        if w.prev is None:
            raise SystemExit(1)
        return
    try:
        with Live(w.step(interval), console=console, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(w.step(interval), refresh=True)
    except KeyboardInterrupt:
        pass


main = top

if __name__ == "__main__":
    top()
