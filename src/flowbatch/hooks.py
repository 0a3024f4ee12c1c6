"""Typed hooks into the runner: how tracing (and similar plug-ins) see items.

The core calls a :class:`Hooks` object, when one is given to
``pipeline.open(hooks=...)``, at four points; without one it costs a single
``is None`` test per call. Hooks run on the event loop; an exception in a
hook is logged and never fails an item.

- ``admitted(item)`` when an item enters the pipeline, in the caller's
  context (a tracer reads the caller's current span here); what it returns
  is kept as ``item.trace``;
- ``started(stage, items, batch)`` before a stage call over ``items`` (one
  item, or a batch); what it returns is the call's state;
- ``carrier(state)``: a small picklable value the worker activates around
  the stage function, in its thread or process, with ``activate`` (a
  module-level function, so that it reaches worker processes);
- ``ended(state, error, errors)`` after the call: ``error`` for the call as a
  whole, ``errors`` per item for a batch that returned exceptions in place.
- ``resolved(item, error)`` when an item's caller gets its answer, on every
  way out (``error`` is a ``CancelledError`` for a caller who went away).

A hooks object with an ``enabled`` attribute that is false when the runner
opens (a tracer with no provider, say) is dropped, so it costs nothing.

Usage::

    async with pipe.open(hooks=OpenTelemetryHooks()) as runner: ...
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

__all__ = ["Hooks", "ItemView", "StageView", "call_hook"]

log = logging.getLogger("flowbatch.hooks")


class ItemView(Protocol):
    """What a hook may read of an item (the engine's envelope)."""

    @property
    def id(self) -> int: ...

    @property
    def index(self) -> int: ...

    @property
    def attempt(self) -> int: ...

    @property
    def trace(self) -> Any: ...

    @property
    def t_enq(self) -> float:
        """When the item entered its current stage's queue (``perf_counter``)."""
        ...

    @property
    def root(self) -> ItemView: ...


class StageView(Protocol):
    """What a hook may read of a stage at run time."""

    @property
    def name(self) -> str: ...


class Hooks:
    """No-op base class: override what you need."""

    #: Runs ``carrier`` around the stage function in the worker; must be a
    #: module-level function (it is pickled to worker processes) or None.
    activate: Callable[[Any], AbstractContextManager[Any]] | None = None

    def __init__(self, pipeline: str = "") -> None:
        self.pipeline = pipeline

    def bind(self, pipeline: str) -> None:
        """Called by the runner with its pipeline's name before any item."""
        self.pipeline = pipeline

    def admitted(self, item: ItemView) -> Any:
        return None

    def started(self, stage: StageView, items: Sequence[ItemView], batch: bool) -> Any:
        return None

    def carrier(self, state: Any) -> Any:
        return None

    def ended(
        self, state: Any, error: BaseException | None, errors: Sequence[BaseException | None] | None
    ) -> None:
        return None

    def resolved(self, item: ItemView, error: BaseException | None) -> None:
        return None


def call_hook(fn: Callable[..., Any], *args: Any) -> Any:
    """Run one hook; log (never raise) what it raises."""
    try:
        return fn(*args)
    except Exception:
        log.exception("flowbatch hook %s failed", getattr(fn, "__qualname__", fn))
        return None


@contextlib.contextmanager
def activated(activate: Callable[[Any], AbstractContextManager[Any]] | None, carrier: Any) -> Iterator[None]:
    """Enter ``activate(carrier)`` if both are set; a failing hook is logged."""
    if activate is None or carrier is None:
        yield
        return
    try:
        cm = activate(carrier)
        cm.__enter__()
    except Exception:
        log.exception("flowbatch hook activate failed")
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            cm.__exit__(None, None, None)
