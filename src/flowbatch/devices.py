"""Devices: a model stage's replicas placed per GPU, with batches that learn what fits.

``fb.stage(Model(), devices="auto", replicas_per_device=2, batch=...)`` makes
one replica per (device, slot). Each replica is its own worker (a thread, or
a process with ``executor="process"``) that calls ``setup(device=...)`` when
the callable's ``setup`` takes a ``device`` argument, else sets the replica's
``device`` attribute and calls ``setup()``; :func:`current_device` tells a
plain function where it runs. Batches go to a free replica (the one used
last, whose weights are warm, among those whose learned limits fit).

Memory: a call that raises the device's out-of-memory error
(``torch.cuda.OutOfMemoryError``) is split in halves and each half is run
again on the same replica: the batch does not fail. The largest batch that
fitted is remembered per replica (:class:`LearnedLimit`) and caps later
batches, as dispatched by the worker loop and, for a batch that still
exceeds it, by running it in parts. With ``Batch(cost=...)`` (e.g. tokens)
the padded cost (size x largest cost) is learned instead, the same way: the
memory a padded batch takes follows it, and a cap on size would hold batches
of short items to what long ones fit. Parts are cut longest first, so each holds items of similar cost and pads
little. After ``probe_after`` seconds (on the runner's clock) without an
out-of-memory error, the cap is raised halfway to the size that failed, so
memory freed since is used again.

The device layer (:class:`DeviceLayer`) is the one place that talks to torch
and NVML; tests pass a fake one through ``fb.Devices(layer=...)``. (Over 500
lines on purpose: placement, the learned limits and the replica executor that
splits on out-of-memory read and write the same per-replica state.)

Usage::

    embed = fb.stage(SentenceEmbedder(dtype="float16"), devices="auto",
                     replicas_per_device=2, batch=fb.Batch(max_size=256))
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import inspect
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from .batching import Batch
from .errors import BatchContractError, PipelineError
from .executors import Activate, Executor, RemoteError, make_executor
from .metrics import DeviceStats

if TYPE_CHECKING:
    from .stage import Stage

__all__ = [
    "DEFAULT_PROBE_AFTER",
    "DeviceExecutor",
    "DeviceLayer",
    "Devices",
    "LearnedLimit",
    "Replica",
    "TorchLayer",
    "current_device",
    "is_oom",
]

log = logging.getLogger("flowbatch")

#: Seconds without an out-of-memory error before a learned cap is raised again.
DEFAULT_PROBE_AFTER = 30.0

_OOM_TEXT = "CUDA out of memory"


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is a device out-of-memory error.

    ``torch.cuda.OutOfMemoryError`` (and ``torch.OutOfMemoryError``) by
    type when torch is loaded (an instance of a torch class means it is; torch
    is never imported here), the ``RuntimeError("CUDA out of memory...")`` of
    older torch, and a process worker's :class:`~flowbatch.executors.RemoteError`
    that carries that message.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        classes = tuple(
            c
            for c in (
                getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None),
                getattr(torch, "OutOfMemoryError", None),
            )
            if isinstance(c, type)
        )
        if classes and isinstance(exc, classes):
            return True
    return isinstance(exc, RuntimeError | RemoteError) and _OOM_TEXT in str(exc)


# ----------------------------------------------------------------- the layer


@runtime_checkable
class DeviceLayer(Protocol):
    """What flowbatch asks of a device runtime (torch + NVML by default).

    ``visible()`` lists the devices ``"auto"`` uses (``[]``: none, run on the
    CPU as an ordinary stage); ``is_oom(exc)`` recognises an out-of-memory
    error; ``released(device)`` runs in the worker after one (give cached
    blocks back); ``memory(device)`` is ``(bytes used, bytes total)`` or
    ``None``; ``utilization(device)`` the busy fraction (0..1) or ``None``.
    A layer used with process workers must pickle.
    """

    def visible(self) -> list[str]: ...

    def is_oom(self, exc: BaseException) -> bool: ...

    def released(self, device: str) -> None: ...

    def memory(self, device: str) -> tuple[int, int] | None: ...

    def utilization(self, device: str) -> float | None: ...


def _cuda_index(device: str) -> int | None:
    if device == "cuda":
        return 0
    if device.startswith("cuda:"):
        with contextlib.suppress(ValueError):
            return int(device[5:])
    return None


class TorchLayer:
    """The default layer: torch for devices and memory, NVML (``nvidia-ml-py``,
    optional) for whole-device memory and utilization."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._nvml_tried = False

    def __getstate__(self) -> dict[str, Any]:
        return {}  # a process worker opens NVML again, if it needs it

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def visible(self) -> list[str]:
        try:
            import torch
        except ImportError:
            return []
        if not torch.cuda.is_available():
            return []
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]

    def is_oom(self, exc: BaseException) -> bool:
        return is_oom(exc)

    def released(self, device: str) -> None:
        torch = sys.modules.get("torch")
        if torch is not None and _cuda_index(device) is not None:
            torch.cuda.empty_cache()

    def _handle(self, device: str) -> Any:
        index = _cuda_index(device)
        if index is None:
            return None
        if not self._nvml_tried:
            self._nvml_tried = True
            try:
                import pynvml  # type: ignore[import-not-found]  # nvidia-ml-py, optional

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception:  # not installed, or no driver: no NVML figures
                self._nvml = None
        nvml = self._nvml
        if nvml is None:
            return None
        # CUDA numbers the visible devices; NVML numbers them all.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        try:
            if visible:
                ids = [v.strip() for v in visible.split(",") if v.strip()]
                ident = ids[index]
                if ident.isdigit():
                    return nvml.nvmlDeviceGetHandleByIndex(int(ident))
                return nvml.nvmlDeviceGetHandleByUUID(ident)
            return nvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:
            return None

    def memory(self, device: str) -> tuple[int, int] | None:
        handle = self._handle(device)
        if handle is not None:
            with contextlib.suppress(Exception):
                info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                return int(info.used), int(info.total)
        torch = sys.modules.get("torch")
        index = _cuda_index(device)
        if torch is None or index is None or not torch.cuda.is_initialized():
            return None
        # This process's share only (threads): what torch's allocator holds.
        with contextlib.suppress(Exception):
            total = torch.cuda.get_device_properties(index).total_memory
            return int(torch.cuda.memory_reserved(index)), int(total)
        return None

    def utilization(self, device: str) -> float | None:
        handle = self._handle(device)
        if handle is None:
            return None
        with contextlib.suppress(Exception):
            return float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu) / 100.0
        return None


#: The layer used unless ``fb.Devices(layer=...)`` says otherwise.
TORCH = TorchLayer()


# ---------------------------------------------------------------- the option


@dataclass(frozen=True, slots=True)
class Devices:
    """Where a model stage's replicas run: ``replicas_per_device`` per device.

    - ``devices``: ``"auto"`` (every visible CUDA device; none: the stage runs
      on the CPU as without ``devices``), or device names (``["cuda:0",
      "cuda:1"]``, ``"cpu"`` too).
    - ``replicas_per_device``: replicas (workers) on each device.
    - ``probe_after``: seconds without an out-of-memory error before a
      learned cap is raised again.
    - ``layer``: the device runtime (:class:`DeviceLayer`); tests pass a fake.
    - ``oom``: an extra predicate: an exception it accepts is treated as
      out of memory too.

    ``fb.stage(fn, devices="auto", replicas_per_device=2)`` builds one;
    ``fb.stage(fn, devices=fb.Devices(...))`` takes it as is.
    """

    devices: str | tuple[str, ...] = "auto"
    replicas_per_device: int = 1
    probe_after: float = DEFAULT_PROBE_AFTER
    layer: DeviceLayer = TORCH
    oom: Callable[[BaseException], bool] | None = None

    def __post_init__(self) -> None:
        devices = self.devices
        if isinstance(devices, str):
            if devices != "auto":
                devices = (devices,)
        elif isinstance(devices, Sequence):
            devices = tuple(devices)
        else:
            raise TypeError(f"devices must be 'auto' or a list of device names, got {devices!r}")
        if isinstance(devices, tuple):
            if not devices or not all(isinstance(d, str) and d for d in devices):
                raise ValueError(f"devices must name at least one device, got {self.devices!r}")
            if len(set(devices)) != len(devices):
                raise ValueError(f"devices lists a device twice: {devices!r}")
        object.__setattr__(self, "devices", devices)
        n = self.replicas_per_device
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"replicas_per_device must be an int >= 1, got {n!r}")
        if not self.probe_after > 0:
            raise ValueError(f"probe_after must be > 0 seconds, got {self.probe_after!r}")
        if not isinstance(self.layer, DeviceLayer):
            raise TypeError(
                f"layer must implement flowbatch.devices.DeviceLayer, got {self.layer!r}"
            )

    def resolved(self) -> Devices | None:
        """This option with ``"auto"`` replaced by the visible devices; None: none is."""
        if self.devices != "auto":
            return self
        visible = tuple(self.layer.visible())
        return dataclasses.replace(self, devices=visible) if visible else None

    @property
    def names(self) -> tuple[str, ...]:
        """The device names (empty until :meth:`resolved`)."""
        return self.devices if isinstance(self.devices, tuple) else ()

    @property
    def replicas(self) -> int:
        """How many replicas the stage runs: devices x replicas per device."""
        return max(1, len(self.names)) * self.replicas_per_device

    def is_oom(self, exc: BaseException) -> bool:
        """Whether ``exc`` means out of memory, by the layer or the extra predicate."""
        return self.layer.is_oom(exc) or (self.oom is not None and self.oom(exc))


# ------------------------------------------------------------ learned limits


class LearnedLimit:
    """The most a replica's memory holds (items, or padded cost), learned from OOMs.

    ``None`` (:attr:`cap`) until the first out-of-memory error. Then the cap
    is the largest amount that ran since, below the amount that failed (half
    of it until a part has run). ``allowed(now)`` raises the cap after
    ``probe_after`` seconds without an error: halfway to the amount that
    failed, or to that amount itself once they are adjacent; a probe that
    reaches ``ceiling`` lifts the cap altogether.
    """

    __slots__ = ("best", "cap", "ceiling", "failed", "probe_after", "since", "whole")

    def __init__(self, probe_after: float, ceiling: float | None, whole: bool) -> None:
        self.probe_after = probe_after
        self.ceiling = ceiling
        self.whole = whole  # counts of items: whole numbers, a step of 1
        self.cap: float | None = None
        self.failed: float | None = None
        self.best = 0.0  # the largest amount that ran below ``failed``
        self.since = 0.0  # when the cap last went down or was probed

    def _step(self) -> float:
        return 1.0 if self.whole else max(1e-9, (self.failed or 0.0) * 0.02)

    def allowed(self, now: float) -> float | None:
        """The cap as of ``now`` (raised when it is time to probe); None: no cap."""
        cap = self.cap
        if cap is None or now - self.since < self.probe_after:
            return cap
        failed = self.failed
        if failed is None:
            new = cap * 2
        elif failed - cap <= self._step():
            new = failed  # memory may have been freed since: try it again
        else:
            new = cap + (failed - cap) / 2
            if self.whole:
                new = float(int(new))
        self.since = now
        if self.ceiling is not None and new >= self.ceiling:
            self.cap = self.failed = None
            self.best = 0.0
        else:
            self.cap = new
        return self.cap

    def fitted(self, amount: float) -> None:
        """A call of ``amount`` ran without running out of memory."""
        if self.failed is not None and amount >= self.failed:
            self.failed = None  # a probe at the failed amount went through
        self.best = max(self.best, amount)
        if self.cap is not None and amount > self.cap:
            self.cap = amount

    def overflowed(self, amount: float, now: float) -> None:
        """A call of ``amount`` ran out of memory."""
        if self.best >= amount:
            self.best = 0.0  # memory got tighter: what fitted before may not now
        self.failed = amount if self.failed is None else min(self.failed, amount)
        half = max(1.0, float(int(amount / 2))) if self.whole else amount / 2
        self.cap = self.best if self.best > 0 else half
        self.since = now


# ------------------------------------------------------------------ replicas

_where = threading.local()


def current_device() -> str | None:
    """The device of the replica running in this worker (``None`` outside one).

    For a plain function placed with ``devices=``; an object gets its device
    through ``setup(device=...)`` or its ``device`` attribute.
    """
    return getattr(_where, "device", None)


def _takes_device(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "device" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class Replica:
    """A stage's callable placed on one device: what a device worker runs.

    ``setup()`` places the callable (``setup(device=...)``, or its ``device``
    attribute then ``setup()``); a call that runs out of memory gives the
    allocator's cached blocks back (in the worker) before the error goes up.
    """

    def __init__(self, fn: Any, device: str, layer: DeviceLayer) -> None:
        self.fn = fn
        self.device = device
        self.layer = layer

    def setup(self) -> None:
        _where.device = self.device
        fn = self.fn
        setup = getattr(fn, "setup", None)
        if callable(setup) and _takes_device(setup):
            setup(device=self.device)
            return
        if not (inspect.isroutine(fn) or inspect.isclass(fn)):
            with contextlib.suppress(AttributeError, TypeError):
                fn.device = self.device
        if callable(setup):
            setup()

    def __call__(self, arg: Any) -> Any:
        try:
            return self.fn(arg)
        except BaseException as exc:
            if self.layer.is_oom(exc):
                with contextlib.suppress(Exception):
                    self.layer.released(self.device)
            raise

    def teardown(self) -> None:
        teardown = getattr(self.fn, "teardown", None)
        if callable(teardown):
            teardown()


class _Slot:
    """The executor's view of one replica: its worker and what it learned."""

    __slots__ = ("cost", "device", "executor", "fitted", "index", "oom_splits", "size")

    def __init__(
        self, index: int, device: str, executor: Executor, size: LearnedLimit, cost: LearnedLimit
    ) -> None:
        self.index = index
        self.device = device
        self.executor = executor
        self.size = size
        self.cost = cost
        self.fitted = 0  # the largest batch that ran
        self.oom_splits = 0


def _cap_int(cap: float | None) -> int | None:
    return None if cap is None else max(1, int(cap))


class DeviceExecutor(Executor):
    """Replicas of a stage placed per device; routes each call to a free one.

    Built by the runner for a stage with ``devices=``: one child executor
    (``"thread"`` or ``"process"``, one worker each) per (device, slot).
    """

    def __init__(
        self,
        spec: Stage,
        devices: Devices,
        kind: Literal["thread", "process"],
        *,
        post: Callable[[Any], Any] | None,
        activate: Activate | None,
        clock: Callable[[], float],
    ) -> None:
        self.spec = spec
        self.devices = devices
        self.clock = clock
        self.stage = spec.name
        batch = spec.batch
        self._cost = batch.cost if batch is not None else None
        size_ceiling = float(batch.max_size) if batch is not None else None
        cost_ceiling = batch.max_cost if batch is not None else None
        fn = spec.fn
        names = devices.names
        n = devices.replicas
        # Each replica its own object (as thread workers get): a model per replica.
        copies = n > 1 and not inspect.isroutine(fn)
        self._slots: list[_Slot] = []
        for i in range(n):
            device = names[i // devices.replicas_per_device]
            replica = Replica(copy.copy(fn) if copies else fn, device, devices.layer)
            child = make_executor(kind, replica, 1, spec.name, post=post, activate=activate)
            self._slots.append(
                _Slot(
                    i,
                    device,
                    child,
                    LearnedLimit(devices.probe_after, size_ceiling, whole=True),
                    LearnedLimit(devices.probe_after, cost_ceiling, whole=False),
                )
            )
        self._free: list[_Slot] = []
        self._started: list[_Slot] = []
        self._capped: dict[tuple[int, float | None], Batch] = {}

    @property
    def restarts(self) -> int:  # type: ignore[override]
        return sum(s.executor.restarts for s in self._slots)

    @property
    def pending(self) -> int:  # type: ignore[override]
        return sum(s.executor.pending for s in self._slots)

    async def start(self, stage: Stage | None = None) -> None:
        spec = self.spec if stage is None else stage
        results = await asyncio.gather(
            *(s.executor.start(spec) for s in self._slots), return_exceptions=True
        )
        self._started = [s for s, r in zip(self._slots, results, strict=True) if r is None]
        for r in results:
            if isinstance(r, BaseException):
                await self.stop()
                raise r
        self._free = list(reversed(self._slots))  # the first replica is used first

    async def stop(self) -> None:
        started, self._started = self._started, []
        self._free = []
        for s in started:
            with contextlib.suppress(Exception):
                await s.executor.stop()

    # ------------------------------------------------------------- routing

    def _pick(self, size: int, cost: float | None) -> _Slot:
        """The free replica for a call: the last used among those whose
        limits fit, else the one with the largest cap."""
        now = self.clock()
        free = self._free
        best: _Slot | None = None
        best_cap = -1.0
        for s in reversed(free):
            size_cap = s.size.allowed(now)
            cost_cap = s.cost.allowed(now)
            if (size_cap is None or size <= size_cap) and (
                cost is None or cost_cap is None or cost <= cost_cap
            ):
                return s
            cap = size_cap if size_cap is not None else float("inf")
            if cap > best_cap:
                best, best_cap = s, cap
        if best is None:
            raise RuntimeError(f"stage {self.stage!r}: a call came with no replica free")
        return best

    def batch_limits(self, options: Batch) -> Batch:
        """The worker loop's options for its next batch: ``max_size`` and
        ``max_cost`` lowered to the largest learned caps among the free replicas."""
        free = self._free
        if not free:
            return options
        now = self.clock()
        size_cap: float | None = 0.0
        cost_cap: float | None = 0.0
        for s in free:
            sc = s.size.allowed(now)
            cc = s.cost.allowed(now)
            if size_cap is not None:
                size_cap = None if sc is None else max(size_cap, sc)
            if cost_cap is not None:
                cost_cap = None if cc is None else max(cost_cap, cc)
        size = options.max_size
        if size_cap is not None:
            size = max(1, min(size, int(size_cap)))
        cost = options.max_cost
        if cost_cap is not None and options.cost is not None:
            cost = cost_cap if cost is None else min(cost, cost_cap)
        if size == options.max_size and cost == options.max_cost:
            return options
        key = (size, cost)
        capped = self._capped.get(key)
        if capped is None:
            if len(self._capped) > 64:
                self._capped.clear()
            capped = self._capped[key] = dataclasses.replace(
                options, max_size=size, max_cost=cost
            )
        return capped

    async def call(self, arg: Any, timeout: float | None, carrier: Any = None) -> Any:
        if self.spec.batch is None or not isinstance(arg, list):
            slot = self._pick(1, None)
            self._free.remove(slot)
            try:
                return await slot.executor.call(arg, timeout, carrier)
            finally:
                self._free.append(slot)
        costs = [float(self._cost(x)) for x in arg] if self._cost is not None else None
        padded = len(arg) * max(costs) if costs else None
        slot = self._pick(len(arg), padded)
        self._free.remove(slot)
        try:
            return await self._run(slot, arg, costs, timeout, carrier)
        finally:
            self._free.append(slot)

    # ------------------------------------------------------- memory limits

    def _parts(self, slot: _Slot, n: int, costs: list[float] | None) -> list[list[int]]:
        """The batch's indices cut to the replica's caps (longest first when costed)."""
        now = self.clock()
        size_cap = _cap_int(slot.size.allowed(now))
        cost_cap = slot.cost.allowed(now) if costs is not None else None
        if (size_cap is None or n <= size_cap) and (
            cost_cap is None or costs is None or n * max(costs) <= cost_cap
        ):
            return [list(range(n))]
        order = sorted(range(n), key=lambda i: -costs[i]) if costs is not None else list(range(n))
        parts: list[list[int]] = []
        part: list[int] = []
        widest = 0.0
        for i in order:
            c = costs[i] if costs is not None else 0.0
            w = max(widest, c)
            if part and (
                (size_cap is not None and len(part) >= size_cap)
                or (cost_cap is not None and (len(part) + 1) * w > cost_cap)
            ):
                parts.append(part)
                part, w = [], c
            part.append(i)
            widest = w
        parts.append(part)
        return parts

    async def _run(
        self,
        slot: _Slot,
        values: list[Any],
        costs: list[float] | None,
        timeout: float | None,
        carrier: Any,
    ) -> Any:
        parts = self._parts(slot, len(values), costs)
        if len(parts) == 1:
            return await self._fit(slot, values, costs, timeout=timeout, carrier=carrier, whole=True)
        return await self._fit_parts(slot, values, costs, parts, timeout=timeout, carrier=carrier)

    async def _fit_parts(
        self,
        slot: _Slot,
        values: list[Any],
        costs: list[float] | None,
        parts: Sequence[Sequence[int]],
        *,
        timeout: float | None,
        carrier: Any,
    ) -> list[Any]:
        """Run each part (indices into ``values``) with :meth:`_fit`, one after the
        other; the parts' results put back in the places of their items."""
        results: list[Any] = [None] * len(values)
        for idx in parts:
            outs = await self._fit(
                slot,
                [values[i] for i in idx],
                [costs[i] for i in idx] if costs is not None else None,
                timeout=timeout,
                carrier=carrier,
                whole=False,
            )
            for i, out in zip(idx, outs, strict=True):
                results[i] = out
        return results

    async def _fit(
        self,
        slot: _Slot,
        values: list[Any],
        costs: list[float] | None,
        *,
        timeout: float | None,
        carrier: Any,
        whole: bool,
    ) -> Any:
        """Run ``values`` on ``slot``; out of memory: learn, split in halves, run each.

        ``whole``: the stage's own batch, whose result goes back as it came
        (the worker checks its contract); a part's result must be a list of
        its length here, to be put back in place.
        """
        n = len(values)
        padded = n * max(costs) if costs else None
        try:
            outs = await slot.executor.call(values, timeout, carrier)
        except Exception as exc:
            if n == 1 or not self.devices.is_oom(exc):
                raise
            now = self.clock()
            # With a cost function, memory follows the padded cost: learn that
            # alone (a cap on size would hold short items to long items' batches).
            if padded is not None:
                slot.cost.overflowed(padded, now)
            else:
                slot.size.overflowed(n, now)
            slot.oom_splits += 1
            log.info(
                "stage %r: a batch of %d ran out of memory on %s; split in halves "
                "(cap now %s items, %s cost)",
                self.stage,
                n,
                slot.device,
                _cap_int(slot.size.cap),
                slot.cost.cap,
                extra={"stage": self.stage, "device": slot.device},
            )
            order = sorted(range(n), key=lambda i: -costs[i]) if costs else list(range(n))
            half = n // 2
            return await self._fit_parts(
                slot, values, costs, (order[:half], order[half:]), timeout=timeout, carrier=carrier
            )
        if padded is not None:
            slot.cost.fitted(padded)
        else:
            slot.size.fitted(n)
        slot.fitted = max(slot.fitted, n)
        if whole:
            return outs
        if not isinstance(outs, list):
            outs = list(outs) if isinstance(outs, tuple) else outs
        if not isinstance(outs, list) or len(outs) != n:
            raise BatchContractError(
                f"batched stage {self.stage!r} returned "
                f"{len(outs) if isinstance(outs, list) else type(outs).__name__} "
                f"results for a part of {n} items; it must return one result per input, in order"
            )
        return outs

    # -------------------------------------------------------------- figures

    def device_stats(self) -> tuple[DeviceStats, ...]:
        """One record per replica: its device, learned caps, memory and utilization."""
        layer = self.devices.layer
        memory: dict[str, tuple[int, int] | None] = {}
        busy: dict[str, float | None] = {}
        out = []
        for s in self._slots:
            if s.device not in memory:
                try:
                    memory[s.device] = layer.memory(s.device)
                    busy[s.device] = layer.utilization(s.device)
                except Exception:  # figures are best effort; never fail stats()
                    memory[s.device], busy[s.device] = None, None
            mem = memory[s.device]
            out.append(
                DeviceStats(
                    device=s.device,
                    replica=s.index,
                    batch_cap=_cap_int(s.size.cap),
                    cost_cap=s.cost.cap,
                    largest_batch=s.fitted,
                    oom_splits=s.oom_splits,
                    memory_used=mem[0] if mem is not None else None,
                    memory_total=mem[1] if mem is not None else None,
                    utilization=busy[s.device],
                )
            )
        return tuple(out)


def device_executor(
    spec: Stage,
    *,
    post: Callable[[Any], Any] | None,
    activate: Activate | None,
    clock: Callable[[], float],
) -> DeviceExecutor:
    """The executor of a stage placed with ``devices=`` (the runner calls this)."""
    devices = spec.devices
    if devices is None or spec.executor not in ("thread", "process"):
        raise PipelineError(f"stage {spec.name!r}: not a device stage")
    kind: Literal["thread", "process"] = "process" if spec.executor == "process" else "thread"
    return DeviceExecutor(spec, devices, kind, post=post, activate=activate, clock=clock)
