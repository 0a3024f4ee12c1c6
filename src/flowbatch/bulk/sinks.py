"""Sinks: where a bulk job's results go, written in batches, one transaction each.

Usage::

    sink = PostgresSink("postgresql://localhost/shop", table="review_vectors",
                        key="id", column="embedding")
    report = await run_job(pipe, source, sink, checkpoint="job.ckpt")

A sink becomes the job's final batched stage (:meth:`Sink.stage`): each
call gets a list of ``(key, result)`` and writes it in one transaction
(a database transaction, or a file committed by ``fsync`` / rename). The
stage's ``Retry`` retries a write that failed for a passing reason (a
dropped connection, a lock); an error that may be one row's fault (the
database rejects a row: a constraint, a bad value) splits the batch in
halves, as every batched stage is split, until that row fails alone with
the database's message while the rest are written.

Writes are idempotent where the target allows: the database sinks upsert on
the key, so a batch written again after a crash leaves one row per key. The
file sinks cannot overwrite a line, so on resume they first tell the
checkpoint which keys they already hold (:meth:`Sink.recover`).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowbatch.batching import Batch
from flowbatch.retry import Retry
from flowbatch.stage import Stage, stage

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

__all__ = ["JsonlSink", "ParquetSink", "PostgresSink", "Sink", "SqliteSink"]

Row = tuple[Any, Any]

DEFAULT_BATCH = 500


def plain(value: Any) -> Any:
    """A result as plain Python (numpy arrays and scalars become lists and numbers)."""
    tolist = getattr(value, "tolist", None)
    if tolist is not None and callable(tolist):
        return tolist()
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Sink:
    """Base of the sinks. Subclasses implement :meth:`write` (one transaction)
    and, if they need them, :meth:`open`, :meth:`close` and :meth:`recover`.

    ``batch``, ``concurrency`` and ``retry`` are the options of the sink's stage.
    """

    name = "sink"
    batch = Batch(max_size=DEFAULT_BATCH)
    concurrency = 1
    retry = Retry(attempts=5, backoff=0.2, on=(OSError,))

    async def open(self, *, fresh: bool) -> None:
        """Get ready to write. ``fresh``: the job starts over (file sinks empty their output)."""

    async def recover(self, checkpoint: Checkpoint) -> None:
        """On resume: mark in ``checkpoint`` the keys this sink already holds
        (sinks that cannot upsert, so that no key is written twice)."""

    async def write(self, rows: list[Row]) -> None:
        """Write ``rows`` (``(key, result)`` pairs) in one transaction, or raise."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections and files."""

    def stage(self, checkpoint: Checkpoint | None = None) -> Stage:
        """The job's final stage: write each batch, then mark its keys done."""

        async def write(rows: list[Row]) -> list[None]:
            await self.write(rows)
            if checkpoint is not None:
                checkpoint.mark([k for k, _ in rows])
            return [None] * len(rows)

        write.__name__ = self.name
        return stage(
            write,
            name=self.name,
            executor="async",
            concurrency=self.concurrency,
            batch=self.batch,
            retry=self.retry,
        )


# ------------------------------------------------------------------ PostgreSQL


def _pg_retry() -> Retry:
    import asyncpg.exceptions as pgx

    return Retry(
        attempts=5,
        backoff=0.2,
        on=(
            OSError,
            pgx.PostgresConnectionError,
            pgx.ConnectionDoesNotExistError,
            pgx.SerializationError,
            pgx.DeadlockDetectedError,
            pgx.TooManyConnectionsError,
        ),
    )


def _pg_split_on() -> tuple[type[BaseException], ...]:
    import asyncpg.exceptions as pgx

    return (pgx.IntegrityConstraintViolationError, pgx.DataError)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _table(name: str) -> str:
    return ".".join(_ident(part) for part in name.split("."))


class PostgresSink(Sink):
    """Upsert into an existing PostgreSQL table through asyncpg, one transaction per batch.

    The table needs a unique constraint on ``key`` (the upsert's conflict
    target). A result that is a dict fills the columns it names; any other
    result fills ``column`` (numpy arrays become lists, so a ``real[]`` or
    ``float8[]`` column takes a vector). ``json``/``jsonb`` columns take any
    JSON-able value. ``concurrency`` connections write at once.

    Usage: ``PostgresSink(dsn, table="docs_vec", key="id", column="embedding")``
    """

    name = "pg_sink"

    def __init__(self, dsn: str, table: str, *, key: str = "key", column: str = "value",
                 batch_size: int = DEFAULT_BATCH, concurrency: int = 2,
                 retry: Retry | None = None) -> None:
        self.dsn = dsn
        self.table = table
        self.key = key
        self.column = column
        self.batch = Batch(max_size=batch_size, split_on=_pg_split_on())
        self.concurrency = concurrency
        self.retry = retry if retry is not None else _pg_retry()
        self._pool: Any = None
        self._sql: dict[tuple[str, ...], str] = {}

    async def open(self, *, fresh: bool) -> None:
        import asyncpg

        async def init(conn: Any) -> None:
            for t in ("json", "jsonb"):
                await conn.set_type_codec(
                    t, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
                )

        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=1, max_size=self.concurrency, init=init
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def _statement(self, cols: tuple[str, ...]) -> str:
        sql = self._sql.get(cols)
        if sql is None:
            names = [self.key, *cols]
            marks = ", ".join(f"${i}" for i in range(1, len(names) + 1))
            sets = ", ".join(f"{_ident(c)} = EXCLUDED.{_ident(c)}" for c in cols)
            action = f"DO UPDATE SET {sets}" if cols else "DO NOTHING"
            sql = (
                f"INSERT INTO {_table(self.table)} ({', '.join(map(_ident, names))}) "  # noqa: S608 - identifiers quoted
                f"VALUES ({marks}) ON CONFLICT ({_ident(self.key)}) {action}"
            )
            self._sql[cols] = sql
        return sql

    async def write(self, rows: list[Row]) -> None:
        groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        for key, result in rows:
            if isinstance(result, dict):
                cols = tuple(result)
                args = (key, *(plain(result[c]) for c in cols))
            else:
                cols = (self.column,)
                args = (key, plain(result))
            groups.setdefault(cols, []).append(args)
        async with self._pool.acquire() as conn, conn.transaction():
            for cols, args_list in groups.items():
                await conn.executemany(self._statement(cols), args_list)


# ---------------------------------------------------------------------- SQLite


def _sqlite_value(v: Any) -> Any:
    v = plain(v)
    if v is None or isinstance(v, int | float | str | bytes):
        return v
    return json.dumps(v)


class SqliteSink(Sink):
    """Upsert into a SQLite table, one transaction per batch. The table is made
    on the first write when missing (``key`` as primary key, one column per
    result field, or ``column`` for results that are not dicts); lists and
    dicts are stored as JSON text.

    Usage: ``SqliteSink("out.db", table="vectors")``
    """

    name = "sqlite_sink"

    def __init__(self, path: str | os.PathLike[str], table: str, *, key: str = "key",
                 column: str = "value", batch_size: int = DEFAULT_BATCH,
                 retry: Retry | None = None) -> None:
        self.path = Path(path)
        self.table = table
        self.key = key
        self.column = column
        self.batch = Batch(max_size=batch_size, split_on=(sqlite3.IntegrityError,))
        self.retry = retry if retry is not None else Retry(
            attempts=5, backoff=0.2, on=(sqlite3.OperationalError, OSError)
        )
        self._db: sqlite3.Connection | None = None

    async def open(self, *, fresh: bool) -> None:
        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                 timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            return db

        self._db = await asyncio.to_thread(connect)

    async def close(self) -> None:
        if self._db is not None:
            await asyncio.to_thread(self._db.close)
            self._db = None

    def _write(self, rows: list[Row]) -> None:
        db = self._db
        assert db is not None
        groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        for key, result in rows:
            if isinstance(result, dict):
                cols = tuple(result)
                groups.setdefault(cols, []).append(
                    (key, *(_sqlite_value(result[c]) for c in cols))
                )
            else:
                groups.setdefault((self.column,), []).append((key, _sqlite_value(result)))
        t = _ident(self.table)
        db.execute("BEGIN IMMEDIATE")
        try:
            for cols, args in groups.items():
                names = ", ".join(map(_ident, (self.key, *cols)))
                db.execute(
                    f"CREATE TABLE IF NOT EXISTS {t} ({_ident(self.key)} PRIMARY KEY, "
                    f"{', '.join(map(_ident, cols))})"
                )
                sets = ", ".join(f"{_ident(c)} = excluded.{_ident(c)}" for c in cols)
                db.executemany(
                    f"INSERT INTO {t} ({names}) VALUES ({', '.join('?' * (len(cols) + 1))}) "  # noqa: S608 - identifiers quoted
                    f"ON CONFLICT ({_ident(self.key)}) DO UPDATE SET {sets}",
                    args,
                )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    async def write(self, rows: list[Row]) -> None:
        await asyncio.to_thread(self._write, rows)


# ----------------------------------------------------------------------- files


def _json_line(key: Any, result: Any) -> str:
    return json.dumps({"key": key, "value": result}, default=plain, separators=(",", ":"))


class JsonlSink(Sink):
    """Append ``{"key": ..., "value": ...}`` lines to a file; each batch is
    written, flushed and fsynced before its keys count as done.

    A file cannot be upserted: a new job (or ``fresh``) truncates it, and a
    resumed job first cuts a line torn by the crash and marks the keys the
    file holds as done, so that none is written twice.

    Usage: ``JsonlSink("vectors.jsonl")``
    """

    name = "jsonl_sink"

    def __init__(self, path: str | os.PathLike[str], *, batch_size: int = DEFAULT_BATCH) -> None:
        self.path = Path(path)
        self.batch = Batch(max_size=batch_size)
        self._f: Any = None
        self._resuming = False

    async def open(self, *, fresh: bool) -> None:
        self._resuming = not fresh
        if fresh:
            self.path.write_bytes(b"")
        self._f = self.path.open("ab")

    async def recover(self, checkpoint: Checkpoint) -> None:
        def scan() -> list[Any]:
            keys: list[Any] = []
            good = 0
            with self.path.open("rb") as f:
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # torn by the crash: never counted as written
                    keys.append(json.loads(line)["key"])
                    good += len(line)
            with self.path.open("r+b") as f:
                f.truncate(good)
            return keys

        keys = await asyncio.to_thread(scan)
        checkpoint.mark(keys)

    def _write(self, rows: list[Row]) -> None:
        data = "".join(_json_line(k, v) + "\n" for k, v in rows).encode()
        self._f.write(data)
        self._f.flush()
        os.fsync(self._f.fileno())

    async def write(self, rows: list[Row]) -> None:
        await asyncio.to_thread(self._write, rows)

    async def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class ParquetSink(Sink):
    """Write Parquet part files into a folder: one ``part-*.parquet`` per batch of
    up to ``rows_per_file`` rows, written to a temporary name, fsynced and
    committed by rename (a reader never sees half a file).

    Columns: ``key``, then the result's fields when it is a dict, else
    ``value``. Batches are held open up to ``max_wait`` seconds to fill a
    file. ``ParquetSource(folder)`` reads the parts back.

    Usage: ``ParquetSink("out/")``
    """

    name = "parquet_sink"

    def __init__(self, path: str | os.PathLike[str], *, rows_per_file: int = 10_000,
                 max_wait: float = 1.0, key: str = "key", column: str = "value") -> None:
        self.path = Path(path)
        self.batch = Batch(max_size=rows_per_file, max_wait=max_wait)
        self.key = key
        self.column = column

    def _parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet"))

    async def open(self, *, fresh: bool) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for tmp in self.path.glob("part-*.tmp"):
            tmp.unlink()  # a write the crash cut short: never committed
        if fresh:
            for part in self._parts():
                part.unlink()

    async def recover(self, checkpoint: Checkpoint) -> None:
        import pyarrow.parquet as pq

        def keys() -> list[Any]:
            out: list[Any] = []
            for part in self._parts():
                out.extend(pq.read_table(part, columns=[self.key]).column(0).to_pylist())
            return out

        checkpoint.mark(await asyncio.to_thread(keys))

    def _write(self, rows: list[Row]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        records = [
            {self.key: k, **{c: plain(x) for c, x in v.items()}}
            if isinstance(v, dict)
            else {self.key: k, self.column: plain(v)}
            for k, v in rows
        ]
        # Named in write order, so a folder reads back in the order rows were written.
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        tmp = self.path / f"{name}.tmp"
        pq.write_table(pa.Table.from_pylist(records), tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.rename(self.path / f"{name}.parquet")
        _fsync_dir(self.path)

    async def write(self, rows: list[Row]) -> None:
        await asyncio.to_thread(self._write, rows)

