"""Async jobs: accept work now (202), run it in the background, answer later.

A job's items go through the same runner and the same in-flight limiter as
requests; a job waits in the limiter's line (``runner.admit_many``) instead of
getting 503, and its items' timeout counts from their admission. Its record lives in a
:class:`JobStore`; a finished job's result is kept ``job_ttl`` seconds.
Every job runs as a task of the manager's task group, which the service's
lifespan owns: stopping the manager finishes every accepted job.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from .codec import dump_msgpack
from .errors import ApiError, from_engine, overloaded
from .service import result_document
from .stores import Job, JobStore, MemoryJobStore, SQLiteJobStore

if TYPE_CHECKING:
    from .config import ServeConfig
    from .service import Endpoint, Service

__all__ = ["Job", "JobManager", "JobStore", "MemoryJobStore", "SQLiteJobStore", "job_document"]

log = logging.getLogger("flowbatch.http.jobs")


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat()


def job_document(job: Job, status_url: str) -> dict[str, Any]:
    """What ``GET /v1/jobs/{id}`` shows for ``job``."""
    return {
        "id": job.id,
        "pipeline": job.pipeline,
        "status": job.status,
        "status_url": status_url,
        "created_at": _iso(job.created_at),
        "finished_at": _iso(job.finished_at),
        "expires_at": _iso(job.expires_at),
        "result": msgspec.msgpack.decode(job.result) if job.result is not None else None,
        "error": job.error,
    }


class JobManager:
    """Creates, runs, cancels and expires jobs of one service."""

    def __init__(self, service: Service, store: JobStore, config: ServeConfig) -> None:
        self.service = service
        self.store = store
        self.ttl = config.job_ttl
        self.max_pending = config.max_pending_jobs
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancelling: set[str] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._next_purge = 0.0

    @property
    def pending(self) -> int:
        """Jobs accepted by this process and not finished."""
        return len(self._tasks)

    async def start(self) -> None:
        await self.store.open()
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        await self.store.purge(time.time())
        for job in await self.store.unfinished():
            await self._resume(job)

    async def stop(self) -> None:
        """Accept no more jobs, finish the accepted ones, close the store."""
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                await tg.__aexit__(None, None, None)
        finally:
            await self.store.close()

    async def _resume(self, job: Job) -> None:
        """Run again a job that a previous process accepted but did not finish."""
        ep = self.service.endpoints.get(job.pipeline)
        if ep is None or job.payload is None:
            now = time.time()
            err = {"status": 404, "type": "not_found",
                   "message": f"pipeline {job.pipeline!r} is no longer served"}
            await self.store.put(job.replace(status="failed", error=err, payload=None,
                                             finished_at=now, expires_at=now + self.ttl))
            return
        values = msgspec.msgpack.decode(job.payload)
        log.info("resuming job %s (%d items) after a restart", job.id, len(values))
        self._spawn(job, ep, values)

    async def submit(
        self, ep: Endpoint, single: bool, values: list[Any], timeout: float | None
    ) -> Job:
        """Accept a job (or raise 503); it runs in the background."""
        self.service.runner_of(ep)  # 503 when not ready or draining
        if self._tg is None:
            raise ApiError(503, "unavailable", "the job manager is not running")
        if len(self._tasks) >= self.max_pending:
            raise overloaded(
                f"{len(self._tasks)} jobs are waiting to run (the limit); retry later",
                self.service.config.retry_after,
            )
        self.service.check_count(ep, len(values))
        now = time.time()
        if now >= self._next_purge:
            self._next_purge = now + min(self.ttl, 60.0)
            await self.store.purge(now)
        job = Job(
            id=uuid.uuid4().hex, pipeline=ep.name, status="queued", single=single,
            created_at=now, payload=dump_msgpack(values), timeout=timeout,
        )
        await self.store.put(job)
        self._spawn(job, ep, values)
        return job

    def _spawn(self, job: Job, ep: Endpoint, values: list[Any]) -> None:
        assert self._tg is not None
        self._tasks[job.id] = self._tg.create_task(self._run(job, ep, values))

    async def _run(self, job: Job, ep: Endpoint, values: list[Any]) -> None:
        service = self.service
        futs: list[asyncio.Future[Any]] = []
        try:
            try:
                futs = await service.admit_waiting(ep, values, job.timeout)
                await self.store.put(job.replace(status="running"))
                if futs:
                    await asyncio.wait(futs)
                status, doc = result_document(
                    futs, job.single, service.config.retry_after, faults=service.faults,
                    where=f"job {job.id}", request_id=job.id,
                )
                if status == 200:
                    final = job.replace(status="succeeded", result=dump_msgpack(doc))
                else:
                    final = job.replace(
                        status="failed", error=doc["error"],
                        result=dump_msgpack(doc) if not job.single else None,
                    )
            except asyncio.CancelledError:
                for fut in futs:
                    fut.cancel()
                task = asyncio.current_task()
                if job.id not in self._cancelling or task is None:
                    raise
                task.uncancel()  # we asked for this cancellation: the job ends here
                final = job.replace(status="cancelled")
            except ApiError as err:
                told = service.faults.conceal(err, f"job {job.id}", job.id)
                final = job.replace(status="failed", error=told.as_dict())
            except Exception as exc:  # encoding a result, the store: not the client's fault
                told = service.faults.conceal(from_engine(exc), f"job {job.id}", job.id)
                final = job.replace(status="failed", error=told.as_dict())
            now = time.time()
            await self.store.put(
                final.replace(payload=None, finished_at=now, expires_at=now + self.ttl)
            )
        finally:
            self._tasks.pop(job.id, None)
            self._cancelling.discard(job.id)

    async def get(self, job_id: str) -> Job | None:
        """The job, or None when unknown or expired."""
        job = await self.store.get(job_id)
        if job is None:
            return None
        if job.expires_at is not None and job.expires_at < time.time():
            await self.store.delete(job_id)
            return None
        return job

    async def cancel(self, job_id: str) -> Job | None:
        """Cancel an unfinished job (it stays, as cancelled) or delete a finished one."""
        task = self._tasks.get(job_id)
        if task is not None:
            self._cancelling.add(job_id)
            task.cancel()
            await asyncio.wait([task])
            return await self.store.get(job_id)
        job = await self.get(job_id)
        if job is None:
            return None
        if not job.finished:
            # Accepted by another process sharing the store: mark it cancelled here.
            now = time.time()
            job = job.replace(status="cancelled", payload=None, finished_at=now,
                              expires_at=now + self.ttl)
            await self.store.put(job)
            return job
        await self.store.delete(job_id)
        return job
