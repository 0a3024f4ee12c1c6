"""The worker loop: feed a broker's messages into one runner, settle each alone.

Usage::

    worker = Worker(pipe, broker, WorkerConfig(prefetch=256))
    loop.add_signal_handler(signal.SIGTERM, worker.stop)
    stats = await worker.run()

How a message travels: ``fetch`` asks the broker for at most as many
messages as the pipeline has room for (the free places of the runner's
in-flight limiter, ``max_in_flight=prefetch``; see "Places" below), each is
decoded and submitted to the runner with ``submit_nowait`` (so
messages from many fetches are batched together by the engine), and a
done-callback turns its outcome into an ``Outcome``: a result, a retry with
backoff, or a dead letter. One settling task writes the outcomes in batches
(whatever piled up while the last write was in flight) and only then are
the deliveries acknowledged. A renewal task extends the lease of everything
still unsettled every ``lease / 3`` seconds.

Four tasks, all owned by one task group: the fetch loop (the caller's),
the settler, the renewer, and the lag reader (the queue's depth for
``/metrics``, every ``lag_interval`` seconds, see :attr:`Worker.lag`).
Retries that are not yet due are timer handles owned by the worker,
cancelled (and their deliveries released) on stop.

Places: ``prefetch`` bounds the messages fetched and not yet settled, and it
is the runner's own limiter that counts them, so that the worker keeps no
count of its own: while a message's item is inside the runner, the engine
holds its place (taken by ``submit_nowait``, given back when it is answered);
before that (decoding, a retry not yet due) and after (its outcome waiting to
be written) the worker holds it, and gives it back once the message is
settled. The engine gives a place back when it answers, a loop turn before
the worker's done-callback takes it again, so a fetch is sized as the free
places less the answers the worker has not seen yet (``_inside``); should a
place still be missing, its message is held on credit (``_owed``) and the
next place the worker gives back pays it.

Failures of the broker itself (a lost connection, a restart) never lose a
message: the failing call is retried after a reconnect, with backoff, and
outcomes stay queued until they are written.

Why one module of about 600 lines: the fetch loop, the per-message outcomes,
the settler and the stop sequence all work on the same unsettled set; the
waits for a broker (bounded, interruptible, the one backoff) are in
``connect.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import msgspec

from flowbatch.errors import DeadlineExceeded, ItemFailed, Overloaded, PipelineClosed
from flowbatch.limits import CapacityLimiter
from flowbatch.pipeline import Pipeline
from flowbatch.retry import Retry
from flowbatch.runner import Runner

from .base import (
    Broker,
    Delivery,
    Envelope,
    Outcome,
    QueueStats,
    ResultRecord,
    decode_job,
    encode_job,
    encode_record,
    peek_job_id,
    redact,
)
from .config import DEFAULT_WORKER_CONFIG, WorkerConfig
from .connect import Stopped, open_within, pause, unless_stopped

__all__ = ["Worker", "WorkerStats", "worker_name"]

log = logging.getLogger("flowbatch.brokers")

T = TypeVar("T")


def worker_name() -> str:
    """A name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """What a worker did, returned by ``Worker.run`` and ``Worker.statistics()``."""

    fetched: int
    succeeded: int
    retried: int
    dead: int
    released: int
    redelivered: int
    reconnects: int  # the worker's and the client library's own
    settles: int
    abandoned: int  # settles given up after repeated broker failures: redelivered


class _Job:
    __slots__ = ("attempts", "delivery", "env", "first_seen")

    def __init__(self, delivery: Delivery, env: Envelope, attempts: int, first_seen: float) -> None:
        self.delivery = delivery
        self.env = env
        self.attempts = attempts
        self.first_seen = first_seen


class Worker:
    """Consumes one broker queue into one pipeline until ``stop()``."""

    def __init__(
        self,
        pipeline: Pipeline,
        broker: Broker,
        config: WorkerConfig = DEFAULT_WORKER_CONFIG,
    ) -> None:
        if not isinstance(pipeline, Pipeline):
            raise TypeError(f"Worker needs an fb.Pipeline, got {type(pipeline).__name__}")
        self.pipeline = pipeline
        self.broker = broker
        self.config = config
        self.name = config.name or worker_name()
        #: where this worker's /metrics is served, if anywhere (for the startup line)
        self.metrics_url: str | None = None
        self._runner: Runner | None = None
        # The runner's limiter (see "Places" in the module docstring).
        self._places: CapacityLimiter | None = None
        self._owed = 0  # messages outside the runner holding no place (a fetch took it)
        self._inside: set[asyncio.Future[Any]] = set()  # messages' items in the runner
        self._unsettled: set[Delivery] = set()
        self._held: dict[Delivery, asyncio.TimerHandle] = {}
        self._pending: list[Outcome] = []
        self._wake_settler = asyncio.Event()
        self._wake_fetcher = asyncio.Event()
        self._stopping = asyncio.Event()
        self._finished = asyncio.Event()
        self._reconnect_lock = asyncio.Lock()
        self._reconnecting = False
        # The one backoff (jittered) between reconnection attempts.
        self._backoff = Retry(backoff=config.reconnect_backoff, max_backoff=config.max_reconnect_backoff)
        self._down = False  # the last broker call failed
        # Set _STOP_GRACE after stop(): from then on a broker that is away is
        # not waited for (no reconnect, no retry, waits interrupted).
        self._give_up = asyncio.Event()
        self._give_up_timer: asyncio.TimerHandle | None = None
        self._started = asyncio.Event()
        self._lag: QueueStats | None = None
        self._counts = dict.fromkeys(
            ("fetched", "succeeded", "retried", "dead", "released", "redelivered",
             "reconnects", "settles", "abandoned"),
            0,
        )

    # ------------------------------------------------------------- public

    def stop(self) -> None:
        """Stop fetching; in-flight messages finish and are settled, then ``run`` returns.

        A broker that is away is waited for no longer than ``_STOP_GRACE``
        (about a second) after this call: what it could not settle by then,
        the broker redelivers.
        """
        self._stopping.set()
        self._wake_fetcher.set()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._give_up.set()
        else:
            if not self._unsettled:
                self._give_up.set()  # nothing to settle: no reason to wait
            if self._give_up_timer is None:
                self._give_up_timer = loop.call_later(_STOP_GRACE, self._give_up.set)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def wait_started(self) -> None:
        """Wait until the broker is open and the pipeline is running."""
        await self._started.wait()

    def statistics(self) -> WorkerStats:
        counts = dict(self._counts)
        counts["reconnects"] += self.broker.auto_reconnects
        return WorkerStats(**counts)

    @property
    def runners(self) -> dict[str, Runner]:
        """The worker's open runner by pipeline name (empty when not running),
        for ``flowbatch.prometheus``."""
        runner = self._runner
        return {} if runner is None else {self.pipeline.name: runner}

    def in_flight(self) -> int:
        """Deliveries fetched and not yet settled."""
        return len(self._unsettled)

    @property
    def lag(self) -> QueueStats | None:
        """The queue's depth as last read (``Broker.queue_lag``, every
        ``WorkerConfig.lag_interval`` s while running): None before the first
        read, after a failed one, with ``lag_interval=None``, or once stopped."""
        return self._lag

    async def run(self) -> WorkerStats:
        """Consume until ``stop()``; returns the worker's statistics."""
        cfg = self.config
        self.broker.configure(
            lease=cfg.lease, prefetch=cfg.prefetch, name=self.name, result_ttl=cfg.result_ttl
        )
        if not await self._open_first():
            return self.statistics()  # stopped before the broker answered
        log.info(
            "worker %s: consuming queue %r at %s into pipeline %r: concurrency=%d "
            "max_attempts=%d lease=%gs result_ttl=%s metrics=%s",
            self.name, self.broker.queue, redact(self.broker.url), self.pipeline.name,
            cfg.prefetch, cfg.retry.attempts, cfg.lease,
            f"{cfg.result_ttl:g}s" if cfg.result_ttl else "forever",
            self.metrics_url or "off",
        )
        try:
            async with self.pipeline.open(
                queue_size=cfg.prefetch, max_in_flight=cfg.prefetch
            ) as runner:
                self._runner = runner
                self._places = runner.limiter
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._settler())
                    tg.create_task(self._renewer())
                    if cfg.lag_interval is not None:
                        tg.create_task(self._lag_reader(cfg.lag_interval))
                    self._started.set()
                    try:
                        await self._fetch_loop()
                    finally:
                        await self._finish()
        finally:
            self._runner = None
            self._places = None
            self._lag = None
            # A broker that is down is not waited for (a client library may
            # try to flush into a dead connection).
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0 if self._down else _MIN_OP_TIMEOUT):
                    await self.broker.close()
        return self.statistics()

    # --------------------------------------------------------- fetch loop

    async def _fetch_loop(self) -> None:
        cfg = self.config
        broker = self.broker
        last_progress = time.monotonic()
        places = self._places
        assert places is not None
        while not self._stopping.is_set():
            # An answered item's place is free until its done-callback runs.
            free = min(places.available, cfg.prefetch)  # inf once the runner stops
            room = int(free) - sum(1 for f in self._inside if f.done())
            if room <= 0:
                self._wake_fetcher.clear()
                await self._wake_fetcher.wait()
                continue
            try:
                # A fetch that hangs is a stalled connection; the first one
                # may join a consumer group, which takes seconds.
                async with asyncio.timeout(cfg.poll + max(cfg.lease, _MIN_OP_TIMEOUT)):
                    deliveries = await broker.fetch(room, cfg.poll)
            except Exception as exc:
                if self._stopping.is_set():
                    return
                log.warning("worker %s: fetch failed (%s); reconnecting", self.name, _brief(exc))
                await self._reconnect(exc)
                last_progress = time.monotonic()
                continue
            now = time.monotonic()
            if deliveries:
                last_progress = now
                for d in deliveries:
                    self._start(d)
            elif now - last_progress > cfg.stall_after:
                last_progress = now
                try:
                    backlog = await broker.backlog()
                except Exception:
                    backlog = None
                if backlog:
                    # Alive but not consuming while messages wait: a consumer
                    # the broker forgot (typically after a reconnect).
                    log.warning(
                        "worker %s: no delivery for %.0fs with %d messages waiting; reconnecting",
                        self.name, cfg.stall_after, backlog,
                    )
                    await self._reconnect(None)

    async def _finish(self) -> None:
        """Stop: release held retries, let in-flight messages settle, stop the tasks."""
        held = list(self._held)
        for d in held:
            self._held.pop(d).cancel()
        if held:
            await self._release(held)
        deadline = time.monotonic() + self.config.stop_timeout
        while self._unsettled and time.monotonic() < deadline:
            self._wake_fetcher.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._wake_fetcher.wait()
        if self._unsettled:
            log.error(
                "worker %s: %d messages not settled within stop_timeout; the broker will "
                "redeliver them", self.name, len(self._unsettled),
            )
        self._finished.set()
        self._wake_settler.set()

    # ------------------------------------------------------- per message

    def _take(self) -> None:
        """A message is outside the runner: the worker holds its place."""
        places = self._places
        if places is None:  # the runner has closed: nothing left to bound
            return
        if places.available >= 1 and places.try_acquire(1):
            return
        self._owed += 1  # a fetch took it in the moment after the engine gave it back

    def _give(self) -> None:
        """A message the worker held is settled (or handed to the runner)."""
        if self._owed:
            self._owed -= 1
        elif self._places is not None:
            self._places.release(1)

    def _start(self, d: Delivery) -> None:
        cfg = self.config
        self._counts["fetched"] += 1
        if d.redelivered:
            self._counts["redelivered"] += 1
        self._unsettled.add(d)
        self._take()
        now = time.time()
        # A message that is no valid envelope still fails its job for the
        # producer (a failed result under its id) when its id can be read.
        if len(d.body) > cfg.max_message_bytes:
            self._dead(
                d, peek_job_id(d.body), 1, now,
                f"MessageTooLarge: message of {len(d.body)} bytes exceeds "
                f"max_message_bytes={cfg.max_message_bytes}",
            )
            return
        try:
            env = decode_job(d.body)
        except msgspec.ValidationError as exc:
            self._dead(d, peek_job_id(d.body, parsed=_json_or_none(d.body)), 1, now,
                       f"MalformedMessage: wrong schema: {exc}")
            return
        except msgspec.DecodeError as exc:
            self._dead(d, peek_job_id(d.body), 1, now,
                       f"MalformedMessage: not a JSON job envelope: {exc}")
            return
        d.job_id = env.id
        attempts = env.attempt + max(0, d.deliveries - 1)
        first_seen = env.first_seen or now
        if attempts > cfg.retry.attempts:
            # Delivered again and again without being settled: it kills workers.
            self._dead(
                d, env.id, attempts, first_seen,
                f"Undeliverable: delivered {attempts} times without being settled "
                "(its worker crashed or stalled each time)",
            )
            return
        payload = env.payload
        if cfg.payload_type is not None:
            try:
                payload = msgspec.convert(payload, cfg.payload_type)
            except msgspec.ValidationError as exc:
                self._dead(d, env.id, attempts, first_seen, f"MalformedMessage: wrong schema: {exc}")
                return
        job = _Job(d, env, attempts, first_seen)
        delay = env.not_before - now
        if delay > 0:
            assert self._runner is not None
            loop = asyncio.get_running_loop()
            self._held[d] = loop.call_later(delay, self._due, job, payload)
            return
        self._submit(job, payload)

    def _due(self, job: _Job, payload: Any) -> None:
        if self._held.pop(job.delivery, None) is not None:
            self._submit(job, payload)

    def _submit(self, job: _Job, payload: Any) -> None:
        runner = self._runner
        assert runner is not None
        self._give()  # the engine takes the message's place ...
        try:
            fut = runner.submit_nowait(payload, timeout=self.config.timeout)
        except Overloaded:
            # Only when the place was on credit (see _take); it comes back soon.
            self._take()
            loop = asyncio.get_running_loop()
            self._held[job.delivery] = loop.call_later(0.01, self._due, job, payload)
            return
        except PipelineClosed:
            self._take()
            self._pending_release(job.delivery)
            return
        self._inside.add(fut)
        fut.add_done_callback(lambda f: self._finished_job(job, f))

    def _finished_job(self, job: _Job, fut: asyncio.Future[Any]) -> None:
        d = job.delivery
        self._inside.discard(fut)
        self._take()  # ... and gives it back to the worker once answered
        if fut.cancelled():
            self._pending_release(d)
            return
        exc = fut.exception()
        now = time.time()
        if exc is None:
            record = ResultRecord(
                id=job.env.id,
                ok=True,
                attempts=job.attempts,
                first_seen=job.first_seen,
                finished_at=now,
                value=fut.result(),
            )
            try:
                data = encode_record(record)
            except (NotImplementedError, TypeError, OverflowError) as err:
                self._dead(
                    d, job.env.id, job.attempts, job.first_seen,
                    f"UnserializableResult: the pipeline's result cannot be stored as JSON: {err}",
                )
                return
            self._queue(Outcome(d, job_id=job.env.id, result=data))
            return
        if isinstance(exc, PipelineClosed):
            self._pending_release(d)
            return
        error = _describe(exc)
        cause = exc.error if isinstance(exc, ItemFailed) else exc
        retry = self.config.retry
        if not isinstance(exc, DeadlineExceeded) and retry.should_retry(cause, job.attempts):
            delay = retry.delay(job.attempts)
            body = encode_job(
                job.env.id,
                job.env.payload,
                attempt=job.attempts + 1,
                first_seen=job.first_seen,
                not_before=now + delay,
            )
            self._counts["retried"] += 1
            log.info("worker %s: job %s failed (%s); retry in %.2fs", self.name, job.env.id, error, delay)
            self._queue(Outcome(d, job_id=job.env.id, retry=body, delay=delay))
            return
        self._dead(d, job.env.id, job.attempts, job.first_seen, error)

    def _dead(self, d: Delivery, job_id: str | None, attempts: int, first_seen: float, error: str) -> None:
        now = time.time()
        self._counts["dead"] += 1
        record = ResultRecord(
            id=job_id or "", ok=False, attempts=attempts, first_seen=first_seen,
            finished_at=now, error=error,
        )
        letter = ResultRecord(
            id=job_id or "", ok=False, attempts=attempts, first_seen=first_seen,
            finished_at=now, error=error, body=d.body.decode("utf-8", "replace"),
        )
        log.warning("worker %s: job %s dead-lettered: %s", self.name, job_id, error)
        self._queue(
            Outcome(
                d,
                job_id=job_id,
                result=encode_record(record) if job_id else None,
                dead=encode_record(letter),
            )
        )

    def _queue(self, outcome: Outcome) -> None:
        self._pending.append(outcome)
        self._wake_settler.set()

    def _pending_release(self, d: Delivery) -> None:
        # Released by the settler (it owns broker writes), never lost.
        self._queue(Outcome(d))

    # ------------------------------------------------------------ settler

    async def _settler(self) -> None:
        while True:
            if not self._pending:
                if self._finished.is_set():
                    return
                self._wake_settler.clear()
                await self._wake_settler.wait()
                continue
            batch, self._pending = self._pending, []
            releases = [o.delivery for o in batch if _is_release(o)]
            writes = [o for o in batch if not _is_release(o)]
            try:
                if writes:
                    await self._with_reconnect(
                        partial(self.broker.settle, writes), "settle", attempts=_SETTLE_ATTEMPTS
                    )
                if releases:
                    await self._with_reconnect(
                        partial(self.broker.release, releases), "release", attempts=_SETTLE_ATTEMPTS
                    )
            except _GaveUp as exc:
                # Not acked: the broker hands these messages out again once
                # their lease passes (or at once, if the connection went);
                # any result already written wins over the next one.
                log.warning(
                    "worker %s: gave up settling %d messages (%s); the broker will "
                    "redeliver them", self.name, len(batch), exc,
                )
                self._counts["abandoned"] += len(batch)
                for o in batch:
                    self._settled(o.delivery)
                self._wake_fetcher.set()
                continue
            self._counts["settles"] += 1
            for o in writes:
                if o.result is not None and o.dead is None:
                    self._counts["succeeded"] += 1
            self._counts["released"] += len(releases)
            for o in batch:
                self._settled(o.delivery)
            self._wake_fetcher.set()

    def _settled(self, d: Delivery) -> None:
        if d in self._unsettled:
            self._unsettled.discard(d)
            self._give()

    async def _release(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            self._pending_release(d)

    # ------------------------------------------------------------ renewer

    async def _renewer(self) -> None:
        interval = self.config.lease / 3
        while not self._finished.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._finished.wait()
            live = list(self._unsettled)
            if live and not self._finished.is_set():
                try:
                    await self.broker.extend(live)
                except Exception as exc:
                    log.warning("worker %s: lease renewal failed: %s", self.name, _brief(exc))

    # --------------------------------------------------------- lag reader

    async def _lag_reader(self, interval: float) -> None:
        """Read the queue's lag now and every ``interval`` s until stop.

        Off the hot path: a slow or failing broker only delays or drops the
        reading (logged: the first failure in a row as a warning), and stop
        interrupts a read in progress.
        """
        failing = False
        while not self._stopping.is_set():
            try:
                lag = await unless_stopped(
                    self.broker.queue_lag(), max(interval, _MIN_OP_TIMEOUT), self._stopping
                )
            except Stopped:
                return
            except Exception as exc:
                self._lag = None
                log.log(
                    logging.DEBUG if failing else logging.WARNING,
                    "worker %s: reading the queue's lag failed (%s); the broker gauges are "
                    "left out until a read succeeds", self.name, _brief(exc),
                )
                failing = True
            else:
                self._lag = lag
                failing = False
            if not await pause(interval, self._stopping):
                return

    # ---------------------------------------------------------- reconnect

    async def _with_reconnect(
        self,
        op: Callable[[], Any],
        what: str,
        *,
        reconnect: bool = True,
        attempts: int | None = None,
    ) -> Any:
        """Run a broker call until it succeeds, reconnecting with backoff.

        Gives up (``_GaveUp``) after ``attempts`` failures, or when it fails
        more than ``_STOP_GRACE`` after ``stop()``: a worker told to stop
        does not wait for a broker that is away (what it could not settle,
        the broker redelivers).
        """
        failures = 0
        while True:
            try:
                if failures:
                    # The broker has just failed: a retry that hangs must
                    # not hold up a stop.
                    result = await unless_stopped(op(), _MIN_OP_TIMEOUT, self._give_up)
                else:
                    async with asyncio.timeout(max(self.config.lease, _MIN_OP_TIMEOUT)):
                        result = await op()
            except Stopped:
                raise _GaveUp(f"{what} interrupted by stop") from None
            except Exception as exc:
                self._down = True
                failures += 1
                if attempts is not None and failures >= attempts:
                    raise _GaveUp(f"{what} failed {failures} times: {_brief(exc)}") from exc
                if self._give_up.is_set():
                    raise _GaveUp(f"{what} failed while stopping: {_brief(exc)}") from exc
                delay = self._backoff.delay(failures)
                log.warning(
                    "worker %s: %s failed (%s); retrying in %.1f s", self.name, what, _brief(exc), delay
                )
                if not await pause(delay, self._give_up):
                    raise _GaveUp(f"{what} interrupted by stop") from exc
                if reconnect:
                    await self._reconnect(exc)
            else:
                self._down = False
                return result

    async def _reconnect(self, exc: BaseException | None) -> None:
        """Re-open the broker connection once, however many calls saw it fail.

        Retries with backoff (``Retry.delay``, jittered, so that workers do
        not reconnect in lockstep after a broker restart) until it succeeds
        or ``_STOP_GRACE`` has passed since ``stop()`` (which interrupts a
        reconnect attempt or a wait between them).
        """
        epoch = self.broker.epoch
        async with self._reconnect_lock:
            if self.broker.epoch != epoch or self._give_up.is_set():
                return  # another task already reconnected, or stopping for good
            failures = 0
            while True:
                try:
                    # A reconnect that hangs (a client library waiting on a
                    # dead socket) is abandoned and tried again.
                    await unless_stopped(
                        self.broker.reconnect(), _MIN_OP_TIMEOUT, self._give_up
                    )
                except Stopped:
                    return
                except Exception as err:
                    self._down = True
                    failures += 1
                    delay = self._backoff.delay(failures)
                    log.warning(
                        "worker %s: broker unreachable at %s (%s); retrying in %.1f s",
                        self.name, redact(self.broker.url), _brief(err), delay,
                    )
                    if not await pause(delay, self._give_up):
                        return
                else:
                    self._down = False
                    self._counts["reconnects"] += 1
                    log.info("worker %s: reconnected to %r", self.name, self.broker)
                    return

    async def _open_first(self) -> bool:
        """Open the broker at start; False when ``stop()`` came first.

        An unreachable broker is retried with backoff for ``connect_timeout``
        seconds, then ``BrokerUnreachable``; one that refuses the settings
        (credentials, virtual host) raises ``BrokerRefused`` at once.
        """
        return await open_within(
            self.broker, self.config.connect_timeout, backoff=self._backoff,
            stop=self._stopping, who=f"worker {self.name}",
        )


class _GaveUp(Exception):
    pass


# A settle that fails this many times in a row, reconnecting in between (about
# a minute with the default backoff), is abandoned to the broker's redelivery.
_SETTLE_ATTEMPTS = 16
# The shortest time a broker call may take before it counts as hung.
_MIN_OP_TIMEOUT = 30.0
# After stop(), how long a broker that is away is still retried (reconnect,
# settle) before what is unsettled is left to the broker's redelivery.
_STOP_GRACE = 1.0


def _is_release(o: Outcome) -> bool:
    return o.result is None and o.dead is None and o.retry is None


def _json_or_none(body: bytes) -> Any:
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ItemFailed):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]
