"""The stage worker loops: take items from a stage's queue, call, pass results on.

Each stage has ``concurrency`` worker tasks ("slots"), owned by the runner's
task group. An unbatched slot takes one item per call (:meth:`Workers.run_single`);
a batched slot takes what waits, up to the batch's limits, after the
dispatch policy of batching.py says whether to hold the batch open or
linger (:meth:`Workers.run_batched`). A call's result moves on through
:meth:`Workers.pass_on` (or :meth:`Workers.fan_out`, or after the last stage
:meth:`Ledger.finish`); every outcome is
reported to the ledger.

A failing batch is retried whole when the stage's ``Retry`` retries its
error, and split in halves to find the item that breaks it otherwise (see
``Batch.split_on``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from types import CoroutineType
from typing import Any

from .batching import (
    GROUPED_AGE,
    LINGER_GAP,
    Batch,
    CostModel,
    DeadlinePick,
    deadline_hold,
    dispatch_reason,
    fair_share,
    holds_open,
    linger_bound,
    linger_target,
    pick_batch,
    pick_by_deadline,
)
from .envelope import Item
from .errors import Backpressure, BatchContractError, DeadlineExceeded, PipelineClosed
from .executors import CallTimedOut, Unpicklable, materialize
from .hooks import Hooks, call_hook
from .ledger import Ledger
from .stagerun import StageRun

__all__ = ["Workers", "check_batch", "returned_coroutine"]

log = logging.getLogger("flowbatch")

#: The most waiting items an unbatched stage's only slot takes at once (it
#: works through them one call at a time). Small, because what a slot holds
#: is no longer in its queue: not counted in ``stats()``'s ``queued`` and
#: not bounded by the queue's size.
TAKE_CHUNK = 32


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _describe(x: Any) -> str:
    try:
        return f"{type(x).__name__} of length {len(x)}"
    except TypeError:
        return type(x).__name__


def returned_coroutine(sr: StageRun, coro: Any) -> TypeError:
    """The error of a stage call that returned a coroutine instead of a result."""
    name = getattr(coro, "__qualname__", type(coro).__name__)
    with contextlib.suppress(Exception):
        coro.close()  # never awaited: close it rather than leave a warning behind
    return TypeError(
        f"stage {sr.name!r} returned a coroutine ({name}) instead of a result: "
        "an 'await' is missing, or an async function is hidden behind a plain "
        "function; make the stage itself 'async def' (it then runs on the event loop)"
    )


def check_batch(sr: StageRun, outs: Any, n: int) -> list[Any] | BatchContractError:
    """The results of a batch call as a list of ``n``, or the broken contract."""
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


class Workers:
    """The worker loops of one runner's stages.

    ``flushing`` is set when a drain begins: from then on no batch is held
    open or lingered on.
    """

    def __init__(
        self,
        name: str,
        ledger: Ledger,
        hooks: Hooks | None,
        loop: asyncio.AbstractEventLoop,
        clock: Callable[[], float],
    ) -> None:
        self.name = name
        self.ledger = ledger
        self.hooks = hooks
        self.loop = loop
        self.clock = clock
        self.flushing = False

    def run(self, sr: StageRun, slot: int) -> Coroutine[Any, Any, None]:
        """The loop of worker ``slot`` of stage ``sr``."""
        if sr.batch is not None:
            return self.run_batched(sr, slot)
        return self.run_single(sr, slot)

    def flush(self, stages: list[StageRun]) -> None:
        """A drain began: batches held open or lingering go now."""
        self.flushing = True
        for sr in stages:
            sr.inq.poke()

    # ------------------------------------------------------------ passing on

    def pass_on(self, nxt: StageRun, item: Item, out: Any, now: float) -> bool:
        """``item`` passed its stage (not a fan-out stage, nor the last) with
        result ``out`` at ``now``: move it on to the next stage, ``nxt``.

        Returns False when ``nxt``'s queue is full; the caller then awaits
        ``nxt.inq.put(item)``. (Written as a plain function so that the hot
        path pays no coroutine when there is room.) After the last stage an
        item goes to :meth:`Ledger.finish` instead.
        """
        item.value = out
        item.attempt = 1
        item.t_enq = now
        if nxt.cost is not None and not self.ledger.priced_for(nxt, item):
            return True
        return nxt.inq.put_nowait(item)

    async def fan_out(self, sr: StageRun, item: Item, out: Any, now: float) -> None:
        """``item`` passed fan-out stage ``sr``: its children move on in its place."""
        ledger = self.ledger
        try:
            children = out if isinstance(out, list) else materialize(out)
        except Exception as exc:
            sr.metrics.done -= 1
            ledger.fail(sr, item, exc)
            return
        n = len(children)
        if n == 0:
            ledger.retire()
            ledger.deliver(item, [])
            return
        item.results = [None] * n
        item.pending = n
        ledger.live += n - 1  # the parent is replaced by its children
        nxt = sr.next
        root = item.root
        for i, value in enumerate(children):
            if root.done:
                ledger.retire(n - i)  # the caller is gone: make no more children
                return
            child = item.child(value, i, now)
            if nxt is None:
                ledger.retire()
                ledger.deliver(child, value)
            elif not self.pass_on(nxt, child, value, now):
                await nxt.inq.put(child)

    async def _moved_on(self, sr: StageRun, item: Item, out: Any, now: float) -> None:
        nxt = sr.next
        if sr.fan_out:
            await self.fan_out(sr, item, out, now)
        elif nxt is None:
            self.ledger.finish(item, out, now)
        elif not self.pass_on(nxt, item, out, now):
            await nxt.inq.put(item)

    # --------------------------------------------------------------- calling

    async def call_hooked(self, sr: StageRun, items: list[Item], arg: Any, batch: bool) -> Any:
        """A stage call wrapped in the hooks' started / carrier / ended.

        The hook calls are written out (not through ``call_hook``) because
        this runs once per stage call; a hook's own error is logged, never
        raised into the item.
        """
        hooks = self.hooks
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

    # ------------------------------------------------------------ unbatched

    async def run_single(self, sr: StageRun, slot: int) -> None:
        """One worker slot of an unbatched stage: one item per call.

        The engine's hot path: a slot that finds a backlog runs through it
        without suspending except inside the stage function or when the next
        queue is full. The stage's only slot takes up to ``TAKE_CHUNK``
        waiting items per :meth:`Channel.take_many` call (one call per chunk,
        not per item; it works through them in order, as it would have
        anyway); a slot among several takes one at a time, so that no slot
        holds items another free slot could start.
        """
        ch = sr.inq
        take = ch.take_many
        chunk = TAKE_CHUNK if sr.spec.concurrency == 1 else 1
        m = sr.metrics
        running = m.running
        holding = m.holding
        served = m.service.buf.append
        waited = m.wait.buf.append
        call = sr.call
        fan_out = sr.fan_out
        nxt = sr.next
        forward = nxt is not None and not fan_out  # else fan out, or leave the engine
        finish = self.ledger.finish
        pass_on = self.pass_on
        ledger = self.ledger
        hooks = self.hooks
        clock = self.clock
        time = self.loop.time
        coroutine = CoroutineType
        gate = sr.gate
        if gate is not None:
            chunk = 1
        while True:
            if sr.paused_until and (left := sr.paused_until - clock()) > 0:
                await asyncio.sleep(left)  # after a Backpressure: the stage waits as told
            if gate is not None:
                await gate.acquire()  # the stage's current limit (fb.Adaptive)
            items = take(chunk)
            if not items:
                if gate is not None:
                    gate.release()
                if not await ch.wait_nonempty():
                    return
                continue
            for k, item in enumerate(items):
                root = item.root
                if root.done:
                    ledger.drop_abandoned(sr, item)
                    continue
                if root.deadline is not None and time() >= root.deadline:
                    ledger.drop_expired(sr, item)
                    continue
                t0 = clock()
                running[slot] = t0
                holding[slot] = 1
                try:
                    if hooks is None:
                        out = await call(item.value)
                    else:
                        out = await self.call_hooked(sr, [item], item.value, False)
                except BaseException as exc:
                    m.served(slot, t0, clock())
                    waited(t0 - item.t_enq)
                    if isinstance(exc, asyncio.CancelledError) and _being_cancelled():
                        ledger.fail(
                            sr, item, PipelineClosed(f"pipeline {self.name!r} was stopped")
                        )
                        raise
                    if isinstance(exc, Backpressure):
                        # This item and the rest of the chunk wait out the pause.
                        self.pushed_back(sr, items[k:], exc)
                        break
                    if gate is not None and isinstance(exc, TimeoutError):
                        sr.adapt(clock() - t0, clock(), dropped=True)
                    ledger.retry_or_fail(sr, item, exc)
                    if isinstance(exc, CallTimedOut) and exc.pending is not None:
                        await asyncio.wait([exc.pending])
                    continue
                t1 = clock()
                running[slot] = 0.0
                holding[slot] = 0
                served(t1 - t0)
                waited(t0 - item.t_enq)
                if gate is not None:
                    sr.adapt(t1 - t0, t1)
                if type(out) is coroutine:
                    ledger.fail(sr, item, returned_coroutine(sr, out))
                    continue
                m.done += 1
                if forward:
                    if not pass_on(nxt, item, out, t1):  # type: ignore[arg-type]
                        await nxt.inq.put(item)  # type: ignore[union-attr]
                elif fan_out:
                    await self.fan_out(sr, item, out, t1)
                else:
                    finish(item, out, t1)
            if gate is not None:
                gate.release()

    def pushed_back(self, sr: StageRun, items: list[Item], exc: Backpressure) -> None:
        """A call for ``items`` raised ``Backpressure``: the stage (an adaptive
        one cuts its limit) starts no call before the time it was told
        (``sr.paused_until``, which both worker loops wait out) and the items
        go back to the queue.

        Not a failed attempt (``item.attempt`` stays): the service was
        overloaded, not the item wrong. Its deadline and its caller still end it.
        """
        now = self.clock()
        resume = sr.backpressure(exc.retry_after, now)
        log.debug(
            "stage %r: the called service pushed back (%s); %d item(s) wait %.3fs",
            sr.name,
            exc,
            len(items),
            resume - now,
            extra={"pipeline": self.name, "stage": sr.name},
        )
        for item in items:
            item.t_enq = now
            sr.inq.put_force(item)

    # --------------------------------------------------------------- batched

    async def run_batched(self, sr: StageRun, slot: int) -> None:
        """One worker slot of a batched stage: takes what is waiting, up to the limit.

        Each batch is labelled with why it went out (``batching.REASONS``),
        counted in the stage's metrics.
        """
        ch = sr.inq
        opts = sr.batch
        assert opts is not None
        m = sr.metrics
        holding = m.holding
        why, why_items = m.reason_batches, m.reason_items
        ledger = self.ledger
        time = self.loop.time
        if opts.latency_target is not None and m.cost_model is None:
            m.cost_model = CostModel()  # shared by the stage's workers
        model = m.cost_model
        last = 1  # this worker's previous batch: how many callers it just answered
        gate = sr.gate
        while True:
            if not len(ch):
                if not await ch.wait_nonempty():
                    return
            if gate is not None:
                await gate.acquire()  # the stage's current limit (fb.Adaptive)
                if not len(ch):  # another slot took them while this one waited
                    gate.release()
                    continue
            if sr.paused_until and (left := sr.paused_until - self.clock()) > 0:
                await asyncio.sleep(left)  # after a Backpressure: the stage waits as told
                if gate is not None:
                    gate.release()
                continue  # and looks again
            # A device's learned memory caps lower max_size / max_cost (devices.py).
            options = opts if sr.limits is None else sr.limits(opts)
            held: str | None = None
            if model is not None:
                picked, held = await self._deadline_batch(sr, options, model, last)
            else:
                if not self.flushing:
                    if holds_open(options, len(ch)):
                        await self._hold_open(sr, options)
                        held = "max_wait"
                        if not len(ch):
                            if gate is not None:
                                gate.release()
                            continue
                    else:
                        want = linger_target(options, len(ch), last)
                        if want and await self._linger(sr, want):
                            held = "linger"
                            if not len(ch):
                                if gate is not None:
                                    gate.release()
                                continue
                share = fair_share(len(ch), holding)
                due = self.clock() - GROUPED_AGE * sr.service_time if sr.service_time else None
                picked = ch.take(
                    functools.partial(pick_batch, options=options, limit=share, due=due)
                )
            left = len(ch)
            batch: list[Item] = []
            now = time()
            for item in picked:
                root = item.root
                if root.done:
                    ledger.drop_abandoned(sr, item)
                elif root.deadline is not None and now >= root.deadline:
                    ledger.drop_expired(sr, item)
                else:
                    batch.append(item)
            if batch:
                last = len(batch)
                reason = dispatch_reason(held, len(picked), left, options.max_size, self.flushing)
                why[reason] += 1
                why_items[reason] += last
                await self.run_batch(sr, slot, batch, first=True)
                if gate is not None:
                    gate.release()
                # Let the callers answered by this batch run (and submit their
                # next items) before this worker forms its next batch; else a
                # closed loop of callers sees a run of tiny batches.
                await asyncio.sleep(0)
            elif gate is not None:
                gate.release()

    def _slack(self, target: float) -> Callable[[Item], float]:
        """Seconds left until an item's deadline, as of now: its own
        (``submit(timeout=...)``, on the loop's clock) or its arrival at the
        stage plus ``target`` (on the runner's clock), whichever comes first."""
        loop_now = self.loop.time()
        limit = target - self.clock()

        def slack(item: Item) -> float:
            s = item.t_enq + limit
            d = item.root.deadline
            return s if d is None or d - loop_now >= s else d - loop_now

        return slack

    async def _deadline_batch(
        self, sr: StageRun, options: Batch, model: CostModel, last: int
    ) -> tuple[list[Item], str | None]:
        """``Batch(latency_target=...)``: hold the batch while deadlines allow,
        then take it earliest deadline first, sized to its most urgent item's
        deadline; items that cannot make theirs fail here, uncalled.

        Returns the batch and ``"deadline"`` when a deadline cut it short or
        ended its hold (else None). The hold starts only under load (fewer
        items waiting than this worker's last batch held): a lone request
        never waits.
        """
        ch = sr.inq
        target = options.latency_target
        assert target is not None
        held: str | None = None
        if len(ch) < last:
            # The earliest deadline waiting, on the runner's clock, kept up to
            # date from the items that arrive (each wake-up looks at the new
            # ones only). Items another worker took may linger in it: that
            # only ends the hold sooner.
            clock = self.clock
            earliest = math.inf
            seen = 0
            while not self.flushing and not ch.closed:
                n = len(ch)
                if n != seen:
                    if n < seen:
                        earliest, seen = math.inf, 0
                    slack = self._slack(target)
                    now = clock()
                    for x in itertools.islice(ch, seen, n):  # the new ones (C-speed skip)
                        earliest = min(earliest, now + slack(x))
                    seen = n
                wait = deadline_hold(options, model, n, earliest - clock())
                if wait <= 0:
                    if held is not None and len(ch) < options.max_size:
                        held = "deadline"  # one more item would miss a deadline
                    break
                held = "holding"
                until = self.loop.time() + wait
                try:
                    async with asyncio.timeout_at(until):
                        await ch.wait_put()
                except TimeoutError:
                    model.woke_late(self.loop.time() - until)  # a busy loop: leave more room
                    held = "deadline"
                    break
        slack = self._slack(target)
        share = fair_share(len(ch), sr.metrics.holding)
        picks: list[DeadlinePick] = []

        def pick(q: deque[Item]) -> list[Item]:
            p = pick_by_deadline(q, options, model, slack, share)
            picks.append(p)
            return p.late + p.batch

        ch.take(pick)
        p = picks[0]
        if p.late:
            one = model.predict(1)
            for item in p.late:
                self._cannot_make_it(sr, item, slack(item), one)
        if held == "deadline" or p.cut:
            return p.batch, "deadline"
        return p.batch, None  # a hold that ended full, or by a drain, is labelled as such

    def _cannot_make_it(self, sr: StageRun, item: Item, left: float, one: float) -> None:
        """``item`` cannot meet its deadline in ``sr`` even alone: fail it, uncalled."""
        ledger = self.ledger
        if item.root.done:
            ledger.drop_abandoned(sr, item)
            return
        ledger.resolve(
            item.root,
            None,
            DeadlineExceeded(
                f"item cannot meet its deadline in stage {sr.name!r}: {max(left, 0.0):.3g}s "
                f"left, a batch of one takes about {one:.3g}s"
            ),
        )
        sr.metrics.expired += 1
        ledger.retire()

    async def _hold_open(self, sr: StageRun, opts: Batch) -> None:
        """Keep a non-full batch open for up to ``max_wait``; a drain ends it at once."""
        ch = sr.inq
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(opts.max_wait):
                while len(ch) < opts.max_size and not self.flushing:
                    await ch.wait_put()

    async def _linger(self, sr: StageRun, want: int) -> bool:
        """Under load: wait (briefly) for ``want`` items before taking a batch.

        The callers a batch answered usually send their next item at once, so
        they arrive in a burst just after the worker comes free; taking the
        one or two already waiting would run a near-empty batch (as costly as
        a full one on most models) while the burst waits behind it. Returns
        once ``want`` items wait, once no item has come for a gap, after the
        linger's bound, or when a drain begins. False when it did not wait
        at all (a bound of 0: no service time measured yet).
        """
        opts = sr.batch
        assert opts is not None
        bound = linger_bound(opts, sr.service_time)
        if bound <= 0:
            return False
        time = self.loop.time
        ch = sr.inq
        gap = bound * LINGER_GAP
        end = time() + bound
        while len(ch) < want and not self.flushing:
            left = end - time()
            if left <= 0:
                return True
            try:
                async with asyncio.timeout(min(gap, left)):
                    await ch.wait_put()
            except TimeoutError:
                return True  # nothing came for a gap: the burst is over
        return True

    async def run_batch(self, sr: StageRun, slot: int, batch: list[Item], first: bool) -> None:
        """Call the stage on ``batch``; pass each result on or report its error."""
        m = sr.metrics
        ledger = self.ledger
        clock = self.clock
        n = len(batch)
        t0 = clock()
        if first:
            waited = m.wait.buf.append
            for item in batch:
                waited(t0 - item.t_enq)
        m.batch(n, [item.cost for item in batch] if sr.cost is not None else None)
        m.running[slot] = t0
        m.holding[slot] = n
        try:
            values = [item.value for item in batch]
            if self.hooks is None:
                outs = await sr.call(values)
            else:
                outs = await self.call_hooked(sr, batch, values, True)
        except BaseException as exc:
            m.served(slot, t0, clock())
            if isinstance(exc, asyncio.CancelledError) and _being_cancelled():
                err = PipelineClosed(f"pipeline {self.name!r} was stopped")
                for item in batch:
                    ledger.fail(sr, item, err)
                raise
            if isinstance(exc, Backpressure):
                self.pushed_back(sr, batch, exc)
                return
            if isinstance(exc, CallTimedOut) and exc.pending is not None:
                await asyncio.wait([exc.pending])
            await self._batch_failed(sr, slot, batch, exc)
            return
        t1 = clock()
        m.served(slot, t0, t1)
        sr.measured(t1 - t0)
        if m.cost_model is not None:
            m.cost_model.observe(n, t1 - t0)
        results = check_batch(sr, outs, n)
        if isinstance(results, BatchContractError):
            for item in batch:
                ledger.fail(sr, item, results)
            return
        for item, out in zip(batch, results, strict=True):
            if isinstance(out, Exception):
                ledger.retry_or_fail(sr, item, out)
            elif type(out) is CoroutineType:
                ledger.fail(sr, item, returned_coroutine(sr, out))
            else:
                m.done += 1
                await self._moved_on(sr, item, out, t1)

    async def _batch_failed(
        self, sr: StageRun, slot: int, batch: list[Item], exc: BaseException
    ) -> None:
        """A batch call raised ``exc``: retry it whole, split it, or fail its items.

        An error the stage's ``Retry`` retries (a model server's brief outage)
        says nothing about any one item: the whole batch runs again after the
        backoff. An error in ``Batch.split_on``, one the ``Retry`` does not
        retry, or one that outlasts the last attempt may be one item's fault:
        the batch is split in halves until that item fails alone.
        """
        ledger = self.ledger
        n = len(batch)
        opts = sr.batch
        assert opts is not None
        if n == 1 or isinstance(exc, PipelineClosed | DeadlineExceeded):
            for item in batch:
                ledger.retry_or_fail(sr, item, exc)
            return
        attempt = max(item.attempt for item in batch)
        if not opts.splits(exc) and not isinstance(exc, Unpicklable) and sr.retry.should_retry(
            exc, attempt
        ):
            delay = sr.retry.delay(attempt)
            sr.metrics.retried += n
            log.debug(
                "a batch of %d items will retry stage %r in %.3fs (attempt %d failed: %s: %s)",
                n,
                sr.name,
                delay,
                attempt,
                type(exc).__name__,
                exc,
                extra={"pipeline": self.name, "stage": sr.name, "attempt": attempt},
            )
            for item in batch:
                item.attempt += 1
            if delay > 0:
                # The worker holds its batch through the backoff: the stage's
                # service is failing, and this keeps the batch whole.
                await asyncio.sleep(delay)
            now = self.loop.time()
            again: list[Item] = []
            for item in batch:
                root = item.root
                if root.done:
                    ledger.drop_abandoned(sr, item)
                elif root.deadline is not None and now >= root.deadline:
                    ledger.drop_expired(sr, item)
                else:
                    again.append(item)
            if again:
                await self.run_batch(sr, slot, again, first=False)
            return
        # Split to find the item that breaks the batch; the rest succeed.
        half = n // 2
        await self.run_batch(sr, slot, batch[:half], first=False)
        await self.run_batch(sr, slot, batch[half:], first=False)
