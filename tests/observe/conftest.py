"""Fixtures for the observability tests: an in-memory span exporter; skips without extras."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


# Modules that need the optional extras (observe, observe-test): skipped without them.
collect_ignore: list[str] = []
if _missing("opentelemetry.sdk"):
    collect_ignore.append("test_observe_tracing.py")
if _missing("starlette") or _missing("httpx") or _missing("uvicorn"):
    collect_ignore.append("test_observe_dashboard.py")


@pytest.fixture
def exporter() -> Iterator[tuple[object, object]]:
    """A tracer provider (not installed globally) and its in-memory exporter."""
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exp = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    yield provider, exp
    provider.shutdown()
