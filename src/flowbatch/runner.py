"""The runner: a started pipeline with its queues, workers and executors.

Every front end drives this one surface::

    async with pipeline.open() as runner:
        y = await runner.submit(x, timeout=2.0)
        async for y in runner.map(xs): ...
        print(runner.stats().bottleneck)

How an item travels: it is wrapped in an ``Item`` envelope (envelope.py) and
put in the bounded channel of the first stage. Each stage has ``concurrency``
worker tasks (workers.py) that take items (or batches) from their channel,
run the stage function through the stage's executor, and put the results in
the next stage's channel. The last stage resolves the item's caller. A
deadline, a cancellation or a failure marks the item's root as done; its
pieces still in the pipeline are dropped at the next stage boundary, so no
work is done for a caller who has gone. The ledger (ledger.py) admits items
and records every outcome.

This module keeps the runner's lifetime (open, drain, stop), intake
(``submit``, ``submit_nowait``, ``admit_many``, ``admit_many_nowait``,
``map``) and ``stats()``. It is about 650 lines because ``map``'s feeder
and collector and the whole-request intake share the runner's lifetime (a
drain stops feeders, an abort fails collectors and waiting admissions);
admission, outcomes and the worker loops are in ledger.py and workers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from itertools import islice
from time import perf_counter
from typing import TYPE_CHECKING, Any

from .admission import Admission, AdmissionController, LatencyTarget, check_target, floor_limit
from .channel import ChannelClosed
from .devices import DeviceExecutor
from .envelope import Collector, FutureSink, Item
from .errors import Overloaded, PipelineClosed
from .hooks import Hooks
from .ledger import Ledger
from .limits import CapacityLimiter
from .metrics import PipelineStats, StageStats, find_bottleneck
from .replicas import start_scalers
from .stagerun import StageRun
from .workers import Workers

if TYPE_CHECKING:
    from .bulk.checkpoint import Checkpoint
    from .pipeline import Pipeline

__all__ = ["DEFAULT_QUEUE_SIZE", "Runner"]

log = logging.getLogger("flowbatch")
log.addHandler(logging.NullHandler())

DEFAULT_QUEUE_SIZE = 1024
# The most items of a map's (sync) input read and admitted at once.
FEED_CHUNK = 32
# Seconds between folds of timing samples into histograms.
FOLD_INTERVAL = 0.25
# Seconds a drain waits, once every caller is answered, for calls that still
# hold pieces of answered (cancelled or expired) items, before cancelling them.
ABANDONED_GRACE = 1.0


class Runner:
    """A started pipeline. Get one from ``Pipeline.open()``; use it as
    ``async with``. Leaving the block drains: every admitted item finishes.

    ``clock`` (test-facing): the monotonic clock, in seconds, the runner
    measures with (service and queue-wait times, latency, the batch service
    time that sizes the automatic linger). Default ``time.perf_counter``;
    a test passes a clock it moves by hand.

    ``max_in_flight``: the most items inside the runner at once (admitted
    and not yet answered), held by one :class:`~flowbatch.limits.CapacityLimiter`
    (``runner.limiter``): past it ``submit`` and ``map`` wait in line and
    ``submit_nowait`` raises ``Overloaded``; ``stats().rejected`` counts the
    refusals. ``None`` (default): only the queues bound the work.

    ``latency_target`` (seconds, or ``"auto"``; not with ``max_in_flight``):
    the same limiter, resized every ``FOLD_INTERVAL`` by an
    :class:`~flowbatch.admission.AdmissionController` (``runner.admission``)
    so that admitted items' p99 latency stays under the target while the
    throughput stays at the pipeline's limit; see flowbatch/admission.py.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        window: int | None = None,
        hooks: Hooks | None = None,
        *,
        clock: Callable[[], float] | None = None,
        max_in_flight: int | None = None,
        latency_target: LatencyTarget | None = None,
    ) -> None:
        target = check_target(latency_target)
        if target is not None and max_in_flight is not None:
            raise ValueError(
                "give max_in_flight (a fixed limit) or latency_target (a limit that follows "
                f"the load), not both: got max_in_flight={max_in_flight!r}, "
                f"latency_target={latency_target!r}"
            )
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be an int >= 1, got {queue_size!r}")
        self.pipeline = pipeline
        self.name = pipeline.name
        self.queue_size = queue_size
        specs = pipeline.stages
        per_call = sum(s.concurrency * (s.batch.max_size if s.batch else 1) for s in specs)
        self.window = window if window is not None else max(queue_size, 2 * per_call)
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {window!r}")
        self._clock: Callable[[], float] = clock if clock is not None else perf_counter
        self._stages: list[StageRun] = []
        self._hooks = hooks
        self._ledger = Ledger(self.name, hooks, self._clock)
        #: The in-flight limiter (``max_in_flight`` or ``latency_target``), or None.
        self.limiter = CapacityLimiter(max_in_flight) if max_in_flight is not None else None
        #: What resizes the limiter for ``latency_target``, or None (a fixed limit).
        self.admission: Admission | None = None
        if target is not None:
            floor = floor_limit(specs)
            self.limiter = CapacityLimiter(floor)
            ctl = AdmissionController(target, floor, max(floor, queue_size))
            self.admission = Admission(ctl, self.limiter, self.name)
        self._ledger.limiter = self.limiter
        self._rejected = 0
        self._workers: Workers | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._worker_tasks: list[asyncio.Task[None]] = []
        self._folder: asyncio.Task[None] | None = None
        self._scalers: list[asyncio.Task[None]] = []  # adaptive replicas (replicas.py)
        self._state = "new"  # new -> open -> closing -> closed
        self._aborted: BaseException | None = None
        self._drained: asyncio.Future[None] | None = None
        self._feeders: set[asyncio.Task[None]] = set()
        self._collectors: set[Collector] = set()
        self._t_open = 0.0

    # ------------------------------------------------------------ lifetime

    async def __aenter__(self) -> Runner:
        if self._state != "new":
            raise RuntimeError("a Runner can be opened once; call pipeline.open() again")
        loop = self._loop = asyncio.get_running_loop()
        if self._hooks is not None:
            self._hooks.bind(self.name)
            if not getattr(self._hooks, "enabled", True):
                self._hooks = None  # installed but switched off: keep the fast path
        ledger = self._ledger
        ledger.hooks = self._hooks
        self._stages = [
            StageRun(s, self.queue_size, self._hooks, self._clock) for s in self.pipeline.stages
        ]
        ledger.bind(loop, self._stages[0])
        if self.admission is not None:
            self.admission.bind(ledger, self._stages)
        for a, b in zip(self._stages, self._stages[1:], strict=False):
            a.next = b
        for sr in self._stages:
            sr.executor.followed_by(sr.next.executor if sr.next is not None else None)
        started: list[StageRun] = []
        try:
            for sr in self._stages:
                await sr.executor.start(sr.spec)
                started.append(sr)
        except BaseException:
            for sr in reversed(started):
                with contextlib.suppress(Exception):
                    await sr.executor.stop()
            self._state = "closed"
            raise
        workers = self._workers = Workers(self.name, ledger, self._hooks, loop, self._clock)
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        for sr in self._stages:
            for slot in range(sr.spec.concurrency):
                self._worker_tasks.append(self._tg.create_task(self._guard(workers.run(sr, slot))))
        self._folder = self._tg.create_task(self._fold_periodically())
        self._scalers = start_scalers(self._tg, self._stages, self._clock)
        self._t_open = self._clock()
        for sr in self._stages:
            sr.metrics.opened(self._t_open)  # an adaptive limit's worker-seconds count from here
        self._state = "open"
        return self

    async def _fold_periodically(self) -> None:
        """Fold timing samples into histograms now and then, so that their
        buffers stay small however fast items flow."""
        while True:
            await asyncio.sleep(FOLD_INTERVAL)
            self._fold()
            if self.admission is not None:
                self.admission.tick(self._clock())

    def _fold(self) -> None:
        for sr in self._stages:
            sr.metrics.fold()
        self._ledger.latency.fold()

    async def __aexit__(self, et: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None or isinstance(exc, Exception):
            await self.drain()
        else:
            # Cancelled or interrupted: stop now; every caller still gets an answer.
            await self._shutdown(exc)

    async def drain(self) -> None:
        """Stop intake, finish every admitted item, then stop the workers.

        ``submit`` and ``map`` raise ``PipelineClosed`` from the moment this
        is called. Items already admitted (including partial batches and items
        waiting for a retry) all finish before it returns.
        """
        if self._state in ("closing", "closed"):
            if self._drained is not None:
                await asyncio.shield(self._drained)
            return
        self._state = "closing"
        if self._workers is not None:
            self._workers.flush(self._stages)  # batches held open go now
        self._drained = drained = self._ledger.wait_settled()
        answered = self._ledger.wait_answered()
        await self._stop_feeders()
        self._ledger.check_settled()
        try:
            await asyncio.wait((drained, answered), return_when=asyncio.FIRST_COMPLETED)
            if not drained.done():
                # Every caller has its answer, but calls still hold pieces of
                # answered (cancelled or expired) items: give them a moment,
                # then stop waiting for work nobody will read (an async call
                # may never end, e.g. one waiting for a Ray actor that the
                # cluster cannot place).
                await asyncio.wait((drained,), timeout=ABANDONED_GRACE)
                if not drained.done():
                    self._cancel_abandoned_calls()
        except asyncio.CancelledError as exc:
            await self._shutdown(exc)
            raise
        await self._shutdown(None)

    def _cancel_abandoned_calls(self) -> None:
        busy = [t for t in self._worker_tasks if not t.done()]
        log.info(
            "pipeline %r: every caller is answered; cancelling %d worker(s) still in calls "
            "for answered items",
            self.name,
            len(busy),
        )
        for task in busy:
            task.cancel()

    async def _stop_feeders(self) -> None:
        for task in list(self._feeders):
            task.cancel()
        if self._feeders:
            await asyncio.gather(*self._feeders, return_exceptions=True)

    async def _shutdown(self, exc: BaseException | None) -> None:
        if self._state == "closed":
            return
        self._state = "closing"
        if exc is not None:
            self._aborted = exc
            await self._stop_feeders()
            self._fail_all(PipelineClosed(f"pipeline {self.name!r} was stopped: {exc!r}"))
        for sr in self._stages:
            sr.inq.close()
        if self.limiter is not None:
            self.limiter.total = math.inf  # wake every waiter: the closed queue refuses it
        if self._folder is not None:
            self._folder.cancel()
        for task in self._scalers:
            task.cancel()
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                if exc is not None:
                    await tg.__aexit__(type(exc), exc, exc.__traceback__)
                else:
                    await tg.__aexit__(None, None, None)
        finally:
            self._ledger.cancel_timers()
            for sr in self._stages:
                with contextlib.suppress(Exception):
                    await asyncio.shield(sr.executor.stop())
            self._state = "closed"
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)

    def _fail_all(self, err: BaseException) -> None:
        self._ledger.fail_all(err)
        for col in self._collectors:
            col.error = col.error or err
            col.input_done = True
            col.wake()
            col.wake_feeder()

    async def _guard(self, coro: Any) -> None:
        """Run a worker loop; if it breaks (a bug), fail everything, never hang."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            err = PipelineClosed(f"pipeline {self.name!r} stopped by an internal error: {exc!r}")
            err.__cause__ = exc
            self._aborted = exc
            self._fail_all(err)
            ledger = self._ledger
            ledger.live = 0
            ledger.admitting = 0
            ledger.check_settled()
            raise

    # ------------------------------------------------------------- intake

    def _check_open(self) -> None:
        if self._state != "open":
            if self._state == "new":
                raise PipelineClosed(
                    f"pipeline {self.name!r} is not open; use 'async with pipeline.open() as runner'"
                )
            raise PipelineClosed(f"pipeline {self.name!r} is closed to new items")

    def _new_root(self, value: Any, timeout: float | None) -> Item:
        root = Item(value, self._clock())
        if timeout is not None:
            if not isinstance(timeout, int | float) or timeout <= 0:
                raise ValueError(f"timeout must be a number > 0, got {timeout!r}")
            assert self._loop is not None
            root.deadline = self._loop.time() + timeout
        return root

    async def submit(self, item: Any, timeout: float | None = None) -> Any:
        """Run ``item`` through the pipeline and return its result.

        Waits for room when the first queue is full. With ``timeout``
        (seconds, counted from this call) it raises ``DeadlineExceeded`` once
        that has passed, wherever the item is; the item is dropped before its
        next stage. Cancelling the call removes the item from the work ahead.
        Raises ``ItemFailed`` when a stage fails it (also when the first
        stage's batch cost function fails on it).
        """
        self._check_open()
        root = self._new_root(item, timeout)
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        root.sink = FutureSink(fut).__call__  # bound: an inlined call
        ledger = self._ledger
        if not ledger.admit_nowait(root, True):
            await ledger.admit_when_room(root, timeout)
        ledger.arm(root, fut, timeout, watch=False)
        try:
            return await fut
        except asyncio.CancelledError:
            ledger.cancel_root(root)  # this caller went away: drop the item
            raise

    def submit_nowait(self, item: Any, timeout: float | None = None) -> asyncio.Future[Any]:
        """Admit ``item`` now or raise ``Overloaded``; returns a future of its result.

        Raises ``Overloaded`` when the first queue is full or
        ``max_in_flight`` items are in flight (counted in
        ``stats().rejected``). Cancelling the future removes the item from
        the work ahead. An item
        the first stage's batch cost function fails on is admitted failed:
        its future holds the ``ItemFailed``.
        """
        self._check_open()
        root = self._new_root(item, timeout)
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        root.sink = FutureSink(fut).__call__  # bound: an inlined call
        if not self._ledger.admit_nowait(root, False):
            self._rejected += 1
            raise self._overloaded(1)
        self._ledger.arm(root, fut, timeout)
        return fut

    def admit_many_nowait(
        self, items: Sequence[Any], timeout: float | None = None
    ) -> list[asyncio.Future[Any]]:
        """Admit every one of ``items`` now, or none and raise ``Overloaded``.

        :meth:`submit_nowait` for a request of many items, which is admitted
        whole or not at all: ``len(items)`` places of ``max_in_flight`` are
        taken in one go (a refusal counts ``len(items)`` in
        ``stats().rejected``). Returns one future per item, in order;
        ``timeout`` as for ``submit_nowait``.
        """
        self._check_open()
        roots, futs = self._new_roots(items, timeout)
        if roots and not self._ledger.admit_all_nowait(roots):
            self._rejected += len(roots)
            raise self._overloaded(len(roots))
        for root, fut in zip(roots, futs, strict=True):
            self._ledger.arm(root, fut, timeout)
        return futs

    async def admit_many(
        self, items: Sequence[Any], timeout: float | None = None
    ) -> list[asyncio.Future[Any]]:
        """Admit every one of ``items``, waiting in line for all their places.

        The waiting twin of :meth:`admit_many_nowait` (for work that can
        wait: a job, a stream): it queues in ``max_in_flight``'s line, first
        come first served, until ``len(items)`` places are free at once, and
        returns one future per item. ``timeout`` counts from admission (the
        wait in line is not counted; wrap the call in ``asyncio.timeout`` to
        bound it). Cancelled while waiting, it admits nothing.
        """
        self._check_open()
        limiter = self.limiter
        if limiter is not None and len(items) > self._most_at_once(limiter):
            raise ValueError(
                f"{len(items)} items can never be admitted at once: "
                + self._limit_text(limiter)
            )
        roots, futs = self._new_roots(items, timeout)
        await self._ledger.admit_all_when_room(roots, timeout)
        for root, fut in zip(roots, futs, strict=True):
            self._ledger.arm(root, fut, timeout)
        return futs

    def _new_roots(
        self, items: Sequence[Any], timeout: float | None
    ) -> tuple[list[Item], list[asyncio.Future[Any]]]:
        assert self._loop is not None
        roots: list[Item] = []
        futs: list[asyncio.Future[Any]] = []
        for value in items:
            root = self._new_root(value, timeout)
            fut: asyncio.Future[Any] = self._loop.create_future()
            root.sink = FutureSink(fut).__call__  # bound: an inlined call
            roots.append(root)
            futs.append(fut)
        return roots, futs

    def _most_at_once(self, limiter: CapacityLimiter) -> float:
        """The most items one request can always be admitted with."""
        return limiter.total if self.admission is None else self.admission.controller.floor

    def _limit_text(self, limiter: CapacityLimiter) -> str:
        if self.admission is None:
            return f"max_in_flight={_fmt_limit(limiter.total)}"
        ctl = self.admission.controller
        return (
            f"the in-flight limit is {_fmt_limit(limiter.total)}, never below {ctl.floor} "
            f"(kept for latency_target={ctl.target:.3g}s)"
        )

    def _overloaded(self, n: int) -> Overloaded:
        """The error for ``n`` items refused now: what is full, and how full."""
        limiter = self.limiter
        first = self._stages[0]
        if limiter is not None and first.inq.maxsize - len(first.inq) >= n:
            return Overloaded(
                f"pipeline {self.name!r} is full: {limiter.borrowed} items are in "
                f"flight ({self._limit_text(limiter)}); retry later"
            )
        return Overloaded(
            f"pipeline {self.name!r} is full: {len(first.inq)} items are waiting at "
            f"stage {first.name!r} (queue_size={first.inq.maxsize}); retry later"
        )

    def map(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool = True,
        return_exceptions: bool = False,
        window: int | None = None,
        progress: bool = False,
        checkpoint: str | os.PathLike[str] | Checkpoint | None = None,
        fresh: bool = False,
    ) -> AsyncIterator[Any]:
        """Run every item of a sync or async iterable; yield the results.

        Items are pulled only as fast as results are consumed (at most
        ``window`` are inside the pipeline or waiting to be yielded), so an
        endless generator runs in flat memory. ``ordered=True`` yields in
        input order; ``ordered=False`` as results complete. A failed item
        raises its ``ItemFailed`` (stopping the map) unless
        ``return_exceptions=True``, which yields the error in its place.
        ``progress=True`` shows a progress bar (rich) while results come
        (with a total when ``items`` has a length), as ``pipe.run`` does.

        ``checkpoint`` (a path, or a :class:`flowbatch.bulk.Checkpoint`):
        a resumable map. ``items`` are keyed records (a source of
        ``flowbatch.bulk``; other values are keyed by position); keys the
        checkpoint holds are skipped, and a key is recorded once its result
        is out (so the last stage should be the one that stores it).
        Results come in input order; ``fresh=True`` forgets the checkpoint.
        """
        self._check_open()
        if not isinstance(items, Iterable | AsyncIterable):
            raise TypeError(f"map() needs an iterable or async iterable, got {type(items).__name__}")
        size = window if window is not None else self.window
        if size < 1:
            raise ValueError(f"window must be >= 1, got {window!r}")
        if checkpoint is not None:
            from .bulk.job import checkpointed_map

            results = checkpointed_map(
                self, items, checkpoint, fresh=fresh, return_exceptions=return_exceptions,
                window=size,
            )
        else:
            results = self._map(items, ordered, return_exceptions, size)
        if not progress:
            return results
        total: int | None = None
        with contextlib.suppress(TypeError):
            total = len(items)  # type: ignore[arg-type]
        return self._with_progress(results, total)

    async def _with_progress(
        self, results: AsyncIterator[Any], total: int | None
    ) -> AsyncIterator[Any]:
        from rich.progress import Progress

        try:
            with Progress(transient=False) as bar:
                task = bar.add_task(self.name, total=total)
                async for r in results:
                    bar.advance(task)
                    yield r
        finally:
            await results.aclose()  # type: ignore[attr-defined]

    async def _map(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        ordered: bool,
        return_exceptions: bool,
        window: int,
    ) -> AsyncIterator[Any]:
        assert self._loop is not None
        col = Collector(ordered)
        self._collectors.add(col)
        feeder = self._loop.create_task(self._feed(items, col, window))
        self._feeders.add(feeder)
        by_index = col.by_index
        ready = col.ready
        try:
            while True:
                if ordered:
                    got = by_index.pop(col.next_index, None)
                    if got is not None:
                        col.next_index += 1
                else:
                    got = ready.popleft() if ready else None
                if got is not None:
                    col.outstanding -= 1
                    if col.feeder_waiter is not None:
                        col.wake_feeder()
                    value, exc = got
                    if exc is not None:
                        if not return_exceptions:
                            raise exc
                        yield exc
                    else:
                        yield value
                    continue
                if col.input_done and col.outstanding == 0:
                    if col.error is not None:
                        raise col.error
                    return
                if col.error is not None and self._aborted is not None:
                    raise col.error
                col.waiter = self._loop.create_future()
                await col.waiter
        finally:
            col.closed = True
            feeder.cancel()
            await asyncio.wait([feeder])
            self._feeders.discard(feeder)
            self._collectors.discard(col)
            self._forget(col)

    def _forget(self, col: Collector) -> None:
        """A map stopped early: its items not yet answered are dropped before
        their next stage (wherever they are: queued, held by a worker, in a
        call or waiting for a retry)."""
        ledger = self._ledger
        for root in [r for r in ledger.roots if getattr(r.sink, "__self__", None) is col]:
            ledger.cancel_root(root)

    async def _feed(
        self, items: Iterable[Any] | AsyncIterable[Any], col: Collector, window: int
    ) -> None:
        """Read the map's input, admitting each item while the window has room.

        A sync input is read in chunks (up to ``FEED_CHUNK`` items, within
        the window) admitted in one :meth:`Ledger.admit_all_nowait` call; an
        async one item by item (its next item may take a while to come).
        """
        assert self._loop is not None
        loop = self._loop
        clock = self._clock
        ledger = self._ledger
        admit_nowait = ledger.admit_nowait
        # The bound method, not the instance: a call the interpreter inlines.
        sink = col.__call__
        it: Any = aiter(items) if isinstance(items, AsyncIterable) else iter(items)
        is_async = isinstance(items, AsyncIterable)
        chunk: list[Any] = []
        failed: BaseException | None = None  # the input's own error, after what it gave
        exhausted = False
        try:
            while not exhausted:
                while col.outstanding >= window:
                    col.feeder_waiter = loop.create_future()
                    await col.feeder_waiter
                if is_async:
                    try:
                        chunk.append(await anext(it))
                    except StopAsyncIteration:
                        break
                else:
                    want = min(window - col.outstanding, FEED_CHUNK)
                    try:
                        chunk.extend(islice(it, want))  # keeps what came before an error
                    except BaseException as exc:
                        failed = exc
                        exhausted = True
                    else:
                        exhausted = len(chunk) < want
                    if not chunk:
                        break
                if self._state != "open":
                    raise PipelineClosed(
                        f"pipeline {self.name!r} closed before all of the map's input was read"
                    )
                now = clock()
                index = col.admitted
                roots = []
                for value in chunk:
                    root = Item(value, now)
                    root.sink = sink
                    root.index = index
                    index += 1
                    roots.append(root)
                chunk.clear()
                if ledger.admit_all_nowait(roots, True):
                    col.admitted = index
                    col.outstanding += len(roots)
                    continue
                for root in roots:  # no room for all at once: one by one, waiting
                    if not admit_nowait(root, True):
                        await ledger.admit_when_room(root, None)
                    col.admitted += 1
                    col.outstanding += 1
            if failed is not None:
                raise failed
        except asyncio.CancelledError:
            if not col.closed and col.error is None:
                col.error = PipelineClosed(
                    f"pipeline {self.name!r} closed before all of the map's input was read"
                )
            raise
        except ChannelClosed:
            col.error = PipelineClosed(f"pipeline {self.name!r} closed during map")
        except BaseException as exc:
            # The input itself failed: results so far are yielded, then this.
            col.error = exc
        finally:
            col.input_done = True
            col.wake()

    # ---------------------------------------------------------- statistics

    def stats(self) -> PipelineStats:
        """An immutable snapshot of the pipeline's and each stage's figures."""
        now = self._clock()
        elapsed = now - self._t_open if self._t_open else 0.0
        stages = tuple(self._stage_stats(sr, now, elapsed) for sr in self._stages)
        led = self._ledger
        busy_span = (led.t_last or now) - led.t_first if led.t_first else 0.0
        return PipelineStats(
            name=self.name,
            elapsed=elapsed,
            submitted=led.submitted,
            completed=led.completed,
            failed=led.failed,
            expired=led.expired,
            cancelled=led.cancelled,
            rejected=self._rejected,
            in_flight=led.submitted - led.completed - led.failed - led.expired - led.cancelled,
            items_per_s=led.completed / busy_span if busy_span > 0 else 0.0,
            latency=led.latency.summary(),
            stages=stages,
            bottleneck=find_bottleneck(stages),
            in_flight_limit=self.limiter.total if self.limiter is not None else None,
            latency_target=(
                self.admission.controller.target or None if self.admission is not None else None
            ),
        )

    @staticmethod
    def _stage_stats(sr: StageRun, now: float, elapsed: float) -> StageStats:
        snap = sr.metrics.snapshot(now, elapsed, len(sr.inq))
        ex = sr.executor
        if isinstance(ex, DeviceExecutor):
            snap = dataclasses.replace(snap, devices=ex.device_stats())
        if sr.scaler is not None:
            snap = dataclasses.replace(snap, replicas=sr.scaler.replicas)
        if ex.restarts or ex.pending:
            return dataclasses.replace(snap, restarts=ex.restarts, pending=ex.pending)
        return snap

    @property
    def closed(self) -> bool:
        """True once the runner no longer accepts items."""
        return self._state != "open"


def _fmt_limit(total: float) -> str:
    return "unlimited" if total == math.inf else str(int(total))
