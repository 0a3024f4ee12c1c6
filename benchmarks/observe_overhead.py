"""observe_overhead: what tracing costs on the core overhead benchmark.

The pipeline is the one of ``overhead.py``: N integers through 3 no-op
``async def`` stages with ``runner.map`` (ordered), on one event loop. Sides,
run interleaved (A B C D A B C D ...) ``--repeats`` times; figures are medians:

- ``bare``: the plain asyncio.Queue chain of overhead.py, for scale only;
- ``base``: flowbatch with no hooks. Metrics are always on in the core, so
  their cost is inside this figure (see ``overhead.py`` for flowbatch
  against the bare chain);
- ``otel_off``: ``OpenTelemetryHooks()`` installed with no SDK tracer
  provider (the API's proxy): "tracing compiled in but off";
- ``otel_on``: ``OpenTelemetryHooks(provider)`` with an SDK provider whose
  span processor hands every span to an exporter that drops it (4 spans per
  item: the item and its 3 stage calls); ``--on-items`` items, as it is slow;
- ``otel_sampled``: the same with a 1% ``ParentBased(TraceIdRatioBased)``
  sampler, as a busy production service would run it.

``tracing_hooks()`` with no provider returns None, so "tracing in the code,
no provider" costs exactly ``base`` that way; ``otel_off`` is the cost of
installing the hooks object anyway.

Ratios are items/s over ``base`` items/s. The issue's target is that tracing
and metrics cost at most 5% (ratio >= 0.95) where tracing is off.

Usage: .venv/bin/python benchmarks/observe_overhead.py [--items 200000] [--on-items 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from time import perf_counter
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median, r3, report, verdict
from overhead import bare_chain

import flowbatch as fb
from flowbatch.hooks import Hooks
from flowbatch.runner import DEFAULT_QUEUE_SIZE

TARGET = 0.95


async def noop(x: int) -> int:
    return x


def null_provider(ratio: float | None = None) -> Any:
    """An SDK tracer provider whose spans are exported to nowhere; with
    ``ratio``, sampling that fraction of traces."""
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    class Null(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    sampler = None if ratio is None else ParentBased(TraceIdRatioBased(ratio))
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(Null()))
    return provider


async def chain(n: int, hops: int, queue_size: int, hooks: Hooks | None) -> float:
    """Seconds to map ``n`` items through ``hops`` no-op stages (open and drain included)."""
    pipe = fb.Pipeline([fb.stage(noop, name=f"s{i}") for i in range(hops)], name="overhead")
    got = 0
    t0 = perf_counter()
    async with pipe.open(queue_size=queue_size, hooks=hooks) as runner:
        async for _ in runner.map(range(n)):
            got += 1
    dt = perf_counter() - t0
    assert got == n, (got, n)
    return dt


async def main_async(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, int]]:
    from opentelemetry import trace

    from flowbatch.observe.tracing import OpenTelemetryHooks, tracing_enabled

    if tracing_enabled():
        raise SystemExit("a global SDK tracer provider is set: the 'off' side would be on")
    provider = null_provider()
    sampled = null_provider(0.01)
    n, hops, qs = args.items, args.hops, args.queue_size
    sizes = {"bare": n, "base": n, "otel_off": n, "otel_on": args.on_items, "otel_sampled": n}
    sides: dict[str, Callable[[], Awaitable[float]]] = {
        "bare": lambda: bare_chain(n, hops, qs),
        "base": lambda: chain(n, hops, qs, None),
        "otel_off": lambda: chain(n, hops, qs, OpenTelemetryHooks()),
        "otel_on": lambda: chain(args.on_items, hops, qs, OpenTelemetryHooks(provider)),
        "otel_sampled": lambda: chain(n, hops, qs, OpenTelemetryHooks(sampled)),
    }
    for run in sides.values():  # warm-up: imports, allocator, caches
        await run()
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.repeats):
        for name, run in sides.items():
            gc.collect()
            times[name].append(await run())
    provider.shutdown()
    sampled.shutdown()
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    return times, sizes


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--on-items", type=int, default=20_000,
                   help="items for the tracing-on side (it makes 4 spans per item)")
    p.add_argument("--hops", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE)
    args = p.parse_args()

    times, sizes = asyncio.run(main_async(args))
    rate = {k: sizes[k] / median(v) for k, v in times.items()}
    base = rate["base"]
    per_item_us = {k: 1e6 / r for k, r in rate.items()}
    labels = {
        "bare": "bare asyncio.Queue chain (scale only)",
        "base": "flowbatch, no hooks (metrics on)",
        "otel_off": "OpenTelemetryHooks, no SDK provider",
        "otel_on": "OpenTelemetryHooks, SDK + null exporter",
        "otel_sampled": "same, 1% of traces sampled",
    }
    rows = []
    figures: dict[str, Any] = {
        "items": args.items,
        "on_items": args.on_items,
        "hops": args.hops,
        "repeats": args.repeats,
        "target_ratio": TARGET,
    }
    for k in times:
        ratio = rate[k] / base
        figures[f"{k}_items_per_s"] = round(rate[k])
        figures[f"{k}_us_per_item"] = r3(per_item_us[k])
        figures[f"{k}_ratio"] = r3(ratio)
        extra = per_item_us[k] - per_item_us["base"]
        check = verdict(ratio, TARGET) if k == "otel_off" else ""
        rows.append([labels[k], rate[k], per_item_us[k], extra, ratio, check])
    figures["ratio"] = figures["otel_off_ratio"]
    figures["target_met"] = figures["ratio"] >= TARGET
    figures["runs_s"] = {k: [r3(x) for x in v] for k, v in times.items()}
    report(
        "observe_overhead",
        f"{args.items:,} items through {args.hops} no-op async stages "
        f"({args.on_items:,} with tracing on; median of {args.repeats}, interleaved)",
        ["side", "items/s", "us/item", "us/item over base", "ratio to base",
         f"target >= {TARGET}"],
        rows,
        figures,
        notes=[
            "headline ratio = otel_off (tracing installed, no SDK provider) over base",
            "metrics are always on in the core: their cost is inside 'base'",
        ],
    )


if __name__ == "__main__":
    main()
