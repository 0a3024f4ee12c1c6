"""``flowbatch bench``: put a pipeline under load in process and say what limits it.

``--concurrency`` callers each submit one input at a time (a closed loop),
cycling through the input file, for ``--duration`` seconds (0: one pass over
the input) or until ``--requests`` inputs were sent. Sixty times in a run (every
0.25 to 1 s) it samples throughput, latency and each stage's utilization
(:meth:`~flowbatch.PipelineStats.since` between two ``runner.stats()``).
The report says the throughput, the latency percentiles, each stage's
utilization and batch sizes, the bottleneck and what to change, all read from
``runner.stats()`` (the figures ``flowbatch top`` and ``/metrics`` show);
``--report`` writes it as a self-contained HTML page of charts.

Input: one item per line (``.txt`` and anything else: the line's text,
without its newline); ``.jsonl``: one JSON value per line; ``.json``: a list.

Usage::

    flowbatch bench myapp.pipelines:embed --input sentences.txt \\
        --concurrency 64 --duration 30 --report bench.html
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

import flowbatch as fb
from flowbatch.metrics import format_seconds
from flowbatch.target import load_pipeline

from .analysis import advise
from .page import finite, report_page

__all__ = ["BenchResult", "bench", "read_inputs", "run_bench", "write_report"]


def read_inputs(path: str | Path) -> list[Any]:
    """The items in ``path`` (``-``: standard input); see the module docstring."""
    text = sys.stdin.read() if str(path) == "-" else Path(path).read_text(encoding="utf-8")
    suffix = Path(str(path)).suffix.lower()
    if suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json input must hold a list, got {type(data).__name__}")
        items: list[Any] = data
    elif suffix == ".jsonl":
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
    else:
        items = [line for line in text.splitlines() if line.strip()]
    if not items:
        raise ValueError(f"{path}: no input items")
    return items


# ----------------------------------------------------------------- the run


@dataclass
class BenchResult:
    """What one bench run measured."""

    pipeline: str
    concurrency: int
    seconds: float
    ok: int
    failed: int
    stats: fb.PipelineStats
    timeline: list[dict[str, Any]]
    advice: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    max_batch: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def items_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def latency(self, q: float) -> float | None:
        """The ``q`` quantile of the completed items' latency (``stats().latency``)."""
        if not self.stats.latency.count:
            return None
        return self.stats.latency.quantile(q)


class _Load:
    """The callers' shared state: the next input, what came back, when."""

    def __init__(self, items: Sequence[Any], requests: int | None, deadline: float) -> None:
        self.items = items
        self.requests = requests
        self.deadline = deadline
        self.sent = 0
        self.ok = 0
        self.failed = 0
        self.errors: dict[str, int] = {}

    def next(self, now: float) -> Any:
        if now >= self.deadline or (self.requests is not None and self.sent >= self.requests):
            raise StopIteration
        x = self.items[self.sent % len(self.items)]
        self.sent += 1
        return x


async def run_bench(
    pipeline: fb.Pipeline,
    items: Sequence[Any],
    *,
    concurrency: int = 8,
    duration: float = 10.0,
    requests: int | None = None,
    timeout: float | None = None,
    sample_every: float | None = None,
) -> BenchResult:
    """Run the load and return what it measured (see the module docstring)."""
    if duration <= 0 and requests is None:
        requests = len(items)
    horizon = duration if duration > 0 else float("inf")
    every = sample_every if sample_every is not None else min(1.0, max(0.25, horizon / 60))
    timeline: list[dict[str, Any]] = []
    async with pipeline.open() as runner:
        t_start = perf_counter()
        load = _Load(items, requests, t_start + horizon)
        done = asyncio.Event()

        async def caller() -> None:
            while True:
                try:
                    x = load.next(perf_counter())
                except StopIteration:
                    return
                try:
                    await runner.submit(x, timeout=timeout)
                except (fb.ItemFailed, fb.DeadlineExceeded) as exc:
                    load.failed += 1
                    key = (
                        f"{exc.stage}: {type(exc.error).__name__}"
                        if isinstance(exc, fb.ItemFailed)
                        else type(exc).__name__
                    )
                    load.errors[key] = load.errors.get(key, 0) + 1
                else:
                    load.ok += 1

        async def sampler() -> None:
            last_t = t_start
            last = runner.stats()
            while not done.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), every)
                now = perf_counter()
                if done.is_set() and timeline and now - last_t < every / 2:
                    break  # a sliver at the end: its rates would only be noise
                cur = runner.stats()
                timeline.append(_sample(now - t_start, last, cur))
                last, last_t = cur, now

        async with asyncio.TaskGroup() as tg:
            sampling = tg.create_task(sampler())
            async with asyncio.TaskGroup() as callers:
                for _ in range(concurrency):
                    callers.create_task(caller())
            seconds = perf_counter() - t_start
            done.set()
            await sampling
        stats = runner.stats()
    return BenchResult(
        pipeline=pipeline.name,
        concurrency=concurrency,
        seconds=seconds,
        ok=load.ok,
        failed=load.failed,
        stats=stats,
        timeline=timeline,
        advice=advise(
            stats, pipeline, load=f"--concurrency {concurrency}", callers=concurrency
        ),
        config={
            "concurrency": concurrency,
            "duration": duration,
            "requests": requests,
            "timeout": timeout,
            "inputs": len(items),
        },
        max_batch={s.name: s.batch.max_size for s in pipeline.stages if s.batch is not None},
        errors=dict(sorted(load.errors.items(), key=lambda kv: -kv[1])),
    )


def _sample(t: float, last: fb.PipelineStats, cur: fb.PipelineStats) -> dict[str, Any]:
    """One point of the timeline: the figures between two snapshots."""
    w = cur.since(last)
    dt = max(w.elapsed, 1e-9)
    return {
        "t": t,
        "items_per_s": w.completed / dt,
        "errors_per_s": (w.failed + w.expired) / dt,
        "p50": w.latency.p50 if w.latency.count else None,
        "p99": w.latency.p99 if w.latency.count else None,
        "util": {s.name: s.utilization for s in w.stages},
        "queued": {s.name: s.queued for s in w.stages},
        "bottleneck": w.bottleneck,
    }


# ---------------------------------------------------------------- the report


def _dur(s: float | None) -> str:
    return "-" if s is None else format_seconds(s)


def report_data(result: BenchResult) -> dict[str, Any]:
    """The report as the chart script draws it (also what ``--json`` writes)."""
    sd = result.stats.to_dict()
    for st in sd["stages"]:
        # The queue at the end of a run is empty (it drained): show the run's mean.
        depths = [p["queued"][st["name"]] for p in result.timeline if st["name"] in p["queued"]]
        st["queued"] = round(sum(depths) / len(depths), 1) if depths else 0
    lat = {f"p{q}": result.latency(q / 100) for q in (50, 90, 99)}
    data: dict[str, Any] = finite({
        "title": f"pipeline {result.pipeline}",
        "subtitle": (
            f"{result.concurrency} concurrent callers for {result.seconds:.1f} s; "
            f"{result.ok} items done, {result.failed} failed; generated "
            f"{datetime.now(UTC).isoformat(timespec='seconds')}"
        ),
        "cards": [
            ["items/s", f"{result.items_per_s:,.1f}"],
            ["latency p50", _dur(lat["p50"])],
            ["latency p90", _dur(lat["p90"])],
            ["latency p99", _dur(lat["p99"])],
            ["failed", str(result.failed)],
            ["bottleneck", result.stats.bottleneck or "-"],
        ],
        "advice": result.advice,
        "bottleneck": result.stats.bottleneck,
        "util_label": "whole run",
        "queue_note": "queued (mean)",
        "timeline": result.timeline,
        "stages": sd["stages"],
        "summary": {
            "items_per_s": result.items_per_s,
            "ok": result.ok,
            "failed": result.failed,
            "seconds": result.seconds,
            "latency": lat,
            "errors": result.errors,
        },
        "config": result.config,
        "pipeline": sd,
    })
    return data


def write_report(result: BenchResult, path: str | Path) -> Path:
    """Write the HTML report of ``result`` to ``path``."""
    out = Path(path)
    out.write_text(report_page(report_data(result), "flowbatch bench"), encoding="utf-8")
    return out


def print_report(result: BenchResult, console: Console) -> None:
    s = result.stats
    console.print(
        Text.assemble(
            ("flowbatch bench ", "bold"),
            (result.pipeline, "bold"),
            f": {result.concurrency} callers, {result.seconds:.1f} s, "
            f"{result.ok} done, {result.failed} failed",
        )
    )
    console.print(
        Text.assemble(
            ("throughput ", "bold"),
            f"{result.items_per_s:,.1f} items/s   ",
            ("latency ", "bold"),
            f"p50 {_dur(result.latency(0.5))}  p90 {_dur(result.latency(0.9))}  "
            f"p99 {_dur(result.latency(0.99))}",
        )
    )
    table = Table(header_style="bold", box=None, pad_edge=False)
    for col in ("stage", "executor", "workers", "items", "failed", "busy", "batch",
                "call p50", "call p99", "wait p50"):
        table.add_column(col, justify="left" if col in ("stage", "executor") else "right")
    for st in s.stages:
        mx = result.max_batch.get(st.name)
        batch = f"{st.mean_batch_size:.1f}" + (f" / {mx}" if mx else "") if st.batches else "-"
        neck = st.name == s.bottleneck
        table.add_row(
            ("▶ " if neck else "  ") + st.name,
            st.executor,
            str(st.workers),
            str(st.done),
            str(st.failed),
            f"{st.utilization * 100:.0f}%",
            batch,
            _dur(st.service_time.p50),
            _dur(st.service_time.p99),
            _dur(st.queue_wait.p50),
            style="bold red" if neck else None,
        )
    console.print(table)
    console.print(Text.assemble(("bottleneck: ", "bold"), (s.bottleneck or "-", "bold red")))
    if result.errors:
        console.print(
            "errors: " + ", ".join(f"{k} x{v}" for k, v in result.errors.items()),
            style="red", highlight=False,
        )
    for line in result.advice:
        console.print(f"- {line}", highlight=False)


# ------------------------------------------------------------------------ CLI


@click.command(name="bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("target", metavar="MODULE:ATTR")
@click.option("--input", "input_path", required=True,
              type=click.Path(exists=True, dir_okay=False, allow_dash=True),
              help="Items, one per line (.jsonl: JSON per line; .json: a list).")
@click.option("--concurrency", "-c", default=8, show_default=True,
              type=click.IntRange(min=1), help="Callers submitting at once.")
@click.option("--duration", "-d", default=10.0, show_default=True,
              type=click.FloatRange(min=0), help="Seconds of load (0: one pass over the input).")
@click.option("--requests", "-n", type=click.IntRange(min=1), default=None,
              help="Stop after this many items (whichever of this and --duration comes first).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Per-item deadline in seconds.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write a self-contained HTML report with charts here.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the report's figures as JSON here.")
def bench(
    *,
    target: str,
    input_path: str,
    concurrency: int,
    duration: float,
    requests: int | None,
    timeout: float | None,
    report_path: Path | None,
    json_path: Path | None,
) -> None:
    """Load the pipeline MODULE:ATTR in process with --concurrency callers and
    report throughput, latency, per-stage utilization, the bottleneck and
    what to change."""
    try:
        pipeline = load_pipeline(target)
        items = read_inputs(input_path)
    except (ValueError, TypeError, ImportError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    result = asyncio.run(
        run_bench(
            pipeline, items, concurrency=concurrency, duration=duration,
            requests=requests, timeout=timeout,
        )
    )
    console = Console() if sys.stdout.isatty() else Console(width=120)
    print_report(result, console)
    if report_path is not None:
        write_report(result, report_path)
        console.print(f"report: {report_path}", highlight=False)
    if json_path is not None:
        json_path.write_text(json.dumps(report_data(result), indent=1), encoding="utf-8")
        console.print(f"figures: {json_path}", highlight=False)


main = bench

if __name__ == "__main__":
    bench()
