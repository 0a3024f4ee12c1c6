"""Batch formation: the ``Batch`` options and how a batch is picked from a queue.

A batched stage takes whatever is waiting when one of its workers becomes
free (up to ``max_size``), so an idle model adds no delay and a busy one sees
its batches grow by themselves. ``max_wait`` holds a non-full batch open a
little longer at any load. Under load (``linger``), a worker that comes free
while the items its last batch answered are on their way back waits for
them, briefly, instead of running a near-empty batch. ``cost``/``max_cost``
bound a batch by a budget such as tokens and group items of similar cost so
that padding is small.

``latency_target`` sizes batches to deadlines instead: a :class:`CostModel`
learns the batch time curve (``a + b*n`` seconds) online, each batch is
picked earliest deadline first and as large as still lets its most urgent
item finish in time, and an item that cannot finish in time even alone is
failed before it costs model time (:func:`pick_by_deadline`,
:func:`deadline_hold`).

The dispatch policy (hold a batch open, linger, fair share, the service-time
estimate, deadlines, why a batch went out: :data:`REASONS`) is written here
as pure functions of counts and times, so that the worker loops (workers.py)
only wait, and tests can check each decision without running a stage.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import WorkerCrashed

__all__ = [
    "COST_FORGET",
    "COST_MARGIN",
    "DEFAULT_MAX_SIZE",
    "DEFAULT_SPLIT_ON",
    "LINGER_GAP",
    "LINGER_SHARE",
    "REASONS",
    "SERVICE_TIME_WEIGHT",
    "SUPERLINEAR",
    "Batch",
    "CostModel",
    "DeadlinePick",
    "deadline_hold",
    "dispatch_reason",
    "fair_share",
    "holds_open",
    "linger_bound",
    "linger_target",
    "next_service_time",
    "pick_batch",
    "pick_by_deadline",
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
#: The smallest batch a worker takes to group items by length (below it the
#: model's fixed cost per call outweighs what grouping saves).
GROUPED_MIN = 8
#: Grouping by length passes an item over for at most this many of the
#: stage's recent batch service times; then it goes in the next batch.
GROUPED_AGE = 2.0


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
    - ``latency_target``: seconds an item may spend in this stage (queue
      plus the call); batches are then sized to deadlines. Each item's
      deadline is its own (``submit(timeout=...)``) when it has one, else its
      arrival at the stage plus ``latency_target``. The stage learns how long
      a batch of ``n`` takes (``a + b*n``, refitted as batches run; see
      :class:`CostModel`) and picks each batch earliest deadline first, as
      large as still lets its most urgent item finish in time. Under load (a
      worker comes free with fewer items waiting than its last batch held) a
      batch is held for more items as long as the most urgent one can still
      wait; a lone request never waits. An item that cannot finish in time
      even in a batch of one fails with ``DeadlineExceeded`` before it costs
      model time. Not with ``max_wait``; ``linger=0`` turns the holding off.
    - ``group_lengths`` (default True): with no ``cost`` function, items that
      have a length (``str``, ``bytes``, lists: text, token ids) are grouped
      by it, as padding makes a model compute each batch as if every item
      were as long as its longest. When several workers share the stage and
      more items wait than one takes, a free worker takes the oldest item
      and those closest to it in length: its fair share when two batches or
      more wait, else half of it (at least :data:`GROUPED_MIN`), since a
      smaller batch of similar lengths costs less
      per item than a larger one of mixed lengths (measured with
      all-MiniLM-L6-v2 on short sentences: 16 grouped out of 64 ran 1.19x
      the items/s of 32 in arrival order, as many as 64 at once). A lone
      worker, or one that finds no more waiting than it would take, takes
      what waits in arrival order, as before. An item passed over for
      :data:`GROUPED_AGE` (2) of the stage's recent batch times goes first
      in the next batch whatever its length (also when grouping by
      ``cost``), so grouping delays no item by more than that. ``False``:
      always arrival order.

    Usage: ``fb.stage(embed, batch=fb.Batch(max_size=64, cost=len, max_cost=8192))``
    """

    max_size: int = DEFAULT_MAX_SIZE
    max_wait: float = 0.0
    cost: Callable[[Any], float] | None = None
    max_cost: float | None = None
    linger: float | None = None
    split_on: tuple[type[BaseException], ...] = DEFAULT_SPLIT_ON
    latency_target: float | None = None
    group_lengths: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_size, int) or self.max_size < 1:
            raise ValueError(f"Batch.max_size must be an int >= 1, got {self.max_size!r}")
        if not isinstance(self.group_lengths, bool):
            raise TypeError(f"Batch.group_lengths must be True or False, got {self.group_lengths!r}")
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
        target = self.latency_target
        if target is not None:
            if (
                isinstance(target, bool)
                or not isinstance(target, int | float)
                or not 0 < target < math.inf
            ):
                raise ValueError(
                    "Batch.latency_target must be a number of seconds > 0 (or None), "
                    f"got {target!r}"
                )
            if self.max_wait > 0:
                raise ValueError(
                    "Batch.latency_target and Batch.max_wait both say how long a batch is "
                    "held; set one of them (with latency_target, deadlines bound the hold)"
                )
            if self.linger:
                raise ValueError(
                    "Batch.linger is not used with Batch.latency_target (deadlines bound "
                    f"the hold); leave it None, or 0 to never hold a batch, got {self.linger!r}"
                )

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


#: Why a batch went out (``StageStats.batch_reasons``), one label per dispatch:
#:
#: - ``full``: as large as the limits allow (``max_size``, ``max_cost``, a
#:   fair share among free workers): more was waiting, or a hold filled it;
#: - ``worker_free``: a worker was free and took what waited, at once;
#: - ``max_wait``: held open for ``max_wait``, not full when it ran out;
#: - ``linger``: a worker lingered, under load, for the callers its last
#:   batch answered;
#: - ``deadline``: ``latency_target``: cut to the size that still meets its
#:   most urgent item's deadline, or held until waiting longer would miss it;
#: - ``drain``: the runner was draining, so nothing was held.
REASONS = ("full", "worker_free", "max_wait", "linger", "deadline", "drain")


def dispatch_reason(
    held: str | None, taken: int, left: int, max_size: int, flushing: bool
) -> str:
    """Why a batch of ``taken`` items went out, ``left`` items still waiting after it.

    ``held`` is what held it before it went (``"max_wait"``, ``"linger"``), or
    ``"deadline"`` when a deadline cut it short or ended its hold; None when
    nothing held it. A deadline outranks the limits, the limits a drain.
    """
    if held == "deadline":
        return "deadline"
    if taken >= max_size or left:
        return "full"
    if flushing:
        return "drain"
    return held or "worker_free"


# --------------------------------------------------------- deadline batching

#: The weight the cost model's past batches keep at each new one: an
#: effective memory of about ``1 / (1 - COST_FORGET)`` = 20 batches.
COST_FORGET = 0.95
#: A batch is held for more items only while it would still finish with
#: this share of its predicted time to spare (plus twice the spread of the
#: model's recent errors and the measured lateness of the worker's
#: wake-ups: see CostModel.budget).
COST_MARGIN = 0.1
#: A log-log slope of batch time over batch size from which cost counts as
#: growing faster than the batch (a line's is at most 1; see CostModel).
SUPERLINEAR = 1.1
# Batch sizes whose (weighted) variance is below this count as one size;
# for the log-log fit, the variance of log sizes (sizes 1 and 2 alike: 0.12).
_DISTINCT_SIZES = 0.25
_DISTINCT_LOG_SIZES = 0.1


class CostModel:
    """How long a batch of ``n`` items takes: ``a + b*n`` seconds, learned online.

    :meth:`observe` adds one measured batch and refits: a weighted least
    squares line through every batch so far, each older batch weighed down
    by ``forget`` per new one (recursive least squares with forgetting, in
    its two-parameter closed form), so the fit follows a model that warms up
    or a machine whose load changes. ``a`` (the fixed cost of a call) and
    ``b`` (the cost per item) are never negative. Until batches of at least
    two sizes have been measured the line cannot be fitted; the model is then
    proportional (``a = 0``, ``b`` = mean time / mean size), which
    overestimates batches larger than those seen and so errs towards smaller
    batches, not missed deadlines. Before any batch it predicts 0.

    Cost that grows faster than the batch (padding, attention over longer
    inputs) is detected from a second fit of the same batches, a line in
    log-log space (``log t = log c + k log n``, weighted alike): a line's
    own log-log slope is at most 1, so a slope ``k`` of at least
    ``SUPERLINEAR`` (1.1) over batches of clearly different sizes means the
    curve bends up. ``exponent`` is then ``k`` (None otherwise) and a batch
    is predicted to take the larger of the line and ``c * n**k``: the line
    alone, fitted through the sizes seen, would promise too little for
    larger batches and miss deadlines. Sizing by tokens rather than items is
    :attr:`Batch.cost`'s business.

    A batch is held for more items only while :meth:`budget`, the
    prediction with room to spare, still fits: ``COST_MARGIN`` of it, twice
    ``spread`` (the root mean square of the model's recent errors, once the
    line is fitted) and ``lag`` (how late the worker's timed wake-ups have
    been: a busy event loop). Batches themselves are sized by the plain
    prediction: a margin there would shrink every batch, and smaller
    batches under load serve fewer items in time, not more.

    Usage: ``m = CostModel(); m.observe(8, 0.012); m.predict(16)``
    """

    __slots__ = (
        "_forget", "_lined", "_lw", "_lx", "_lxx", "_lxy", "_ly", "_scale", "_sn", "_snn", "_snt", "_sq",
        "_st", "_w", "a", "b", "exponent", "lag", "samples", "spread",
    )

    def __init__(self, forget: float = COST_FORGET) -> None:
        if not 0 < forget <= 1:
            raise ValueError(f"CostModel forget must be in (0, 1], got {forget!r}")
        self._forget = forget
        self._w = self._sn = self._st = self._snn = self._snt = 0.0
        self._lw = self._lx = self._ly = self._lxx = self._lxy = 0.0
        self._scale = 0.0
        self._sq = 0.0
        self._lined = False
        self.spread = 0.0
        self.lag = 0.0
        self.a = 0.0
        self.b = 0.0
        self.exponent: float | None = None
        self.samples = 0

    def observe(self, n: int, seconds: float) -> None:
        """A batch of ``n`` items took ``seconds``: refit the model."""
        f = self._forget
        if self._lined:
            # The line is fitted: how far off was it? (Before that, errors
            # only say that the model was still learning.)
            miss = seconds - self.predict(n)
            self._sq = self._sq * f + (1 - f) * miss * miss
            self.spread = math.sqrt(self._sq)
        self._w = self._w * f + 1.0
        self._sn = self._sn * f + n
        self._st = self._st * f + seconds
        self._snn = self._snn * f + n * n
        self._snt = self._snt * f + n * seconds
        self.samples += 1
        if n >= 1 and seconds > 0:
            x, y = math.log(n), math.log(seconds)
            self._lw = self._lw * f + 1.0
            self._lx = self._lx * f + x
            self._ly = self._ly * f + y
            self._lxx = self._lxx * f + x * x
            self._lxy = self._lxy * f + x * y
            self._fit_power()
        self._fit_line()

    def _fit_line(self) -> None:
        w = self._w
        mean_n = self._sn / w
        mean_t = self._st / w
        var = self._snn / w - mean_n * mean_n
        self._lined = var >= _DISTINCT_SIZES
        if not self._lined:
            self.a, self.b = 0.0, max(0.0, mean_t / mean_n) if mean_n > 0 else 0.0
            return
        b = (self._snt / w - mean_n * mean_t) / var
        a = mean_t - b * mean_n
        if b < 0:  # noise: time does not grow with size
            a, b = mean_t, 0.0
        elif a < 0:  # the line through the origin that fits best
            a, b = 0.0, self._snt / self._snn
        self.a, self.b = max(0.0, a), b

    def _fit_power(self) -> None:
        w = self._lw
        mx, my = self._lx / w, self._ly / w
        var = self._lxx / w - mx * mx
        k = (self._lxy / w - mx * my) / var if var >= _DISTINCT_LOG_SIZES else 0.0
        if k >= SUPERLINEAR:
            self.exponent, self._scale = k, math.exp(my - k * mx)
        else:
            self.exponent = None

    def predict(self, n: int) -> float:
        """Seconds a batch of ``n`` items is expected to take."""
        t = self.a + self.b * n
        if self.exponent is not None:
            return max(t, self._scale * math.pow(n, self.exponent))
        return t

    def budget(self, n: int) -> float:
        """Seconds to allow a batch of ``n`` to be sure it is done: the
        prediction, ``COST_MARGIN`` of it, twice ``spread``, and ``lag``."""
        return self.predict(n) * (1 + COST_MARGIN) + 2 * self.spread + self.lag

    def woke_late(self, seconds: float) -> None:
        """A timed wake-up of the worker came ``seconds`` late (a busy loop)."""
        self.lag += SERVICE_TIME_WEIGHT * (max(0.0, seconds) - self.lag)

    def largest(self, seconds: float, limit: int) -> int:
        """The largest batch, at most ``limit``, predicted to take at most
        ``seconds`` (0: not even one)."""
        if self.predict(1) > seconds:
            return 0
        lo, hi = 1, limit  # the prediction grows with n: bisect
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.predict(mid) <= seconds:
                lo = mid
            else:
                hi = mid - 1
        return lo


@dataclass(frozen=True, slots=True)
class DeadlinePick:
    """What :func:`pick_by_deadline` removed from the queue.

    ``late``: items that cannot meet their deadline even in a batch of one
    (to fail with ``DeadlineExceeded``, uncalled); ``batch``: the next batch,
    most urgent first; ``cut``: the deadline, not the limits, kept it smaller
    than what waited.
    """

    late: list[Any]
    batch: list[Any]
    cut: bool


def pick_by_deadline(
    queue: deque[Any],
    options: Batch,
    model: CostModel,
    slack: Callable[[Any], float],
    limit: int | None = None,
) -> DeadlinePick:
    """Remove the late items and the next batch from ``queue``, earliest deadline first.

    ``slack(item)`` is the seconds left until the item's deadline. An item
    whose slack is below the predicted time of a batch of one is late. The
    batch is the ``n`` most urgent of the others, ``n`` as large as the model
    predicts still finishes within the most urgent one's slack, within
    ``max_size`` (or ``limit``, a fair share) and ``max_cost`` (padded, as
    :func:`pick_batch` counts it). What is not taken stays, in its order.
    """
    size = options.max_size if limit is None else max(1, min(limit, options.max_size))
    one = model.predict(1)
    items = list(queue)
    keyed = sorted((slack(x), i) for i, x in enumerate(items))
    slacks = [s for s, _ in keyed]
    order = [i for _, i in keyed]
    k = 0
    while k < len(order) and slacks[k] < one:
        k += 1
    late = [items[i] for i in order[:k]]
    rest = order[k:]
    chosen: list[int] = []
    cut = False
    if rest:
        fit = max(1, model.largest(slacks[k], size))
        cut = fit < min(len(rest), size)
        budget = options.max_cost if options.cost is not None else None
        widest = 0.0
        for i in rest[:fit]:
            if budget is not None:
                c = max(widest, items[i].cost)
                if chosen and (len(chosen) + 1) * c > budget:
                    cut = False  # the cost budget, a limit, ended it
                    break
                widest = c
            chosen.append(i)
    if late or chosen:
        gone = set(order[:k]) | set(chosen)
        queue.clear()
        queue.extend(x for i, x in enumerate(items) if i not in gone)
    return DeadlinePick(late, [items[i] for i in chosen], cut)


def deadline_hold(options: Batch, model: CostModel, waiting: int, urgent: float) -> float:
    """Seconds a free worker may still hold a batch of ``waiting`` items for
    more (0: dispatch now).

    ``urgent``: seconds left until the earliest deadline among them. The
    batch may wait while one more item would still let that item finish in
    time: its slack less the :meth:`CostModel.budget` of a batch one larger.
    Never for a full batch, with ``linger=0``, before the model has measured
    a batch, or when that item cannot make it at all (it fails at the pick,
    at once, and the others go). (The worker starts holding only under load,
    as it lingers: see ``Batch.latency_target``.)
    """
    if options.linger == 0 or not model.samples or not waiting or waiting >= options.max_size:
        return 0.0
    if urgent < model.predict(1):
        return 0.0
    return max(0.0, urgent - model.budget(waiting + 1))


class _Costed(Protocol):
    cost: float


def _length(value: Any) -> int | None:
    """A value's length for grouping (text, bytes, token lists), or None."""
    if isinstance(value, str | bytes | bytearray | list | tuple):
        return len(value)
    return None


def _due_first(window: list[Any], order: list[int], due: float | None, start: int = 0) -> list[int]:
    """``order`` (indices into ``window`` from ``start``) with the items queued
    (``.t_enq``) at or before ``due`` moved first, oldest first: those passed
    over long enough go in whatever grouping prefers (None: ``order``)."""
    if due is None:
        return order
    first = [i for i in range(start, len(window)) if window[i].t_enq <= due]
    return first + [i for i in order if window[i].t_enq > due]


def _pick_by_length(queue: deque[Any], size: int, due: float | None = None) -> list[Any] | None:
    """The oldest item and the ``size - 1`` closest to it in length among the
    next ``size * _LOOKAHEAD_FACTOR`` (in arrival order); None, with the
    queue untouched, when there is no choice or the items have no length.
    Items carry their payload in ``.value``.

    ``due``: a clock reading; items queued (``.t_enq``) at or before it have
    been passed over long enough and go first, oldest first, whatever their
    length (the rest of the batch is grouped as above). Grouping then
    reorders the queue by at most that age: without it an item of an
    uncommon length waits until it is the oldest, and under a sustained
    backlog the spread of latencies (and the p99 an admission target keeps)
    widens to several batch times.
    """
    if len(queue) <= size:
        return None
    first_len = _length(getattr(queue[0], "value", None))
    if first_len is None:
        return None
    window = [queue.popleft() for _ in range(min(len(queue), size * _LOOKAHEAD_FACTOR + 1))]
    lengths = [_length(getattr(x, "value", None)) for x in window]
    closest = sorted(
        (i for i in range(1, len(window)) if lengths[i] is not None),
        key=lambda i: abs(lengths[i] - first_len),  # type: ignore[operator]
    )
    taken = {0, *_due_first(window, closest, due, start=1)[: size - 1]}
    queue.extendleft(reversed([x for i, x in enumerate(window) if i not in taken]))
    return [window[i] for i in sorted(taken)]


def pick_batch(
    queue: deque[Any], options: Batch, limit: int | None = None, due: float | None = None
) -> list[Any]:
    """Remove and return the next batch from ``queue`` (oldest first).

    Without a cost function this is the first ``max_size`` items, unless
    ``group_lengths`` groups them (see :class:`Batch`; only with a ``limit``,
    several workers sharing the stage). With one,
    the oldest item is always taken (so nothing starves); the rest are the
    queued items within a look-ahead window whose cost is closest to it, as
    long as ``len(batch) * max(cost)`` stays within ``max_cost``. Items must carry ``.cost``.
    ``limit`` caps the batch below ``max_size`` (a fair share among free workers).
    ``due``: a clock reading; when items are grouped (by length or by cost),
    those queued (``.t_enq``) at or before it go first, oldest first, within
    ``max_cost`` (see :func:`_pick_by_length`).
    """
    size = options.max_size if limit is None else max(1, min(limit, options.max_size))
    n = min(len(queue), size)
    if options.cost is None:
        if limit is not None and options.group_lengths and len(queue) > GROUPED_MIN:
            # A backlog of two batches or more leaves a choice at full size;
            # short of that, half the share is what leaves one.
            take = size if len(queue) >= 2 * size else -(-size // 2)
            grouped = _pick_by_length(queue, max(GROUPED_MIN, take), due)
            if grouped is not None:
                return grouped
        return [queue.popleft() for _ in range(n)]
    first: _Costed = queue.popleft()
    chosen = [first]
    budget = options.max_cost
    if size == 1 or not queue or (budget is not None and first.cost >= budget):
        return chosen
    window = [queue.popleft() for _ in range(min(len(queue), size * _LOOKAHEAD_FACTOR))]
    by_closeness = sorted(range(len(window)), key=lambda i: abs(window[i].cost - first.cost))
    by_closeness = _due_first(window, by_closeness, due)
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
