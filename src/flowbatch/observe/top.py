"""``flowbatch top URL``: a live terminal view of a running service or worker.

It reads the Prometheus ``/metrics`` endpoint every ``--interval`` seconds and
shows, from the difference between the last two scrapes, per pipeline and
per stage: throughput, queue depth, in-flight items, utilization (as a bar),
mean batch size, recent p50/p99 of the stage call, and errors. The stage whose
workers were busiest in the last interval, the bottleneck, is highlighted.

Percentiles come from the exported histogram buckets (powers of two), by
interpolation as Prometheus' ``histogram_quantile`` does: read them as a
scale, not to the millisecond.

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

from .analysis import bucket_quantile

__all__ = [
    "PipelineSample",
    "PipelineView",
    "StageSample",
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
class StageSample:
    """One stage's figures in one scrape (counters since the runner opened)."""

    ok: float = 0.0
    failed: float = 0.0
    retried: float = 0.0
    expired: float = 0.0
    dropped: float = 0.0
    queued: float = 0.0
    in_flight: float = 0.0
    workers: float = 0.0
    busy_seconds: float = 0.0
    service: Buckets = field(default_factory=list)
    wait: Buckets = field(default_factory=list)
    batch_count: float = 0.0
    batch_sum: float = 0.0
    batched: bool = False


@dataclass
class PipelineSample:
    """One pipeline's figures in one scrape, with its stages in order."""

    submitted: float = 0.0
    completed: float = 0.0
    failed: float = 0.0
    expired: float = 0.0
    cancelled: float = 0.0
    in_flight: float = 0.0
    latency: Buckets = field(default_factory=list)
    stages: dict[str, StageSample] = field(default_factory=dict)


_STAGE_OUTCOMES = {"ok", "failed", "expired", "dropped"}
_PIPELINE_OUTCOMES = {"completed", "failed", "expired", "cancelled"}


def parse(text: str) -> dict[str, PipelineSample]:
    """flowbatch's figures from a Prometheus text exposition, per pipeline.

    Other metrics in the page (process, Python, the service's own) are
    ignored, so any ``/metrics`` that includes flowbatch's will do.
    """
    out: dict[str, PipelineSample] = {}

    def pipe(labels: dict[str, str]) -> PipelineSample:
        return out.setdefault(labels.get("pipeline", ""), PipelineSample())

    def stage(labels: dict[str, str]) -> StageSample:
        return pipe(labels).stages.setdefault(labels.get("stage", ""), StageSample())

    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith("flowbatch_"):
            continue
        for s in fam.samples:
            name, labels, v = s.name, s.labels, float(s.value)
            if "pipeline" not in labels:
                continue
            if name == "flowbatch_pipeline_submitted_total":
                pipe(labels).submitted = v
            elif name == "flowbatch_pipeline_items_total":
                outcome = labels.get("outcome", "")
                if outcome in _PIPELINE_OUTCOMES:
                    setattr(pipe(labels), outcome, v)
            elif name == "flowbatch_pipeline_in_flight":
                pipe(labels).in_flight = v
            elif name == "flowbatch_pipeline_latency_seconds_bucket":
                pipe(labels).latency.append((float(labels["le"]), v))
            elif "stage" not in labels:
                continue
            elif name == "flowbatch_stage_items_total":
                outcome = labels.get("outcome", "")
                if outcome in _STAGE_OUTCOMES:
                    setattr(stage(labels), outcome, v)
            elif name == "flowbatch_stage_retries_total":
                stage(labels).retried = v
            elif name == "flowbatch_stage_queue_depth":
                stage(labels).queued = v
            elif name == "flowbatch_stage_in_flight":
                stage(labels).in_flight = v
            elif name == "flowbatch_stage_workers":
                stage(labels).workers = v
            elif name == "flowbatch_stage_busy_seconds_total":
                stage(labels).busy_seconds = v
            elif name == "flowbatch_stage_service_seconds_bucket":
                stage(labels).service.append((float(labels["le"]), v))
            elif name == "flowbatch_stage_queue_wait_seconds_bucket":
                stage(labels).wait.append((float(labels["le"]), v))
            elif name == "flowbatch_stage_batch_size_count":
                st = stage(labels)
                st.batch_count, st.batched = v, True
            elif name == "flowbatch_stage_batch_size_sum":
                stage(labels).batch_sum = v
    for p in out.values():
        p.latency.sort()
        for st in p.stages.values():
            st.service.sort()
            st.wait.sort()
    return out


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


def _d(cur: float, prev: float) -> float:
    """A counter's increase; a counter that went down was reset (a restart)."""
    return cur - prev if cur >= prev else cur


def _d_buckets(cur: Buckets, prev: Buckets) -> Buckets:
    p = dict(prev)
    if any(c < p.get(le, 0.0) for le, c in cur):
        return list(cur)
    return [(le, c - p.get(le, 0.0)) for le, c in cur]


def _quantiles(cur: Buckets, prev: Buckets) -> tuple[float | None, float | None]:
    d = _d_buckets(cur, prev)
    if not d or d[-1][1] <= 0:
        return None, None
    return bucket_quantile(d, 0.5), bucket_quantile(d, 0.99)


def compute(
    prev: dict[str, PipelineSample], cur: dict[str, PipelineSample], dt: float
) -> list[PipelineView]:
    """What happened between two scrapes ``dt`` seconds apart."""
    dt = max(dt, 1e-9)
    views: list[PipelineView] = []
    for name, p in cur.items():
        q = prev.get(name, PipelineSample())
        stages: list[StageView] = []
        for sname, s in p.stages.items():
            r = q.stages.get(sname, StageSample())
            nb = _d(s.batch_count, r.batch_count)
            p50, p99 = _quantiles(s.service, r.service)
            wait50, _ = _quantiles(s.wait, r.wait)
            util = _d(s.busy_seconds, r.busy_seconds) / (dt * s.workers) if s.workers else 0.0
            stages.append(
                StageView(
                    name=sname,
                    items_per_s=_d(s.ok, r.ok) / dt,
                    errors_per_s=_d(s.failed, r.failed) / dt,
                    failed=s.failed,
                    queued=s.queued,
                    in_flight=s.in_flight,
                    workers=s.workers,
                    utilization=min(1.0, max(0.0, util)),
                    mean_batch=(_d(s.batch_sum, r.batch_sum) / nb if nb else None)
                    if s.batched
                    else None,
                    p50=p50,
                    p99=p99,
                    wait_p50=wait50,
                )
            )
        worked = [st for st in stages if st.utilization > 0]
        neck = (
            max(worked, key=lambda st: (round(st.utilization, 2), st.queued)).name
            if worked
            else None
        )
        stages = [
            StageView(**{**st.__dict__, "bottleneck": st.name == neck}) for st in stages
        ]
        lat50, lat99 = _quantiles(p.latency, q.latency)
        views.append(
            PipelineView(
                name=name,
                items_per_s=_d(p.completed, q.completed) / dt,
                errors_per_s=_d(p.failed, q.failed) / dt,
                failed=p.failed,
                in_flight=p.in_flight,
                p50=lat50,
                p99=lat99,
                stages=tuple(stages),
                bottleneck=neck,
            )
        )
    return views


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
            f"  in flight {v.in_flight:.0f}  latency p50 {_dur(v.p50)} p99 {_dur(v.p99)}  ",
            (f"failed {v.failed:.0f}", "red" if v.failed else ""),
        )
        neck = next((st for st in v.stages if st.bottleneck), None)
        foot = (
            Text.assemble(
                ("bottleneck: ", "bold"),
                (neck.name, "bold red"),
                f" ({neck.utilization * 100:.0f}% busy on {neck.workers:.0f} "
                f"worker{'s' if neck.workers != 1 else ''}, {neck.queued:.0f} queued)",
            )
            if neck is not None
            else Text("bottleneck: - (no work in the last interval)", style="dim")
        )
        parts.append(
            Panel(
                Group(head, table, foot),
                title=f"pipeline {v.name}",
                title_align="left",
                padding=(0, 1),
                subtitle="busy: workers' time in the stage fn  p50/p99: a call  wait: queue p50",
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
        self.prev: dict[str, PipelineSample] | None = None
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
        return render(compute(prev, cur, dt), self.url, f"every {interval:g}s, ctrl-c quits")


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
