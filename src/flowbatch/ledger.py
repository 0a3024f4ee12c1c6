"""The ledger: the one place that admits items and records how each one ends.

Every item that enters a runner comes in through :meth:`Ledger.admit_nowait`
(and :meth:`Ledger.admit_when_room` for callers that wait), the one admission
path of ``submit``, ``submit_nowait`` and ``map``, or, for a request of many
items admitted whole, :meth:`Ledger.admit_all_nowait` /
:meth:`Ledger.admit_all_when_room` (``admit_many_nowait`` / ``admit_many``),
which take the in-flight places in one acquisition and then queue and count
each item the same way; it is counted here once
(admitted, or failed on the way in by the first stage's cost function), and
leaves through exactly one of ``resolve`` (its caller gets a value or an
error) or ``cancel_root`` (its caller went away). Worker loops report what
happens to each envelope: passed on (``deliver``), dropped because its
caller is gone (``drop_abandoned``) or its deadline passed
(``drop_expired``), failed (``fail``), or failed with another attempt to
come (``retry_or_fail``).

Invariant behind "nothing lost": ``live`` counts envelopes inside the engine
(in a channel, in a call, or waiting for a retry). Every path that removes
one calls :meth:`Ledger.retire`; a drain waits on :meth:`Ledger.wait_settled`
for ``live`` (and callers still waiting for room) to reach zero.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .channel import ChannelClosed
from .errors import DeadlineExceeded, ItemFailed, PipelineClosed
from .executors import Unpicklable
from .hooks import Hooks, call_hook
from .limits import CapacityLimiter
from .metrics import Histogram

if TYPE_CHECKING:
    from .envelope import Item
    from .stagerun import StageRun

__all__ = ["Ledger"]

log = logging.getLogger("flowbatch")

#: Schedules ``callback`` after ``delay`` seconds (``loop.call_later``'s shape).
Scheduler = Callable[[float, Callable[[], None]], asyncio.TimerHandle]


class Ledger:
    """Admission and outcomes of one runner's items, and their counts."""

    def __init__(self, name: str, hooks: Hooks | None, clock: Callable[[], float]) -> None:
        self.name = name
        self.hooks = hooks
        self.clock = clock
        self.loop: asyncio.AbstractEventLoop | None = None
        self.first: StageRun | None = None  # the stage items are admitted to
        self.call_later: Scheduler | None = None
        self.live = 0  # envelopes inside the engine
        self.admitting = 0  # callers waiting for room in the first queue
        self.roots: set[Item] = set()  # admitted items not yet resolved
        # Each admitted root holds a place in it until it is answered.
        self.limiter: CapacityLimiter | None = None
        self.timers: set[asyncio.TimerHandle] = set()
        self.submitted = 0
        self.completed = 0
        self.failed = 0
        self.expired = 0
        self.cancelled = 0
        self.t_first = 0.0
        self.t_last = 0.0
        self.latency = Histogram()
        self._ids = 0
        self._settled: asyncio.Future[None] | None = None
        self._answered: asyncio.Future[None] | None = None

    def bind(
        self,
        loop: asyncio.AbstractEventLoop,
        first: StageRun,
        call_later: Scheduler | None = None,
    ) -> None:
        """Attach to the runner's event loop and first stage; ``call_later``
        schedules retries."""
        self.loop = loop
        self.first = first
        self.call_later = call_later if call_later is not None else loop.call_later

    # ------------------------------------------------------------ admission

    def _register(self, roots: Sequence[Item]) -> None:
        """Number ``roots``, show them to the hooks and count them as submitted."""
        ids = self._ids
        for root in roots:
            ids += 1
            root.id = ids
        self._ids = ids
        hooks = self.hooks
        if hooks is not None:
            for root in roots:
                root.trace = call_hook(hooks.admitted, root)
        self.submitted += len(roots)
        if not self.t_first:
            self.t_first = roots[0].t0

    def priced(self, first: StageRun, root: Item) -> bool:
        """Compute ``root``'s cost for the first (batched) stage before it is
        queued. A failing cost function fails this item alone: it is counted
        as submitted and failed, its caller gets ``ItemFailed``, and this
        returns False."""
        assert first.cost is not None
        try:
            root.cost = float(first.cost(root.value))
        except Exception as exc:
            self._register((root,))
            self.resolve(root, None, ItemFailed(first.name, 1, exc))
            return False
        return True

    def admit_nowait(self, root: Item, wait: bool) -> bool:
        """The one admission path of ``submit``, ``submit_nowait`` and ``map``.

        Prices ``root`` for the first stage (a failing cost function fails
        it here, counted as submitted and failed), then takes a place in the
        in-flight limiter (when there is one), puts it in the first queue
        and counts it as inside the engine. Returns False, holding nothing,
        when that cannot be done now: a caller that waits (``wait``) goes on
        with :meth:`admit_when_room` (the limiter's line, first come first
        served: it takes a free place here only when nobody waits in line,
        and its miss counts no rejection), one that does not raises
        ``Overloaded``.
        """
        first = self.first
        assert first is not None
        if first.cost is not None and not self.priced(first, root):
            return True
        limiter = self.limiter
        if limiter is not None and not (limiter.take_free() if wait else limiter.try_acquire()):
            return False
        if not first.inq.put_nowait(root):
            if limiter is not None:
                limiter.release()
            return False
        self._admitted((root,))
        return True

    async def admit_when_room(self, root: Item, timeout: float | None) -> None:
        """Admit an already priced ``root`` once the limiter has a place and
        the first queue has room (within its deadline), and count it."""
        assert self.first is not None
        ch = self.first.inq
        limiter = self.limiter
        self.admitting += 1
        held = False
        try:
            try:
                async with asyncio.timeout_at(root.deadline):
                    if limiter is not None:
                        await limiter.acquire()
                        held = True
                    await ch.put(root)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"no room in pipeline {self.name!r} within the timeout of {timeout}s"
                ) from None
        except BaseException as exc:
            if held:
                assert limiter is not None
                limiter.release()
            self.admitting -= 1
            self.check_settled()  # a drain may be waiting for this caller alone
            if isinstance(exc, ChannelClosed):
                raise PipelineClosed(
                    f"pipeline {self.name!r} closed before the item was admitted"
                ) from None
            raise
        # Counted as live before anyone checks whether the runner has settled.
        self._admitted((root,))
        self.admitting -= 1

    def admit_all_nowait(self, roots: list[Item], wait: bool = False) -> bool:
        """:meth:`admit_nowait` for many items at once, all or none.

        Takes ``len(roots)`` places in the limiter in one acquisition and
        checks that the first queue has room for all of them; False, holding
        nothing and admitting nothing, when either has not (one rejection in
        the limiter). Then each is priced as by :meth:`admit_nowait` (one its
        cost function fails on is admitted failed and gives its place back)
        and the rest are queued in one :meth:`Channel.put_many` and counted.
        ``wait`` as for :meth:`admit_nowait`: a caller that will wait
        (``map``) takes the places only when they are free and nobody waits
        in line, and a miss counts no rejection.
        """
        first = self.first
        assert first is not None
        n = len(roots)
        limiter = self.limiter
        if limiter is not None and not (limiter.take_free(n) if wait else limiter.try_acquire(n)):
            return False
        ch = first.inq
        if ch.maxsize - len(ch) < n:
            if limiter is not None:
                limiter.release(n)
            return False
        todo = roots
        if first.cost is not None:
            todo = []
            for root in roots:
                if self.priced(first, root):
                    todo.append(root)
                elif limiter is not None:
                    limiter.release()
        ch.put_many(todo)  # room checked above
        self._admitted(todo)
        return True

    async def admit_all_when_room(self, roots: list[Item], timeout: float | None) -> None:
        """Admit every one of ``roots``, waiting in the limiter's line for all
        of their places at once (first come, first served), then for room in
        the first queue.

        Each is priced first (one its cost function fails on is failed at
        once and needs no place). ``timeout`` sets each item's deadline from
        the moment it is admitted: the wait in line is not counted. Cancelled
        (or closed) while waiting: none of ``roots`` stays admitted.
        """
        first = self.first
        assert first is not None
        assert self.loop is not None
        ch = first.inq
        limiter = self.limiter
        todo = [r for r in roots if first.cost is None or self.priced(first, r)]
        admitted: list[Item] = []
        self.admitting += 1
        held = 0
        try:
            if limiter is not None and todo:
                await limiter.acquire(len(todo))
                held = len(todo)
            deadline = None if timeout is None else self.loop.time() + timeout
            for root in todo:
                root.deadline = deadline
                if not ch.put_nowait(root):
                    await ch.put(root)
                held = max(held - 1, 0)  # its place now goes with it
                self._admitted((root,))
                admitted.append(root)
        except BaseException as exc:
            if held:
                assert limiter is not None
                limiter.release(held)
            for root in admitted:
                self.cancel_root(root)  # dropped at its next stage
            self.admitting -= 1
            self.check_settled()
            if isinstance(exc, ChannelClosed):
                raise PipelineClosed(
                    f"pipeline {self.name!r} closed before the items were admitted"
                ) from None
            raise
        self.admitting -= 1

    def _admitted(self, roots: Sequence[Item]) -> None:
        """``roots`` were just put in the first queue: count them as inside the engine."""
        if not roots:
            return
        self._register(roots)  # once per call: a map admits its items in chunks
        self.live += len(roots)
        self.roots.update(roots)

    def arm(
        self, root: Item, fut: asyncio.Future[Any], timeout: float | None, watch: bool = True
    ) -> None:
        """Attach the deadline timer and cancellation to a submitted item's future.

        ``watch=False``: the caller awaits ``fut`` itself and calls
        :meth:`cancel_root` when that await is cancelled, so no callback on
        ``fut`` is needed for it (a callback costs a loop turn per item).
        """
        loop = self.loop
        assert loop is not None
        if root.deadline is not None and not root.done:
            handle = loop.call_at(root.deadline, self.deadline_passed, root, timeout)
            self.timers.add(handle)

            def disarm(_: asyncio.Future[Any]) -> None:
                handle.cancel()
                self.timers.discard(handle)

            fut.add_done_callback(disarm)
        if watch:
            fut.add_done_callback(lambda f: self.cancel_root(root) if f.cancelled() else None)

    def deadline_passed(self, root: Item, timeout: float | None) -> None:
        """``root``'s timer fired: its caller gets ``DeadlineExceeded`` now."""
        self.resolve(
            root, None, DeadlineExceeded(f"item did not finish within its timeout of {timeout}s")
        )

    def cancel_root(self, root: Item) -> None:
        """``root``'s caller went away: its pieces are dropped at the next stage."""
        if not root.done:
            root.done = True
            self.cancelled += 1
            self._leave(root)
            if self.hooks is not None:
                call_hook(self.hooks.resolved, root, asyncio.CancelledError())

    # -------------------------------------------------------------- outcome

    def resolve(
        self, root: Item, value: Any, exc: BaseException | None, now: float | None = None
    ) -> None:
        """Give ``root``'s caller its answer (once; later answers are ignored).

        ``now``: the runner's clock when the answer was made, if the caller
        has just read it (a latency sample costs no second reading).
        """
        if root.done:
            return
        root.done = True
        self._leave(root)
        if exc is None:
            self.completed += 1
            if now is None:
                now = self.clock()
            self.t_last = now
            self.latency.buf.append(now - root.t0)
        elif isinstance(exc, DeadlineExceeded):
            self.expired += 1
        else:
            self.failed += 1
        if self.hooks is not None:
            call_hook(self.hooks.resolved, root, exc)
        sink = root.sink
        assert sink is not None
        sink(root, value, exc)

    def _leave(self, root: Item) -> None:
        """``root`` is answered: it no longer holds a place."""
        if self.limiter is not None and root in self.roots:
            self.limiter.release()
        self.roots.discard(root)
        if self._answered is not None and not self.roots:
            self.check_answered()

    def deliver(self, item: Item, value: Any) -> None:
        """``item`` has its final value: hand it to its parent or caller."""
        while True:
            parent = item.parent
            if parent is None:
                self.resolve(item, value, None)
                return
            results = parent.results
            assert results is not None
            results[item.index] = value
            parent.pending -= 1
            if parent.pending:
                return
            item, value = parent, results

    def finish(self, item: Item, value: Any, now: float) -> None:
        """``item`` passed the last stage with ``value`` at ``now`` (the
        runner's clock): it leaves the engine."""
        self.live -= 1
        if not self.live and self._settled is not None:
            self.check_settled()
        if item.parent is None:
            self.resolve(item, value, None, now)
        else:
            self.deliver(item, value)

    def retire(self, n: int = 1) -> None:
        """``n`` envelopes left the engine."""
        self.live -= n
        if not self.live and self._settled is not None:
            self.check_settled()

    def drop_abandoned(self, sr: StageRun, item: Item) -> None:
        """``item``'s caller is gone (cancelled, or a sibling failed): skip it."""
        sr.metrics.dropped += 1
        self.retire()

    def drop_expired(self, sr: StageRun, item: Item) -> None:
        """``item``'s deadline passed before ``sr``: fail its caller, skip the work."""
        self.resolve(
            item.root,
            None,
            DeadlineExceeded(f"item's deadline passed before stage {sr.name!r}"),
        )
        sr.metrics.expired += 1
        self.retire()

    def fail(self, sr: StageRun, item: Item, exc: BaseException) -> None:
        """``item`` failed in ``sr`` for good."""
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
                extra=self.log_fields(sr, item),
            )
        self.resolve(item.root, None, err)
        self.retire()

    def will_retry(self, sr: StageRun, item: Item, exc: BaseException) -> bool:
        """Whether ``item``, which failed ``sr`` with ``exc``, gets another attempt."""
        return (
            not item.root.done
            and not isinstance(exc, Unpicklable)
            and sr.retry.should_retry(exc, item.attempt)
        )

    def retry_or_fail(self, sr: StageRun, item: Item, exc: BaseException) -> None:
        """A call failed for ``item``: queue it again after the backoff, or fail it."""
        if not self.will_retry(sr, item, exc):
            self.fail(sr, item, exc)
            return
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
            extra=self.log_fields(sr, item),
        )
        item.attempt += 1
        if delay <= 0:
            sr.inq.put_force(item)
            return
        assert self.call_later is not None
        handle: asyncio.TimerHandle | None = None

        def again() -> None:
            self.timers.discard(handle)
            item.t_enq = self.clock()
            sr.inq.put_force(item)

        handle = self.call_later(delay, again)
        self.timers.add(handle)

    def priced_for(self, sr: StageRun, item: Item) -> bool:
        """Compute ``item``'s cost for batched stage ``sr``; False: it failed there."""
        assert sr.cost is not None
        try:
            item.cost = float(sr.cost(item.value))
        except Exception as exc:
            self.fail(sr, item, exc)
            return False
        return True

    def fail_all(self, err: BaseException) -> None:
        """Answer every admitted item's caller with ``err`` (the runner stops)."""
        for root in list(self.roots):
            self.resolve(root, None, err)

    def log_fields(self, sr: StageRun, item: Item) -> dict[str, Any]:
        """The record attributes every engine log line about an item carries."""
        return {"pipeline": self.name, "stage": sr.name, "item": item.id, "attempt": item.attempt}

    # ------------------------------------------------------------- settling

    def wait_settled(self) -> asyncio.Future[None]:
        """A future done once no item is inside the engine or waiting for room."""
        if self._settled is None:
            assert self.loop is not None
            self._settled = self.loop.create_future()
        self.check_settled()
        return self._settled

    def check_settled(self) -> None:
        """Resolve :meth:`wait_settled`'s future if nothing is left."""
        fut = self._settled
        if fut is not None and not self.live and not self.admitting and not fut.done():
            fut.set_result(None)
        self.check_answered()

    def wait_answered(self) -> asyncio.Future[None]:
        """A future done once every admitted item's caller has its answer and
        nobody waits for room (pieces of answered items may still be in calls)."""
        if self._answered is None:
            assert self.loop is not None
            self._answered = self.loop.create_future()
        self.check_answered()
        return self._answered

    def check_answered(self) -> None:
        fut = self._answered
        if fut is not None and not self.roots and not self.admitting and not fut.done():
            fut.set_result(None)

    def cancel_timers(self) -> None:
        for handle in self.timers:
            handle.cancel()
        self.timers.clear()
