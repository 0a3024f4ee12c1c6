"""Stages: one named step of a pipeline, and the ``@stage`` decorator.

Usage::

    @fb.stage(concurrency=32)
    async def fetch(url: str) -> bytes: ...

    @fb.stage(batch=fb.Batch(max_size=64))
    def embed(texts: list[str]) -> list[list[float]]: ...
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

from .batching import Batch
from .devices import Devices
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
    #: Where the replicas run (``devices=``), resolved: ``None`` for an
    #: ordinary stage, or when ``"auto"`` found no GPU.
    devices: Devices | None = None

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
        if self.devices is not None:
            opts.append(
                f"devices={list(self.devices.names)!r} "
                f"replicas_per_device={self.devices.replicas_per_device}"
            )
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
    devices: str | Sequence[str] | Devices | None = None,
    replicas_per_device: int | None = None,
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
    if not isinstance(executor, Executor) and all(
        callable(getattr(executor, m, None)) for m in ("start", "call", "stop")
    ):
        raise PipelineError(
            f"stage {label!r}: executor {type(executor).__name__} does not subclass "
            f"flowbatch.Executor; write 'class {type(executor).__name__}(fb.Executor)'"
        )
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
    placed, concurrency = _placement(
        label,
        devices=devices,
        replicas_per_device=replicas_per_device,
        executor=executor,
        concurrency=concurrency,
        is_async=is_async,
    )
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
        devices=placed,
    )


def _placement(
    label: str,
    *,
    devices: str | Sequence[str] | Devices | None,
    replicas_per_device: int | None,
    executor: str | Executor,
    concurrency: int,
    is_async: bool,
) -> tuple[Devices | None, int]:
    """The stage's resolved ``devices=`` (or None) and its concurrency (its replicas)."""
    if devices is None:
        if replicas_per_device is not None:
            raise PipelineError(f"stage {label!r}: replicas_per_device needs devices=")
        return None, concurrency
    if isinstance(executor, Executor):
        raise PipelineError(
            f"stage {label!r}: devices= places replicas in thread or process workers; "
            f"{type(executor).__name__} places its own (Ray: num_gpus=, Dask: resources)"
        )
    if is_async or executor == "async":
        raise PipelineError(
            f"stage {label!r}: devices= needs a plain def or an object with __call__ "
            "(each replica runs in a worker of its own); an async function runs on the loop"
        )
    if concurrency != 1:
        raise PipelineError(
            f"stage {label!r}: with devices=, the workers are devices x "
            "replicas_per_device; pass replicas_per_device instead of concurrency"
        )
    try:
        if isinstance(devices, Devices):
            option = devices
            if replicas_per_device is not None:
                option = dataclasses.replace(option, replicas_per_device=replicas_per_device)
        else:
            option = Devices(
                devices if isinstance(devices, str) else tuple(devices),
                replicas_per_device if replicas_per_device is not None else 1,
            )
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"stage {label!r}: {exc}") from exc
    placed = option.resolved()
    if placed is None:
        # "auto" without a GPU: today's CPU stage, with one worker per replica.
        return None, option.replicas_per_device
    return placed, placed.replicas


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
    devices: str | Sequence[str] | Devices | None = None,
    replicas_per_device: int | None = None,
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
    devices: str | Sequence[str] | Devices | None = None,
    replicas_per_device: int | None = None,
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
    devices: str | Sequence[str] | Devices | None = None,
    replicas_per_device: int | None = None,
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
    - ``devices="auto" | ["cuda:0", ...]`` with ``replicas_per_device=N``
      (or ``devices=fb.Devices(...)``): one replica per (device, slot), each
      in its own thread (or process) worker, placed by ``setup(device=...)``
      or its ``device`` attribute; a batch that runs out of device memory is
      split and the size that fits is learned (see flowbatch/devices.py).
      ``"auto"`` without a GPU runs ``replicas_per_device`` CPU workers.
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
        "devices": devices,
        "replicas_per_device": replicas_per_device,
    }
    if fn is None:
        return lambda f: _make_stage(f, **opts)
    return _make_stage(fn, **opts)
