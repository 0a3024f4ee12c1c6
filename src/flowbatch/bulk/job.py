"""A bulk job: every record of a source through a pipeline into a sink, resumable.

Usage::

    report = await run_job(pipe, PostgresSource(dsn, query, key="id", value="body"),
                           PostgresSink(dsn, "vectors", key="id", column="embedding"),
                           checkpoint="embed.ckpt")
    print(report.stats)                      # the stats table
    raise SystemExit(0 if report.ok else 1)

How a record travels: the source yields ``Record(key, value)``; a key the
checkpoint holds is skipped; the value goes through the pipeline (one
runner, ``map`` in input order, so each result is paired with its key
without the stages seeing keys); ``(key, result)`` goes to the sink's stage
(a second runner with that one batched stage), which writes a batch in one
transaction and then marks its keys in the checkpoint. Without a sink the
pipeline's last stage is the writer, and a key is marked once its result
comes out. Both runners pull only as fast as the next one drains, so memory
stays flat whatever the source's size.

What a crash costs: keys are marked after their write commits, so a rerun
recomputes only the items that were between the source and a committed
mark (at most the runners' windows; with a sink, in practice the batches
being written) and the sink's upsert makes a repeated write harmless.

A failed item (in a stage or rejected by the sink) is not marked: it is
written to the failed-keys file (JSON Lines: ``key``, ``error``, and the
source ``value`` when JSON can hold it), which ``JsonlSource(path,
key="key", value="value")`` (URL ``failed:PATH``) feeds back as a source.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any, TextIO

from flowbatch.metrics import PipelineStats, find_bottleneck
from flowbatch.pipeline import Pipeline
from flowbatch.runner import DEFAULT_QUEUE_SIZE

from .checkpoint import Checkpoint
from .sinks import Sink
from .sources import Record, Source

if TYPE_CHECKING:
    from flowbatch.runner import Runner

__all__ = ["JobReport", "checkpointed_map", "records_of", "run_job"]

#: Keys marked per checkpoint transaction when the pipeline itself writes (no sink).
MARK_EVERY = 256


@dataclasses.dataclass(frozen=True, slots=True)
class JobReport:
    """What a bulk job did: ``done`` written, ``failed`` (listed in ``failed_path``),
    ``skipped`` (done by an earlier run), seconds taken, and the stats of every stage."""

    done: int
    failed: int
    skipped: int
    elapsed: float
    failed_path: Path | None
    stats: PipelineStats

    @property
    def ok(self) -> bool:
        """True when no item failed."""
        return self.failed == 0


async def records_of(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Record]:
    """``items`` as records: a :class:`Record` passes as is; any other value is keyed
    by its position (from 0)."""
    i = 0
    if isinstance(items, AsyncIterable):
        async for x in items:
            yield x if isinstance(x, Record) else Record(i, x)
            i += 1
    else:
        for x in items:
            yield x if isinstance(x, Record) else Record(i, x)
            i += 1


def _checkpoint(checkpoint: str | os.PathLike[str] | Checkpoint, fresh: bool) -> Checkpoint:
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    return Checkpoint.open(checkpoint, fresh=fresh)


class _Failures:
    """The failed-keys file, written as failures come (created on the first)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.count = 0
        self._f: TextIO | None = None
        if path is not None:
            path.unlink(missing_ok=True)  # a previous run's list is stale

    def add(self, rec: Record, exc: BaseException) -> None:
        self.count += 1
        if self.path is None:
            return
        if self._f is None:
            self._f = self.path.open("w", encoding="utf-8")
        entry = {"key": rec.key, "error": str(exc), "value": rec.value}
        try:
            line = json.dumps(entry, default=_plain)
        except (TypeError, ValueError):
            del entry["value"]
            line = json.dumps(entry, default=str)
        self._f.write(line + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _plain(v: Any) -> Any:
    tolist = getattr(v, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(type(v).__name__)


class _Marks:
    """Keys marked in the checkpoint in groups (no sink: the pipeline wrote them)."""

    def __init__(self, ckpt: Checkpoint | None) -> None:
        self.ckpt = ckpt
        self.keys: list[Any] = []

    def add(self, key: Any) -> None:
        if self.ckpt is None:
            return
        self.keys.append(key)
        if len(self.keys) >= MARK_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.ckpt is not None and self.keys:
            self.ckpt.mark(self.keys)
            self.keys = []


class _Bar:
    """The job's progress bar (rich): done of total, rate, ETA."""

    def __init__(self, name: str, total: int | None, enabled: bool) -> None:
        self._progress: Any = None
        self._task: Any = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
        )
        self._task = self._progress.add_task(name, total=total, rate="")
        self._t0 = perf_counter()
        self._n = 0

    def __enter__(self) -> _Bar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, worked: bool = True) -> None:
        if self._progress is None:
            return
        fields: dict[str, Any] = {}
        if worked:
            self._n += 1
            dt = perf_counter() - self._t0
            if dt > 0:
                fields["rate"] = f"{self._n / dt:,.0f} items/s"
        self._progress.update(self._task, advance=1, **fields)


def _merged(a: PipelineStats, b: PipelineStats | None) -> PipelineStats:
    if b is None:
        return a
    stages = (*a.stages, *b.stages)
    return dataclasses.replace(
        a, stages=stages, bottleneck=find_bottleneck(stages), failed=a.failed + b.failed
    )


async def run_job(
    pipeline: Pipeline,
    source: Iterable[Any] | AsyncIterable[Any],
    sink: Sink | None = None,
    *,
    checkpoint: str | os.PathLike[str] | Checkpoint | None = None,
    fresh: bool = False,
    failed_path: str | os.PathLike[str] | None = None,
    progress: bool = False,
    queue_size: int = DEFAULT_QUEUE_SIZE,
) -> JobReport:
    """Run every record of ``source`` through ``pipeline`` into ``sink``; see the module doc.

    ``checkpoint`` (a path or :class:`Checkpoint`): skip the keys it holds and
    mark each key once written; ``fresh=True`` empties it (and a file sink's
    output) first. ``failed_path``: where the failed keys go (JSON Lines).
    """
    t0 = perf_counter()
    ckpt = _checkpoint(checkpoint, fresh) if checkpoint is not None else None
    failures = _Failures(Path(failed_path) if failed_path is not None else None)
    total = await source.count() if progress and isinstance(source, Source) else None
    done = skipped = 0
    sink_stats: PipelineStats | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            if sink is not None:
                await sink.open(fresh=fresh or ckpt is None)
                stack.push_async_callback(sink.close)
                if ckpt is not None and not fresh:
                    await sink.recover(ckpt)
            bar = stack.enter_context(_Bar(pipeline.name, total, progress))
            runner = await stack.enter_async_context(pipeline.open(queue_size=queue_size))
            pending: deque[Record] = deque()

            async def todo() -> AsyncIterator[Any]:
                nonlocal skipped
                async for rec in records_of(source):
                    if ckpt is not None and ckpt.done(rec.key):
                        skipped += 1
                        bar.advance(worked=False)
                        continue
                    pending.append(rec)
                    yield rec.value

            results = runner.map(todo(), ordered=True, return_exceptions=True)
            if sink is None:
                marks = _Marks(ckpt)
                try:
                    async for r in results:
                        rec = pending.popleft()
                        if isinstance(r, BaseException):
                            failures.add(rec, r)
                        else:
                            done += 1
                            marks.add(rec.key)
                        bar.advance()
                finally:
                    marks.flush()
            else:
                sink_pipe = Pipeline([sink.stage(ckpt)], name=f"{pipeline.name}.sink")
                sink_runner = await stack.enter_async_context(sink_pipe.open())
                writing: deque[Record] = deque()

                async def rows() -> AsyncIterator[tuple[Any, Any]]:
                    async for r in results:
                        rec = pending.popleft()
                        if isinstance(r, BaseException):
                            failures.add(rec, r)
                            bar.advance()
                            continue
                        writing.append(rec)
                        yield (rec.key, r)

                async for w in sink_runner.map(rows(), ordered=True, return_exceptions=True):
                    rec = writing.popleft()
                    if isinstance(w, BaseException):
                        failures.add(rec, w)
                    else:
                        done += 1
                    bar.advance()
                await sink_runner.drain()
                sink_stats = sink_runner.stats()
            await runner.drain()
            stats = _merged(runner.stats(), sink_stats)
    finally:
        failures.close()
        if ckpt is not None and not isinstance(checkpoint, Checkpoint):
            ckpt.close()
    return JobReport(
        done=done,
        failed=failures.count,
        skipped=skipped,
        elapsed=perf_counter() - t0,
        failed_path=failures.path if failures.count else None,
        stats=stats,
    )


async def checkpointed_map(
    runner: Runner,
    items: Iterable[Any] | AsyncIterable[Any],
    checkpoint: str | os.PathLike[str] | Checkpoint,
    *,
    fresh: bool = False,
    return_exceptions: bool = False,
    window: int | None = None,
) -> AsyncIterator[Any]:
    """``runner.map(items, checkpoint=...)``: skip the keys ``checkpoint`` holds, yield
    the others' results in input order, and mark each key once its result is out
    (the pipeline's last stage wrote it). ``items`` are records (a source) or
    values keyed by position. A failed item is not marked."""
    ckpt = _checkpoint(checkpoint, fresh)
    pending: deque[Any] = deque()

    async def todo() -> AsyncIterator[Any]:
        async for rec in records_of(items):
            if not ckpt.done(rec.key):
                pending.append(rec.key)
                yield rec.value

    marks = _Marks(ckpt)
    try:
        results = runner.map(todo(), ordered=True, return_exceptions=True, window=window)
        async for r in results:
            key = pending.popleft()
            if isinstance(r, BaseException):
                if not return_exceptions:
                    raise r
            else:
                marks.add(key)
            yield r
    finally:
        marks.flush()
        if not isinstance(checkpoint, Checkpoint):
            ckpt.close()
