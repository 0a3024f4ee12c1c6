"""OpenTelemetry tracing of a pipeline: a span per item, per stage call and per batch.

Give :class:`OpenTelemetryHooks` to ``pipeline.open(hooks=...)``. Spans:

- ``{pipeline}``: one per item, from admission to its answer. Its parent is
  the context current where the item was submitted, so a front end that
  attaches the caller's context (``extract`` from a ``traceparent`` header or
  from message headers) gets the pipeline's spans in the caller's trace.
- ``{pipeline} {stage}``: one per item per stage call (per attempt), a child
  of the item's span. In a batched stage each item keeps its own span.
- ``{pipeline} {stage} batch``: one per batch call, a new root linked to the
  spans of the items in it (and they to it): a batch serves many traces.

The stage function runs with its call's span as the current span, in the
event loop, in thread workers and in process workers (the context travels as
W3C ``traceparent`` headers), so spans it makes itself nest below.

Without a tracer provider (only the OpenTelemetry API, or an SDK that was
never installed as the global provider) the hooks turn themselves off when
the runner opens: they then make no spans and pass no context. The check is
made once, at ``open()``, so set the provider up before opening runners.
Hooks that are off still cost the runner its hook calls; where tracing may
be off, :func:`tracing_hooks` gives None instead, and the runner keeps its
fast path. Items whose trace the sampler drops make no stage spans.

Usage::

    from flowbatch.observe.tracing import attached, tracing_hooks

    async with pipe.open(hooks=tracing_hooks()) as runner:
        with attached(request.headers):          # in an HTTP handler
            y = await runner.submit(x)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from time import perf_counter
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from flowbatch.hooks import Hooks, ItemView, StageView

__all__ = [
    "OpenTelemetryHooks",
    "activate",
    "attached",
    "extract",
    "inject",
    "tracing_enabled",
    "tracing_hooks",
]

Headers = (
    Mapping[str, str]
    | Mapping[str, bytes]
    | Mapping[bytes, bytes]
    | Iterable[tuple[str, str]]
    | Iterable[tuple[str, bytes]]
    | Iterable[tuple[bytes, bytes]]
)

_TRACER_NAME = "flowbatch"


# ---------------------------------------------------------------- propagation


def _text(x: str | bytes) -> str:
    return x.decode("latin-1") if isinstance(x, bytes) else x


def _normalize(headers: Headers | None) -> dict[str, str]:
    """Lower-case ``str -> str`` from a mapping or from pairs, ``str`` or ``bytes``.

    Covers ASGI scope headers (``[(b"traceparent", b"00-...")]``), Starlette's
    ``Headers``, Kafka's ``[("traceparent", b"...")]``, AMQP and NATS header
    mappings and plain dicts. The first value of a repeated name wins.
    """
    out: dict[str, str] = {}
    if headers is None:
        return out
    pairs: Iterable[Any] = headers.items() if isinstance(headers, Mapping) else headers
    for pair in pairs:
        try:
            k, v = pair
        except (TypeError, ValueError):
            continue
        if v is None or not isinstance(k, str | bytes) or not isinstance(v, str | bytes):
            continue
        out.setdefault(_text(k).lower(), _text(v))
    return out


class _DictGetter(Getter[Mapping[str, str]]):
    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        v = carrier.get(key.lower())
        return None if v is None else [v]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_GETTER = _DictGetter()


def extract(headers: Headers | None, context: Context | None = None) -> Context:
    """The context carried by ``headers`` (W3C ``traceparent``, ``tracestate``,
    ``baggage``, or whatever the global propagator reads), over ``context``
    (default: the current one). Header names match in any case; values may
    be ``bytes``.

    Usage: ``token = opentelemetry.context.attach(extract(scope["headers"]))``
    """
    return propagate.extract(_normalize(headers), context=context, getter=_GETTER)


def inject(
    headers: MutableMapping[str, str] | None = None, context: Context | None = None
) -> MutableMapping[str, str]:
    """Write the current (or given) context into ``headers`` (a new dict by
    default) with the global propagator, and return them: for a message
    published to a broker, or an outgoing HTTP call."""
    out: MutableMapping[str, str] = {} if headers is None else headers
    propagate.inject(out, context=context)
    return out


@contextlib.contextmanager
def attached(headers: Headers | None) -> Iterator[Context]:
    """Make the context carried by ``headers`` current inside the block.

    Items submitted inside are traced as children of the caller's span::

        with attached(message.headers):
            await runner.submit(message.body)
    """
    ctx = extract(headers)
    token = otel_context.attach(ctx)
    try:
        yield ctx
    finally:
        otel_context.detach(token)


def tracing_enabled(provider: trace.TracerProvider | None = None) -> bool:
    """Whether ``provider`` (default: the global one) makes real spans.

    False for the API's no-op provider and for the proxy that stands in
    until an SDK provider is installed with ``trace.set_tracer_provider``.
    """
    p = provider if provider is not None else trace.get_tracer_provider()
    return not isinstance(p, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


# -------------------------------------------------------------- the carrier


class _Carrier:
    """A stage call's context on its way to the worker.

    Threads and the event loop use the ``Context`` as it is; pickling it for
    a worker process sends W3C headers instead (only then are they written).
    """

    __slots__ = ("_ctx", "_headers")

    def __init__(self, ctx: Context | None = None, headers: dict[str, str] | None = None) -> None:
        self._ctx = ctx
        self._headers = headers

    def context(self) -> Context:
        if self._ctx is None:
            self._ctx = extract(self._headers, Context())
        return self._ctx

    def __reduce__(self) -> tuple[Any, tuple[dict[str, str]]]:
        headers = self._headers
        if headers is None:
            headers = {}
            propagate.inject(headers, context=self._ctx)
        return (_carrier_from_headers, (headers,))


def _carrier_from_headers(headers: dict[str, str]) -> _Carrier:
    return _Carrier(headers=headers)


@contextlib.contextmanager
def activate(carrier: Any) -> Iterator[None]:
    """Make a stage call's span current around the stage function (in its
    worker: the event loop, a thread or a process)."""
    if not isinstance(carrier, _Carrier):
        yield
        return
    token = otel_context.attach(carrier.context())
    try:
        yield
    finally:
        otel_context.detach(token)


# -------------------------------------------------------------------- hooks


class _ItemTrace:
    """What the hooks keep on an item (``item.trace``): its span and context.

    ``recording`` is False when the sampler dropped the item's trace: its
    stage calls then make no spans either (they would not be recorded), and
    only the context (with its "not sampled" flag) travels on.
    """

    __slots__ = ("ctx", "recording", "span")

    def __init__(self, span: trace.Span, ctx: Context, recording: bool) -> None:
        self.span = span
        self.ctx = ctx
        self.recording = recording


class _Call:
    """One stage call: the items' spans (with each item's place in the call),
    the batch span, and the context to carry into the worker."""

    __slots__ = ("batch_span", "ctx", "spans")

    def __init__(
        self, spans: list[tuple[int, trace.Span]], batch_span: trace.Span | None, ctx: Context
    ) -> None:
        self.spans = spans
        self.batch_span = batch_span
        self.ctx = ctx


def _error(span: trace.Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


class OpenTelemetryHooks(Hooks):
    """Runner hooks that trace items, stage calls and batches with OpenTelemetry.

    ``tracer_provider``: where spans go (default: the global provider, read
    when the runner opens). ``enabled``: force tracing on or off; by default
    it is on when the provider is a real (SDK) one. ``item_spans``: make the
    per-item span covering admission to answer (on by default); without it
    stage spans are children of the caller's span directly.

    Usage: ``pipe.open(hooks=OpenTelemetryHooks())``
    """

    activate = staticmethod(activate)

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        enabled: bool | None = None,
        item_spans: bool = True,
    ) -> None:
        super().__init__()
        self._provider = tracer_provider
        self._enabled = enabled
        self.item_spans = item_spans
        self.on = False
        self._tracer: trace.Tracer = trace.NoOpTracer()

    @property
    def enabled(self) -> bool:
        """Whether these hooks make spans (known once the runner has opened)."""
        return self.on

    def bind(self, pipeline: str) -> None:
        super().bind(pipeline)
        provider = self._provider if self._provider is not None else trace.get_tracer_provider()
        self.on = tracing_enabled(provider) if self._enabled is None else self._enabled
        if self.on:
            from flowbatch import __version__

            self._tracer = provider.get_tracer(_TRACER_NAME, __version__)

    def admitted(self, item: ItemView) -> Any:
        if not self.on:
            return None
        parent = otel_context.get_current()
        if not self.item_spans:
            # Whether stage spans are sampled is decided per span, by the sampler.
            return _ItemTrace(trace.INVALID_SPAN, parent, True)
        span = self._tracer.start_span(
            self.pipeline,
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes={"flowbatch.pipeline": self.pipeline, "flowbatch.item.id": item.id},
        )
        return _ItemTrace(span, trace.set_span_in_context(span, parent), span.is_recording())

    def _item_span(
        self, stage: str, item: ItemView, now: float, links: Sequence[Link] | None
    ) -> trace.Span:
        tr = item.trace
        attrs: dict[str, Any] = {
            "flowbatch.pipeline": self.pipeline,
            "flowbatch.stage": stage,
            "flowbatch.item.id": item.id,
            "flowbatch.attempt": item.attempt,
        }
        if item.root is not item:
            attrs["flowbatch.item.index"] = item.index  # a fan-out child
        attrs["flowbatch.queue_wait_s"] = max(0.0, now - item.t_enq)
        return self._tracer.start_span(
            f"{self.pipeline} {stage}",
            context=tr.ctx if isinstance(tr, _ItemTrace) else None,
            attributes=attrs,
            links=links,
        )

    def started(self, stage: StageView, items: Sequence[ItemView], batch: bool) -> Any:
        if not self.on:
            return None
        now = perf_counter()
        if not batch:
            item = items[0]
            tr = item.trace
            if not isinstance(tr, _ItemTrace):
                return None
            if not tr.recording:  # sampled out: carry the context, make no span
                return _Call([], None, tr.ctx)
            span = self._item_span(stage.name, item, now, None)
            # On the item's context, so that baggage travels on too.
            return _Call([(0, span)], None, trace.set_span_in_context(span, tr.ctx))
        bspan = self._tracer.start_span(
            f"{self.pipeline} {stage.name} batch",
            context=Context(),  # a new trace: the batch serves many callers
            attributes={
                "flowbatch.pipeline": self.pipeline,
                "flowbatch.stage": stage.name,
                "flowbatch.batch.size": len(items),
            },
        )
        to_batch = [Link(bspan.get_span_context())]
        spans = [
            (i, self._item_span(stage.name, it, now, to_batch))
            for i, it in enumerate(items)
            if isinstance(it.trace, _ItemTrace) and it.trace.recording
        ]
        for _, s in spans:
            bspan.add_link(s.get_span_context())
        return _Call(spans, bspan, trace.set_span_in_context(bspan, Context()))

    def carrier(self, state: Any) -> Any:
        if not isinstance(state, _Call):
            return None
        return _Carrier(state.ctx)

    def ended(
        self,
        state: Any,
        error: BaseException | None,
        errors: Sequence[BaseException | None] | None,
    ) -> None:
        if not isinstance(state, _Call):
            return
        for i, span in state.spans:
            exc = error if error is not None else (errors[i] if errors is not None else None)
            if exc is not None:
                _error(span, exc)
            span.end()
        if state.batch_span is not None:
            if error is not None:
                _error(state.batch_span, error)
            elif errors is not None:
                state.batch_span.set_attribute(
                    "flowbatch.batch.failed", sum(e is not None for e in errors)
                )
            state.batch_span.end()

    def resolved(self, item: ItemView, error: BaseException | None) -> None:
        tr = item.trace
        if not isinstance(tr, _ItemTrace) or not tr.span.is_recording():
            return
        if error is not None:
            _error(tr.span, error)
        tr.span.end()


def tracing_hooks(
    tracer_provider: trace.TracerProvider | None = None, *, item_spans: bool = True
) -> OpenTelemetryHooks | None:
    """:class:`OpenTelemetryHooks` when tracing is on, else None.

    A runner given no hooks keeps its fastest path, so this is the way to
    have tracing in the code at no cost where no tracer provider is set up.
    Decided now: call it after the provider is installed.

    Usage: ``pipe.open(hooks=tracing_hooks())``
    """
    if not tracing_enabled(tracer_provider):
        return None
    return OpenTelemetryHooks(tracer_provider, item_spans=item_spans)
