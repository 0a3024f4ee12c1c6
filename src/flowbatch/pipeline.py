"""Pipeline: an ordered chain of stages, validated when it is built.

Usage::

    pipe = fb.Pipeline([fetch, split, embed, store], name="ingest")
    async with pipe.open() as runner:
        async for vector in runner.map(urls): ...

    vectors = pipe.run(urls)  # the synchronous shortcut
"""

from __future__ import annotations

import asyncio
import os
import pickle
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import PipelineError
from .hooks import Hooks
from .runner import DEFAULT_QUEUE_SIZE, Runner
from .stage import Stage, stage

if TYPE_CHECKING:
    from .admission import LatencyTarget
    from .bulk.checkpoint import Checkpoint

__all__ = ["Pipeline"]


class Pipeline:
    """An ordered chain of stages. Building it checks the chain; ``open()``
    starts it. A pipeline holds no running state and can be opened many
    times (each ``open()`` is a fresh runner)."""

    def __init__(self, stages: Sequence[Stage | Any], *, name: str = "pipeline") -> None:
        if isinstance(stages, Stage) or callable(stages) or not isinstance(stages, Sequence):
            raise PipelineError(
                f"pipeline {name!r}: stages must be a list of stages, got {type(stages).__name__}"
            )
        if not stages:
            raise PipelineError(f"pipeline {name!r}: needs at least one stage")
        if not isinstance(name, str) or not name:
            raise PipelineError(f"pipeline name must be a non-empty string, got {name!r}")
        built: list[Stage] = []
        for i, s in enumerate(stages):
            if isinstance(s, Stage):
                built.append(s)
            elif callable(s):
                built.append(stage(s))
            else:
                raise PipelineError(
                    f"pipeline {name!r}: stage #{i} ({s!r}, {type(s).__name__}) is not callable; "
                    "use a function, a callable object or fb.stage(...)"
                )
        seen: set[str] = set()
        instances: dict[int, str] = {}  # an Executor instance serves one stage
        for s in built:
            if s.name in seen:
                raise PipelineError(
                    f"pipeline {name!r}: two stages are named {s.name!r}; "
                    "give one a name with fb.stage(fn, name=...)"
                )
            seen.add(s.name)
            if not isinstance(s.executor, str):
                other = instances.setdefault(id(s.executor), s.name)
                if other != s.name:
                    raise PipelineError(
                        f"pipeline {name!r}: stages {other!r} and {s.name!r} share one executor "
                        "instance, which serves one stage; give each stage its own "
                        "(e.g. a second fb.ray.actors(...))"
                    )
            if s.executor == "process":
                try:
                    pickle.dumps(s.fn)
                except Exception as exc:
                    raise PipelineError(
                        f"pipeline {name!r}: stage {s.name!r} runs in worker processes, but its "
                        f"function cannot be pickled ({type(exc).__name__}: {exc}); "
                        "define it at module level"
                    ) from exc
        self.name = name
        self.stages: tuple[Stage, ...] = tuple(built)

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r} {[s.name for s in self.stages]}>"

    def open(
        self,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        window: int | None = None,
        hooks: Hooks | None = None,
        *,
        clock: Callable[[], float] | None = None,
        max_in_flight: int | None = None,
        latency_target: LatencyTarget | None = None,
    ) -> Runner:
        """Start the pipeline: ``async with pipe.open() as runner``.

        ``queue_size`` bounds each stage's input queue (a batched stage gets
        at least two full batches per worker); ``submit`` waits, and
        ``submit_nowait`` raises ``Overloaded``, when the first one is full.
        ``window`` bounds how many items one ``map`` keeps in flight.
        ``hooks`` (a :class:`flowbatch.hooks.Hooks`) sees every item and
        call, for tracing. ``max_in_flight`` bounds the items inside the
        runner at once (``submit`` waits, ``submit_nowait`` raises
        ``Overloaded`` past it), a fixed number. ``latency_target`` (seconds,
        or ``"auto"``: a multiple of the measured service time; not with
        ``max_in_flight``) makes that bound adapt instead: it is resized so
        that admitted items' p99 latency stays under the target while the
        throughput stays at the pipeline's limit (flowbatch/admission.py;
        ``stats().in_flight_limit``). ``clock`` (for tests) replaces
        ``time.perf_counter`` as the clock the runner measures with; see
        :class:`Runner`.
        """
        return Runner(
            self,
            queue_size=queue_size,
            window=window,
            hooks=hooks,
            clock=clock,
            max_in_flight=max_in_flight,
            latency_target=latency_target,
        )

    def run(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        progress: bool = True,
        ordered: bool = True,
        return_exceptions: bool = False,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        checkpoint: str | os.PathLike[str] | Checkpoint | None = None,
        fresh: bool = False,
    ) -> list[Any]:
        """Run every item and return the results as a list (synchronous).

        Shows a progress bar on a terminal when ``progress`` is true. Must not
        be called from inside a running event loop; use ``await
        pipe.arun(items)`` there (a notebook, an async application).

        ``checkpoint="job.ckpt"`` makes the run resumable: a rerun skips the
        keys of ``items`` (records of a ``flowbatch.bulk`` source; other
        values are keyed by position) whose results came out before, and
        returns the others' results; ``fresh=True`` starts over. See
        ``Runner.map`` and, to write into a sink, ``flowbatch.bulk.run_job``.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "Pipeline.run() cannot be called from a running event loop; "
                "use 'await pipeline.arun(items)' (or 'async with pipeline.open() "
                "as runner' and runner.map()) instead"
            )
        return asyncio.run(
            self.arun(
                items,
                progress=progress,
                ordered=ordered,
                return_exceptions=return_exceptions,
                queue_size=queue_size,
                checkpoint=checkpoint,
                fresh=fresh,
            )
        )

    async def arun(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        progress: bool = True,
        ordered: bool = True,
        return_exceptions: bool = False,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        checkpoint: str | os.PathLike[str] | Checkpoint | None = None,
        fresh: bool = False,
    ) -> list[Any]:
        """``run`` for code already inside an event loop: ``await pipe.arun(items)``.

        Opens the pipeline, runs every item, drains, and returns the results
        as a list; the options are ``run``'s.
        """
        async with self.open(queue_size=queue_size) as runner:
            results = runner.map(
                items,
                ordered=ordered,
                return_exceptions=return_exceptions,
                progress=progress,
                checkpoint=checkpoint,
                fresh=fresh,
            )
            return [r async for r in results]
