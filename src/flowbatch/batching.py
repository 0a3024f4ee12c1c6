"""Batch formation: the ``Batch`` options and how a batch is picked from a queue.

A batched stage takes whatever is waiting when one of its workers becomes
free (up to ``max_size``), so an idle model adds no delay and a busy one sees
its batches grow by themselves. ``max_wait`` holds a non-full batch open a
little longer at any load. Under load (``linger``), a worker that comes free
while the items its last batch answered are on their way back waits for
them, briefly, instead of running a near-empty batch. ``cost``/``max_cost``
bound a batch by a budget such as tokens and group items of similar cost so
that padding is small.

The dispatch policy (hold a batch open, linger, fair share, the service-time
estimate) is written here as pure functions of counts and times, so that the
worker loops (workers.py) only wait, and tests can check each decision
without running a stage.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import WorkerCrashed

__all__ = [
    "DEFAULT_MAX_SIZE",
    "DEFAULT_SPLIT_ON",
    "LINGER_GAP",
    "LINGER_SHARE",
    "SERVICE_TIME_WEIGHT",
    "Batch",
    "fair_share",
    "holds_open",
    "linger_bound",
    "linger_target",
    "next_service_time",
    "pick_batch",
]

DEFAULT_MAX_SIZE = 32
#: The automatic linger: this share of the stage's recent batch service time.
LINGER_SHARE = 0.1
#: A lingering worker dispatches once no item has arrived for this share of its linger.
LINGER_GAP = 0.25

#: The weight of the newest sample in the moving average of batch service time.
SERVICE_TIME_WEIGHT = 0.2
#: Errors that mean "one item of this batch is bad" by default: a worker
#: process that dies in a batch was most often killed by one input.
DEFAULT_SPLIT_ON: tuple[type[BaseException], ...] = (WorkerCrashed,)

# How far past the oldest item the cost-aware picker looks for similar items.
_LOOKAHEAD_FACTOR = 4


@dataclass(frozen=True, slots=True)
class Batch:
    """Options of a batched stage: its function takes and returns a list.

    - ``max_size``: the most items in one call.
    - ``max_wait``: seconds to keep a non-full batch open once a worker is
      free, at any load (0: dispatch at once; batches still grow under load).
    - ``linger``: under load only, the most seconds a worker that comes free
      waits for as many items as its previous batch held (callers answered
      by a batch usually send their next item at once; a closed loop of
      HTTP clients, say, returns in a burst). It dispatches as soon as it
      has them, the batch is full, or no item has come for a quarter of the
      linger. A worker whose previous batch held one item, or that finds as
      many waiting as it last took, never waits: a lone request pays no
      delay. ``None`` (default): 10% of the stage's recent batch service
      time, so lingering costs at most that much latency; ``0``: never.
      Ignored when ``max_wait`` is set.
    - ``cost``: ``item -> number`` (for example its token count);
      ``max_cost``: the most cost in one call, counted as a padded model
      computes it: the batch's size times its largest item's cost. Items of
      similar cost are grouped; an item whose own cost exceeds ``max_cost``
      runs alone.
    - ``split_on``: exception types that mean "one item of the batch is
      bad". A batch that raises one of them is split in halves at once to
      find that item; the others succeed. A batch that raises an error the
      stage's ``Retry`` retries (and that is not in ``split_on``) is first
      retried whole, with the retry's backoff (a model server's brief 503, a
      moment without GPU memory); one that raises an error the ``Retry``
      does not retry, or that still fails after its last attempt, is split,
      so that one bad item never fails the others. Default:
      ``(WorkerCrashed,)`` (a worker process that dies in a batch was most
      often killed by one input).

    Usage: ``fb.stage(embed, batch=fb.Batch(max_size=64, cost=len, max_cost=8192))``
    """

    max_size: int = DEFAULT_MAX_SIZE
    max_wait: float = 0.0
    cost: Callable[[Any], float] | None = None
    max_cost: float | None = None
    linger: float | None = None
    split_on: tuple[type[BaseException], ...] = DEFAULT_SPLIT_ON

    def __post_init__(self) -> None:
        if not isinstance(self.max_size, int) or self.max_size < 1:
            raise ValueError(f"Batch.max_size must be an int >= 1, got {self.max_size!r}")
        if self.max_wait < 0:
            raise ValueError(f"Batch.max_wait must be >= 0, got {self.max_wait!r}")
        if self.linger is not None and not self.linger >= 0:  # also rejects nan
            raise ValueError(f"Batch.linger must be None or >= 0, got {self.linger!r}")
        if self.max_cost is not None and self.cost is None:
            raise ValueError("Batch.max_cost needs a cost function (Batch.cost)")
        if self.cost is not None and not callable(self.cost):
            raise ValueError(f"Batch.cost must be callable, got {self.cost!r}")
        if self.max_cost is not None and self.max_cost <= 0:
            raise ValueError(f"Batch.max_cost must be > 0, got {self.max_cost!r}")
        split_on = self.split_on
        if isinstance(split_on, type):
            split_on = (split_on,)
            object.__setattr__(self, "split_on", split_on)
        if not isinstance(split_on, tuple) or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in split_on
        ):
            raise ValueError(f"Batch.split_on must be exception classes, got {split_on!r}")

    def splits(self, error: BaseException) -> bool:
        """Whether ``error`` from a whole batch means "one item is bad": split at once."""
        return isinstance(error, self.split_on)


# ------------------------------------------------------------- dispatch policy


def holds_open(options: Batch, waiting: int) -> bool:
    """Whether a free worker keeps a batch of ``waiting`` items open for ``max_wait``."""
    return options.max_wait > 0 and waiting < options.max_size


def linger_target(options: Batch, waiting: int, last: int) -> int:
    """How many items a free worker lingers for; 0: dispatch what waits now.

    ``last`` is the size of the worker's previous batch (the callers it just
    answered). A worker lingers only under load (its previous batch held more
    than what waits now), never when ``max_wait`` rules, and never with
    ``linger=0``: a lone request pays no delay.
    """
    if options.max_wait > 0 or options.linger == 0 or waiting >= last:
        return 0
    return min(last, options.max_size)


def linger_bound(options: Batch, service_time: float) -> float:
    """The most seconds a worker lingers: ``linger``, or a share of the service time."""
    return options.linger if options.linger is not None else LINGER_SHARE * service_time


def fair_share(waiting: int, holding: Sequence[int]) -> int | None:
    """The most items one free worker takes: its share of what waits plus
    what the other workers hold (None with a single worker: no cap).

    A burst then keeps every replica busy with batches of similar size:
    taking everything would let one replica run huge batches while another
    cycles through tiny ones, the worst of both on a model's cost curve.
    """
    workers = len(holding)
    if workers <= 1:
        return None
    return -(-(waiting + sum(holding)) // workers)


def next_service_time(estimate: float, sample: float) -> float:
    """The moving average of batch service time after one more ``sample``."""
    if not estimate:
        return sample
    return estimate + SERVICE_TIME_WEIGHT * (sample - estimate)


class _Costed(Protocol):
    cost: float


def pick_batch(queue: deque[Any], options: Batch, limit: int | None = None) -> list[Any]:
    """Remove and return the next batch from ``queue`` (oldest first).

    Without a cost function this is the first ``max_size`` items. With one,
    the oldest item is always taken (so nothing starves); the rest are the
    queued items within a look-ahead window whose cost is closest to it, as
    long as ``len(batch) * max(cost)`` stays within ``max_cost``. Items must carry ``.cost``.
    ``limit`` caps the batch below ``max_size`` (a fair share among free workers).
    """
    size = options.max_size if limit is None else max(1, min(limit, options.max_size))
    n = min(len(queue), size)
    if options.cost is None:
        return [queue.popleft() for _ in range(n)]
    first: _Costed = queue.popleft()
    chosen = [first]
    budget = options.max_cost
    if size == 1 or not queue or (budget is not None and first.cost >= budget):
        return chosen
    window = [queue.popleft() for _ in range(min(len(queue), size * _LOOKAHEAD_FACTOR))]
    by_closeness = sorted(range(len(window)), key=lambda i: abs(window[i].cost - first.cost))
    taken: set[int] = set()
    widest = first.cost
    for i in by_closeness:
        c = window[i].cost
        # The padded cost: every item in the batch is as costly as its largest.
        if budget is not None and (len(taken) + 2) * max(widest, c) > budget:
            continue
        taken.add(i)
        widest = max(widest, c)
        if len(taken) + 1 >= size:
            break
    chosen.extend(window[i] for i in sorted(taken))
    # What was looked at but not taken goes back to the front, in order.
    queue.extendleft(reversed([x for i, x in enumerate(window) if i not in taken]))
    return chosen
