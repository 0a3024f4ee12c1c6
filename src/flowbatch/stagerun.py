"""A stage as it runs: its input channel, executor, metrics and successor.

The runner builds one :class:`StageRun` per stage when it opens; the worker
loops (workers.py) and the ledger (ledger.py) read it. It holds no policy:
what to do with an item is theirs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .adaptive import DEFAULT_RETRY_AFTER, GradientLimit
from .batching import Batch, next_service_time
from .channel import Channel
from .devices import device_executor
from .envelope import Item
from .executors import Executor, make_executor, materialize, materialize_each
from .limits import CapacityLimiter
from .metrics import StageMetrics

if TYPE_CHECKING:
    from .hooks import Hooks
    from .replicas import ReplicaScaler
    from .stage import Stage

__all__ = ["StageRun"]


class StageRun:
    """A stage at run time: its channel, executor, metrics and successor."""

    __slots__ = (
        "batch",
        "call",
        "control",
        "cost",
        "direct",
        "executor",
        "fan_out",
        "gate",
        "inq",
        "limits",
        "metrics",
        "name",
        "next",
        "paused_until",
        "retry",
        "scaler",
        "service_time",
        "spec",
    )

    def __init__(
        self,
        spec: Stage,
        queue_size: int,
        hooks: Hooks | None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.batch = spec.batch
        self.retry = spec.retry
        self.fan_out = spec.fan_out
        self.cost = spec.batch.cost if spec.batch is not None else None
        # Recent batch service time (seconds, moving average): sizes the linger.
        self.service_time = 0.0
        size = queue_size
        if spec.batch is not None:
            # Room for every worker's next full batch, so batches can fill.
            size = max(size, 2 * spec.batch.max_size * spec.concurrency)
        self.inq: Channel[Item] = Channel(size)
        self.metrics = StageMetrics(
            spec.name,
            spec.executor_name,
            spec.concurrency,
            spec.batch.max_size if spec.batch is not None else 0,
        )
        self.next: StageRun | None = None
        #: ``concurrency=fb.Adaptive(...)``: the stage's current limit. Each
        #: worker slot holds one unit while it forms and runs a call; the
        #: stage's controller sets its ``total``. None for a fixed concurrency
        #: (its slots are the limit: nothing to take on the hot path).
        self.gate: CapacityLimiter | None = (
            CapacityLimiter(spec.adaptive.start) if spec.adaptive is not None else None
        )
        #: the controller that sets ``gate.total`` from each call's latency
        self.control: GradientLimit | None = None
        if spec.adaptive is not None:
            self.control = GradientLimit(
                spec.adaptive, clock=clock if clock is not None else time.perf_counter
            )
            self.metrics.limit = spec.adaptive.start
        #: What resizes the stage's replicas (replicas.py), for an adaptive stage
        #: whose executor can resize; set by the runner when it opens.
        self.scaler: ReplicaScaler | None = None
        #: After a ``Backpressure``: the stage (batched or not) starts no call
        #: before this time (the runner's clock; 0.0: never paused).
        self.paused_until = 0.0
        self.executor: Executor
        # A device stage's learned memory caps lower its next batch (devices.py).
        self.limits: Callable[[Batch], Batch] | None = None
        if isinstance(spec.executor, Executor):
            self.executor = spec.executor
        else:
            post: Callable[[Any], Any] | None = None
            if spec.fan_out and spec.executor != "async":
                post = materialize_each if spec.batch is not None else materialize
            if spec.devices is not None:
                placed = device_executor(
                    spec,
                    post=post,
                    activate=hooks.activate if hooks is not None else None,
                    clock=clock if clock is not None else time.perf_counter,
                )
                self.executor = placed
                if spec.batch is not None:
                    self.limits = placed.batch_limits
            else:
                self.executor = make_executor(
                    spec.executor,
                    spec.fn,
                    spec.concurrency,
                    spec.name,
                    post=post,
                    activate=hooks.activate if hooks is not None else None,
                    cpu_threads=spec.cpu_threads,
                    lone_threads=spec.lone_threads,
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

    def adapt(self, rtt: float, now: float, dropped: bool = False) -> None:
        """An adaptive stage's call took ``rtt`` seconds (``dropped``: it timed
        out): feed the controller and apply its limit. The caller holds its
        gate unit still, so ``gate.borrowed`` counts it in flight."""
        if self.scaler is not None:
            return  # its replicas follow the load instead (replicas.py)
        gate, ctl = self.gate, self.control
        assert gate is not None
        assert ctl is not None
        n = ctl.sample(rtt, gate.borrowed, now, dropped)
        if n != gate.total:
            gate.total = n
            self.metrics.set_limit(n, now)

    def backpressure(self, retry_after: float | None, now: float) -> float:
        """A call raised ``Backpressure``: count it, cut an adaptive stage's
        limit, and return the time before which the stage starts no call."""
        self.metrics.backpressured += 1
        ctl = self.control
        if ctl is None or self.scaler is not None:  # replicas.py owns a scaled stage's gate
            resume = now + (DEFAULT_RETRY_AFTER if retry_after is None else retry_after)
        else:
            n = ctl.backpressure(retry_after, now)
            assert self.gate is not None
            if n != self.gate.total:
                self.gate.total = n
                self.metrics.set_limit(n, now)
            resume = ctl.resume_at
        self.paused_until = max(self.paused_until, resume)
        return resume

    def measured(self, seconds: float) -> None:
        """A batch call took ``seconds``: update the service-time estimate."""
        self.service_time = next_service_time(self.service_time, seconds)
