"""Tracing: spans per item, stage call and batch; context from headers into every worker."""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

from observehelpers import PYTHON
from opentelemetry import trace
from opentelemetry.trace import StatusCode

import flowbatch as fb
from flowbatch.observe.tracing import (
    OpenTelemetryHooks,
    activate,
    attached,
    extract,
    inject,
    tracing_enabled,
    tracing_hooks,
)

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def _ids() -> str:
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}/{ctx.span_id:016x}"


async def on_loop(x: str) -> dict[str, str]:
    return {"x": x, "loop": _ids()}


def in_thread(batch: list[dict[str, str]]) -> list[Any]:
    out: list[Any] = []
    for d in batch:
        if d["x"] == "bad":
            out.append(ValueError("bad item"))
        else:
            out.append({**d, "thread": _ids()})
    return out


def in_process(d: dict[str, str]) -> dict[str, str]:
    return {**d, "process": _ids()}


def by_name(spans: Any, name: str) -> list[Any]:
    return [s for s in spans if s.name == name]


def test_spans_per_item_stage_and_batch_in_the_callers_trace(exporter: Any) -> None:
    provider, exp = exporter
    pipe = fb.Pipeline(
        [
            fb.stage(on_loop, name="prep"),
            fb.stage(in_thread, name="embed", batch=fb.Batch(max_size=3, max_wait=60)),
            fb.stage(in_process, name="store", executor="process"),
        ],
        name="traced",
    )

    async def main() -> list[Any]:
        async with pipe.open(hooks=OpenTelemetryHooks(provider)) as runner:
            # As an HTTP handler would: attach the context of the request's headers.
            with attached([(b"traceparent", TRACEPARENT.encode())]):
                calls = [asyncio.ensure_future(runner.submit(x)) for x in ("a", "bad", "b")]
            return await asyncio.gather(*calls, return_exceptions=True)

    out = asyncio.run(main())
    assert isinstance(out[1], fb.ItemFailed)
    spans = exp.get_finished_spans()

    items = by_name(spans, "traced")
    assert len(items) == 3
    for s in items:  # each item's span is a child of the caller's remote span
        assert f"{s.context.trace_id:032x}" == TRACE_ID
        assert f"{s.parent.span_id:016x}" == PARENT_ID
    item_ids = {s.attributes["flowbatch.item.id"]: s for s in items}
    assert item_ids[2].status.status_code is StatusCode.ERROR

    for stage in ("prep", "embed"):
        stage_spans = by_name(spans, f"traced {stage}")
        assert len(stage_spans) == 3
        for s in stage_spans:
            item = item_ids[s.attributes["flowbatch.item.id"]]
            assert s.parent.span_id == item.context.span_id
            assert s.attributes["flowbatch.stage"] == stage
            assert s.attributes["flowbatch.attempt"] == 1
    assert len(by_name(spans, "traced store")) == 2  # the failed item never got there

    # The batch: one span, a new trace, linked both ways with the items' spans.
    (batch,) = by_name(spans, "traced embed batch")
    assert batch.parent is None and f"{batch.context.trace_id:032x}" != TRACE_ID
    assert batch.attributes["flowbatch.batch.size"] == 3
    assert batch.attributes["flowbatch.batch.failed"] == 1
    embed = by_name(spans, "traced embed")
    assert {link.context.span_id for link in batch.links} == {s.context.span_id for s in embed}
    for s in embed:
        assert [link.context.span_id for link in s.links] == [batch.context.span_id]
    (bad,) = [s for s in embed if s.attributes["flowbatch.item.id"] == 2]
    assert bad.status.status_code is StatusCode.ERROR
    assert any(e.name == "exception" for e in bad.events)

    # Inside each worker the current span is that call's span: on the event
    # loop, in the thread (the batch span) and in the worker process.
    ok = [y for y in out if isinstance(y, dict)]
    assert len(ok) == 2
    for y in ok:
        trace_id, span_id = y["loop"].split("/")
        assert trace_id == TRACE_ID
        assert span_id in {f"{s.context.span_id:016x}" for s in by_name(spans, "traced prep")}
        assert y["thread"] == f"{batch.context.trace_id:032x}/{batch.context.span_id:016x}"
        trace_id, span_id = y["process"].split("/")
        assert trace_id == TRACE_ID
        assert span_id in {f"{s.context.span_id:016x}" for s in by_name(spans, "traced store")}


def test_map_items_take_the_context_of_the_consumer(exporter: Any) -> None:
    provider, exp = exporter
    pipe = fb.Pipeline([fb.stage(on_loop, name="prep")], name="mapped")
    headers = {"TraceParent": TRACEPARENT}  # a broker message's headers, any case

    async def main() -> list[Any]:
        async with pipe.open(hooks=OpenTelemetryHooks(provider, item_spans=False)) as runner:
            with attached(headers):
                return [y async for y in runner.map(["a", "b"])]

    out = asyncio.run(main())
    assert [y["x"] for y in out] == ["a", "b"]
    spans = exp.get_finished_spans()
    assert by_name(spans, "mapped") == []  # item_spans=False
    stage_spans = by_name(spans, "mapped prep")
    assert len(stage_spans) == 2
    for s in stage_spans:  # directly below the caller's span
        assert f"{s.parent.span_id:016x}" == PARENT_ID


def test_without_a_tracer_provider_the_hooks_do_nothing() -> None:
    assert not tracing_enabled(trace.NoOpTracerProvider())
    assert not tracing_enabled(trace.ProxyTracerProvider())
    hooks = OpenTelemetryHooks(trace.NoOpTracerProvider())
    seen: list[Any] = []

    class Spy(OpenTelemetryHooks):
        def carrier(self, state: Any) -> Any:
            c = super().carrier(state)
            seen.append(c)
            return c

    spy = Spy(trace.NoOpTracerProvider())
    pipe = fb.Pipeline([fb.stage(on_loop, name="prep")], name="off")

    async def main(h: OpenTelemetryHooks) -> Any:
        async with pipe.open(hooks=h) as runner:
            with attached({"traceparent": TRACEPARENT}):
                return await runner.submit("a")

    assert asyncio.run(main(hooks))["x"] == "a"
    assert hooks.on is False
    assert asyncio.run(main(spy))["x"] == "a"
    assert seen == []  # switched-off hooks are dropped by the runner: never called


def test_tracing_hooks_is_none_where_tracing_is_off(exporter: Any) -> None:
    provider, _ = exporter
    assert tracing_hooks(trace.NoOpTracerProvider()) is None
    assert tracing_hooks(trace.ProxyTracerProvider()) is None
    hooks = tracing_hooks(provider, item_spans=False)
    assert isinstance(hooks, OpenTelemetryHooks) and not hooks.item_spans
    assert not hooks.enabled  # until a runner opens with it


def test_sampled_out_items_make_no_stage_spans_but_carry_the_context() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    exp = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exp))
    pipe = fb.Pipeline([fb.stage(on_loop, name="prep")], name="sampled")

    async def main() -> Any:
        hooks = OpenTelemetryHooks(provider)
        async with pipe.open(hooks=hooks) as runner:
            assert hooks.enabled
            with attached({"traceparent": TRACEPARENT}):
                return await runner.submit("a")

    try:
        out = asyncio.run(main())
    finally:
        provider.shutdown()
    assert exp.get_finished_spans() == ()
    assert out["loop"].split("/")[0] == TRACE_ID  # the caller's trace still travels


def test_extract_and_inject_round_trip() -> None:
    ctx = extract({"traceparent": TRACEPARENT, "tracestate": "k=v"})
    sc = trace.get_current_span(ctx).get_span_context()
    assert f"{sc.trace_id:032x}" == TRACE_ID and sc.is_remote
    headers = inject(context=ctx)
    assert headers["traceparent"] == TRACEPARENT
    assert headers["tracestate"] == "k=v"
    # ASGI scope headers, Kafka header pairs, junk: all tolerated.
    for form in (
        [(b"traceparent", TRACEPARENT.encode())],
        [("traceparent", TRACEPARENT.encode()), ("other", None)],
        {"TRACEPARENT": TRACEPARENT},
    ):
        got = trace.get_current_span(extract(form)).get_span_context()  # type: ignore[arg-type]
        assert f"{got.span_id:016x}" == PARENT_ID
    assert not trace.get_current_span(extract(None)).get_span_context().is_valid
    assert not trace.get_current_span(extract([("x",)])).get_span_context().is_valid  # type: ignore[list-item]
    with activate(None):  # a carrier-less call runs as is
        pass


def test_importing_flowbatch_and_its_observers_does_not_import_opentelemetry() -> None:
    code = (
        "import sys, flowbatch, flowbatch.observe, flowbatch.observe.logs, "
        "flowbatch.observe.top, flowbatch.observe.bench, flowbatch.observe.analysis\n"
        "bad = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([PYTHON, "-c", code], check=True, timeout=60)
