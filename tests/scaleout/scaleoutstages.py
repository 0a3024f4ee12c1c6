"""Stage functions for the scale-out tests, pickled by value to Ray and Dask workers.

The workers cannot import the tests' folder, so the conftest registers this
module with cloudpickle to travel by value. Markers are files under a
directory the test passes in: they work across processes and machines.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np


class Counted:
    """``setup()`` counts its runs in this replica; calls report (pid, setups, n)."""

    def __init__(self) -> None:
        self.setups = 0

    def setup(self) -> None:
        self.setups += 1

    def __call__(self, xs: list[Any]) -> list[tuple[int, int, int, Any]]:
        return [(os.getpid(), self.setups, len(xs), x) for x in xs]


def double_or_fail(xs: list[int]) -> list[Any]:
    """Doubles; 7 comes back as its own error, 13 breaks the whole batch."""
    if 13 in xs:
        raise ValueError("thirteen breaks the batch")
    return [ValueError("seven") if x == 7 else 2 * x for x in xs]


def double_one(x: int) -> int:
    if x == 7:
        raise ValueError("seven")
    return 2 * x


class FlakyOnce:
    """Fails each item's first attempt (a marker file per item), then doubles."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __call__(self, xs: list[int]) -> list[Any]:
        out: list[Any] = []
        for x in xs:
            mark = Path(self.where, f"flaky-{x}")
            if mark.exists():
                out.append(2 * x)
            else:
                mark.touch()
                out.append(ConnectionError(f"{x} failed once"))
        return out


def wrong_length(xs: list[int]) -> list[int]:
    return xs[:-1]


def slow_on_first(xs: list[int]) -> list[int]:
    """Sleeps past any sensible timeout on a batch holding 0; else doubles."""
    if 0 in xs:
        time.sleep(60)
    return [2 * x for x in xs]


class HoldFirst:
    """The first call anywhere writes its pid to ``where/held`` and blocks (60 s
    at most) until killed; later calls (in a replacement) double."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __call__(self, xs: Any) -> Any:
        held = Path(self.where, "held")
        try:
            fd = os.open(held, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if isinstance(xs, int):  # an unbatched stage
                return (os.getpid(), 2 * xs)
            return [(os.getpid(), 2 * x) for x in xs]
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        for _ in range(600):
            time.sleep(0.1)
        raise RuntimeError("was never killed")


class Blocking:
    """Each call blocks until the file ``where/open`` exists (60 s at most)."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __call__(self, xs: list[int]) -> list[int]:
        gate = Path(self.where, "open")
        for _ in range(6000):
            if gate.exists():
                break
            time.sleep(0.01)
        return xs


def rebuild(arr: np.ndarray, log: str) -> Big:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    return Big(arr, log)


class Big:
    """A 4 MB array that writes its process id to ``log`` whenever it is unpickled."""

    def __init__(self, arr: np.ndarray, log: str) -> None:
        self.arr = arr
        self.log = log

    def __reduce__(self) -> tuple[Any, ...]:
        return rebuild, (self.arr, self.log)


class MakeBig:
    def __init__(self, log: str) -> None:
        self.log = log

    def __call__(self, xs: list[int]) -> list[Big]:
        return [Big(np.full(1 << 19, x, dtype=np.float64), self.log) for x in xs]  # 4 MB


def total(xs: list[Big]) -> list[float]:
    return [float(b.arr[0]) * b.arr.size for b in xs]


def where_am_i(xs: list[int]) -> list[tuple[str, int]]:
    import ray

    node = ray.get_runtime_context().get_node_id()
    return [(node, x) for x in xs]


class OnNode:
    """Notes its node in ``where/node-<id>`` on each call; the first call on the
    node named in ``where/hold-on`` blocks until the node is gone."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __call__(self, xs: list[int]) -> list[tuple[str, int]]:
        import ray

        node = ray.get_runtime_context().get_node_id()
        Path(self.where, f"node-{node}").touch()
        hold = Path(self.where, "hold-on")
        if hold.exists() and hold.read_text() == node:
            for _ in range(600):
                time.sleep(0.1)
        time.sleep(0.01)  # a call takes a while, so every actor gets some
        return [(node, x) for x in xs]


class DaskCounted:
    """Counts setup() runs in this Dask worker process; reports (pid, setups)."""

    def __init__(self) -> None:
        self.setups = 0

    def setup(self) -> None:
        self.setups += 1

    def __call__(self, xs: list[int]) -> list[tuple[int, int, int]]:
        return [(os.getpid(), self.setups, x) for x in xs]


class DieOnce:
    """The first call holding ``victim`` kills its own worker process."""

    def __init__(self, where: str, victim: int) -> None:
        self.where = where
        self.victim = victim

    def __call__(self, xs: list[int]) -> list[int]:
        if self.victim in xs:
            try:
                fd = os.open(Path(self.where, "died"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                os.kill(os.getpid(), 9)
        return [2 * x for x in xs]


class BrokenSetup:
    def setup(self) -> None:
        raise RuntimeError("no model here")

    def __call__(self, x: int) -> int:
        return x


def split_words(texts: list[str]) -> list[Any]:
    """A batched fan-out stage: each text becomes its numbers (a generator each)."""
    return [(int(w) for w in t.split()) for t in texts]


async def aio_double(x: int) -> tuple[int, int]:
    """An async stage: runs on the actor's event loop."""
    import asyncio

    await asyncio.sleep(0)
    return os.getpid(), 2 * x
