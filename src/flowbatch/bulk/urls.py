"""Sources and sinks from URLs, as ``flowbatch run --source URL --sink URL`` takes them.

Sources::

    lines:PATH                          one item per non-blank line, key = line number
    jsonl:PATH[?key=F&value=F]          one JSON value per line (a bare *.jsonl path too)
    csv:PATH[?columns=a,b&key=F&value=F]      rows as dicts (a bare *.csv path too)
    parquet:PATH[?columns=a,b&key=F&value=F]  a file or a folder of parts (bare *.parquet)
    glob:PATTERN[?read=bytes|path|open] files through fsspec (glob:s3://bucket/*.pdf)
    postgresql://USER@HOST:PORT/DB?query=SQL[&key=F&value=F&prefetch=N]
    sqlite:PATH?table=T|query=SQL[&key=F&value=F]
    failed:PATH                         a failed-keys file of an earlier run

Sinks::

    postgresql://USER@HOST:PORT/DB?table=T[&key=id&column=value&batch=500&concurrency=2]
    sqlite:PATH?table=T[&key=key&column=value&batch=500]
    parquet:FOLDER[?rows=10000]
    jsonl:PATH[?batch=500]

Parameter values are percent-decoded (``%20``, ``%26`` for ``&``); ``+``
stays a plus. Other parameters of a ``postgresql://`` URL go to asyncpg
as they are (``sslmode=require``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from .sinks import JsonlSink, ParquetSink, PostgresSink, Sink, SqliteSink
from .sources import (
    CsvSource,
    GlobSource,
    JsonlSource,
    LinesSource,
    ParquetSource,
    PostgresSource,
    Source,
    SqliteSource,
)

__all__ = ["open_sink", "open_source"]

_PG = ("postgresql://", "postgres://")
_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


def _params(query: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        out[unquote(name)] = unquote(value)
    return out


def _split(url: str) -> tuple[str, str, dict[str, str]]:
    """``scheme:rest?params`` -> (scheme, rest, params); a bare path gets its scheme by suffix."""
    scheme, sep, rest = url.partition(":")
    if not sep or len(scheme) == 1 or "/" in scheme:  # a bare path (or a Windows drive)
        rest = url
        scheme = next((s for suf, s in _BY_SUFFIX.items() if url.split("?", 1)[0].endswith(suf)), "")
        if not scheme:
            raise ValueError(
                f"cannot tell what {url!r} is: write it as lines:, jsonl:, csv:, parquet:, "
                "glob:, sqlite:, failed: or postgresql:// (see flowbatch run --help)"
            )
    path, _, query = rest.partition("?")
    return scheme, path, _params(query)


def _columns(p: dict[str, str]) -> list[str] | None:
    cols = p.pop("columns", None)
    return [c.strip() for c in cols.split(",") if c.strip()] if cols else None


def _value(p: dict[str, str]) -> Any:
    v = p.pop("value", None)
    if v and "," in v:
        return [c.strip() for c in v.split(",")]
    return v or None


def _no_more(url: str, p: dict[str, str]) -> None:
    if p:
        raise ValueError(f"{url!r}: unknown parameter(s) {sorted(p)}")


def _pg(url: str, ours: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    p = _params(parts.query)
    mine = {k: p.pop(k) for k in ours if k in p}
    rest = "&".join(f"{k}={v}" for k, v in p.items())
    return urlunsplit(parts._replace(query=rest)), mine


def open_source(url: str) -> Source:
    """The source a URL names (see the module doc)."""
    if url.startswith(_PG):
        dsn, p = _pg(url, ("query", "key", "value", "prefetch"))
        if "query" not in p:
            raise ValueError(f"{url!r}: a PostgreSQL source needs ?query=SELECT...")
        return PostgresSource(dsn, p["query"], key=p.get("key") or None,
                              value=_value(p), prefetch=int(p.get("prefetch", 1000)))
    scheme, path, p = _split(url)
    src: Source
    if scheme == "lines":
        src = LinesSource(path)
    elif scheme == "jsonl":
        src = JsonlSource(path, key=p.pop("key", None), value=_value(p))
    elif scheme == "failed":
        src = JsonlSource(path, key="key", value="value")
    elif scheme == "csv":
        src = CsvSource(path, columns=_columns(p), key=p.pop("key", None), value=_value(p))
    elif scheme == "parquet":
        src = ParquetSource(path, columns=_columns(p), key=p.pop("key", None), value=_value(p))
    elif scheme == "glob":
        src = GlobSource(path, read=p.pop("read", "bytes"))
    elif scheme == "sqlite":
        src = SqliteSource(path, p.pop("query", None), table=p.pop("table", None),
                           key=p.pop("key", None), value=_value(p))
    else:
        raise ValueError(f"{url!r}: no source of kind {scheme!r}")
    _no_more(url, p)
    return src


def open_sink(url: str) -> Sink:
    """The sink a URL names (see the module doc)."""
    if url.startswith(_PG):
        dsn, p = _pg(url, ("table", "key", "column", "batch", "concurrency"))
        if "table" not in p:
            raise ValueError(f"{url!r}: a PostgreSQL sink needs ?table=NAME")
        return PostgresSink(dsn, p["table"], key=p.get("key", "key"),
                            column=p.get("column", "value"),
                            batch_size=int(p.get("batch", 500)),
                            concurrency=int(p.get("concurrency", 2)))
    scheme, path, p = _split(url)
    sink: Sink
    if scheme == "sqlite":
        if "table" not in p:
            raise ValueError(f"{url!r}: a SQLite sink needs ?table=NAME")
        sink = SqliteSink(path, p.pop("table"), key=p.pop("key", "key"),
                          column=p.pop("column", "value"), batch_size=int(p.pop("batch", 500)))
    elif scheme == "parquet":
        sink = ParquetSink(path, rows_per_file=int(p.pop("rows", 10_000)))
    elif scheme == "jsonl":
        sink = JsonlSink(path, batch_size=int(p.pop("batch", 500)))
    else:
        raise ValueError(f"{url!r}: no sink of kind {scheme!r}")
    _no_more(url, p)
    return sink
