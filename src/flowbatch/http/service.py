"""The service behind the routes: the served pipelines and their runners.

One :class:`Service` is built by ``create_app``. Its ``lifespan`` opens every
pipeline (running each stage's ``setup``) with its admission limit (a
``latency_target``, by default derived from the measured service time, or a
fixed ``max_in_flight``; see flowbatch/admission.py), starts the
job manager, and on the way out stops taking work, finishes what was admitted
and closes the runners. Admission is the runner's own limiter
(``runner.limiter``): a request that holds a connection is admitted whole
through :meth:`Service.admit` (``runner.admit_many_nowait``, 503 at once when
there is no room, ``Retry-After`` the measured time to drain what is in
flight); jobs and streams wait in its line (``runner.admit_many``).
So overload, deadlines and cancellation behave the same everywhere, and the
engine counts every refusal (``stats().rejected``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flowbatch.admission import MIN_LIMIT, LatencyTarget, floor_limit
from flowbatch.errors import FlowbatchError, Overloaded
from flowbatch.limits import CapacityLimiter
from flowbatch.pipeline import Pipeline
from flowbatch.runner import DEFAULT_QUEUE_SIZE, Runner

from .config import ServeConfig
from .errors import (
    ApiError,
    ClientGone,
    Faults,
    bad_request,
    from_engine,
    is_fault,
    new_request_id,
    not_found,
    overloaded,
    too_large,
)

if TYPE_CHECKING:
    from starlette.types import Receive

    from .jobs import JobManager, JobStore

__all__ = ["MIN_IN_FLIGHT", "Endpoint", "Service", "parse_timeout"]

log = logging.getLogger("flowbatch.http")

#: The least in-flight limit chosen automatically: a request of a few inputs
#: can always be admitted whole (more than the limit's floor is a 413).
MIN_IN_FLIGHT = MIN_LIMIT

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Endpoint:
    """One served pipeline: its runner (once open) and its admission limit."""

    __slots__ = ("capacity", "fixed", "name", "pipeline", "runner")

    def __init__(self, name: str, pipeline: Pipeline, config: ServeConfig) -> None:
        self.name = name
        self.pipeline = pipeline
        #: whether the limit is a fixed ``max_in_flight`` (else a latency target's)
        self.fixed = config.max_in_flight is not None
        #: the most inputs one request may have: ``max_in_flight``, or the
        #: floor of the adaptive limit (:func:`flowbatch.admission.floor_limit`)
        self.capacity = config.max_in_flight or floor_limit(pipeline.stages)
        self.runner: Runner | None = None

    @property
    def ready(self) -> bool:
        return self.runner is not None and not self.runner.closed

    @property
    def limiter(self) -> CapacityLimiter | None:
        """The runner's in-flight limiter, the one admission gate (None until open)."""
        return self.runner.limiter if self.runner is not None else None


def normalize_pipelines(pipelines: Pipeline | Mapping[str, Pipeline]) -> dict[str, Pipeline]:
    """``{name: pipeline}`` from one pipeline or a mapping; checks the names."""
    if isinstance(pipelines, Pipeline):
        named = {pipelines.name: pipelines}
    elif isinstance(pipelines, Mapping):
        named = dict(pipelines)
    else:
        raise TypeError(
            "serve a flowbatch.Pipeline or a dict of them, "
            f"got {type(pipelines).__name__}"
        )
    if not named:
        raise ValueError("no pipelines to serve")
    for name, pipe in named.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"pipeline name {name!r} cannot appear in a URL: use letters, digits, '.', '_', '-'"
            )
        if not isinstance(pipe, Pipeline):
            raise TypeError(f"{name!r} is a {type(pipe).__name__}, not a flowbatch.Pipeline")
    return named


def parse_timeout(value: str | None, default: float | None) -> float | None:
    """The ``X-Request-Timeout`` header (seconds) as a number, or a 400."""
    if value is None:
        return default
    try:
        timeout = float(value)
    except ValueError:
        timeout = float("nan")
    if not 0 < timeout < 1e9:  # also rejects nan and inf
        raise bad_request(
            f"X-Request-Timeout must be a number of seconds > 0, got {value!r}",
            param="X-Request-Timeout",
        )
    return timeout


async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class Service:
    """The served pipelines and the state every route shares."""

    def __init__(
        self,
        pipelines: Pipeline | Mapping[str, Pipeline],
        config: ServeConfig,
        job_store: JobStore | None = None,
    ) -> None:
        from .jobs import JobManager, MemoryJobStore

        self.config = config
        #: How server faults are logged and answered (``config.expose_errors``).
        self.faults = Faults(config.expose_errors)
        self.endpoints: dict[str, Endpoint] = {
            name: Endpoint(name, pipe, config)
            for name, pipe in normalize_pipelines(pipelines).items()
        }
        self.jobs: JobManager = JobManager(
            self, job_store if job_store is not None else MemoryJobStore(), config
        )
        # new -> starting -> ready -> [stopping ->] draining -> stopped
        self.state = "new"
        #: Pipelines ``/v1/embeddings`` serves; None: all of them.
        self.embedding_models: frozenset[str] | None = None

    # ------------------------------------------------------------ lifetime

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def begin_grace(self) -> None:
        """Report not ready from now on, but go on serving (the shutdown grace period).

        ``run()`` calls it at SIGTERM; :meth:`begin_drain` follows when the
        grace period ends.
        """
        if self.state in ("new", "starting", "ready"):
            self.state = "stopping"

    def begin_drain(self) -> None:
        """Report not ready and take no new work from now on (before the drain)."""
        if self.state in ("new", "starting", "ready", "stopping"):
            self.state = "draining"

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Open every pipeline; on exit, finish admitted work and close them.

        Pass it as the lifespan of a host application that mounts this one::

            host = Starlette(routes=[Mount("/ml", app)], lifespan=app.lifespan)
        """
        if self.state != "new":
            raise RuntimeError("the service has been started already; build a new app")
        self.state = "starting"
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self._set_stopped)  # runs last
            for ep in self.endpoints.values():
                # The queue is never what refuses: the limiter is (its total
                # stays within the queue's size, see flowbatch/admission.py).
                size = max(DEFAULT_QUEUE_SIZE, ep.capacity)
                target: LatencyTarget = self.config.latency_target or "auto"
                ep.runner = await stack.enter_async_context(
                    ep.pipeline.open(queue_size=size, max_in_flight=ep.capacity)
                    if ep.fixed
                    else ep.pipeline.open(queue_size=size, latency_target=target)
                )
                if ep.fixed:
                    log.info("pipeline %r is open (max %d items in flight)", ep.name, ep.capacity)
                else:
                    log.info(
                        "pipeline %r is open (in-flight limit from %d, latency target %s)",
                        ep.name, ep.capacity,
                        "auto" if target == "auto" else f"{target}s",
                    )
            await self.jobs.start()
            stack.push_async_callback(self.jobs.stop)
            if self.state == "starting":
                self.state = "ready"
            try:
                yield
            finally:
                self.begin_drain()
                log.info("draining: finishing admitted work")

    async def _set_stopped(self) -> None:
        self.state = "stopped"

    # ------------------------------------------------------------- intake

    def endpoint(self, name: str) -> Endpoint:
        """The endpoint called ``name``, or a 404 that lists the ones there are."""
        ep = self.endpoints.get(name)
        if ep is None:
            raise not_found(
                f"no pipeline named {name!r}; this server has {sorted(self.endpoints)}"
            )
        return ep

    def open_runners(self) -> dict[str, Runner]:
        """The runners open now, by pipeline name (for the dashboard)."""
        return {
            name: ep.runner
            for name, ep in self.endpoints.items()
            if ep.runner is not None and not ep.runner.closed
        }

    def runner_of(self, ep: Endpoint, draining_ok: bool = False) -> Runner:
        """The open runner of ``ep``, or a 503 while starting or shutting down.

        ``draining_ok``: for work accepted before the drain began (jobs).
        """
        runner = ep.runner
        usable = self.state in ("ready", "stopping") or (draining_ok and self.state == "draining")
        if runner is None or runner.closed or not usable:
            reason = "is starting" if self.state in ("new", "starting") else "is shutting down"
            raise ApiError(
                503, "unavailable", f"pipeline {ep.name!r} is not ready: the server {reason}",
                {"Retry-After": str(self.config.retry_after)},
            )
        return runner

    def check_count(self, ep: Endpoint, n: int) -> None:
        limit = min(self.config.max_inputs, ep.capacity)
        if n > limit:
            raise too_large(
                f"{n} inputs in one request; pipeline {ep.name!r} takes at most {limit}: "
                "split the request"
            )

    def admit(
        self, ep: Endpoint, values: Sequence[Any], timeout: float | None
    ) -> list[asyncio.Future[Any]]:
        """Admit every value now, all or none, or raise 503; one future per value.

        ``runner.admit_many_nowait``: the values take their places in the
        runner's limiter together; each place is given back when its item is
        answered (result, error, deadline or cancellation).
        """
        runner = self.runner_of(ep)
        try:
            return runner.admit_many_nowait(values, timeout)
        except Overloaded as exc:
            limiter = runner.limiter
            held = limiter.borrowed if limiter is not None else 0
            raise overloaded(
                f"pipeline {ep.name!r} is at capacity ({held} items in flight); retry later",
                self.retry_after(runner),
            ) from exc
        except FlowbatchError as exc:
            raise from_engine(exc, self.config.retry_after) from exc

    def retry_after(self, runner: Runner) -> int:
        """Seconds a refused client is told to wait: with a latency target, the
        measured time to drain what is in flight (rounded up, at least 1);
        else (or before it is measured) ``config.retry_after``."""
        adm = runner.admission
        measured = adm.retry_after() if adm is not None else None
        return measured if measured is not None else self.config.retry_after

    async def admit_waiting(
        self, ep: Endpoint, values: Sequence[Any], timeout: float | None
    ) -> list[asyncio.Future[Any]]:
        """Admit every value, waiting in the limiter's line (jobs and streams).

        ``timeout`` counts from admission. A 503 when the runner is not open
        (jobs accepted before a drain are still admitted).
        """
        runner = self.runner_of(ep, draining_ok=True)
        try:
            return await runner.admit_many(values, timeout)
        except FlowbatchError as exc:
            raise from_engine(exc, self.config.retry_after) from exc

    async def wait(self, futs: list[asyncio.Future[Any]], receive: Receive) -> None:
        """Wait for every future; if the client goes away first, cancel them.

        Raises :class:`ClientGone` in that case.
        """
        if all(f.done() for f in futs):
            return
        done: asyncio.Future[Any] = futs[0] if len(futs) == 1 else asyncio.gather(
            *futs, return_exceptions=True
        )
        watch = asyncio.ensure_future(_disconnected(receive))
        left = False

        def gone(w: asyncio.Future[None]) -> None:
            nonlocal left
            if not w.cancelled():  # the client went away: drop its items
                left = True
                for fut in futs:
                    fut.cancel()

        watch.add_done_callback(gone)
        # The futures are awaited directly (not through asyncio.wait), so that
        # an answer wakes this handler one loop turn sooner.
        try:
            await done
        except asyncio.CancelledError:
            if not left:
                raise  # this handler itself is being cancelled
        except Exception:  # noqa: S110 - the item's error: read from its future
            pass
        finally:
            watch.cancel()
        if left:
            raise ClientGone


def outcome(fut: asyncio.Future[Any]) -> tuple[Any, BaseException | None]:
    """``(value, None)`` or ``(None, error)`` of a done future."""
    if fut.cancelled():
        return None, asyncio.CancelledError()
    exc = fut.exception()
    if exc is not None:
        return None, exc
    return fut.result(), None


def result_document(
    futs: Sequence[asyncio.Future[Any]],
    single: bool,
    retry_after: int,
    *,
    faults: Faults,
    where: str,
    request_id: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """The status and body for done futures: ``{"output"}`` or ``{"outputs", "errors"}``.

    In a multi-input answer each failed input has ``null`` in ``outputs`` and
    an entry in ``errors``; the status is 200 unless every input failed the
    same way, in which case it is that failure's status (and ``error`` says it).
    Faults go through ``faults`` (logged as ``where``), all under one request
    id: ``request_id`` or a new one.
    """
    rid = request_id

    def told(exc: BaseException) -> ApiError:
        nonlocal rid
        err = from_engine(exc, retry_after)
        if is_fault(err.status):
            rid = rid or new_request_id()
            err = faults.conceal(err, where, rid)
        return err

    if single:
        value, exc = outcome(futs[0])
        if exc is None:
            return 200, {"output": value}
        err = told(exc)
        return err.status, {"error": err.as_dict()}
    outputs: list[Any] = []
    errors: list[dict[str, Any]] = []
    for i, fut in enumerate(futs):
        value, exc = outcome(fut)
        outputs.append(value)
        if exc is not None:
            errors.append({"index": i, **told(exc).as_dict()})
    doc: dict[str, Any] = {"outputs": outputs}
    status = 200
    if errors:
        doc["errors"] = errors
        statuses = {e["status"] for e in errors}
        if len(errors) == len(futs) and len(statuses) == 1:
            status = errors[0]["status"]
            first = errors[0]
            doc["error"] = {
                "status": status,
                "type": first["type"],
                "message": f"every input failed; the first: {first['message']}",
            }
            if "request_id" in first:
                doc["error"]["request_id"] = first["request_id"]
    return status, doc
