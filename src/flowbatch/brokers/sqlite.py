"""The embedded broker: a durable queue in one SQLite file (``sqlite:///path.db``).

No server: producers and any number of worker processes on one machine share
the file (WAL mode, ``synchronous=FULL``: a committed write survives a crash
of the process and of the machine). ``sqlite:///jobs.db`` is relative to the
current directory, ``sqlite:////var/lib/jobs.db`` absolute.

How it keeps the contract:

- fetch claims rows in one ``UPDATE ... RETURNING`` statement: the row's
  ``visible_at`` becomes now + lease and ``owner`` this connection, so no other
  worker sees it until the lease passes (a crashed worker's messages come
  back after ``lease`` seconds);
- settle is one transaction: results (``INSERT OR IGNORE``: the first result
  of a job wins; ``expires_at`` = now + the worker's ``result_ttl``, and
  expired results are deleted about once a minute and never read), dead
  letters and retries are written and the message rows deleted together; rows whose lease another worker has taken over are left
  to that worker;
- retries keep the row and move ``visible_at`` forward by the backoff;
- ``extend`` moves ``visible_at`` of owned rows; ``release`` makes them
  visible again at once without counting a delivery.

SQLite calls run in one thread per broker object; the event loop never blocks
on the file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flowbatch.retry import Retry

from .base import (
    Broker,
    BrokerError,
    DeadLetter,
    Delivery,
    Outcome,
    QueueStats,
    age_of,
    decode_record,
)

__all__ = ["SQLiteBroker"]

T = TypeVar("T")

# An idle fetch polls the file: 2 ms, then doubling (with jitter) up to 100 ms.
_POLL = Retry(backoff=0.002, max_backoff=0.1)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fb_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    body BLOB NOT NULL,
    visible_at REAL NOT NULL,
    owner TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS fb_messages_ready ON fb_messages (queue, visible_at);
CREATE TABLE IF NOT EXISTS fb_results (
    queue TEXT NOT NULL,
    job_id TEXT NOT NULL,
    record BLOB NOT NULL,
    expires_at REAL,
    PRIMARY KEY (queue, job_id)
);
CREATE TABLE IF NOT EXISTS fb_dead (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    job_id TEXT,
    record BLOB NOT NULL
);
"""


def sqlite_path(url: str) -> str:
    """The file of ``sqlite:///relative.db`` or ``sqlite:////absolute.db``."""
    parts = urlsplit(url)
    if parts.netloc:
        raise ValueError(f"sqlite URL {url!r} must have three slashes: sqlite:///path.db")
    path = parts.path.removeprefix("/")
    if not path:
        raise ValueError(f"sqlite URL {url!r} names no file: use sqlite:///path.db")
    return path


class SQLiteBroker(Broker):
    """One queue in a SQLite file; see the module docstring."""

    scheme = "sqlite"

    def __init__(self, url: str, queue: str) -> None:
        super().__init__(url, queue)
        self.path = sqlite_path(url)
        self._db: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._owner = ""
        self._next_purge = 0.0

    # ------------------------------------------------------------ plumbing

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None or self._thread is None:
            raise BrokerError(f"{self!r} is not open")
        db = self._db
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, fn, db)
        except sqlite3.OperationalError as exc:
            raise BrokerError(f"sqlite {self.path}: {exc}") from exc

    async def open(self) -> None:
        if self._db is not None:
            return
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="flowbatch-sqlite")
        loop = asyncio.get_running_loop()

        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=60)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=60000")
            db.executescript(_SCHEMA)
            _add_expiry(db)
            return db

        self._db = await loop.run_in_executor(self._thread, connect)
        self._owner = f"{id(self):x}-{secrets.token_hex(4)}"
        self.epoch += 1

    async def close(self) -> None:
        db, thread = self._db, self._thread
        self._db = self._thread = None
        if thread is None:
            return
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(thread, db.close)
        thread.shutdown(wait=False)

    # ------------------------------------------------------------ producer

    async def publish(self, bodies: Sequence[bytes]) -> None:
        rows = [(self.queue, bytes(b)) for b in bodies]

        def write(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.executemany(
                    "INSERT INTO fb_messages (queue, body, visible_at) VALUES (?, ?, 0)", rows
                )

        await self._run(write)

    async def get_result(self, job_id: str) -> bytes | None:
        def read(db: sqlite3.Connection) -> bytes | None:
            row = db.execute(
                "SELECT record FROM fb_results WHERE queue = ? AND job_id = ? "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (self.queue, job_id, time.time()),
            ).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(read)

    # ------------------------------------------------------------ consumer

    async def fetch(self, max_messages: int, wait: float) -> list[Delivery]:
        deadline = time.monotonic() + wait
        polls = 0
        while True:
            got = await self._run(lambda db: self._claim(db, max_messages))
            if got or time.monotonic() >= deadline:
                epoch = self.epoch
                return [
                    Delivery(bytes(body), msg_id, deliveries=n, redelivered=n > 1, epoch=epoch)
                    for msg_id, body, n in got
                ]
            # SQLite has no notifications: poll, backing off while idle.
            polls += 1
            pause = _POLL.delay(polls)
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))

    def _claim(self, db: sqlite3.Connection, n: int) -> list[tuple[int, bytes, int]]:
        now = time.time()
        with _transaction(db):
            rows = db.execute(
                "UPDATE fb_messages SET owner = ?, visible_at = ?, deliveries = deliveries + 1 "
                "WHERE id IN (SELECT id FROM fb_messages WHERE queue = ? AND visible_at <= ? "
                "ORDER BY visible_at, id LIMIT ?) RETURNING id, body, deliveries",
                (self._owner, now + self.lease, self.queue, now, n),
            ).fetchall()
        rows.sort()
        return rows

    async def settle(self, outcomes: Sequence[Outcome]) -> None:
        q, owner, ttl = self.queue, self._owner, self.ttl
        purge = time.monotonic() >= self._next_purge
        if purge:
            self._next_purge = time.monotonic() + _PURGE_EVERY

        def write(db: sqlite3.Connection) -> None:
            now = time.time()
            results = [(o.job_id, o.result) for o in outcomes if o.result is not None and o.job_id]
            with _transaction(db):
                if purge:
                    db.execute(
                        "DELETE FROM fb_results WHERE queue = ? AND expires_at <= ?", (q, now)
                    )
                else:  # an expired result must not keep a new one out
                    db.executemany(
                        "DELETE FROM fb_results WHERE queue = ? AND job_id = ? AND expires_at <= ?",
                        [(q, job_id, now) for job_id, _ in results],
                    )
                db.executemany(
                    "INSERT OR IGNORE INTO fb_results (queue, job_id, record, expires_at) "
                    "VALUES (?, ?, ?, ?)",
                    [(q, job_id, record, now + ttl if ttl else None) for job_id, record in results],
                )
                db.executemany(
                    "INSERT INTO fb_dead (queue, job_id, record) VALUES (?, ?, ?)",
                    [(q, o.job_id, o.dead) for o in outcomes if o.dead is not None],
                )
                db.executemany(
                    "UPDATE fb_messages SET body = ?, visible_at = ?, owner = NULL, deliveries = 0 "
                    "WHERE id = ? AND owner = ?",
                    [
                        (o.retry, now + o.delay, o.delivery.tag, owner)
                        for o in outcomes
                        if o.retry is not None
                    ],
                )
                db.executemany(
                    "DELETE FROM fb_messages WHERE id = ? AND owner = ?",
                    [(o.delivery.tag, owner) for o in outcomes if o.retry is None],
                )

        await self._run(write)

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        owner = self._owner

        def write(db: sqlite3.Connection) -> None:
            until = time.time() + self.lease
            with _transaction(db):
                db.executemany(
                    "UPDATE fb_messages SET visible_at = ? WHERE id = ? AND owner = ?",
                    [(until, d.tag, owner) for d in deliveries],
                )

        await self._run(write)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        owner = self._owner

        def write(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.executemany(
                    "UPDATE fb_messages SET visible_at = 0, owner = NULL, "
                    "deliveries = max(deliveries - 1, 0) WHERE id = ? AND owner = ?",
                    [(d.tag, owner) for d in deliveries],
                )

        await self._run(write)

    async def backlog(self) -> int | None:
        def read(db: sqlite3.Connection) -> int:
            row = db.execute(
                "SELECT count(*) FROM fb_messages WHERE queue = ? AND visible_at <= ?",
                (self.queue, time.time()),
            ).fetchone()
            return int(row[0])

        return await self._run(read)

    # ---------------------------------------------------------- inspection

    async def results(self) -> dict[str, bytes]:
        def read(db: sqlite3.Connection) -> dict[str, bytes]:
            rows = db.execute(
                "SELECT job_id, record FROM fb_results WHERE queue = ? "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (self.queue, time.time()),
            ).fetchall()
            return {str(k): bytes(v) for k, v in rows}

        return await self._run(read)

    async def dead_letters(self) -> list[bytes]:
        def read(db: sqlite3.Connection) -> list[bytes]:
            rows = db.execute(
                "SELECT record FROM fb_dead WHERE queue = ? ORDER BY id", (self.queue,)
            ).fetchall()
            return [bytes(r[0]) for r in rows]

        return await self._run(read)

    # ------------------------------------ dead letters and depth (tools)

    async def list_dead_letters(self) -> list[DeadLetter]:
        def read(db: sqlite3.Connection) -> list[DeadLetter]:
            rows = db.execute(
                "SELECT id, record FROM fb_dead WHERE queue = ? ORDER BY id", (self.queue,)
            ).fetchall()
            return [DeadLetter(str(i), bytes(r)) for i, r in rows]

        return await self._run(read)

    async def remove_dead_letters(self, keys: Sequence[str]) -> int:
        ids = [(self.queue, int(k)) for k in keys if k.isdigit()]

        def write(db: sqlite3.Connection) -> int:
            with _transaction(db):
                before = db.total_changes
                db.executemany("DELETE FROM fb_dead WHERE queue = ? AND id = ?", ids)
                return db.total_changes - before

        return await self._run(write)

    async def forget_failed_result(self, job_id: str) -> bool:
        def write(db: sqlite3.Connection) -> bool:
            with _transaction(db):
                row = db.execute(
                    "SELECT record FROM fb_results WHERE queue = ? AND job_id = ?",
                    (self.queue, job_id),
                ).fetchone()
                if row is None or decode_record(bytes(row[0])).ok:
                    return False
                db.execute(
                    "DELETE FROM fb_results WHERE queue = ? AND job_id = ?", (self.queue, job_id)
                )
                return True

        return await self._run(write)

    async def queue_stats(self) -> QueueStats:
        q = self.queue
        lag = await self.queue_lag()

        def read(db: sqlite3.Connection) -> QueueStats:
            now = time.time()

            def count(sql: str, *args: Any) -> int:
                return int(db.execute(sql, (q, *args)).fetchone()[0])

            return dataclasses.replace(
                lag,
                dead=count("SELECT count(*) FROM fb_dead WHERE queue = ?"),
                results=count(
                    "SELECT count(*) FROM fb_results WHERE queue = ? "
                    "AND (expires_at IS NULL OR expires_at > ?)", now,
                ),
            )

        return await self._run(read)

    async def queue_lag(self) -> QueueStats:
        q = self.queue

        def read(db: sqlite3.Connection) -> QueueStats:
            now = time.time()

            def count(sql: str, *args: Any) -> int:
                return int(db.execute(sql, (q, *args)).fetchone()[0])

            oldest = db.execute(
                "SELECT body FROM fb_messages WHERE queue = ? AND visible_at <= ? "
                "ORDER BY id LIMIT 1",
                (q, now),
            ).fetchone()
            return QueueStats(
                waiting=count(
                    "SELECT count(*) FROM fb_messages WHERE queue = ? AND visible_at <= ?", now
                ),
                in_flight=count(
                    "SELECT count(*) FROM fb_messages WHERE queue = ? AND visible_at > ? "
                    "AND owner IS NOT NULL", now,
                ),
                delayed=count(
                    "SELECT count(*) FROM fb_messages WHERE queue = ? AND visible_at > ? "
                    "AND owner IS NULL", now,
                ),
                oldest_waiting_age=None if oldest is None else age_of(bytes(oldest[0]), now),
            )

        return await self._run(read)


# How often a worker deletes the expired results of its queue.
_PURGE_EVERY = 60.0


def _add_expiry(db: sqlite3.Connection) -> None:
    """Give a results table made before result TTLs its ``expires_at`` column
    (its rows keep no expiry), and index it for the purge."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(fb_results)")}
    if "expires_at" not in columns:
        try:
            db.execute("ALTER TABLE fb_results ADD COLUMN expires_at REAL")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):  # another process was first
                raise
    db.execute("CREATE INDEX IF NOT EXISTS fb_results_expiry ON fb_results (queue, expires_at)")


class _transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on error)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, et: Any, exc: Any, tb: Any) -> None:
        self.db.execute("COMMIT" if et is None else "ROLLBACK")
