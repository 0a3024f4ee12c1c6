"""Where a stage's function runs: the ``Executor`` interface and the built-ins.

:class:`Executor` is public (``fb.Executor``): ``fb.stage(fn,
executor=MyExecutor())`` runs a stage on any object that implements it (a
pool of Ray actors, a remote model server, a fake in a test). The runner
drives it: ``await start(stage)`` once (runs the stage's ``setup()`` in each
worker; a failure is a ``PipelineError`` naming the stage), ``await
call(arg, timeout)`` for an item (or a batch's list), never more than
``stage.concurrency`` at once, so nothing queues inside an executor, and
``await stop()`` once (``teardown()`` in each worker). ``restarts`` counts
workers replaced after dying; ``stats()`` shows it per stage.

The built-ins, chosen by name (``"async"``, ``"thread"``, ``"process"``):
thread workers are dedicated threads, each holding its own copy of a
stateful stage object (a model replica). Process workers (processes.py) are
spawned interpreters; a worker that dies fails only the call it held
(``WorkerCrashed``) and is replaced.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import os
import pickle
import queue
import threading
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from .errors import PipelineError
from .hooks import activated

if TYPE_CHECKING:
    from .stage import Stage

__all__ = [
    "AsyncExecutor",
    "CallTimedOut",
    "Executor",
    "RemoteError",
    "ThreadExecutor",
    "Unpicklable",
    "make_executor",
]


class RemoteError(Exception):
    """An exception from a worker process that could not be sent back as is."""


class Unpicklable(Exception):
    """An item could not be pickled to send it to a process worker."""


class CallTimedOut(TimeoutError):
    """A stage call ran past the stage's ``timeout``.

    ``pending`` is the still-running call in a thread worker (threads cannot
    be interrupted); the runner waits for it before giving the worker new work.
    """

    def __init__(self, message: str, pending: asyncio.Future[Any] | None = None) -> None:
        super().__init__(message)
        self.pending = pending


Activate = Callable[[Any], AbstractContextManager[Any]]


class Executor(ABC):
    """Where a stage's calls run: subclass it to run a stage anywhere.

    The runner calls, in order:

    - ``await start(stage)`` once, before any call: prepare
      ``stage.concurrency`` workers for ``stage.fn`` and run its ``setup()``
      (when it has one) once in each. Raise to fail the runner's open (a
      :class:`~flowbatch.PipelineError` naming the stage reads best).
    - ``await call(arg, timeout, carrier)``: run ``stage.fn(arg)`` in a worker
      and return its result; ``arg`` is one item, or a list for a batched
      stage (return a list of the same length). Raise what the function
      raised (the stage's ``Retry`` decides what happens next); a call past
      ``timeout`` seconds (``None``: no limit) raises ``TimeoutError``. At
      most ``stage.concurrency`` calls are in flight. ``carrier`` is an
      opaque value from tracing hooks (see hooks.py); an executor that
      cannot carry it across ignores it.
    - ``await stop()`` once, after the last call: run ``teardown()`` (when
      the function has one) in each worker and release them.

    Before ``start`` the runner also calls ``followed_by(next_executor)``
    (optional; a no-op unless overridden): the executor of the next stage,
    or None for the last stage.

    ``restarts`` counts workers replaced after they died, ``pending`` the
    workers asked for but not running yet (a cluster that cannot place them);
    ``stats()`` shows both per stage. An instance serves one running stage
    at a time.

    Usage::

        class Remote(fb.Executor):
            async def start(self, stage): self.fn = stage.fn
            async def call(self, arg, timeout, carrier=None): return await rpc(self.fn, arg)
            async def stop(self): ...

        fb.stage(embed, executor=Remote(), batch=fb.Batch(max_size=64))
    """

    restarts: int = 0
    pending: int = 0

    @abstractmethod
    async def start(self, stage: Stage) -> None:
        """Prepare the workers and run the stage's ``setup()`` in each."""

    @abstractmethod
    async def call(self, arg: Any, timeout: float | None, carrier: Any = None) -> Any:
        """Run the stage function on ``arg`` in a worker; return its result."""

    @abstractmethod
    async def stop(self) -> None:
        """Run ``teardown()`` in each worker and release them."""

    def followed_by(self, executor: Executor | None) -> None:  # noqa: B027 (optional hook)
        """At open, before ``start``: the executor of the stage that takes this
        stage's results, or None when this stage is the last (its results go to
        the caller). A no-op here; an executor may use it to hand its results on
        in a form only that executor reads (``fb.ray.actors`` keeps values in
        Ray's object store when the next stage is on Ray too)."""


def materialize(result: Any) -> list[Any]:
    """Turn a fan-out stage's iterable result into a list (in the worker)."""
    if isinstance(result, str | bytes) or not hasattr(result, "__iter__"):
        raise TypeError(
            f"a fan_out stage must return an iterable of items, got {type(result).__name__}"
        )
    return list(result)


def materialize_each(results: Any) -> Any:
    """:func:`materialize` for each result of a batched fan-out stage."""
    if not isinstance(results, list | tuple):
        return results  # the runner reports the broken contract
    return [r if isinstance(r, BaseException) else materialize(r) for r in results]


def _setup_error(stage: str, exc: BaseException) -> PipelineError:
    err = PipelineError(f"stage {stage!r}: setup() failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def _portable(
    exc: BaseException, dumps: Callable[[Any], bytes] = pickle.dumps
) -> BaseException:
    """``exc`` if it survives a round trip through ``dumps`` (the transport's
    pickler: cloudpickle on Ray and Dask, which ship the user's script's classes
    by value), else a ``RemoteError`` saying so."""
    tb = "".join(traceback.format_exception(exc))
    try:
        exc.add_note(f"traceback in worker process {os.getpid()}:\n{tb}")
        pickle.loads(dumps(exc))
    except Exception as why:
        return RemoteError(
            f"{type(exc).__qualname__}: {exc} (the exception could not be "
            f"pickled back from the worker process: {type(why).__name__}: {why})\n{tb}"
        )
    return exc


_HIDDEN_ASYNC = "an 'await' is missing, or an async function is hidden behind a plain function"


def _no_coroutine(out: Any, hint: str = _HIDDEN_ASYNC) -> Any:
    """``out``, a plain function's result in a worker (process, Ray actor, Dask task);
    a coroutine in its place (nothing there would await it) is closed and raises
    ``TypeError`` saying so, with ``hint``."""
    if inspect.iscoroutine(out):
        out.close()
        raise TypeError(f"the stage returned a coroutine instead of a result: {hint}")
    return out


def _portable_items(out: Any, dumps: Callable[[Any], bytes] = pickle.dumps) -> Any:
    """A batch result (a list) holding exceptions: a copy with each made :func:`_portable`;
    any other ``out`` as it is."""
    if isinstance(out, list) and any(isinstance(x, BaseException) for x in out):
        return [_portable(x, dumps) if isinstance(x, BaseException) else x for x in out]
    return out


# --------------------------------------------------------------------- async


class AsyncExecutor(Executor):
    """Runs an ``async def`` (or async generator) on the event loop.

    Built-in executors are made for one stage (the runner builds them from
    ``"async"``, ``"thread"`` or ``"process"``); ``start``'s stage is theirs.
    """

    def __init__(
        self, fn: Callable[..., Any], workers: int, stage: str, activate: Activate | None = None
    ) -> None:
        self.fn = fn
        self.workers = workers
        self.stage = stage
        self.activate = activate
        self._agen = inspect.isasyncgenfunction(fn) or inspect.isasyncgenfunction(
            getattr(type(fn), "__call__", None)  # noqa: B004
        )

    async def start(self, stage: Stage | None = None) -> None:
        setup = getattr(self.fn, "setup", None)
        if callable(setup):
            try:
                r = setup()
                if inspect.isawaitable(r):
                    await r
            except Exception as exc:
                raise _setup_error(self.stage, exc) from exc

    async def call(self, arg: Any, timeout: float | None, carrier: Any = None) -> Any:
        if carrier is None and timeout is None:
            return await self._run(arg)
        with activated(self.activate, carrier):
            if timeout is None:
                return await self._run(arg)
            try:
                async with asyncio.timeout(timeout):
                    return await self._run(arg)
            except TimeoutError as exc:
                raise CallTimedOut(
                    f"stage {self.stage!r} call took longer than {timeout}s"
                ) from exc

    async def _run(self, arg: Any) -> Any:
        if self._agen:
            return [x async for x in self.fn(arg)]
        return await self.fn(arg)

    async def stop(self) -> None:
        teardown = getattr(self.fn, "teardown", None)
        if callable(teardown):
            r = teardown()
            if inspect.isawaitable(r):
                await r


# -------------------------------------------------------------------- thread


def _resolve(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class ThreadExecutor(Executor):
    """``workers`` dedicated threads; each runs ``setup()`` on its own replica."""

    def __init__(
        self,
        fn: Callable[..., Any],
        workers: int,
        stage: str,
        post: Callable[[Any], Any] | None = None,
        activate: Activate | None = None,
    ) -> None:
        self.fn = fn
        self.workers = workers
        self.stage = stage
        self.post = post
        self.activate = activate
        # One inbox per thread, and the idle ones last in, first out: at low
        # load one warm replica (its weights in the CPU caches) takes every
        # call instead of the calls going round the threads.
        self._inboxes: list[queue.SimpleQueue[tuple[asyncio.Future[Any], Any, Any] | None]] = []
        self._idle: asyncio.LifoQueue[int] = asyncio.LifoQueue()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, stage: Stage | None = None) -> None:
        loop = self._loop = asyncio.get_running_loop()
        has_setup = callable(getattr(self.fn, "setup", None))
        ready: list[asyncio.Future[None]] = []
        for i in range(self.workers):
            fut: asyncio.Future[None] = loop.create_future()
            ready.append(fut)
            replica = copy.copy(self.fn) if has_setup and self.workers > 1 else self.fn
            inbox: queue.SimpleQueue[tuple[asyncio.Future[Any], Any, Any] | None] = (
                queue.SimpleQueue()
            )
            self._inboxes.append(inbox)
            t = threading.Thread(
                target=self._main,
                args=(loop, i, replica, has_setup, fut),
                name=f"flowbatch-{self.stage}-{i}",
                daemon=True,
            )
            self._threads.append(t)
            t.start()
        results = await asyncio.gather(*ready, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                await self.stop()
                raise _setup_error(self.stage, r) from r
        for i in reversed(range(self.workers)):
            self._idle.put_nowait(i)

    def _finished(self, i: int, fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
        """On the loop: thread ``i`` finished a call (even one nobody waits for)."""
        _resolve(fut, ok, value)
        self._idle.put_nowait(i)

    def _main(
        self,
        loop: asyncio.AbstractEventLoop,
        i: int,
        fn: Any,
        has_setup: bool,
        ready: asyncio.Future[None],
    ) -> None:
        if has_setup:
            try:
                fn.setup()
            except BaseException as exc:
                loop.call_soon_threadsafe(_resolve, ready, False, exc)
                return
        loop.call_soon_threadsafe(_resolve, ready, True, None)
        post = self.post
        jobs = self._inboxes[i]
        activate = self.activate
        finished = self._finished
        while True:
            job = jobs.get()
            if job is None:
                break
            fut, arg, carrier = job
            try:
                if carrier is None:
                    out = fn(arg)
                else:
                    with activated(activate, carrier):
                        out = fn(arg)
                if post is not None:
                    out = post(out)
            except BaseException as exc:
                loop.call_soon_threadsafe(finished, i, fut, False, exc)
            else:
                loop.call_soon_threadsafe(finished, i, fut, True, out)
            del job, fut, arg, carrier
        teardown = getattr(fn, "teardown", None)
        if callable(teardown):
            teardown()

    async def call(self, arg: Any, timeout: float | None, carrier: Any = None) -> Any:
        assert self._loop is not None
        i = await self._idle.get()  # at once: the runner never asks more than there are
        fut = self._loop.create_future()
        self._inboxes[i].put((fut, arg, carrier))
        if timeout is None:
            return await fut
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(fut)
        except TimeoutError as exc:
            raise CallTimedOut(
                f"stage {self.stage!r} call took longer than {timeout}s", pending=fut
            ) from exc

    async def stop(self) -> None:
        for inbox in self._inboxes:
            inbox.put(None)
        threads, self._threads = self._threads, []
        for t in threads:
            await asyncio.to_thread(t.join)


def make_executor(
    kind: str,
    fn: Callable[..., Any],
    workers: int,
    stage: str,
    *,
    post: Callable[[Any], Any] | None,
    activate: Activate | None = None,
    cpu_threads: int | None = None,
    lone_threads: int | None = None,
) -> Executor:
    if kind == "async":
        return AsyncExecutor(fn, workers, stage, activate)
    if kind == "thread":
        return ThreadExecutor(fn, workers, stage, post, activate)
    from .processes import ProcessExecutor  # here: processes.py imports this module

    return ProcessExecutor(
        fn, workers, stage, post, activate, cpu_threads=cpu_threads, lone_threads=lone_threads
    )
