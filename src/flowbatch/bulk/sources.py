"""Sources: where a bulk job's items come from, each with a stable key.

Usage::

    src = JsonlSource("docs.jsonl", key="id", value="text")
    async for rec in src:          # Record(key=..., value=...)
        ...
    pipe.run(src, checkpoint="job.ckpt")

A source is an async iterable of :class:`Record`. It reads only as fast as
its consumer takes records (the runner's ``map`` pulls while its window has
room), a chunk at a time, so a table or file of any size is read in flat
memory. Blocking reads (files, SQLite, pyarrow) run in a thread, one chunk
per call, so the event loop keeps serving the pipeline. ``count()`` gives the
number of records when it is cheap to know (for a progress bar's total), else
``None``.

The key is what checkpoints record and sinks upsert on: a column's value
(``key="id"``), a file's path, or the record's position (line or row number,
from 1) when no key column is named.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from itertools import count as _counter
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "CsvSource",
    "GlobSource",
    "JsonlSource",
    "LinesSource",
    "ParquetSource",
    "PostgresSource",
    "Record",
    "Source",
    "SqliteSource",
]

#: Records read per blocking call (one thread hop per chunk).
DEFAULT_CHUNK = 1000


class Record(NamedTuple):
    """One item of a source: its stable ``key`` and the ``value`` the pipeline gets."""

    key: Any
    value: Any


class Source:
    """Base of the sources: an async iterable of :class:`Record`."""

    def __aiter__(self) -> AsyncIterator[Record]:
        return self.records()

    def records(self) -> AsyncIterator[Record]:
        raise NotImplementedError

    async def values(self) -> AsyncIterator[Any]:
        """The values alone: ``runner.map(src.values())`` when no key is needed."""
        async for rec in self.records():
            yield rec.value

    async def count(self) -> int | None:
        """The number of records, when cheap to know; else ``None``."""
        return None


def _pick(row: dict[str, Any], value: str | Sequence[str] | None) -> Any:
    if value is None:
        return row
    if isinstance(value, str):
        return row[value]
    return {c: row[c] for c in value}


async def _chunks(make: Callable[[], Iterator[list[Any]]]) -> AsyncIterator[list[Any]]:
    """Drive a blocking chunk iterator from a thread, one chunk per hop."""
    it = await asyncio.to_thread(make)
    try:
        while True:
            chunk = await asyncio.to_thread(next, it, None)
            if chunk is None:
                return
            yield chunk
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            await asyncio.to_thread(close)


def _read_lines(path: Path, chunk: int, skip_blank: bool) -> Iterator[list[tuple[int, str]]]:
    """The file's lines (without their newline) with their numbers (from 1), in lists
    of ``chunk``; ``skip_blank`` leaves out blank lines (their numbers still count)."""
    with path.open("r", encoding="utf-8") as f:
        buf: list[tuple[int, str]] = []
        for n, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if skip_blank and not line.strip():
                continue
            buf.append((n, line))
            if len(buf) >= chunk:
                yield buf
                buf = []
        if buf:
            yield buf


def _count_lines(path: Path) -> int:
    n = 0
    last = b"\n"
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


class LinesSource(Source):
    """The lines of a text file (without their newline), keyed by line number (from 1).

    Usage: ``LinesSource("urls.txt")``; ``skip_blank=True`` leaves out empty lines
    (their numbers are still counted, so keys stay stable).
    """

    def __init__(self, path: str | os.PathLike[str], *, skip_blank: bool = True,
                 chunk: int = DEFAULT_CHUNK) -> None:
        self.path = Path(path)
        self.skip_blank = skip_blank
        self.chunk = chunk

    async def records(self) -> AsyncIterator[Record]:
        async for lines in _chunks(lambda: _read_lines(self.path, self.chunk, self.skip_blank)):
            for n, line in lines:
                yield Record(n, line)

    async def count(self) -> int | None:
        if self.skip_blank:
            return None
        return await asyncio.to_thread(_count_lines, self.path)


class JsonlSource(Source):
    """JSON Lines: one JSON value per line, keyed by ``key`` (a field) or the line number.

    ``value`` picks the field (or a list of fields) the pipeline gets; by
    default the whole parsed object. Blank lines are skipped. A line that is
    not JSON raises ``ValueError`` naming the file and line.

    Usage: ``JsonlSource("docs.jsonl", key="id", value="text")``
    """

    def __init__(self, path: str | os.PathLike[str], *, key: str | None = None,
                 value: str | Sequence[str] | None = None, chunk: int = DEFAULT_CHUNK) -> None:
        self.path = Path(path)
        self.key = key
        self.value = value
        self.chunk = chunk

    async def records(self) -> AsyncIterator[Record]:
        async for lines in _chunks(lambda: _read_lines(self.path, self.chunk, skip_blank=True)):
            for n, line in lines:
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{self.path}:{n}: not JSON ({exc})") from None
                key = n if self.key is None else obj[self.key]
                yield Record(key, obj if self.value is None else _pick(obj, self.value))

    async def count(self) -> int | None:
        return await asyncio.to_thread(_count_lines, self.path)


def _arrow_rows(batches: Iterator[Any]) -> Iterator[list[dict[str, Any]]]:
    for batch in batches:
        if batch.num_rows:
            yield batch.to_pylist()


class _ArrowSource(Source):
    def __init__(self, path: str | os.PathLike[str], *, columns: Sequence[str] | None,
                 key: str | None, value: str | Sequence[str] | None, chunk: int) -> None:
        self.path = Path(path)
        self.columns = list(columns) if columns is not None else None
        self.key = key
        self.value = value
        self.chunk = chunk

    def _read_columns(self) -> list[str] | None:
        if self.columns is None:
            return None
        cols = list(self.columns)
        if self.key is not None and self.key not in cols:
            cols.append(self.key)
        return cols

    def _batches(self) -> Iterator[list[dict[str, Any]]]:
        raise NotImplementedError

    async def records(self) -> AsyncIterator[Record]:
        n = _counter(1)
        value = self.value
        if value is None and self.columns is not None and self.key not in self.columns:
            value = self.columns  # the key column was read only to key the rows
        async for rows in _chunks(self._batches):
            for row in rows:
                i = next(n)
                key = i if self.key is None else row[self.key]
                yield Record(key, _pick(row, value))


class ParquetSource(_ArrowSource):
    """Rows of a Parquet file (or of a folder of ``*.parquet`` part files, in name
    order), read in record batches through pyarrow with only ``columns`` loaded.

    Each value is the row as a dict (or one column's value with ``value="text"``);
    the key is ``key``'s value, else the row number (from 1, across parts).

    Usage: ``ParquetSource("docs.parquet", columns=["text"], key="id")``
    """

    def __init__(self, path: str | os.PathLike[str], *, columns: Sequence[str] | None = None,
                 key: str | None = None, value: str | Sequence[str] | None = None,
                 chunk: int = DEFAULT_CHUNK) -> None:
        super().__init__(path, columns=columns, key=key, value=value, chunk=chunk)

    def _files(self) -> list[Path]:
        if self.path.is_dir():
            return sorted(self.path.glob("*.parquet"))
        return [self.path]

    def _batches(self) -> Iterator[list[dict[str, Any]]]:
        import pyarrow.parquet as pq

        for f in self._files():
            pf = pq.ParquetFile(f)
            try:
                yield from _arrow_rows(
                    pf.iter_batches(batch_size=self.chunk, columns=self._read_columns())
                )
            finally:
                pf.close()

    async def count(self) -> int | None:
        import pyarrow.parquet as pq

        def rows() -> int:
            return sum(pq.ParquetFile(f).metadata.num_rows for f in self._files())

        return await asyncio.to_thread(rows)


class CsvSource(_ArrowSource):
    """Rows of a CSV file with a header line, streamed through pyarrow's CSV reader
    (types inferred), only ``columns`` kept. Values and keys as :class:`ParquetSource`.

    Usage: ``CsvSource("reviews.csv", columns=["body"], key="review_id", value="body")``
    """

    def __init__(self, path: str | os.PathLike[str], *, columns: Sequence[str] | None = None,
                 key: str | None = None, value: str | Sequence[str] | None = None,
                 chunk: int = DEFAULT_CHUNK) -> None:
        super().__init__(path, columns=columns, key=key, value=value, chunk=chunk)

    def _batches(self) -> Iterator[list[dict[str, Any]]]:
        import pyarrow.csv as pacsv

        reader = pacsv.open_csv(
            self.path,
            read_options=pacsv.ReadOptions(block_size=1 << 20),
            convert_options=pacsv.ConvertOptions(include_columns=self._read_columns()),
        )
        try:
            yield from _arrow_rows(iter(reader))
        finally:
            reader.close()


class GlobSource(Source):
    """Files matching a glob, through fsspec: a local pattern or any fsspec URL
    (``s3://bucket/docs/*.pdf`` when s3fs is installed). Keyed by path, in name order.

    ``read="bytes"`` (default) gives ``(path, bytes)``; ``read="path"`` gives the
    path alone (the stage opens it); ``read="open"`` gives an fsspec
    ``OpenFile`` (``with value as f: f.read()``) for files too large to hold.

    Usage: ``GlobSource("data/**/*.json")``
    """

    def __init__(self, pattern: str, *, read: str = "bytes", **storage_options: Any) -> None:
        if read not in ("bytes", "path", "open"):
            raise ValueError(f"read must be 'bytes', 'path' or 'open', got {read!r}")
        self.pattern = pattern
        self.read = read
        self.storage_options = storage_options
        self._paths: list[str] | None = None

    def _list(self) -> tuple[Any, list[str]]:
        from fsspec.core import url_to_fs

        fs, root = url_to_fs(self.pattern, **self.storage_options)
        if self._paths is None:
            self._paths = sorted(p for p in fs.glob(root) if not fs.isdir(p))
        return fs, self._paths

    async def records(self) -> AsyncIterator[Record]:
        fs, paths = await asyncio.to_thread(self._list)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        local = protocol in ("file", "local")

        def name(p: str) -> str:
            return p if local else f"{protocol}://{p}"

        if self.read == "path":
            for p in paths:
                yield Record(name(p), name(p))
        elif self.read == "open":
            from fsspec.core import OpenFile

            for p in paths:
                # Opened by the stage (``with value as f``), not here: no
                # file handle is held while the item waits in a queue.
                yield Record(name(p), OpenFile(fs, p, "rb"))
        else:
            for p in paths:
                data = await asyncio.to_thread(fs.cat_file, p)
                yield Record(name(p), (name(p), data))

    async def count(self) -> int | None:
        _, paths = await asyncio.to_thread(self._list)
        return len(paths)


class PostgresSource(Source):
    """The rows of a query on PostgreSQL, through asyncpg with a server-side cursor:
    ``prefetch`` rows per round trip, so millions of rows pass in flat memory.

    Each value is the row as a dict (or one column with ``value="body"``); the
    key is ``key``'s value (default: the first column).

    Usage::

        PostgresSource("postgresql://localhost/shop",
                       "SELECT id, body FROM reviews", key="id", value="body")
    """

    def __init__(self, dsn: str, query: str, *, key: str | None = None,
                 value: str | Sequence[str] | None = None, prefetch: int = DEFAULT_CHUNK,
                 args: Sequence[Any] = ()) -> None:
        self.dsn = dsn
        self.query = query
        self.key = key
        self.value = value
        self.prefetch = prefetch
        self.args = tuple(args)

    async def records(self) -> AsyncIterator[Record]:
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        try:
            # A cursor lives in a transaction; READ ONLY also makes the
            # snapshot consistent for the whole read.
            async with conn.transaction(readonly=True):
                cur = conn.cursor(self.query, *self.args, prefetch=self.prefetch)
                key = self.key
                async for row in cur:
                    d = dict(row.items())
                    k = d[key] if key is not None else row[0]
                    yield Record(k, _pick(d, self.value))
        finally:
            await conn.close()

    async def count(self) -> int | None:
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        try:
            n = await conn.fetchval(f"SELECT count(*) FROM ({self.query}) AS q", *self.args)  # noqa: S608 - the user's own query
        finally:
            await conn.close()
        return int(n)


class SqliteSource(Source):
    """The rows of a query (or a whole ``table``) in a SQLite file, ``chunk`` rows
    per read. Values and keys as :class:`PostgresSource`.

    Usage: ``SqliteSource("shop.db", table="reviews", key="id", value="body")``
    """

    def __init__(self, path: str | os.PathLike[str], query: str | None = None, *,
                 table: str | None = None, key: str | None = None,
                 value: str | Sequence[str] | None = None, chunk: int = DEFAULT_CHUNK) -> None:
        if (query is None) == (table is None):
            raise ValueError("SqliteSource needs a query or a table, not both")
        self.path = Path(path)
        self.query = query if query is not None else f'SELECT * FROM "{table}"'  # noqa: S608 - a table name the user gave
        self.key = key
        self.value = value
        self.chunk = chunk

    def _rows(self) -> Iterator[list[dict[str, Any]]]:
        # Each chunk is read by whichever pool thread is free, one at a time.
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        try:
            cur = db.execute(self.query)
            names = [d[0] for d in cur.description]
            while rows := cur.fetchmany(self.chunk):
                yield [dict(zip(names, r, strict=True)) for r in rows]
        finally:
            db.close()

    async def records(self) -> AsyncIterator[Record]:
        async for rows in _chunks(self._rows):
            for d in rows:
                k = d[self.key] if self.key is not None else next(iter(d.values()))
                yield Record(k, _pick(d, self.value))

    async def count(self) -> int | None:
        def n() -> int:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                return int(db.execute(f"SELECT count(*) FROM ({self.query})").fetchone()[0])  # noqa: S608
            finally:
                db.close()

        return await asyncio.to_thread(n)
