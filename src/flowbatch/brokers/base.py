"""The Broker interface every backend implements, and the wire formats.

A broker is bound to one queue. The worker drives it through a handful of
batched calls; producers (``Client``) use ``publish`` and ``get_result``::

    async with open_broker("redis://127.0.0.1:6379/0", "embed") as broker:
        await broker.publish([encode_job("job-1", {"text": "hi"})])
        deliveries = await broker.fetch(64, wait=1.0)
        await broker.settle([Outcome(d, job_id="job-1", result=record) for d in deliveries])

The contract (the same on every backend; each module's docstring says how it
keeps it):

- ``settle`` writes every result record, dead-letter record and retry
  envelope durably *before* it acknowledges the delivery, so a crash between
  the two redelivers the message (at-least-once) and never loses it.
- Results are keyed by job id and the first one written wins, so a
  redelivered message cannot replace a stored result with a different one.
- ``extend`` renews the lease of deliveries still being worked on, so they
  are not handed to another worker.
- ``release`` hands back deliveries that were fetched but will not be
  processed (a graceful stop) without counting an attempt: where the broker
  counts every hand-back as a delivery (RabbitMQ's ``redelivered``, NATS's
  ``num_delivered``) it puts back a copy (``requeue_body``) and acks the
  original. A broker that closes with deliveries it prefetched but never
  handed out returns them the same way.

Wire formats (JSON): a job envelope ``{"id", "payload", "attempt",
"first_seen", "not_before"}``; a result record ``{"id", "ok", "value" |
"error", "attempts", "first_seen", "finished_at"}``; a dead-letter record is
a failed result record plus ``"body"``, the original message as text.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

from flowbatch.errors import FlowbatchError

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_RESULT_TTL",
    "Broker",
    "BrokerError",
    "BrokerRefused",
    "BrokerUnreachable",
    "BrokerUnsupported",
    "DeadLetter",
    "Delivery",
    "Envelope",
    "JobFailed",
    "Outcome",
    "QueueStats",
    "Replayed",
    "ResultRecord",
    "ResultTimeout",
    "check_queue_name",
    "decode_job",
    "decode_record",
    "encode_job",
    "encode_record",
    "new_job_id",
    "peek_job_id",
    "requeue_body",
]

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
#: Stored results are kept this long (7 days, as RabbitMQ's results stream
#: and Kafka's default retention keep them); 0 keeps them until deleted.
DEFAULT_RESULT_TTL = 7 * 24 * 3600.0

_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


def check_queue_name(queue: str) -> str:
    """Queue names travel into stream, subject and topic names: keep them plain."""
    if not isinstance(queue, str) or not _QUEUE_NAME.match(queue):
        raise ValueError(
            f"queue name must be 1-100 characters of letters, digits, '_' or '-', got {queue!r}"
        )
    return queue


class BrokerError(FlowbatchError):
    """A broker could not be reached or refused an operation."""

    http_status = 503


class BrokerRefused(BrokerError):
    """The broker refused our settings (credentials, virtual host, permissions).

    Retrying cannot help: a worker that gets this at start exits 2 at once.
    """


class BrokerUnreachable(BrokerError):
    """No connection to the broker within the connect timeout."""


class BrokerUnsupported(BrokerError):
    """This backend cannot do what was asked (e.g. purge one Kafka record)."""

    http_status = 501


class JobFailed(FlowbatchError):
    """The job was dead-lettered: ``.error``, ``.attempts`` and ``.first_seen`` say why."""

    http_status = 500

    def __init__(self, job_id: str, error: str, attempts: int, first_seen: float) -> None:
        self.job_id = job_id
        self.error = error
        self.attempts = attempts
        self.first_seen = first_seen
        tries = "attempt" if attempts == 1 else "attempts"
        super().__init__(f"job {job_id!r} failed after {attempts} {tries}: {error}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.job_id, self.error, self.attempts, self.first_seen))


class ResultTimeout(FlowbatchError, TimeoutError):
    """No result for ``job_id`` appeared within ``timeout`` s (``Client.result``).

    ``submitted`` says whether this client submitted the job: when it did not,
    the message says "no such job" (a wrong id, or a result past its TTL).
    A ``TimeoutError``, so ``except TimeoutError`` still catches it.
    """

    http_status = 504

    def __init__(self, job_id: str, queue: str, timeout: float, *, submitted: bool) -> None:
        self.job_id = job_id
        self.queue = queue
        self.timeout = timeout
        self.submitted = submitted
        if submitted:
            why = (
                "it was submitted by this client and is still queued or running "
                "(is a worker consuming the queue?)"
            )
        else:
            why = (
                "no such job as far as this client knows: it did not submit it; "
                "the id may be wrong or its result past the results TTL"
            )
        super().__init__(
            f"no result for job {job_id!r} in queue {queue!r} appeared within {timeout:g}s: {why}"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (_result_timeout, (self.job_id, self.queue, self.timeout, self.submitted))


def _result_timeout(job_id: str, queue: str, timeout: float, submitted: bool) -> ResultTimeout:
    return ResultTimeout(job_id, queue, timeout, submitted=submitted)


# ------------------------------------------------------------ wire formats


class Envelope(msgspec.Struct, frozen=True):
    """A job as it travels through the broker."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    payload: Any
    attempt: Annotated[int, msgspec.Meta(ge=1)] = 1
    first_seen: float = 0.0
    not_before: float = 0.0


class ResultRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    """A job's outcome as stored by the broker (and a dead letter, with ``body``)."""

    id: str
    ok: bool
    attempts: int
    first_seen: float
    finished_at: float
    value: Any = None
    error: str | None = None
    body: str | None = None


def _enc_hook(obj: Any) -> Any:
    # numpy arrays and scalars, torch tensors: anything that can list itself.
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    raise NotImplementedError(f"objects of type {type(obj).__name__} are not JSON-serializable")


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)
_job_decoder = msgspec.json.Decoder(Envelope)
_record_decoder = msgspec.json.Decoder(ResultRecord)


def new_job_id() -> str:
    return uuid.uuid4().hex


def encode_job(
    job_id: str,
    payload: Any,
    *,
    attempt: int = 1,
    first_seen: float | None = None,
    not_before: float = 0.0,
) -> bytes:
    """The bytes of a job envelope (raises ``TypeError`` for a payload JSON cannot hold)."""
    env = Envelope(
        id=job_id,
        payload=payload,
        attempt=attempt,
        first_seen=time.time() if first_seen is None else first_seen,
        not_before=not_before,
    )
    try:
        return _encoder.encode(env)
    except (NotImplementedError, TypeError, OverflowError) as exc:
        raise TypeError(f"job payload cannot be encoded as JSON: {exc}") from exc


def decode_job(body: bytes) -> Envelope:
    """Parse an envelope; raises ``msgspec.DecodeError`` / ``ValidationError`` with a clear message."""
    return _job_decoder.decode(body)


# The id as the first member of an envelope, as ``encode_job`` writes it.
_LEADING_ID = re.compile(rb'\A\s*\{\s*"id"\s*:\s*("(?:[^"\\]|\\.){1,2048}")')


def peek_job_id(body: bytes, *, parsed: Any = None) -> str | None:
    """The job id of a message that is not a valid envelope, if it can be read.

    Looks at the start of the body only (envelopes written by ``encode_job``
    begin with their id), so an oversized message is not parsed; ``parsed``
    is the body already decoded as JSON, when it could be.
    """
    job_id: Any = None
    if isinstance(parsed, dict):
        job_id = parsed.get("id")
    else:
        m = _LEADING_ID.match(body[:4096])
        if m is not None:
            with contextlib.suppress(msgspec.DecodeError):
                job_id = msgspec.json.decode(m.group(1))
    if isinstance(job_id, str) and 0 < len(job_id) <= 512:
        return job_id
    return None


def requeue_body(d: Delivery) -> bytes:
    """The body to put back for a delivery handed back without being started.

    The delivery itself costs no attempt; earlier deliveries that were never
    settled (a crashed worker) still do, so they move into the envelope's
    ``attempt``, where the copy carries them.
    """
    if d.deliveries <= 1:
        return d.body
    try:
        env = decode_job(d.body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return d.body
    return _encoder.encode(msgspec.structs.replace(env, attempt=env.attempt + d.deliveries - 1))


def encode_record(record: ResultRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(data: bytes) -> ResultRecord:
    return _record_decoder.decode(data)


# ------------------------------------------------------------ deliveries


@dataclass(slots=True, eq=False)
class Delivery:
    """One message handed to a worker. ``tag`` is the backend's handle on it.

    ``deliveries`` counts how often the broker has handed out this copy (1 when
    the backend does not know); ``redelivered`` is true when an earlier
    delivery was not settled (a crashed or stalled worker). ``epoch`` is the
    broker connection it came from: acks bound to a channel cannot outlive it.
    """

    body: bytes
    tag: Any
    deliveries: int = 1
    redelivered: bool = False
    epoch: int = 0
    job_id: str | None = field(default=None)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to write for one delivery before it is acknowledged.

    Exactly one of: ``result`` (a result record, stored under ``job_id``),
    ``dead`` (a dead-letter record; ``result`` may hold the failure record for
    ``job_id`` too), ``retry`` (the next envelope, due after ``delay`` s).
    """

    delivery: Delivery
    job_id: str | None = None
    result: bytes | None = None
    dead: bytes | None = None
    retry: bytes | None = None
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-letter record and the backend's handle on it.

    ``key`` is what ``flowbatch dlq show|replay|purge`` take: the entry id,
    row id or stream sequence where the broker has one, else a digest of the
    record (RabbitMQ, Kafka, memory).
    """

    key: str
    record: bytes

    def decode(self) -> ResultRecord:
        return decode_record(self.record)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Depth and lag of one queue, as far as the broker can say (None: it cannot).

    - ``waiting``: messages ready to be delivered;
    - ``in_flight``: delivered and not yet settled (held by workers);
    - ``delayed``: retries the broker holds until their due time;
    - ``dead``: dead-letter records;
    - ``results``: stored result records;
    - ``oldest_waiting_age``: seconds since the oldest waiting job was first
      submitted (its envelope's ``first_seen``).
    """

    waiting: int | None = None
    in_flight: int | None = None
    delayed: int | None = None
    dead: int | None = None
    results: int | None = None
    oldest_waiting_age: float | None = None


def age_of(body: bytes | None, now: float | None = None) -> float | None:
    """Seconds since the job in ``body`` was first seen (None if it cannot be read)."""
    if body is None:
        return None
    try:
        first_seen = decode_job(body).first_seen
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if not first_seen:
        return None
    return max(0.0, (time.time() if now is None else now) - first_seen)


def digest_key(record: bytes) -> str:
    """A dead letter's key where the broker gives it no id: a digest of the record."""
    return hashlib.sha256(record).hexdigest()[:16]


class Broker(abc.ABC):
    """One queue on one broker. Use as ``async with``; see the module docstring."""

    #: the URL scheme this backend serves
    scheme: str = ""

    def __init__(self, url: str, queue: str) -> None:
        self.url = url
        self.queue = check_queue_name(queue)
        #: bumped on every (re)connection; see ``Delivery.epoch``
        self.epoch = 0
        #: seconds a delivery stays reserved for its consumer (set by the worker)
        self.lease = 30.0
        #: deliveries a consumer may hold unsettled (set by the worker)
        self.prefetch = 256
        #: reconnections the client library made by itself (NATS does)
        self.auto_reconnects = 0
        #: this consumer's name in the broker, where it has one (the worker's name)
        self.consumer_name = ""
        #: seconds a stored result is kept (0: until deleted), as the worker
        #: configured it; None in a producer (see ``ttl``)
        self.result_ttl: float | None = None

    def configure(
        self,
        *,
        lease: float,
        prefetch: int,
        name: str = "",
        result_ttl: float = DEFAULT_RESULT_TTL,
    ) -> None:
        """Consumer settings; the worker calls this before ``open``."""
        self.lease = float(lease)
        self.prefetch = int(prefetch)
        self.consumer_name = name
        self.result_ttl = float(result_ttl)

    @property
    def ttl(self) -> float:
        """Seconds results written here are kept (0: until deleted)."""
        return DEFAULT_RESULT_TTL if self.result_ttl is None else self.result_ttl

    async def __aenter__(self) -> Broker:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.queue!r} at {redact(self.url)}>"

    # ------------------------------------------------------------ lifetime

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and declare what the queue needs (idempotent)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect; prefetched, unsettled deliveries go back to the broker."""

    async def reconnect(self) -> None:
        """Drop the connection and open a fresh one (a stalled or broken consumer)."""
        with contextlib.suppress(Exception):
            await self.close()  # the old connection may already be gone
        await self.open()

    # ------------------------------------------------------------ producer

    @abc.abstractmethod
    async def publish(self, bodies: Sequence[bytes]) -> None:
        """Enqueue job envelopes; returns once the broker has them durably."""

    @abc.abstractmethod
    async def get_result(self, job_id: str) -> bytes | None:
        """The stored result record of ``job_id``, or None if there is none yet."""

    # ------------------------------------------------------------ consumer

    @abc.abstractmethod
    async def fetch(self, max_messages: int, wait: float) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, waiting at most ``wait`` s for the first."""

    @abc.abstractmethod
    async def settle(self, outcomes: Sequence[Outcome]) -> None:
        """Write each outcome durably, then acknowledge its delivery."""

    @abc.abstractmethod
    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        """Renew the lease of deliveries still being worked on."""

    @abc.abstractmethod
    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand back deliveries that will not be processed here."""

    async def backlog(self) -> int | None:
        """Messages waiting to be delivered, if the broker can say (stall detection)."""
        return None

    # ---------------------------------------------------------- inspection

    @abc.abstractmethod
    async def results(self) -> dict[str, bytes]:
        """Every stored result record by job id (for tools and tests)."""

    @abc.abstractmethod
    async def dead_letters(self) -> list[bytes]:
        """Every dead-letter record (for tools and tests)."""

    # ------------------------------------ dead letters and depth (tools)

    async def list_dead_letters(self) -> list[DeadLetter]:
        """Every dead letter with its key, oldest first."""
        return [DeadLetter(digest_key(r), r) for r in await self.dead_letters()]

    async def remove_dead_letters(self, keys: Sequence[str]) -> int:
        """Delete the dead letters with these keys; returns how many went."""
        raise BrokerUnsupported(f"{self.scheme}:// cannot remove single dead letters")

    async def forget_failed_result(self, job_id: str) -> bool:
        """Remove ``job_id``'s stored result if it is a failure (before a replay)."""
        raise BrokerUnsupported(f"{self.scheme}:// cannot remove a stored result")

    async def queue_stats(self) -> QueueStats:
        """Depth and lag of the queue; fields the broker cannot report are None."""
        return QueueStats(dead=len(await self.dead_letters()))

    async def queue_lag(self) -> QueueStats:
        """What waits in the queue, cheap enough to ask every few seconds.

        ``waiting`` (the lag: messages no worker has been handed yet),
        ``in_flight`` (handed out, not yet acknowledged), ``delayed`` and
        ``oldest_waiting_age``, as :meth:`queue_stats` reports them, without
        the counts that cost a scan (``dead`` and ``results`` are None). The
        worker reads it periodically for its ``flowbatch_broker_*`` gauges
        (``docs/autoscaling.md``); the backends' ``queue_stats`` build on it.
        """
        s = await self.queue_stats()
        return QueueStats(
            waiting=s.waiting,
            in_flight=s.in_flight,
            delayed=s.delayed,
            oldest_waiting_age=s.oldest_waiting_age,
        )

    async def replay_dead_letters(self, keys: Sequence[str] | None = None) -> Replayed:
        """Put dead letters (all, or those with ``keys``) back on the queue.

        Each goes back as its original envelope with the same job id (the
        producer's idempotency key) and ``first_seen``, its attempts reset to
        1; its failed result is removed first, so the next result is stored
        and ``Client.result`` waits for it. The dead letter is deleted only
        once the job is published again (a crash in between leaves a copy in
        the dead-letter queue, never loses the job). Records whose body is no
        job envelope (malformed messages) cannot be replayed and are skipped.
        """
        wanted = None if keys is None else set(keys)
        letters = [x for x in await self.list_dead_letters() if wanted is None or x.key in wanted]
        replayed = Replayed()
        bodies: list[bytes] = []
        for letter in letters:
            try:
                env = decode_job((letter.decode().body or "").encode())
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                replayed.skipped.append((letter.key, f"not a job envelope: {exc}"))
                continue
            await self.forget_failed_result(env.id)
            bodies.append(encode_job(env.id, env.payload, first_seen=env.first_seen or None))
            replayed.keys.append(letter.key)
            replayed.job_ids.append(env.id)
        if bodies:
            await self.publish(bodies)
            await self.remove_dead_letters(replayed.keys)
        if wanted is not None:
            found = {x.key for x in letters}
            replayed.missing.extend(sorted(wanted - found))
        return replayed

    async def purge_dead_letters(self, keys: Sequence[str] | None = None) -> int:
        """Delete dead letters (all, or those with ``keys``); returns how many went."""
        if keys is None:
            keys = [x.key for x in await self.list_dead_letters()]
        return await self.remove_dead_letters(keys) if keys else 0


@dataclass(slots=True)
class Replayed:
    """What ``Broker.replay_dead_letters`` did."""

    keys: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")


def redact(url: str) -> str:
    """``url`` without its password, for logs and errors."""
    return _PASSWORD.sub(r"\1***@", url)
