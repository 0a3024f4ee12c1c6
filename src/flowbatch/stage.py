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
import os
import pickle
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

from .adaptive import Adaptive
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
    #: ``concurrency=fb.Adaptive(...)``: the runner picks the limit between its
    #: ``min`` and ``max`` (``concurrency`` is then ``max``); None: fixed.
    adaptive: Adaptive | None = None
    #: Math-library threads (torch, BLAS, OpenMP, tokenizers) in each worker
    #: process; None outside process workers. See :func:`auto_shape`.
    cpu_threads: int | None = None
    #: torch threads for a call made while the stage's other process workers
    #: are idle: all usable cores when ``cpu_threads`` was chosen for the user
    #: (a lone request need not run on a share of the machine); else None.
    lone_threads: int | None = None

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
        if self.adaptive is not None:
            opts.append(f"adaptive={self.adaptive!r}")
        if self.cpu_threads is not None:
            opts.append(f"cpu_threads={self.cpu_threads}")
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
    concurrency: int | Adaptive | None,
    batch: Batch | None,
    retry: Retry | None,
    timeout: float | None,
    fan_out: bool,
    devices: str | Sequence[str] | Devices | None = None,
    replicas_per_device: int | None = None,
    cpu_threads: int | None = None,
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
    adaptive = concurrency if isinstance(concurrency, Adaptive) else None
    if concurrency is not None and adaptive is None and (
        not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1
    ):
        raise PipelineError(
            f"stage {label!r}: concurrency must be an int >= 1 or a flowbatch.Adaptive, "
            f"got {concurrency!r}"
        )
    if cpu_threads is not None and (
        not isinstance(cpu_threads, int) or isinstance(cpu_threads, bool) or cpu_threads < 1
    ):
        raise PipelineError(f"stage {label!r}: cpu_threads must be an int >= 1, got {cpu_threads!r}")
    if batch is not None and not isinstance(batch, Batch):
        raise PipelineError(f"stage {label!r}: batch must be a flowbatch.Batch, got {batch!r}")
    if retry is not None and not isinstance(retry, Retry):
        raise PipelineError(f"stage {label!r}: retry must be a flowbatch.Retry, got {retry!r}")
    if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
        raise PipelineError(f"stage {label!r}: timeout must be a number > 0, got {timeout!r}")
    is_async = _is_async_callable(fn)
    given = concurrency.max if isinstance(concurrency, Adaptive) else concurrency
    placed, workers = _placement(
        label,
        devices=devices,
        replicas_per_device=replicas_per_device,
        executor=executor,
        concurrency=given if given is not None else 1,
        explicit=given is not None,
        is_async=is_async,
    )
    kind: Literal["async", "thread", "process"] | Executor
    if isinstance(executor, Executor):
        kind = executor  # sync or async, the function is the executor's business
    elif executor == "auto":
        if is_async:
            kind = "async"
        elif placed is None and devices is None and _wants_processes(fn, batch):
            kind = "process"
        else:
            kind = "thread"
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
    lone: int | None = None
    if kind == "process":
        replicas, threads = auto_shape(given if given is not None else None)
        if given is None and executor == "auto":
            workers = replicas
        if cpu_threads is not None:
            threads = cpu_threads
        elif workers > 1 and threads < usable_cores():
            lone = usable_cores()
    elif cpu_threads is not None:
        raise PipelineError(
            f"stage {label!r}: cpu_threads sets the math-library threads of each worker "
            f"process; this stage runs in {kind if isinstance(kind, str) else type(kind).__name__} "
            "workers, which share their process's threads"
        )
    else:
        threads = None
    if (
        adaptive is not None
        and adaptive.replicas is not None
        and batch is None
        and isinstance(kind, str)
        and (kind != "process" or placed is not None)
    ):
        # Replicas follow the load only on a batched stage or an executor that
        # can resize (replicas.start_scalers); the built-in async, thread and
        # device executors cannot, so this stage's limit follows latency
        # (adaptive.GradientLimit) and a rule would be ignored. (An fb.Executor
        # of the user's is known to resize or not only once it runs.)
        where = "devices=" if placed is not None else f"{kind} workers"
        fix = "batch the stage" if placed is not None else (
            "batch the stage or run it with executor='process'"
        )
        raise PipelineError(
            f"stage {label!r}: fb.Adaptive(replicas=...) sets when replicas are added "
            f"or removed, but an unbatched stage on {where} has no replicas to scale: "
            "its limit follows the calls' latency instead (docs/adaptive.md); "
            f"drop replicas=, or {fix}"
        )
    return Stage(
        fn=fn,
        name=label,
        executor=kind,
        concurrency=workers,
        batch=batch,
        retry=retry if retry is not None else NO_RETRY,
        timeout=float(timeout) if timeout is not None else None,
        fan_out=bool(fan_out),
        devices=placed,
        adaptive=adaptive,
        cpu_threads=threads,
        lone_threads=lone,
    )


#: The most process replicas ``executor="auto"`` starts for a model stage by
#: itself: each holds a copy of the model, so memory, not cores, bounds it
#: on a big machine; ask for more with ``concurrency=``.
MAX_AUTO_REPLICAS = 4


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def auto_shape(replicas: int | None = None, cores: int | None = None) -> tuple[int, int]:
    """``(replicas, threads per replica)`` for a model stage in worker processes.

    Small and mid-size CPU models run more items per second as several
    single-threaded processes than as one process whose math library spreads
    each call over every core (measured on the 2-core benchmark machine:
    all-MiniLM-L6-v2, 2 processes x 1 thread 238-259 items/s against 214
    for 1 x 2; benchmarks/serving.py prints both): so by default one replica
    per core up to :data:`MAX_AUTO_REPLICAS`, and the cores shared out
    between them. Given ``replicas``, only the threads are chosen (at least 1).
    """
    cores = cores if cores is not None else usable_cores()
    if replicas is None:
        replicas = min(cores, MAX_AUTO_REPLICAS)
    return replicas, max(1, cores // replicas)


def _wants_processes(fn: Any, batch: Batch | None) -> bool:
    """Whether ``executor="auto"`` runs this plain-def stage in worker processes.

    A batched stage whose object has a ``setup()`` is a model: its calls
    hold the GIL for much of their time (tokenizers' Python, module calls
    between kernels), so in the server's process they slow the event loop
    and it slows them. It goes to process replicas when it can: the object
    pickles, and the main script can be imported by a worker (it has an
    ``if __name__ == "__main__":`` guard, or is not a script). Anything else
    stays in threads, as before.
    """
    if batch is None or not callable(getattr(fn, "setup", None)):
        return False
    main = sys.modules.get("__main__")
    if getattr(type(fn), "__module__", None) == "__main__" and not isinstance(
        getattr(main, "__file__", None), str
    ):
        return False  # defined in a notebook or a REPL: a worker cannot import it
    from .processes import _unguarded_script  # processes.py imports this module's deps

    if _unguarded_script() is not None:
        return False
    try:
        pickle.dumps(fn)
    except Exception:
        return False
    return True


def _placement(
    label: str,
    *,
    devices: str | Sequence[str] | Devices | None,
    replicas_per_device: int | None,
    executor: str | Executor,
    concurrency: int,
    explicit: bool,
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
    if explicit:
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
    concurrency: int | Adaptive | None = None,
    batch: Batch | None = None,
    retry: Retry | None = None,
    timeout: float | None = None,
    fan_out: bool = False,
    devices: str | Sequence[str] | Devices | None = None,
    replicas_per_device: int | None = None,
    cpu_threads: int | None = None,
) -> Stage: ...


@overload
def stage(
    fn: None = None,
    /,
    *,
    name: str | None = None,
    executor: ExecutorKind | Executor = "auto",
    concurrency: int | Adaptive | None = None,
    batch: Batch | None = None,
    retry: Retry | None = None,
    timeout: float | None = None,
    fan_out: bool = False,
    devices: str | Sequence[str] | Devices | None = None,
    replicas_per_device: int | None = None,
    cpu_threads: int | None = None,
) -> Callable[[Callable[..., Any]], Stage]: ...


def stage(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    executor: ExecutorKind | Executor = "auto",
    concurrency: int | Adaptive | None = None,
    batch: Batch | None = None,
    retry: Retry | None = None,
    timeout: float | None = None,
    fan_out: bool = False,
    devices: str | Sequence[str] | Devices | None = None,
    replicas_per_device: int | None = None,
    cpu_threads: int | None = None,
) -> Stage | Callable[[Callable[..., Any]], Stage]:
    """Make a pipeline stage from a function or a callable object.

    - ``async def`` runs on the event loop, up to ``concurrency`` calls at once.
    - a plain ``def`` runs in ``concurrency`` worker threads (``executor="thread"``)
      or worker processes (``executor="process"``). With the default
      ``executor="auto"``, a batched stage whose object has a ``setup()`` (a
      model) runs in process replicas, one per core up to 4 when
      ``concurrency`` is not given, each with its share of the cores for its
      math library (``cpu_threads``); every other plain ``def`` runs in
      threads (``concurrency`` default 1). See :func:`auto_shape`.
    - ``concurrency=fb.Adaptive(min, max)``: the runner picks the limit.
    - ``cpu_threads=N``: torch/BLAS/OpenMP/tokenizer threads in each worker
      process (default: the usable cores divided by the replicas).
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
    - ``executor=``: ``"auto"`` (async def on the loop, a batched model in
      processes, else threads),
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
        "cpu_threads": cpu_threads,
    }
    if fn is None:
        return lambda f: _make_stage(f, **opts)
    return _make_stage(fn, **opts)
