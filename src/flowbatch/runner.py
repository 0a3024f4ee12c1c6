"""The runner: a started pipeline with its queues, workers and executors.

Every front end drives this one surface::

    async with pipeline.open() as runner:
        y = await runner.submit(x, timeout=2.0)
        async for y in runner.map(xs): ...
        print(runner.stats().bottleneck)

How an item travels: it is wrapped in an ``Item`` envelope (envelope.py) and
put in the bounded channel of the first stage. Each stage has ``concurrency`` worker
tasks ("slots") that take items (or batches) from their channel, run the
stage function through the stage's executor, and put the results in the next
stage's channel. The last stage resolves the item's caller. A deadline, a
cancellation or a failure marks the item's root as done; its pieces still in
the pipeline are dropped at the next stage boundary, so no work is done for
a caller who has gone.

Invariant behind "nothing lost": ``_live`` counts envelopes inside the engine
(in a channel, in a call, or waiting for a retry). Every path that removes
one decrements it, and draining waits for it to reach zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

from .batching import LINGER_GAP, LINGER_SHARE, pick_batch
from .channel import Channel, ChannelClosed
from .envelope import Collector, FutureSink, Item
from .errors import (
    BatchContractError,
    DeadlineExceeded,
    ItemFailed,
    Overloaded,
    PipelineClosed,
)
from .executors import (
    CallTimedOut,
    Executor,
    Unpicklable,
    make_executor,
    materialize,
    materialize_each,
)
from .hooks import Hooks, call_hook
from .metrics import Histogram, PipelineStats, StageMetrics, find_bottleneck

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .stage import Stage

__all__ = ["DEFAULT_QUEUE_SIZE", "Runner"]

log = logging.getLogger("flowbatch")
log.addHandler(logging.NullHandler())

DEFAULT_QUEUE_SIZE = 1024
# Seconds between folds of timing samples into histograms.
FOLD_INTERVAL = 0.25


class _StageRun:
    """A stage at run time: its channel, executor, metrics and successor."""

    __slots__ = (
        "batch",
        "call",
        "cost",
        "direct",
        "executor",
        "fan_out",
        "inq",
        "metrics",
        "name",
        "next",
        "retry",
        "spec",
        "svc",
    )

    def __init__(self, spec: Stage, queue_size: int, hooks: Hooks | None) -> None:
        self.spec = spec
        self.name = spec.name
        self.batch = spec.batch
        self.retry = spec.retry
        self.fan_out = spec.fan_out
        self.cost = spec.batch.cost if spec.batch is not None else None
        # Recent batch service time (seconds, moving average): sizes the linger.
        self.svc = 0.0
        size = queue_size
        if spec.batch is not None:
            # Room for every worker's next full batch, so batches can fill.
            size = max(size, 2 * spec.batch.max_size * spec.concurrency)
        self.inq: Channel[Item] = Channel(size)
        self.metrics = StageMetrics(
            spec.name,
            spec.executor,
            spec.concurrency,
            spec.batch.max_size if spec.batch is not None else 0,
        )
        self.next: _StageRun | None = None
        post: Callable[[Any], Any] | None = None
        if spec.fan_out and spec.executor != "async":
            post = materialize_each if spec.batch is not None else materialize
        self.executor: Executor = make_executor(
            spec.executor,
            spec.fn,
            spec.concurrency,
            spec.name,
            post=post,
            activate=hooks.activate if hooks is not None else None,
        )
        timeout = spec.timeout
        # An async function without a timeout is awaited as is: no wrapper.
        self.direct = (
            spec.executor == "async"
            and timeout is None
            and not getattr(self.executor, "_agen", False)
        )
        if self.direct and hooks is None:
            self.call: Callable[[Any], Any] = spec.fn
        else:
            ex = self.executor

            def call(arg: Any) -> Any:
                return ex.call(arg, timeout)

            self.call = call


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _describe(x: Any) -> str:
    try:
        return f"{type(x).__name__} of length {len(x)}"
    except TypeError:
        return type(x).__name__


class Runner:
    """A started pipeline. Get one from ``Pipeline.open()``; use it as
    ``async with``. Leaving the block drains: every admitted item finishes."""

    def __init__(
        self,
        pipeline: Pipeline,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        window: int | None = None,
        hooks: Hooks | None = None,
    ) -> None:
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
        self._stages: list[_StageRun] = []
        self._hooks = hooks
        self._ids = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._folder: asyncio.Task[None] | None = None
        self._state = "new"  # new -> open -> closing -> closed
        self._aborted: BaseException | None = None
        self._live = 0
        self._admitting = 0
        self._drained: asyncio.Future[None] | None = None
        self._roots: set[Item] = set()
        self._feeders: set[asyncio.Task[None]] = set()
        self._collectors: set[Collector] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._submitted = 0
        self._completed = 0
        self._failed = 0
        self._cancelled = 0
        self._t_open = 0.0
        self._t_first = 0.0
        self._t_last = 0.0
        self._expired_n = 0
        self._latency = Histogram()

    # ------------------------------------------------------------ lifetime

    async def __aenter__(self) -> Runner:
        if self._state != "new":
            raise RuntimeError("a Runner can be opened once; call pipeline.open() again")
        self._loop = asyncio.get_running_loop()
        if self._hooks is not None:
            self._hooks.bind(self.name)
            if not getattr(self._hooks, "enabled", True):
                self._hooks = None  # installed but switched off: keep the fast path
        self._stages = [_StageRun(s, self.queue_size, self._hooks) for s in self.pipeline.stages]
        for a, b in zip(self._stages, self._stages[1:], strict=False):
            a.next = b
        started: list[_StageRun] = []
        try:
            for sr in self._stages:
                await sr.executor.start()
                started.append(sr)
        except BaseException:
            for sr in reversed(started):
                with contextlib.suppress(Exception):
                    await sr.executor.stop()
            self._state = "closed"
            raise
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        for sr in self._stages:
            loop_fn = self._run_batched if sr.batch is not None else self._run_single
            for slot in range(sr.spec.concurrency):
                self._tg.create_task(self._guard(loop_fn(sr, slot)))
        self._folder = self._tg.create_task(self._fold_periodically())
        self._t_open = perf_counter()
        self._state = "open"
        return self

    async def _fold_periodically(self) -> None:
        """Fold timing samples into histograms now and then, so that their
        buffers stay small however fast items flow."""
        while True:
            await asyncio.sleep(FOLD_INTERVAL)
            self._fold()

    def _fold(self) -> None:
        for sr in self._stages:
            sr.metrics.fold()
        self._latency.fold()

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
        loop = asyncio.get_running_loop()
        self._drained = loop.create_future()
        for sr in self._stages:
            sr.inq.poke()  # batches held open by max_wait go now
        await self._stop_feeders()
        self._check_drained()
        try:
            await asyncio.shield(self._drained)
        except asyncio.CancelledError as exc:
            await self._shutdown(exc)
            raise
        await self._shutdown(None)

    async def _stop_feeders(self) -> None:
        for task in list(self._feeders):
            task.cancel()
        if self._feeders:
            await asyncio.gather(*self._feeders, return_exceptions=True)

    def _check_drained(self) -> None:
        if (
            self._state == "closing"
            and not self._live
            and not self._admitting
            and self._drained is not None
            and not self._drained.done()
        ):
            self._drained.set_result(None)

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
        if self._folder is not None:
            self._folder.cancel()
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                if exc is not None:
                    await tg.__aexit__(type(exc), exc, exc.__traceback__)
                else:
                    await tg.__aexit__(None, None, None)
        finally:
            for handle in self._timers:
                handle.cancel()
            self._timers.clear()
            for sr in self._stages:
                with contextlib.suppress(Exception):
                    await asyncio.shield(sr.executor.stop())
            self._state = "closed"
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)

    def _fail_all(self, err: BaseException) -> None:
        for root in list(self._roots):
            self._resolve(root, None, err)
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
            self._live = 0
            self._admitting = 0
            self._check_drained()
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
        now = perf_counter()
        root = Item(value, now)
        if timeout is not None:
            if not isinstance(timeout, int | float) or timeout <= 0:
                raise ValueError(f"timeout must be a number > 0, got {timeout!r}")
            assert self._loop is not None
            root.deadline = self._loop.time() + timeout
        self._price(root)
        return root

    def _price(self, root: Item) -> None:
        """Compute the first stage's batch cost before admission; a failing
        cost function fails this call alone."""
        first = self._stages[0]
        if first.cost is not None:
            try:
                root.cost = float(first.cost(root.value))
            except Exception as exc:
                raise ItemFailed(first.name, 1, exc) from exc

    def _admitted(self, root: Item) -> None:
        self._ids += 1
        root.id = self._ids
        if self._hooks is not None:
            root.trace = call_hook(self._hooks.admitted, root)
        self._live += 1
        self._submitted += 1
        self._roots.add(root)
        if not self._t_first:
            self._t_first = root.t0

    def _arm(self, root: Item, fut: asyncio.Future[Any], timeout: float | None) -> None:
        """Attach the deadline timer and cancellation to a submitted item."""
        loop = self._loop
        assert loop is not None
        if root.deadline is not None:
            handle = loop.call_at(root.deadline, self._expire, root, timeout)
            self._timers.add(handle)

            def disarm(_: asyncio.Future[Any]) -> None:
                handle.cancel()
                self._timers.discard(handle)

            fut.add_done_callback(disarm)
        fut.add_done_callback(lambda f: self._cancel_root(root) if f.cancelled() else None)

    def _expire(self, root: Item, timeout: float | None) -> None:
        self._resolve(
            root, None, DeadlineExceeded(f"item did not finish within its timeout of {timeout}s")
        )

    def _cancel_root(self, root: Item) -> None:
        if not root.done:
            root.done = True
            self._cancelled += 1
            self._roots.discard(root)
            if self._hooks is not None:
                call_hook(self._hooks.resolved, root, asyncio.CancelledError())

    async def submit(self, item: Any, timeout: float | None = None) -> Any:
        """Run ``item`` through the pipeline and return its result.

        Waits for room when the first queue is full. With ``timeout``
        (seconds, counted from this call) it raises ``DeadlineExceeded`` once
        that has passed, wherever the item is; the item is dropped before its
        next stage. Cancelling the call removes the item from the work ahead.
        Raises ``ItemFailed`` when a stage fails it.
        """
        self._check_open()
        root = self._new_root(item, timeout)
        loop = self._loop
        assert loop is not None
        fut: asyncio.Future[Any] = loop.create_future()
        root.sink = FutureSink(fut)
        ch = self._stages[0].inq
        if not ch.put_nowait(root):
            await self._wait_for_room(ch, root, timeout)
        self._admitted(root)
        self._arm(root, fut, timeout)
        return await fut

    async def _wait_for_room(self, ch: Channel[Item], root: Item, timeout: float | None) -> None:
        """Put ``root`` in the first queue once there is room (within its deadline)."""
        self._admitting += 1
        try:
            if root.deadline is None:
                await ch.put(root)
            else:
                try:
                    async with asyncio.timeout_at(root.deadline):
                        await ch.put(root)
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"no room in pipeline {self.name!r} within the timeout of {timeout}s"
                    ) from None
        except ChannelClosed:
            self._admitting -= 1
            raise PipelineClosed(
                f"pipeline {self.name!r} closed before the item was admitted"
            ) from None
        except BaseException:
            self._admitting -= 1
            self._check_drained()  # a drain may be waiting for this caller alone
            raise
        # Admitted: _admitted() counts it as live before anyone checks for drained.
        self._admitting -= 1

    def submit_nowait(self, item: Any, timeout: float | None = None) -> asyncio.Future[Any]:
        """Admit ``item`` now or raise ``Overloaded``; returns a future of its result.

        Cancelling the future removes the item from the work ahead.
        """
        self._check_open()
        root = self._new_root(item, timeout)
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        root.sink = FutureSink(fut)
        first = self._stages[0]
        if not first.inq.put_nowait(root):
            raise Overloaded(
                f"pipeline {self.name!r} is full: {len(first.inq)} items are waiting at "
                f"stage {first.name!r} (queue_size={first.inq.maxsize}); retry later"
            )
        self._admitted(root)
        self._arm(root, fut, timeout)
        return fut

    def map(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool = True,
        return_exceptions: bool = False,
        window: int | None = None,
    ) -> AsyncIterator[Any]:
        """Run every item of a sync or async iterable; yield the results.

        Items are pulled only as fast as results are consumed (at most
        ``window`` are inside the pipeline or waiting to be yielded), so an
        endless generator runs in flat memory. ``ordered=True`` yields in
        input order; ``ordered=False`` as results complete. A failed item
        raises its ``ItemFailed`` (stopping the map) unless
        ``return_exceptions=True``, which yields the error in its place.
        """
        self._check_open()
        if not isinstance(items, Iterable | AsyncIterable):
            raise TypeError(f"map() needs an iterable or async iterable, got {type(items).__name__}")
        size = window if window is not None else self.window
        if size < 1:
            raise ValueError(f"window must be >= 1, got {window!r}")
        return self._map(items, ordered, return_exceptions, size)

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
        try:
            while True:
                if ordered:
                    got = col.by_index.pop(col.next_index, None)
                    if got is not None:
                        col.next_index += 1
                else:
                    got = col.ready.popleft() if col.ready else None
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
        """A map stopped early: its items still queued are dropped unrun."""
        for sr in self._stages:
            for item in sr.inq.items:
                root = item.root
                if root.sink is col and not root.done:
                    self._cancel_root(root)

    async def _feed(
        self, items: Iterable[Any] | AsyncIterable[Any], col: Collector, window: int
    ) -> None:
        assert self._loop is not None
        loop = self._loop
        ch = self._stages[0].inq
        priced = self._stages[0].cost is not None

        q = ch.items
        qmax = ch.maxsize
        getters = ch.getters
        hooks = self._hooks
        closed = PipelineClosed(
            f"pipeline {self.name!r} closed before all of the map's input was read"
        )
        it: Any = aiter(items) if isinstance(items, AsyncIterable) else iter(items)
        is_async = isinstance(items, AsyncIterable)
        try:
            # Written out inline (no per-item coroutine): this is the hot path.
            while True:
                if is_async:
                    try:
                        value = await anext(it)
                    except StopAsyncIteration:
                        break
                else:
                    try:
                        value = next(it)
                    except StopIteration:
                        break
                while col.outstanding >= window:
                    col.feeder_waiter = loop.create_future()
                    await col.feeder_waiter
                if self._state != "open":
                    raise closed
                root = Item(value, perf_counter())
                root.sink = col
                root.index = col.admitted
                self._ids += 1
                root.id = self._ids
                if hooks is not None:
                    root.trace = call_hook(hooks.admitted, root)
                if priced:
                    try:
                        self._price(root)
                    except ItemFailed as err:
                        col.admitted += 1
                        col.outstanding += 1
                        self._submitted += 1
                        self._failed += 1
                        if hooks is not None:
                            call_hook(hooks.resolved, root, err)
                        col(root, None, err)
                        continue
                if len(q) < qmax:
                    q.append(root)
                    if getters:
                        ch.wake_getter()
                else:
                    await ch.put(root)
                col.admitted += 1
                col.outstanding += 1
                self._live += 1
                self._submitted += 1
                if not self._t_first:
                    self._t_first = root.t0
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

    # ------------------------------------------------------------- outcome

    def _resolve(self, root: Item, value: Any, exc: BaseException | None) -> None:
        if root.done:
            return
        root.done = True
        self._roots.discard(root)
        if exc is None:
            self._completed += 1
            now = perf_counter()
            self._t_last = now
            self._latency.buf.append(now - root.t0)
        elif isinstance(exc, DeadlineExceeded):
            self._expired_n += 1
        else:
            self._failed += 1
        if self._hooks is not None:
            call_hook(self._hooks.resolved, root, exc)
        assert root.sink is not None
        root.sink(root, value, exc)

    def _deliver(self, item: Item, value: Any) -> None:
        """``item`` has its final value: hand it to its parent or caller."""
        while True:
            parent = item.parent
            if parent is None:
                self._resolve(item, value, None)
                return
            results = parent.results
            assert results is not None
            results[item.index] = value
            parent.pending -= 1
            if parent.pending:
                return
            item, value = parent, results

    def _left(self, n: int = 1) -> None:
        self._live -= n
        if not self._live and self._state == "closing":
            self._check_drained()

    def _drop(self, sr: _StageRun, item: Item) -> None:
        sr.metrics.dropped += 1
        self._left()

    def _expired(self, sr: _StageRun, item: Item) -> None:
        self._resolve(
            item.root,
            None,
            DeadlineExceeded(f"item's deadline passed before stage {sr.name!r}"),
        )
        sr.metrics.expired += 1
        self._left()

    def _log_fields(self, sr: _StageRun, item: Item) -> dict[str, Any]:
        """The record attributes every engine log line about an item carries."""
        return {"pipeline": self.name, "stage": sr.name, "item": item.id, "attempt": item.attempt}

    def _fail(self, sr: _StageRun, item: Item, exc: BaseException) -> None:
        sr.metrics.failed += 1
        err = exc if isinstance(exc, ItemFailed) else ItemFailed(sr.name, item.attempt, exc)
        if not item.root.done and not isinstance(exc, PipelineClosed):
            # INFO, not WARNING: the caller gets this error; a front end
            # decides whether it is worth a warning (a client's bad input is not).
            log.info(
                "item %s failed in stage %r (attempt %d): %s: %s",
                item.id,
                sr.name,
                item.attempt,
                type(exc).__name__,
                exc,
                extra=self._log_fields(sr, item),
            )
        self._resolve(item.root, None, err)
        self._left()

    def _on_error(self, sr: _StageRun, item: Item, exc: BaseException) -> None:
        """A call failed for ``item``: retry it or fail it for good."""
        if (
            not item.root.done
            and not isinstance(exc, Unpicklable)
            and sr.retry.should_retry(exc, item.attempt)
        ):
            sr.metrics.retried += 1
            delay = sr.retry.delay(item.attempt)
            log.debug(
                "item %s will retry stage %r in %.3fs (attempt %d failed: %s: %s)",
                item.id,
                sr.name,
                delay,
                item.attempt,
                type(exc).__name__,
                exc,
                extra=self._log_fields(sr, item),
            )
            item.attempt += 1
            if delay <= 0:
                sr.inq.put_force(item)
            else:
                assert self._loop is not None
                handle: asyncio.TimerHandle | None = None

                def again() -> None:
                    self._timers.discard(handle)
                    item.t_enq = perf_counter()
                    sr.inq.put_force(item)

                handle = self._loop.call_later(delay, again)
                self._timers.add(handle)
            return
        self._fail(sr, item, exc)

    def _set_cost(self, sr: _StageRun, item: Item) -> bool:
        assert sr.cost is not None
        try:
            item.cost = float(sr.cost(item.value))
        except Exception as exc:
            self._fail(sr, item, exc)
            return False
        return True

    async def _advance(self, sr: _StageRun, item: Item, out: Any, now: float) -> None:
        """``item`` passed ``sr`` with result ``out``: move it on."""
        if sr.fan_out:
            await self._fan_out(sr, item, out, now)
            return
        nxt = sr.next
        if nxt is None:
            self._left()
            self._deliver(item, out)
            return
        item.value = out
        item.attempt = 1
        item.t_enq = now
        if nxt.cost is not None and not self._set_cost(nxt, item):
            return
        if not nxt.inq.put_nowait(item):
            await nxt.inq.put(item)

    async def _fan_out(self, sr: _StageRun, item: Item, out: Any, now: float) -> None:
        try:
            children = out if isinstance(out, list) else materialize(out)
        except Exception as exc:
            sr.metrics.done -= 1
            self._fail(sr, item, exc)
            return
        n = len(children)
        if n == 0:
            self._left()
            self._deliver(item, [])
            return
        item.results = [None] * n
        item.pending = n
        self._live += n - 1  # the parent is replaced by its children
        nxt = sr.next
        root = item.root
        for i, value in enumerate(children):
            if root.done:
                self._left(n - i)  # the caller is gone: make no more children
                return
            child = item.child(value, i, now)
            if nxt is None:
                self._left()
                self._deliver(child, value)
            elif nxt.cost is None or self._set_cost(nxt, child):
                if not nxt.inq.put_nowait(child):
                    await nxt.inq.put(child)

    # -------------------------------------------------------------- workers

    async def _call_hooked(
        self, sr: _StageRun, items: list[Item], arg: Any, batch: bool
    ) -> Any:
        """A stage call wrapped in the hooks' started / carrier / ended.

        The hook calls are written out (not through ``call_hook``) because
        this runs once per stage call; a hook's own error is logged, never
        raised into the item.
        """
        hooks = self._hooks
        assert hooks is not None
        state = carrier = None
        try:
            state = hooks.started(sr, items, batch)
            carrier = hooks.carrier(state)
        except Exception:
            log.exception("flowbatch hook failed before stage %r", sr.name)
        try:
            if carrier is None and sr.direct:
                out = await sr.spec.fn(arg)
            else:
                out = await sr.executor.call(arg, sr.spec.timeout, carrier)
        except BaseException as exc:
            call_hook(hooks.ended, state, exc, None)
            raise
        errors = None
        if batch and isinstance(out, list) and any(isinstance(x, BaseException) for x in out):
            errors = [x if isinstance(x, BaseException) else None for x in out]
        try:
            hooks.ended(state, None, errors)
        except Exception:
            log.exception("flowbatch hook failed after stage %r", sr.name)
        return out

    async def _run_single(self, sr: _StageRun, slot: int) -> None:
        """One worker slot of an unbatched stage: one item per call.

        This loop is the engine's hot path, so it is written out inline: a
        slot that finds a backlog runs through it without suspending except
        inside the stage function or when the next queue is full.
        """
        ch = sr.inq
        q = ch.items
        putters = ch.putters
        m = sr.metrics
        running = m.running
        holding = m.holding
        served = m.service.buf.append
        waited = m.wait.buf.append
        call = sr.call
        nxt = sr.next
        fan_out = sr.fan_out
        hooks = self._hooks
        loop = self._loop
        assert loop is not None
        if nxt is not None:
            nch = nxt.inq
            nq = nch.items
            nmax = nch.maxsize
            ngetters = nch.getters
            ncost = nxt.cost
        while True:
            if not q:
                if not await ch.wait_nonempty():
                    return
            item = q.popleft()
            if putters:
                ch.taken()
            root = item.root
            if root.done:
                self._drop(sr, item)
                continue
            if root.deadline is not None and loop.time() >= root.deadline:
                self._expired(sr, item)
                continue
            t0 = perf_counter()
            running[slot] = t0
            holding[slot] = 1
            try:
                if hooks is None:
                    out = await call(item.value)
                else:
                    out = await self._call_hooked(sr, [item], item.value, False)
            except BaseException as exc:
                m.served(slot, t0, perf_counter())
                waited(t0 - item.t_enq)
                if isinstance(exc, asyncio.CancelledError) and _being_cancelled():
                    self._fail(sr, item, PipelineClosed(f"pipeline {self.name!r} was stopped"))
                    raise
                self._on_error(sr, item, exc)
                if isinstance(exc, CallTimedOut) and exc.pending is not None:
                    await asyncio.wait([exc.pending])
                continue
            t1 = perf_counter()
            running[slot] = 0.0
            holding[slot] = 0
            served(t1 - t0)
            waited(t0 - item.t_enq)
            m.done += 1
            if fan_out:
                await self._fan_out(sr, item, out, t1)
            elif nxt is None:
                self._live -= 1
                if not self._live and self._state == "closing":
                    self._check_drained()
                self._deliver(item, out)
            else:
                item.value = out
                item.attempt = 1
                item.t_enq = t1
                if ncost is not None and not self._set_cost(nxt, item):
                    continue
                # Channel.put inlined; it only waits when the next stage is full.
                if len(nq) < nmax:
                    nq.append(item)
                    if ngetters:
                        nch.wake_getter()
                else:
                    await nch.put(item)

    async def _run_batched(self, sr: _StageRun, slot: int) -> None:
        """One worker slot of a batched stage: takes what is waiting, up to the limit."""
        ch = sr.inq
        q = ch.items
        opts = sr.batch
        holding = sr.metrics.holding
        assert opts is not None
        assert self._loop is not None
        loop = self._loop
        last = 1  # this worker's previous batch: how many callers it just answered
        while True:
            if not q:
                if not await ch.wait_nonempty():
                    return
            if opts.max_wait > 0:
                if len(q) < opts.max_size and self._state == "open":
                    # Hold the batch open for more items; a drain flushes it at once.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(opts.max_wait):
                            while len(q) < opts.max_size and self._state == "open":
                                await ch.wait_put()
                    if not q:
                        continue
            elif len(q) < last and opts.linger != 0 and self._state == "open":
                await self._linger(sr, min(last, opts.max_size))
                if not q:
                    continue
            # Take a fair share of the stage's work (what waits plus what the
            # other workers hold), so that a burst keeps every replica busy and
            # replicas run batches of similar size: taking everything would
            # let one replica run huge batches while another cycles through
            # tiny ones, the worst of both on a model's cost curve.
            workers = len(holding)
            share = -(-(len(q) + sum(holding)) // workers) if workers > 1 else None
            picked = pick_batch(q, opts, share)
            ch.taken()
            if q and ch.getters:
                ch.wake_getter()
            batch: list[Item] = []
            now = loop.time()
            for item in picked:
                root = item.root
                if root.done:
                    self._drop(sr, item)
                elif root.deadline is not None and now >= root.deadline:
                    self._expired(sr, item)
                else:
                    batch.append(item)
            if batch:
                last = len(batch)
                await self._run_batch(sr, slot, batch, first=True)
                # Let the callers answered by this batch run (and submit their
                # next items) before this worker forms its next batch; else a
                # closed loop of callers sees a run of tiny batches.
                await asyncio.sleep(0)

    async def _linger(self, sr: _StageRun, want: int) -> None:
        """Under load: wait (briefly) for ``want`` items before taking a batch.

        The callers a batch answered usually send their next item at once, so
        they arrive in a burst just after the worker comes free; taking the
        one or two already waiting would run a near-empty batch (as costly as
        a full one on most models) while the burst waits behind it. Returns
        once ``want`` items wait, once no item has come for a gap, after the
        linger's bound, or when a drain begins.
        """
        opts = sr.batch
        assert opts is not None
        bound = opts.linger if opts.linger is not None else LINGER_SHARE * sr.svc
        if bound <= 0:
            return
        loop = self._loop
        assert loop is not None
        ch = sr.inq
        q = ch.items
        gap = bound * LINGER_GAP
        end = loop.time() + bound
        while len(q) < want and self._state == "open":
            left = end - loop.time()
            if left <= 0:
                return
            try:
                async with asyncio.timeout(min(gap, left)):
                    await ch.wait_put()
            except TimeoutError:
                return  # nothing came for a gap: the burst is over

    async def _run_batch(
        self, sr: _StageRun, slot: int, batch: list[Item], first: bool
    ) -> None:
        m = sr.metrics
        n = len(batch)
        t0 = perf_counter()
        if first:
            waited = m.wait.buf.append
            for item in batch:
                waited(t0 - item.t_enq)
        m.batch(n, [item.cost for item in batch] if sr.cost is not None else None)
        m.running[slot] = t0
        m.holding[slot] = n
        try:
            values = [item.value for item in batch]
            if self._hooks is None:
                outs = await sr.call(values)
            else:
                outs = await self._call_hooked(sr, batch, values, True)
        except BaseException as exc:
            m.served(slot, t0, perf_counter())
            if isinstance(exc, asyncio.CancelledError) and _being_cancelled():
                err = PipelineClosed(f"pipeline {self.name!r} was stopped")
                for item in batch:
                    self._fail(sr, item, err)
                raise
            if isinstance(exc, CallTimedOut) and exc.pending is not None:
                await asyncio.wait([exc.pending])
            if n > 1 and not isinstance(exc, PipelineClosed | DeadlineExceeded):
                # Split to find the item that breaks the batch; the rest succeed.
                half = n // 2
                await self._run_batch(sr, slot, batch[:half], first=False)
                await self._run_batch(sr, slot, batch[half:], first=False)
                return
            for item in batch:
                self._on_error(sr, item, exc)
            return
        t1 = perf_counter()
        m.served(slot, t0, t1)
        sr.svc = t1 - t0 if not sr.svc else sr.svc + 0.2 * (t1 - t0 - sr.svc)
        results = self._check_batch(sr, outs, n)
        if isinstance(results, BatchContractError):
            for item in batch:
                self._fail(sr, item, results)
            return
        for item, out in zip(batch, results, strict=True):
            if isinstance(out, Exception):
                self._on_error(sr, item, out)
            else:
                m.done += 1
                await self._advance(sr, item, out, t1)

    @staticmethod
    def _check_batch(sr: _StageRun, outs: Any, n: int) -> list[Any] | BatchContractError:
        if isinstance(outs, list):
            results = outs
        elif isinstance(outs, str | bytes | Mapping) or not hasattr(outs, "__len__"):
            results = None
        else:
            try:
                results = list(outs)
            except TypeError:
                results = None
        if results is None or len(results) != n:
            got = _describe(outs) if results is None else f"{len(results)} results"
            return BatchContractError(
                f"batched stage {sr.name!r} returned {got} for a batch of {n} items; "
                "it must return a list with one result per input, in order"
            )
        return results

    # ---------------------------------------------------------- statistics

    def stats(self) -> PipelineStats:
        """An immutable snapshot of the pipeline's and each stage's figures."""
        now = perf_counter()
        elapsed = now - self._t_open if self._t_open else 0.0
        stages = tuple(
            sr.metrics.snapshot(now, elapsed, len(sr.inq)) for sr in self._stages
        )
        busy_span = (self._t_last or now) - self._t_first if self._t_first else 0.0
        return PipelineStats(
            name=self.name,
            elapsed=elapsed,
            submitted=self._submitted,
            completed=self._completed,
            failed=self._failed,
            expired=self._expired_n,
            cancelled=self._cancelled,
            in_flight=self._submitted
            - self._completed
            - self._failed
            - self._expired_n
            - self._cancelled,
            items_per_s=self._completed / busy_span if busy_span > 0 else 0.0,
            latency=self._latency.summary(),
            stages=stages,
            bottleneck=find_bottleneck(stages),
        )

    @property
    def closed(self) -> bool:
        """True once the runner no longer accepts items."""
        return self._state != "open"
