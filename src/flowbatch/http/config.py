"""Settings of the HTTP service, as one small frozen value object.

Usage::

    from flowbatch.http import ServeConfig, create_app

    app = create_app(pipe, config=ServeConfig(api_key="s3cret", max_body_bytes=1 << 20))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = [
    "DEFAULT_GRACEFUL_TIMEOUT",
    "DEFAULT_JOB_TTL",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_INPUTS",
    "DEFAULT_MAX_PENDING_JOBS",
    "DEFAULT_RETRY_AFTER",
    "DEFAULT_SHUTDOWN_GRACE",
    "DEFAULT_STREAM_WINDOW",
    "ServeConfig",
]

#: Largest request body accepted (a stream's limit applies to each line).
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
#: Most inputs in one request (``inputs``, OIP rows, embeddings ``input``).
DEFAULT_MAX_INPUTS = 1024
#: Seconds a finished job's result is kept.
DEFAULT_JOB_TTL = 3600.0
#: Jobs accepted but not finished, per server, before new ones get 503.
DEFAULT_MAX_PENDING_JOBS = 10_000
#: Seconds a client is told to wait (``Retry-After``) after a 503.
DEFAULT_RETRY_AFTER = 1
#: Items one stream keeps in flight (read but not yet answered).
DEFAULT_STREAM_WINDOW = 64
#: Seconds uvicorn waits for open requests after SIGTERM, before cancelling them.
DEFAULT_GRACEFUL_TIMEOUT = 60
#: Seconds the server keeps accepting after SIGTERM, not ready, before it closes.
DEFAULT_SHUTDOWN_GRACE = 5.0


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """How the service admits, limits and protects requests.

    - ``api_key``: when set, every route but the health checks needs
      ``Authorization: Bearer <api_key>``.
    - ``latency_target``: seconds; the in-flight limit of each pipeline
      (requests, jobs and streams together; the runner's limiter) follows
      the load so that admitted requests' p99 latency (admission to answer)
      stays under it while the throughput stays at the pipeline's limit
      (``pipe.open(latency_target=...)``, flowbatch/admission.py). Past the
      limit a request gets 503 at once, without touching the model, with
      ``Retry-After`` the measured time to drain what is in flight. ``None``
      (the default, when ``max_in_flight`` is not set): a target derived
      from the measured service time (4x the pipeline's batch service
      time, at least 50 ms). The limit never falls below two full batches
      per worker of the widest stage (at least 4; the most inputs one
      request may have).
    - ``max_in_flight``: a fixed limit instead (not with ``latency_target``):
      the most items of one pipeline admitted at once, past it a 503 with
      ``Retry-After: retry_after``.
    - ``max_body_bytes``: larger bodies get 413 (for a stream: larger lines).
    - ``max_inputs``: the most inputs in one request (413 past it).
    - ``default_timeout``: seconds an item may take when the client sends no
      ``X-Request-Timeout`` (``None``: no limit).
    - ``retry_after``: seconds sent in ``Retry-After`` with a 503 (with a
      latency target: until the drain rate is measured).
    - ``job_ttl``: seconds a finished job's result is kept.
    - ``max_pending_jobs``: unfinished jobs accepted before new ones get 503.
    - ``stream_window``: items one stream keeps in flight; a client that
      sends faster is slowed down (TCP backpressure).
    - ``expose_errors``: tell clients what a server fault (a 5xx other than
      503 and 504: a stage that broke, an output that cannot be sent) was.
      Off (the default), the answer says "internal error" with a request
      id, and the server log has that id with the full message and the
      traceback; turn it on in development (``flowbatch serve
      --expose-errors``). 4xx messages always say what is wrong.
    - ``shutdown_grace``: seconds that ``run()`` (and ``flowbatch serve``)
      keeps accepting and serving requests after SIGTERM while ``/readyz``
      answers 503, so that a load balancer (a Kubernetes rollout) sees the
      server leave before its listener closes; then it closes and finishes
      the requests in flight. A second SIGTERM, or Ctrl-C, ends it at once;
      0: close at once.
    """

    api_key: str | None = None
    max_in_flight: int | None = None
    latency_target: float | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_inputs: int = DEFAULT_MAX_INPUTS
    default_timeout: float | None = None
    retry_after: int = DEFAULT_RETRY_AFTER
    job_ttl: float = DEFAULT_JOB_TTL
    max_pending_jobs: int = DEFAULT_MAX_PENDING_JOBS
    stream_window: int = DEFAULT_STREAM_WINDOW
    expose_errors: bool = False
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string or None")
        for name in ("max_body_bytes", "max_inputs", "max_pending_jobs", "stream_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_in_flight is not None and (
            not isinstance(self.max_in_flight, int) or self.max_in_flight < 1
        ):
            raise ValueError(f"max_in_flight must be an int >= 1 or None, got {self.max_in_flight!r}")
        if self.latency_target is not None:
            if isinstance(self.latency_target, bool) or not isinstance(
                self.latency_target, int | float
            ) or not 0 < self.latency_target < float("inf"):
                raise ValueError(
                    f"latency_target must be seconds > 0 or None, got {self.latency_target!r}"
                )
            if self.max_in_flight is not None:
                raise ValueError(
                    "give max_in_flight (a fixed limit) or latency_target (a limit that follows "
                    "the load), not both"
                )
        if not isinstance(self.retry_after, int) or self.retry_after < 0:
            raise ValueError(f"retry_after must be an int >= 0, got {self.retry_after!r}")
        if self.default_timeout is not None and not self.default_timeout > 0:
            raise ValueError(f"default_timeout must be > 0 or None, got {self.default_timeout!r}")
        if not isinstance(self.expose_errors, bool):
            raise TypeError(f"expose_errors must be True or False, got {self.expose_errors!r}")
        if not 0 <= self.shutdown_grace < float("inf"):  # also rejects nan
            raise ValueError(f"shutdown_grace must be >= 0 seconds, got {self.shutdown_grace!r}")
        if not self.job_ttl > 0:
            raise ValueError(f"job_ttl must be > 0, got {self.job_ttl!r}")

    def replace(self, **changes: object) -> ServeConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
