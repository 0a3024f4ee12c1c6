"""Worker settings as one frozen value object.

Usage::

    config = WorkerConfig(prefetch=512, retry=fb.Retry(attempts=5, backoff=1.0, max_backoff=60))
    await Worker(pipe, broker, config).run()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flowbatch.retry import Retry

from .base import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_RESULT_TTL

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_LAG_INTERVAL",
    "DEFAULT_LEASE",
    "DEFAULT_PREFETCH",
    "DEFAULT_RETRY",
    "DEFAULT_WORKER_CONFIG",
    "WorkerConfig",
]

DEFAULT_PREFETCH = 256
#: Seconds a worker retries an unreachable broker at start before it gives up.
DEFAULT_CONNECT_TIMEOUT = 30.0
DEFAULT_LEASE = 30.0
#: Seconds between two reads of the queue's lag (the ``flowbatch_broker_*``
#: gauges): about a Prometheus scrape interval.
DEFAULT_LAG_INTERVAL = 15.0
#: Broker-level retries: attempts in all (redeliveries included), then the
#: dead-letter queue. Backoff is per message: 1 s, 2 s, 4 s ... up to 60 s.
DEFAULT_RETRY = Retry(attempts=3, backoff=1.0, max_backoff=60.0)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """How a worker consumes one queue.

    - ``prefetch``: messages in flight at most (fetched and not yet settled);
      also the runner's first queue size, so the worker fetches only what the
      pipeline has room for.
    - ``retry``: attempts in all and the backoff between them, per message
      (``fb.Retry``; its ``on`` picks which errors are retried, the rest are
      dead-lettered at once). Transient faults *inside* a stage are better
      retried by the stage's own ``fb.stage(retry=...)``: that keeps the
      message and its lease where they are.
    - ``lease``: seconds a delivery is reserved for this worker before the
      broker may hand it to another; renewed every ``lease / 3`` while the
      message is in the pipeline.
    - ``poll``: seconds one fetch waits for the first message.
    - ``timeout``: per-message deadline inside the pipeline (None: none).
    - ``max_message_bytes``: larger messages are dead-lettered unread.
    - ``payload_type``: when set, each payload is converted to it
      (``msgspec.convert``); a mismatch is dead-lettered as a schema error.
    - ``stall_after``: seconds without a delivery, while the broker reports a
      backlog, after which the connection is considered stalled and re-opened.
    - ``reconnect_backoff`` / ``max_reconnect_backoff``: waits between
      reconnection attempts (doubling from the first to the second, with
      jitter: ``fb.Retry.delay``).
    - ``connect_timeout``: at start, how long an unreachable broker is
      retried before ``run`` raises ``BrokerUnreachable`` (a broker that
      refuses the credentials or virtual host raises ``BrokerRefused`` at
      once); during a run reconnection is retried until ``stop()``.
    - ``result_ttl``: seconds a stored result is kept (7 days; 0: until
      deleted). Redis, SQLite and NATS apply it to the results they store;
      RabbitMQ's results stream and Kafka's results topic keep their own
      retention (7 days, set when they are created).
    - ``name``: the worker's name in its log lines and, where the broker has
      one, its consumer name there (default: host-pid-random).
    - ``lag_interval``: seconds between two reads of the queue's lag
      (``Broker.queue_lag``) for the worker's ``flowbatch_broker_*`` gauges
      (``docs/autoscaling.md``); None: not read. Read off the hot path by a
      task of the worker's own; a failed read is logged and the gauges are
      left out until the next one succeeds.
    - ``stop_timeout``: on stop, how long to wait for in-flight messages to
      finish and be settled. A broker that is away at that point is retried
      for about a second after ``stop()``, no longer: what could not be
      settled is redelivered by the broker.
    """

    prefetch: int = DEFAULT_PREFETCH
    retry: Retry = DEFAULT_RETRY
    lease: float = DEFAULT_LEASE
    poll: float = 1.0
    timeout: float | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    payload_type: Any = None
    stall_after: float = 15.0
    reconnect_backoff: float = 0.1
    max_reconnect_backoff: float = 5.0
    stop_timeout: float = 60.0
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    result_ttl: float = DEFAULT_RESULT_TTL
    name: str | None = field(default=None)
    lag_interval: float | None = DEFAULT_LAG_INTERVAL

    def __post_init__(self) -> None:
        if not isinstance(self.prefetch, int) or self.prefetch < 1:
            raise ValueError(f"prefetch must be an int >= 1, got {self.prefetch!r}")
        if not isinstance(self.retry, Retry):
            raise TypeError(f"retry must be an fb.Retry, got {self.retry!r}")
        for name in (
            "lease", "poll", "stall_after", "reconnect_backoff", "max_reconnect_backoff",
            "connect_timeout",
        ):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 or None, got {self.timeout!r}")
        if self.lag_interval is not None and (
            not isinstance(self.lag_interval, int | float) or not self.lag_interval > 0
        ):
            raise ValueError(f"lag_interval must be a number > 0 or None, got {self.lag_interval!r}")
        if not isinstance(self.result_ttl, int | float) or self.result_ttl < 0:
            raise ValueError(f"result_ttl must be a number >= 0, got {self.result_ttl!r}")
        if self.max_message_bytes < 1:
            raise ValueError("max_message_bytes must be >= 1")


DEFAULT_WORKER_CONFIG = WorkerConfig()
