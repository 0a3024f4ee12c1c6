"""Logging: the engine's item fields come out in text and in JSON lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import flowbatch as fb
from flowbatch.observe.logs import JsonFormatter, TextFormatter, setup_logging


def flaky(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x


@pytest.fixture
def restore_logger() -> Iterator[None]:
    log = logging.getLogger("flowbatch")
    handlers, level = list(log.handlers), log.level
    yield
    log.handlers[:] = handlers
    log.setLevel(level)


def run_failing_pipeline() -> None:
    pipe = fb.Pipeline(
        [fb.stage(flaky, name="check", retry=fb.Retry(attempts=2, backoff=0))], name="logs"
    )

    async def main() -> list[Any]:
        async with pipe.open() as runner:
            return [y async for y in runner.map([1, -2], return_exceptions=True)]

    out = asyncio.run(main())
    assert isinstance(out[1], fb.ItemFailed)


@pytest.mark.usefixtures("restore_logger")
def test_json_lines_carry_pipeline_stage_item_and_attempt() -> None:
    buf = io.StringIO()
    setup_logging("DEBUG", json=True, stream=buf)
    run_failing_pipeline()
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    retry = [d for d in lines if d["level"] == "DEBUG" and d["logger"] == "flowbatch"]
    fail = [d for d in lines if d["level"] == "INFO" and d["logger"] == "flowbatch"]
    assert len(retry) == 1 and len(fail) == 1
    for d, attempt in ((retry[0], 1), (fail[0], 2)):
        assert d["logger"] == "flowbatch"
        assert (d["pipeline"], d["stage"], d["item"], d["attempt"]) == ("logs", "check", 2, attempt)
        assert "negative: -2" in d["message"]
        assert d["ts"].endswith("+00:00")


@pytest.mark.usefixtures("restore_logger")
def test_text_lines_carry_the_same_fields_and_setup_replaces_its_handler() -> None:
    first = io.StringIO()
    setup_logging("DEBUG", stream=first)
    buf = io.StringIO()
    setup_logging("INFO", stream=buf)  # replaces the first handler
    run_failing_pipeline()
    assert first.getvalue() == ""
    (line,) = buf.getvalue().splitlines()
    assert "INFO" in line and "flowbatch:" in line
    assert line.endswith("pipeline=logs stage=check item=2 attempt=2")


def test_formatters_keep_other_extras_and_exceptions() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "it broke: %s", ("now",), exc_info=sys.exc_info(),
            extra={"stage": "embed", "request_id": "r 1"},
        )
    d = json.loads(JsonFormatter().format(record))
    assert d["message"] == "it broke: now"
    assert d["stage"] == "embed" and d["request_id"] == "r 1"
    assert d["exc_type"] == "RuntimeError" and "boom" in d["exc"]
    text = TextFormatter().format(record)
    head, _, tb = text.partition("\n")
    assert head.endswith('stage=embed request_id="r 1"')
    assert "RuntimeError: boom" in tb


def test_json_lines_carry_the_trace_of_a_traced_stage_call(exporter: Any) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from flowbatch.observe.tracing import OpenTelemetryHooks

    provider, exp = exporter
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    user_log = logging.getLogger("tests.observe.user")
    user_log.addHandler(handler)
    user_log.setLevel(logging.INFO)
    user_log.propagate = False

    def work(x: int) -> int:
        user_log.info("working on %d", x)
        return x

    pipe = fb.Pipeline([fb.stage(work, name="work")], name="t")

    async def main() -> int:
        async with pipe.open(hooks=OpenTelemetryHooks(provider)) as runner:
            return int(await runner.submit(7))

    try:
        assert asyncio.run(main()) == 7
    finally:
        user_log.removeHandler(handler)
    d = json.loads(buf.getvalue())
    (span,) = [s for s in exp.get_finished_spans() if s.name == "t work"]
    assert d["trace_id"] == f"{span.context.trace_id:032x}"
    assert d["span_id"] == f"{span.context.span_id:016x}"
