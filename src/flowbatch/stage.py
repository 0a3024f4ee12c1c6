"""Stages: one named step of a pipeline, and the ``@stage`` decorator.

Usage::

    @fb.stage(concurrency=32)
    async def fetch(url: str) -> bytes: ...

    @fb.stage(batch=fb.Batch(max_size=64))
    def embed(texts: list[str]) -> list[list[float]]: ...
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, overload

from .batching import Batch
from .errors import PipelineError
from .executors import Executor
from .retry import NO_RETRY, Retry

__all__ = ["ExecutorKind", "Stage", "stage"]

#: The built-in executors, by name; ``executor=`` also takes an :class:`Executor`.
ExecutorKind = Literal["auto", "async", "thread", "process"]
_EXECUTORS = ("auto", "async", "thread", "process")


def _callable_name(fn: Any) -> str:
    name = getattr(fn, "__name__", None)
    if isinstance(name, str):
        return name
    return type(fn).__name__


def _is_async_callable(fn: Any) -> bool:
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - an object's __call__ is what runs
    return call is not None and not inspect.isfunction(fn) and (
        inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)
    )


@dataclass(frozen=True, eq=False, slots=True)
class Stage:
    """One step of a pipeline: a callable plus how it runs.

    Build it with :func:`stage`; the fields are read-only.
    """

    fn: Callable[..., Any]
    name: str
    executor: Literal["async", "thread", "process"] | Executor
    concurrency: int
    batch: Batch | None
    retry: Retry
    timeout: float | None
    fan_out: bool

    @property
    def executor_name(self) -> str:
        """The executor's name: a built-in's (``"thread"``) or an instance's class name."""
        ex = self.executor
        return ex if isinstance(ex, str) else type(ex).__name__

    @property
    def has_setup(self) -> bool:
        """Whether the callable has a ``setup()`` to run once per worker."""
        return callable(getattr(self.fn, "setup", None))

    def __repr__(self) -> str:
        opts = [f"executor={self.executor!r}", f"concurrency={self.concurrency}"]
        if self.batch is not None:
            opts.append(f"batch={self.batch!r}")
        if self.fan_out:
            opts.append("fan_out=True")
        return f"<Stage {self.name!r} {' '.join(opts)}>"


def _make_stage(
    fn: Any,
    *,
    name: str | None,
    executor: str | Executor,
    concurrency: int,
    batch: Batch | None,
    retry: Retry | None,
    timeout: float | None,
    fan_out: bool,
) -> Stage:
    label = name or _callable_name(fn)
    if isinstance(fn, Stage):
        raise PipelineError(f"stage {label!r}: already a Stage; pass its function instead")
    if not callable(fn):
        raise PipelineError(
            f"stage {label!r}: {fn!r} ({type(fn).__name__}) is not callable; "
            "a stage is a function or an object with __call__"
        )
    if not isinstance(label, str) or not label:
        raise PipelineError(f"stage name must be a non-empty string, got {label!r}")
    if not isinstance(executor, Executor) and executor not in _EXECUTORS:
        raise PipelineError(
            f"stage {label!r}: executor must be one of {', '.join(_EXECUTORS)} "
            f"or a flowbatch.Executor; got {executor!r}"
        )
    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise PipelineError(f"stage {label!r}: concurrency must be an int >= 1, got {concurrency!r}")
    if batch is not None and not isinstance(batch, Batch):
        raise PipelineError(f"stage {label!r}: batch must be a flowbatch.Batch, got {batch!r}")
    if retry is not None and not isinstance(retry, Retry):
        raise PipelineError(f"stage {label!r}: retry must be a flowbatch.Retry, got {retry!r}")
    if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
        raise PipelineError(f"stage {label!r}: timeout must be a number > 0, got {timeout!r}")
    is_async = _is_async_callable(fn)
    kind: Literal["async", "thread", "process"] | Executor
    if isinstance(executor, Executor):
        kind = executor  # sync or async, the function is the executor's business
    elif executor == "auto":
        kind = "async" if is_async else "thread"
    elif executor == "async":
        if not is_async:
            raise PipelineError(
                f"stage {label!r}: executor='async' needs an async def function; "
                "use executor='thread' or 'process' for a plain def"
            )
        kind = "async"
    else:
        if is_async:
            raise PipelineError(
                f"stage {label!r}: an async function runs on the event loop; "
                f"executor={executor!r} is for plain functions"
            )
        kind = "thread" if executor == "thread" else "process"
    return Stage(
        fn=fn,
        name=label,
        executor=kind,
        concurrency=concurrency,
        batch=batch,
        retry=retry if retry is not None else NO_RETRY,
        timeout=float(timeout) if timeout is not None else None,
        fan_out=bool(fan_out),
    )


@overload
def stage(fn: Callable[..., Any], /) -> Stage: ...


@overload
def stage(
    fn: Callable[..., Any],
    /,
    *,
    name: str | None = None,
    executor: ExecutorKind | Executor = "auto",
    concurrency: int = 1,
    batch: Batch | None = None,
    retry: Retry | None = None,
    timeout: float | None = None,
    fan_out: bool = False,
) -> Stage: ...


@overload
def stage(
    fn: None = None,
    /,
    *,
    name: str | None = None,
    executor: ExecutorKind | Executor = "auto",
    concurrency: int = 1,
    batch: Batch | None = None,
    retry: Retry | None = None,
    timeout: float | None = None,
    fan_out: bool = False,
) -> Callable[[Callable[..., Any]], Stage]: ...


def stage(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    executor: ExecutorKind | Executor = "auto",
    concurrency: int = 1,
    batch: Batch | None = None,
    retry: Retry | None = None,
    timeout: float | None = None,
    fan_out: bool = False,
) -> Stage | Callable[[Callable[..., Any]], Stage]:
    """Make a pipeline stage from a function or a callable object.

    - ``async def`` runs on the event loop, up to ``concurrency`` calls at once.
    - a plain ``def`` runs in ``concurrency`` worker threads (``executor="thread"``,
      the default) or worker processes (``executor="process"``).
    - an object with ``setup()`` has it run once per worker before the first
      call (with more than one thread worker, each gets its own ``copy.copy``
      of the object: a model replica); an optional ``teardown()`` runs in the
      same worker when the runner stops.
    - ``batch=fb.Batch(...)``: the function takes a list and returns a list of
      the same length and order; an ``Exception`` in the returned list fails
      that one item.
    - ``fan_out=True``: the function returns an iterable of children for one
      input; the input's result is the list of its children's results.
    - ``retry=fb.Retry(...)``: retry failed items; ``timeout``: seconds one
      call may take.
    - ``executor=``: ``"auto"`` (async def on the loop, else threads),
      ``"async"``, ``"thread"``, ``"process"``, or an instance of
      :class:`flowbatch.Executor` that runs the calls anywhere else.

    Usable as ``stage(fn, ...)``, ``@stage`` and ``@stage(...)``.
    """
    opts: dict[str, Any] = {
        "name": name,
        "executor": executor,
        "concurrency": concurrency,
        "batch": batch,
        "retry": retry,
        "timeout": timeout,
        "fan_out": fan_out,
    }
    if fn is None:
        return lambda f: _make_stage(f, **opts)
    return _make_stage(fn, **opts)
