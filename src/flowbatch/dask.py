"""Stages on a Dask cluster: ``fb.dask.workers(client_or_address)``.

Usage::

    import flowbatch as fb

    embed = fb.stage(
        Embedder(),  # its setup() runs once in each Dask worker
        executor=fb.dask.workers("tcp://scheduler:8786"),
        concurrency=8,  # batches in flight on the cluster
        batch=fb.Batch(max_size=64),
    )

Each call (a batch, or one item) is a Dask task; the scheduler places it.
The stage's function travels once, in a worker plugin that runs its
``setup()`` once per worker (and on workers that join later), not once per
task. A worker that dies loses nothing: Dask runs its tasks again elsewhere;
a task that kills workers over and over ends as ``WorkerCrashed`` (retried
as the stage's ``Retry`` says). Batching, retries, deadlines and per-item
errors stay in the runner, as for a local stage.

The executor opens its own asynchronous ``distributed.Client`` on the
pipeline's event loop (to the given address, or to the given client's
scheduler), so a synchronous client of the caller's is never blocked on.
Install with ``pip install 'flowbatch[dask]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import cloudpickle  # type: ignore[import-untyped]  # comes with distributed
import distributed
from distributed.diagnostics.plugin import WorkerPlugin

from .errors import PipelineError, WorkerCrashed
from .executors import (
    CallTimedOut,
    Executor,
    _no_coroutine,
    _portable,
    _portable_items,
    materialize,
    materialize_each,
)

if TYPE_CHECKING:
    from .stage import Stage

__all__ = ["DaskWorkers", "workers"]

log = logging.getLogger("flowbatch.dask")


class _StagePlugin(WorkerPlugin):  # type: ignore[misc]
    """Carries the stage's function to each worker and sets it up there once."""

    def __init__(self, name: str, fn: Any, post: Callable[[Any], Any] | None) -> None:
        self.name = name
        self.fn = fn
        self.post = post
        self.error: BaseException | None = None

    def setup(self, worker: Any) -> None:
        setup = getattr(self.fn, "setup", None)
        if callable(setup):
            try:
                setup()
            except Exception as exc:
                # Raising here would fail plugin registration with an opaque
                # error; keep it and answer every call on this worker with it.
                self.error = exc
                log.exception("flowbatch: setup() failed on Dask worker %s", worker.address)

    def teardown(self, worker: Any) -> None:
        teardown = getattr(self.fn, "teardown", None)
        if callable(teardown):
            teardown()


def _run(name: str, arg: Any) -> tuple[bool, Any]:
    """The task: the stage's function as set up on this worker."""
    worker = distributed.get_worker()
    plugin = worker.plugins.get(name)
    if plugin is None:
        return False, WorkerCrashed(f"the stage's worker plugin {name!r} is not on this worker")
    if plugin.error is not None:
        return False, _portable(plugin.error, cloudpickle.dumps)
    try:
        out = _no_coroutine(plugin.fn(arg), "a Dask stage runs plain functions")
        if plugin.post is not None:
            out = plugin.post(out)
    except Exception as exc:
        return False, _portable(exc, cloudpickle.dumps)
    return True, _portable_items(out, cloudpickle.dumps)


class DaskWorkers(Executor):
    """Runs one stage's calls as tasks on a Dask cluster; see :func:`workers`."""

    def __init__(
        self, client_or_address: Any, resources: Mapping[str, float] | None = None
    ) -> None:
        if isinstance(client_or_address, str):
            self.address = client_or_address
        elif hasattr(client_or_address, "scheduler_address"):  # a LocalCluster
            self.address = client_or_address.scheduler_address
        elif getattr(client_or_address, "scheduler", None) is not None:  # a Client
            self.address = client_or_address.scheduler.address
        else:
            raise TypeError(
                "fb.dask.workers() takes a distributed.Client, a cluster or a "
                f"scheduler address, got {type(client_or_address).__name__}"
            )
        self.resources = dict(resources) if resources else None
        self.restarts = 0
        self.stage = "?"
        self._client: Any = None
        self._plugin = ""

    async def start(self, stage: Stage) -> None:
        self.stage = stage.name
        self.restarts = 0  # per run: an instance may be opened again after it stopped
        if inspect.iscoroutinefunction(stage.fn) or inspect.iscoroutinefunction(
            getattr(type(stage.fn), "__call__", None)  # noqa: B004
        ):
            raise PipelineError(
                f"stage {stage.name!r}: a Dask stage runs plain functions, not async def"
            )
        post = None
        if stage.fan_out:
            post = materialize_each if stage.batch is not None else materialize
        self._plugin = f"flowbatch-{stage.name}-{uuid.uuid4().hex[:8]}"
        try:
            self._client = await distributed.Client(
                self.address, asynchronous=True, set_as_default=False
            )
            await self._client.register_plugin(_StagePlugin(self._plugin, stage.fn, post))
            errors = await self._client.run(_setup_error, self._plugin)
        except Exception as exc:
            await self.stop()
            raise PipelineError(
                f"stage {stage.name!r}: could not start on the Dask cluster at "
                f"{self.address}: {type(exc).__name__}: {exc}"
            ) from exc
        failed = {w: e for w, e in errors.items() if e is not None}
        if failed:
            await self.stop()
            worker, cause = next(iter(failed.items()))
            err = PipelineError(
                f"stage {stage.name!r}: setup() failed on Dask worker {worker}: "
                f"{type(cause).__name__}: {cause}"
            )
            raise err from cause
        log.info(
            "flowbatch: stage %r runs on the Dask cluster at %s (%d workers)",
            stage.name,
            self.address,
            len(errors),
        )
        await self._check_resources()

    async def _check_resources(self) -> None:
        """Report (``pending``, a warning) when no worker has the resources asked."""
        self.pending = 0
        if not self.resources:
            return
        try:  # a fresh identity: the client's cached one may list no workers yet
            info = await self._client.scheduler.identity(n_workers=-1)
        except TypeError:  # older distributed: no n_workers
            info = await self._client.scheduler.identity()
        workers = info.get("workers", {})
        want = self.resources
        if not any(
            all(info.get("resources", {}).get(k, 0) >= v for k, v in want.items())
            for info in workers.values()
        ):
            self.pending = 1
            have = sorted({k for info in workers.values() for k in info.get("resources", {})})
            log.warning(
                "flowbatch: stage %r asks Dask for resources %s but none of the %d workers "
                "has them (resources seen: %s); its calls wait until such a worker joins",
                self.stage,
                want,
                len(workers),
                have or "none",
            )

    async def call(self, arg: Any, timeout: float | None, carrier: Any = None) -> Any:
        client = self._client
        fut = client.submit(_run, self._plugin, arg, pure=False, resources=self.resources)
        try:
            if timeout is None:
                ok, value = await fut
            else:
                async with asyncio.timeout(timeout):
                    ok, value = await fut
        except TimeoutError as exc:
            with contextlib.suppress(Exception):
                await fut.cancel()
            raise CallTimedOut(f"stage {self.stage!r} call took longer than {timeout}s") from exc
        except distributed.KilledWorker as exc:
            self.restarts += 1
            raise WorkerCrashed(
                f"stage {self.stage!r}: the Dask workers running this call died "
                f"(Dask gave up after its allowed failures): {exc}"
            ) from exc
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(fut.cancel())
            raise
        if not ok:
            raise value
        return value

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        with contextlib.suppress(Exception):
            await client.unregister_worker_plugin(self._plugin)
        with contextlib.suppress(Exception):
            await client.close()


def _setup_error(name: str, dask_worker: Any = None) -> BaseException | None:
    """On each worker: the stage's setup() error there, if any."""
    plugin = dask_worker.plugins.get(name) if dask_worker is not None else None
    return None if plugin is None else plugin.error


def workers(client_or_address: Any, resources: Mapping[str, float] | None = None) -> DaskWorkers:
    """An executor that runs a stage's calls as tasks on a Dask cluster.

    ``client_or_address``: a ``distributed.Client``, a cluster object (such
    as ``LocalCluster``) or a scheduler address. ``resources``: Dask worker
    resources each task needs (``{"GPU": 1}``), so that tasks go only to
    workers that have them.

    Usage::

        fb.stage(embed, executor=fb.dask.workers(client), concurrency=8,
                 batch=fb.Batch(max_size=64))
    """
    return DaskWorkers(client_or_address, resources)
