"""Small pipelines the HTTP tests serve (importable by a server subprocess too).

- ``echo``: returns its input; ``"bad"`` is rejected (ValueError -> 422),
  ``"boom"`` breaks the stage (RuntimeError -> 500).
- ``double``: numbers and numpy rows times two; a dict doubles each value.
- ``hold``: waits at a gate until an input ``"open"`` arrives (or SIGUSR1 in a
  server process), then answers its input; tests use it to keep items in
  flight without sleeping. A second stage counts what reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import flowbatch as fb


async def echo(x: Any) -> Any:
    if x == "bad":
        raise ValueError("'bad' is not a valid input")
    if x == "boom":
        raise RuntimeError("the stage broke")
    return x


async def vectorize(text: str) -> list[float]:
    """A stand-in embedding model: any text -> a 3-d vector."""
    return [float(len(text)), 1.0, 0.0]


def make_vec() -> fb.Pipeline:
    return fb.Pipeline([vectorize], name="vec")


def _double(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _double(v) for k, v in x.items()}
    if isinstance(x, str | bytes):
        return x
    return x * 2


def double_batch(xs: list[Any]) -> list[Any]:
    return [_double(x) for x in xs]


class Hold:
    """An async stage that parks items until ``"open"`` arrives."""

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.entered = 0

    def reset(self) -> None:
        self.gate = None
        self.loop = None
        self.entered = 0

    def release(self) -> None:
        """Open the gate from any thread."""
        gate, loop = self.gate, self.loop
        if gate is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(gate.set)

    async def setup(self) -> None:
        """Runs when the pipeline opens, before any item (and any signal) arrives."""
        self.gate = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            self.loop.add_signal_handler(signal.SIGUSR1, self.gate.set)  # main thread only

    async def __call__(self, x: Any) -> Any:
        assert self.gate is not None, "setup() opens the gate's loop"
        if x == "open":
            self.gate.set()
            return "opened"
        self.entered += 1
        await self.gate.wait()
        return x


class Counter:
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def __call__(self, x: Any) -> Any:
        self.seen.append(x)
        return x


HOLD = Hold()
COUNT = Counter()


def make_echo() -> fb.Pipeline:
    return fb.Pipeline([fb.stage(echo, concurrency=16)], name="echo")


def make_double() -> fb.Pipeline:
    return fb.Pipeline(
        [fb.stage(double_batch, batch=fb.Batch(max_size=16), executor="thread")], name="double"
    )


def make_hold() -> fb.Pipeline:
    return fb.Pipeline(
        [fb.stage(HOLD, name="hold", concurrency=64),
         fb.stage(COUNT, name="count", executor="thread")],
        name="hold",
    )


def make_batched() -> fb.Pipeline:
    """hold, then a batched stage: items released together batch together."""
    return fb.Pipeline(
        [fb.stage(HOLD, name="hold", concurrency=64),
         fb.stage(double_batch, name="batched", batch=fb.Batch(max_size=32))],
        name="batched",
    )


# What `flowbatch serve http_pipelines:all_pipelines` serves.
def all_pipelines() -> dict[str, fb.Pipeline]:
    return {"echo": make_echo(), "double": make_double(), "hold": make_hold()}


echo_pipeline = make_echo()
