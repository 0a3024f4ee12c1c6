"""Job stores: where async jobs and their results live.

Two stores share one interface: :class:`MemoryJobStore` (the default; jobs
end with the process) and :class:`SQLiteJobStore` (one file on one machine;
finished jobs survive a restart and unfinished ones are run again).

Usage::

    app = create_app(pipe, job_store=SQLiteJobStore("jobs.db"))
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson

__all__ = ["FINISHED", "Job", "JobStatus", "JobStore", "MemoryJobStore", "SQLiteJobStore"]

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
#: Statuses after which a job does not change again.
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Job:
    """One job. Times are Unix seconds (they must mean the same after a restart).

    ``payload`` is the msgpack of the inputs (kept until the job finishes, so
    that an unfinished job can run again after a restart); ``result`` the
    msgpack of the answer document; ``error`` what went wrong, when it failed.
    """

    id: str
    pipeline: str
    status: JobStatus
    single: bool
    created_at: float
    payload: bytes | None = None
    timeout: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    result: bytes | None = None
    error: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def replace(self, **changes: Any) -> Job:
        return dataclasses.replace(self, **changes)


class JobStore(abc.ABC):
    """Where jobs are kept. Methods are called from the service's event loop."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Get ready (connect, create tables)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what ``open`` took."""

    @abc.abstractmethod
    async def put(self, job: Job) -> None:
        """Insert ``job`` or replace the job with its id."""

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""

    @abc.abstractmethod
    async def delete(self, job_id: str) -> bool:
        """Remove a job; whether it was there."""

    @abc.abstractmethod
    async def unfinished(self) -> list[Job]:
        """Jobs not yet finished (to run again when a service starts)."""

    @abc.abstractmethod
    async def purge(self, now: float) -> int:
        """Remove jobs whose ``expires_at`` is before ``now``; how many."""


class MemoryJobStore(JobStore):
    """Jobs in a dict: fast, and gone when the process ends."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    async def put(self, job: Job) -> None:
        self._jobs[job.id] = job

    async def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    async def delete(self, job_id: str) -> bool:
        return self._jobs.pop(job_id, None) is not None

    async def unfinished(self) -> list[Job]:
        return [j for j in self._jobs.values() if not j.finished]

    async def purge(self, now: float) -> int:
        gone = [k for k, j in self._jobs.items() if j.expires_at is not None and j.expires_at < now]
        for k in gone:
            del self._jobs[k]
        return len(gone)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS flowbatch_jobs (
    id          TEXT PRIMARY KEY,
    pipeline    TEXT NOT NULL,
    status      TEXT NOT NULL,
    single      INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    payload     BLOB,
    timeout     REAL,
    finished_at REAL,
    expires_at  REAL,
    result      BLOB,
    error       TEXT
)
"""
_INSERT = (
    "INSERT OR REPLACE INTO flowbatch_jobs (id, pipeline, status, single, created_at, payload, "
    "timeout, finished_at, expires_at, result, error) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
)
_SELECT = (
    "SELECT id, pipeline, status, single, created_at, payload, timeout, finished_at, "
    "expires_at, result, error FROM flowbatch_jobs"
)


def _row(job: Job) -> tuple[Any, ...]:
    error = orjson.dumps(job.error).decode() if job.error is not None else None
    return (
        job.id, job.pipeline, job.status, int(job.single), job.created_at, job.payload,
        job.timeout, job.finished_at, job.expires_at, job.result, error,
    )


def _job(row: tuple[Any, ...]) -> Job:
    (id_, pipeline, status, single, created, payload, timeout, finished, expires, result,
     error) = row
    return Job(
        id=id_, pipeline=pipeline, status=status, single=bool(single), created_at=created,
        payload=payload, timeout=timeout, finished_at=finished, expires_at=expires,
        result=result, error=orjson.loads(error) if error is not None else None,
    )


class SQLiteJobStore(JobStore):
    """Jobs in one SQLite file: they survive a restart of the server.

    One connection, used from one thread of its own, so the event loop never
    waits on the disk. WAL journal: readers do not block the writer, and a
    crash loses no committed job. For one machine; share nothing else.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._pool: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"SQLiteJobStore({str(self.path)!r})"

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._pool is None:
            raise RuntimeError(f"{self!r} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def open(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flowbatch-jobs")

        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
            db.execute(
                "CREATE INDEX IF NOT EXISTS flowbatch_jobs_expiry ON flowbatch_jobs (expires_at)"
            )
            return db

        self._db = await self._run(connect)

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await self._run(db.close)
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"{self!r} is not open")
        return self._db

    async def put(self, job: Job) -> None:
        db = self._conn()
        await self._run(db.execute, _INSERT, _row(job))

    async def get(self, job_id: str) -> Job | None:
        db = self._conn()

        def fetch() -> Any:
            return db.execute(_SELECT + " WHERE id = ?", (job_id,)).fetchone()

        row = await self._run(fetch)
        return _job(row) if row is not None else None

    async def delete(self, job_id: str) -> bool:
        db = self._conn()

        def remove() -> int:
            return db.execute("DELETE FROM flowbatch_jobs WHERE id = ?", (job_id,)).rowcount

        return bool(await self._run(remove))

    async def unfinished(self) -> list[Job]:
        db = self._conn()

        def fetch() -> list[Any]:
            where = " WHERE status IN ('queued', 'running') ORDER BY created_at"
            return db.execute(_SELECT + where).fetchall()

        return [_job(r) for r in await self._run(fetch)]

    async def purge(self, now: float) -> int:
        db = self._conn()

        def remove() -> int:
            sql = "DELETE FROM flowbatch_jobs WHERE expires_at IS NOT NULL AND expires_at < ?"
            return db.execute(sql, (now,)).rowcount

        return int(await self._run(remove))
