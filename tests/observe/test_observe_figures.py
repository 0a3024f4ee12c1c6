"""One source of figures: stats(), top, the dashboard and Prometheus agree.

Quantiles, utilization and the bottleneck are computed in flowbatch.metrics
only; every other reader gets them from there, so the same observations give
the same p99 wherever they are read.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

import flowbatch as fb
from flowbatch.metrics import PipelineStats, Summary, quantile, utilization
from flowbatch.observe.dashboard import dashboard_routes
from flowbatch.observe.top import compute, parse
from flowbatch.prometheus import render as exposition

SRC = Path(fb.__file__).resolve().parent


async def prep(x: int) -> int:
    await asyncio.sleep(0.0005 * (x % 7))  # spread the call times over several buckets
    return x


def embed(xs: list[int]) -> list[Any]:
    time.sleep(0.0002 * len(xs))
    return [ValueError("no") if x == 13 else x for x in xs]


PIPE = fb.Pipeline(
    [fb.stage(prep, concurrency=4), fb.stage(embed, batch=fb.Batch(max_size=8))], name="p"
)


def two_snapshots() -> tuple[tuple[PipelineStats, str], tuple[PipelineStats, str]]:
    """(stats, exposition) after 40 items, then after 40 more; idle at each."""

    async def main() -> tuple[tuple[PipelineStats, str], tuple[PipelineStats, str]]:
        async with PIPE.open() as runner:
            [y async for y in runner.map(range(40), return_exceptions=True)]
            a = (runner.stats(), exposition({"p": runner}).decode())
            [y async for y in runner.map(range(40, 80), return_exceptions=True)]
            b = (runner.stats(), exposition({"p": runner}).decode())
            return a, b

    return asyncio.run(main())


def test_stats_and_top_give_the_same_p99_for_the_same_calls() -> None:
    (a, a_text), (b, b_text) = two_snapshots()
    # Since the runner opened: top's view of one scrape against nothing before it.
    (view,) = compute({}, parse(a_text))
    for st, sv in zip(a.stages, view.stages, strict=True):
        assert st.service_time.count > 0
        assert sv.p50 == st.service_time.p50
        assert sv.p99 == st.service_time.p99
        assert sv.wait_p50 == st.queue_wait.p50
    assert view.p99 == a.latency.p99 and view.p50 == a.latency.p50
    # The scrape's own snapshot (a moment after `a`) named the same stage top names.
    assert view.bottleneck == parse(a_text)["p"].bottleneck is not None

    # Between two scrapes: top's figures are those of stats().since().
    recent = b.since(a)
    (view,) = compute(parse(a_text), parse(b_text))  # timed by the runner's uptime series
    assert view.p99 == recent.latency.p99 and recent.latency.count == 40
    for st, sv in zip(recent.stages, view.stages, strict=True):
        assert sv.p99 == st.service_time.p99
    # Rates and utilization over the runner's own clock, between the two scrapes.
    pa, pb = parse(a_text)["p"], parse(b_text)["p"]
    assert view.items_per_s == pytest.approx(40 / (pb.elapsed - pa.elapsed))
    for st, sv in zip(pb.since(pa).stages, view.stages, strict=True):
        assert sv.utilization == st.utilization == utilization(
            st.busy_seconds, st.workers, pb.elapsed - pa.elapsed
        )


def test_the_quantile_is_prometheus_histogram_quantile_on_the_exported_buckets() -> None:
    (a, text), _ = two_snapshots()
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        m = re.match(
            r'flowbatch_stage_service_seconds_bucket\{le="([^"]+)",pipeline="p",stage="prep"\} (\S+)',
            line,
        )
        if m:
            buckets.append((float(m[1]), float(m[2])))
    s = a.stage("prep").service_time
    assert len(buckets) == len(s.buckets) > 30  # every bucket of the engine's histogram
    assert quantile(buckets, 0.99) == s.p99 and quantile(buckets, 0.9) == s.quantile(0.9)


def test_the_dashboard_serves_the_recent_figures_of_since() -> None:
    async def main() -> tuple[list[dict[str, Any]], PipelineStats, PipelineStats]:
        async with PIPE.open() as runner:
            app = Starlette(routes=dashboard_routes(lambda: {"p": runner}))
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                [y async for y in runner.map(range(20), return_exceptions=True)]
                first = (await client.get("/dashboard/stats")).json()
                a = runner.stats()
                [y async for y in runner.map(range(20, 50), return_exceptions=True)]
                second = (await client.get("/dashboard/stats")).json()
                return [first, second], a, runner.stats()

    (first, second), a, b = asyncio.run(main())
    assert first["pipelines"]["p"]["recent"] is None  # nothing to compare with yet
    rec = second["pipelines"]["p"]["recent"]
    want = b.since(a)
    assert rec["p99"] == want.latency.p99 and rec["p50"] == want.latency.p50
    assert rec["bottleneck"] in ("prep", "embed")  # from the route's own snapshots
    assert set(rec["utilization"]) == {"prep", "embed"}


def test_since_is_the_increase_and_a_reset_counts_from_zero() -> None:
    (a, _), (b, _) = two_snapshots()
    w = b.since(a)
    assert (w.submitted, w.completed, w.failed) == (40, 40, 0)
    assert w.stage("prep").done == 40 and w.latency.count == 40
    assert w.elapsed == b.elapsed - a.elapsed
    assert 0.0 < w.stage("prep").utilization <= 1.0
    # A restart: counters went down, so the later figures are the increase.
    again = a.since(b)
    assert again.completed == a.completed and again.latency.count == a.latency.count
    s = Summary.of([(1.0, 2), (2.0, 4), (math.inf, 4)], 5.0)
    assert s.since(Summary()) == s and s.since(s).count == 0


def test_print_stats_is_a_short_table_and_to_dict_is_json() -> None:
    (a, _), _ = two_snapshots()
    text = str(a)
    lines = text.splitlines()
    assert len(lines) == 3 + len(a.stages)
    assert lines[0].startswith("pipeline p: 40 submitted, 39 completed, 1 failed")
    assert "bottleneck: " in lines[1] and "latency p50 " in lines[1]
    assert lines[2].split() == [
        "stage", "executor", "workers", "done", "failed", "busy", "batch",
        "call", "p50", "call", "p99", "wait", "p50",
    ]
    embed_row = next(line for line in lines if " embed " in line)
    assert "thread" in embed_row and "/8" in embed_row  # mean batch of max_size 8
    assert str(a.stage("embed")).startswith("stage embed (thread x1): ")

    d = json.loads(json.dumps(a.to_dict(), allow_nan=False))
    assert (d["name"], d["completed"], d["failed"]) == ("p", 39, 1)
    assert [s["name"] for s in d["stages"]] == ["prep", "embed"]
    st = d["stages"][1]
    assert st == a.stage("embed").to_dict()
    assert st["batch_max_size"] == 8 and st["service_time"]["p99"] == a.stage("embed").service_time.p99
    assert st["service_time"]["buckets"][-1] == [None, a.stage("embed").service_time.count]
    assert sum(n for _, n in st["batch_sizes"]) == st["batches"]


def _sources() -> dict[str, str]:
    return {
        str(p.relative_to(SRC)): p.read_text(encoding="utf-8")
        for p in sorted([*SRC.rglob("*.py"), *SRC.rglob("*.js")])
    }


def test_quantile_utilization_and_bottleneck_are_computed_in_metrics_only() -> None:
    sources = _sources()
    copies = {
        "a quantile function": re.compile(r"def \w*quantile\w*\(|function \w*[qQ]uantile"),
        "the bottleneck rule": re.compile(r"def find_bottleneck|round\([^)]*util"),
        "a utilization formula": re.compile(r"busy_seconds\s*-|/\s*\(\s*dt\s*\*|busy\s*/\s*capacity"),
    }
    found = {
        (what, path)
        for path, text in sources.items()
        for what, pattern in copies.items()
        if pattern.search(text)
    }
    assert found == {
        ("a quantile function", "metrics.py"),
        ("the bottleneck rule", "metrics.py"),
    }


def test_one_writer_of_the_prometheus_text() -> None:
    # Hand-written exposition (a "# TYPE" line, label quoting) lives nowhere in
    # flowbatch: prometheus_client writes every page and escapes label values.
    writers = [
        path for path, text in _sources().items()
        if re.search(r"# (TYPE|HELP) flowbatch|\{\w+=\\?\"\{", text)
    ]
    assert writers == []
