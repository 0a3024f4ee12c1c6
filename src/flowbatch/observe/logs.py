"""Logging set-up for flowbatch programs: readable text lines or JSON lines.

The engine logs on the ``flowbatch`` logger; every line about an item (a
failure, a retry) carries ``pipeline``, ``stage``, ``item`` (the item id) and
``attempt`` as record attributes. Both formats here print them: text as
``key=value`` after the message, JSON as fields of the object. A line logged
inside a traced stage call also carries ``trace_id`` and ``span_id`` (only
when OpenTelemetry is already in use: this module never imports it).

Usage::

    from flowbatch.observe.logs import setup_logging
    setup_logging(level="INFO", json=True)      # one JSON object per line on stderr
"""

from __future__ import annotations

import json as _json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

__all__ = ["ITEM_FIELDS", "JsonFormatter", "TextFormatter", "setup_logging"]

#: The record attributes the engine sets on every line about an item.
ITEM_FIELDS = ("pipeline", "stage", "item", "attempt")

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)


def _trace_ids() -> dict[str, str]:
    """The current span's ids, if OpenTelemetry is loaded and a span is current."""
    otel = sys.modules.get("opentelemetry.trace")
    if otel is None:
        return {}
    ctx = otel.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The record's ``extra`` fields, the item fields first."""
    out: dict[str, Any] = {}
    d = record.__dict__
    for k in ITEM_FIELDS:
        if k in d:
            out[k] = d[k]
    for k, v in d.items():
        if k not in _STANDARD and k not in out and not k.startswith("_"):
            out[k] = v
    return out


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` (the ``extra`` fields)."""

    def __init__(self, fmt: str | None = None, datefmt: str | None = None) -> None:
        super().__init__(fmt or "%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {**_extras(record), **_trace_ids()}
        if not fields:
            return line
        tail = " ".join(f"{k}={_short(v)}" for k, v in fields.items())
        head, sep, rest = line.partition("\n")  # keep a traceback below the fields
        return f"{head} {tail}{sep}{rest}"


def _short(v: Any) -> str:
    s = v if isinstance(v, str) else repr(v)
    return _json.dumps(s) if (not s or " " in s or '"' in s) else s


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, the ``extra`` fields (``pipeline``, ``stage``, ``item``,
    ``attempt`` for item lines), ``trace_id``/``span_id`` when traced, and
    ``exc_type``/``exc`` (the formatted traceback) for an exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_extras(record))
        out.update(_trace_ids())
        if record.exc_info and record.exc_info[1] is not None:
            out["exc_type"] = type(record.exc_info[1]).__name__
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return _json.dumps(out, default=repr, ensure_ascii=False)


def setup_logging(
    level: int | str = logging.INFO,
    *,
    json: bool = False,
    stream: IO[str] | None = None,
    logger: str | None = "flowbatch",
) -> logging.Handler:
    """Send ``logger``'s records (default: the engine's, ``"flowbatch"``; None:
    the root logger) at ``level`` and above to ``stream`` (stderr), as text or
    JSON lines. Calling it again replaces the handler it added before.

    Returns the handler, for a caller that wants to remove it later.
    """
    target = logging.getLogger(logger)
    for h in list(target.handlers):
        if getattr(h, "_flowbatch_observe", False):
            target.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler._flowbatch_observe = True  # type: ignore[attr-defined]
    target.addHandler(handler)
    target.setLevel(level)
    return handler
