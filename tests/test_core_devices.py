"""Devices: replicas placed per device, routing, and batches that learn what fits.

Everything runs through a fake device layer (no GPU here): a layer that
lists devices and recognises :class:`FakeOOM`, and a model that raises it
for batches above what its "memory" holds.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest

import flowbatch as fb
from flowbatch.devices import (
    Devices,
    LearnedLimit,
    current_device,
    is_oom,
)
from flowbatch.executors import RemoteError
from flowbatch.metrics import DeviceStats
from polling import until


class FakeOOM(RuntimeError):
    """The fake device's out-of-memory error (not torch's: the layer says so)."""


class FakeLayer:
    """A device runtime double: its devices, its OOM error, fixed figures."""

    def __init__(self, visible: tuple[str, ...] = ("cuda:0", "cuda:1")) -> None:
        self._visible = list(visible)
        self.freed: list[str] = []

    def visible(self) -> list[str]:
        return list(self._visible)

    def is_oom(self, exc: BaseException) -> bool:
        return isinstance(exc, FakeOOM)

    def released(self, device: str) -> None:
        self.freed.append(device)

    def memory(self, device: str) -> tuple[int, int] | None:
        return (1000 + int(device[-1]), 8000) if device.startswith("cuda:") else None

    def utilization(self, device: str) -> float | None:
        return 0.25 if device.startswith("cuda:") else None


class Clock:
    """A clock moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Model:
    """A batched model whose "memory" holds ``fits`` items (or ``fits_cost``
    padded cost); records every call as (device, batch)."""

    def __init__(self, fits: int = 1_000_000, fits_cost: float | None = None) -> None:
        self.fits = fits
        self.fits_cost = fits_cost
        self.device: str | None = None
        self.setups: list[tuple[int, str]] = []  # shared by the copies
        self.calls: list[tuple[str | None, list[Any]]] = []

    def setup(self, device: str) -> None:
        self.device = device
        self.setups.append((id(self), device))

    def __call__(self, batch: list[Any]) -> list[Any]:
        self.calls.append((self.device, list(batch)))
        if len(batch) > self.fits:
            raise FakeOOM(f"{len(batch)} items do not fit")
        if self.fits_cost is not None and len(batch) * max(map(len, batch)) > self.fits_cost:
            raise FakeOOM("too many tokens")
        return [(self.device, x) for x in batch]

    def sizes(self) -> list[int]:
        return [len(b) for _, b in self.calls]


def devices(*names: str, per_device: int = 1, **kw: Any) -> Devices:
    return Devices(names or "auto", per_device, layer=kw.pop("layer", FakeLayer()), **kw)


# ------------------------------------------------------------------ placement


def test_one_replica_per_device_and_slot_each_set_up_on_its_device() -> None:
    model = Model()
    st = fb.stage(
        model,
        devices=devices("cuda:0", "cuda:1", per_device=2),
        batch=fb.Batch(max_size=4),
    )
    assert st.concurrency == 4
    assert st.devices is not None and st.devices.names == ("cuda:0", "cuda:1")

    async def main() -> list[Any]:
        async with fb.Pipeline([st]).open() as runner:
            return [await runner.submit(i) for i in range(3)]

    out = asyncio.run(main())
    assert sorted(d for _, d in model.setups) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert len({i for i, _ in model.setups}) == 4  # four objects: a model per replica
    assert model.device is None  # the stage's own object is never set up
    assert all(d in ("cuda:0", "cuda:1") for d, _ in out)


def test_devices_as_a_list_and_replicas_per_device_keywords() -> None:
    st = fb.stage(Model(), devices=["cuda:0", "cuda:1"], replicas_per_device=3)
    assert st.concurrency == 6
    assert st.devices is not None and st.devices.replicas_per_device == 3
    assert "cuda:1" in repr(st)


class AttrModel:
    """setup() without a device argument: the replica's attribute is set first."""

    def __init__(self) -> None:
        self.device = "unset"
        self.seen: list[str] = []

    def setup(self) -> None:
        self.seen.append(self.device)

    def __call__(self, x: int) -> str:
        return self.device


def test_setup_without_a_device_argument_gets_the_device_attribute() -> None:
    model = AttrModel()
    st = fb.stage(model, devices=devices("cuda:1"))

    async def main() -> str:
        async with fb.Pipeline([st]).open() as runner:
            return await runner.submit(1)

    assert asyncio.run(main()) == "cuda:1"
    assert model.seen == ["cuda:1"]  # one replica: the object itself, placed before setup


def where(x: int) -> tuple[int, str | None]:
    return x, current_device()


def test_a_plain_function_asks_current_device() -> None:
    st = fb.stage(where, devices=devices("cuda:0", "cuda:1"))

    async def main() -> set[str | None]:
        async with fb.Pipeline([st]).open() as runner:
            outs = await asyncio.gather(*(runner.submit(i) for i in range(20)))
        return {d for _, d in outs}

    assert asyncio.run(main()) <= {"cuda:0", "cuda:1"}
    assert current_device() is None  # not in a replica


def test_auto_uses_every_visible_device() -> None:
    st = fb.stage(Model(), devices=Devices("auto", 2, layer=FakeLayer(("cuda:0", "cuda:1"))))
    assert st.devices is not None and st.devices.names == ("cuda:0", "cuda:1")
    assert st.concurrency == 4


def test_auto_without_a_gpu_is_an_ordinary_cpu_stage() -> None:
    model = Model()
    st = fb.stage(model, devices=Devices("auto", layer=FakeLayer(())), replicas_per_device=3)
    assert st.devices is None
    assert st.concurrency == 3  # one CPU worker per replica, today's behaviour
    assert st.executor == "thread"


def test_placement_errors_say_what_to_do() -> None:
    with pytest.raises(fb.PipelineError, match="replicas_per_device instead of concurrency"):
        fb.stage(Model(), devices=devices("cuda:0"), concurrency=2)

    async def agen(x: int) -> int:
        return x

    with pytest.raises(fb.PipelineError, match="plain def"):
        fb.stage(agen, devices=devices("cuda:0"))
    with pytest.raises(fb.PipelineError, match="needs devices="):
        fb.stage(Model(), replicas_per_device=2)
    with pytest.raises(fb.PipelineError, match="twice"):
        fb.stage(Model(), devices=["cuda:0", "cuda:0"])
    with pytest.raises(fb.PipelineError, match="replicas_per_device must be"):
        fb.stage(Model(), devices=["cuda:0"], replicas_per_device=0)

    class Remote(fb.Executor):
        async def start(self, stage: fb.Stage) -> None: ...
        async def call(self, arg: Any, timeout: float | None, carrier: Any = None) -> Any: ...
        async def stop(self) -> None: ...

    with pytest.raises(fb.PipelineError, match="places its own"):
        fb.stage(Model(), executor=Remote(), devices=["cuda:0"])


# -------------------------------------------------------------------- routing


class Blocking(Model):
    """Blocks a call holding "block" until the gate opens."""

    def __init__(self, gate: threading.Event, entered: threading.Event) -> None:
        super().__init__()
        self.gate = gate
        self.entered = entered

    def __call__(self, batch: list[Any]) -> list[Any]:
        if "block" in batch:
            self.entered.set()
            assert self.gate.wait(30)
        return super().__call__(batch)


def test_a_batch_goes_to_a_free_replica() -> None:
    gate, entered = threading.Event(), threading.Event()
    st = fb.stage(
        Blocking(gate, entered),
        devices=devices("cuda:0", "cuda:1"),
        batch=fb.Batch(max_size=8),
    )

    async def main() -> tuple[Any, Any]:
        async with fb.Pipeline([st]).open() as runner:
            first = asyncio.ensure_future(runner.submit("block"))
            await until(entered.is_set)
            second = await runner.submit("free")  # answered while the first is held
            gate.set()
            return await first, second

    (d1, _), (d2, _) = asyncio.run(main())
    assert {d1, d2} == {"cuda:0", "cuda:1"}


# --------------------------------------------------------------------- memory


def test_out_of_memory_splits_the_batch_and_the_size_that_fits_caps_later_batches() -> None:
    model = Model(fits=4)
    layer = FakeLayer()
    st = fb.stage(
        model, devices=devices("cuda:0", layer=layer), batch=fb.Batch(max_size=16, max_wait=60)
    )

    async def main() -> tuple[list[Any], fb.PipelineStats, list[Any], fb.PipelineStats]:
        async with fb.Pipeline([st]).open() as runner:
            first = await asyncio.gather(*(runner.submit(i) for i in range(16)))
            s1 = runner.stats()
            second = await asyncio.gather(*(runner.submit(i) for i in range(16, 32)))
            return first, s1, second, runner.stats()

    first, s1, second, s2 = asyncio.run(main())
    assert first == [("cuda:0", i) for i in range(16)]
    assert second == [("cuda:0", i) for i in range(16, 32)]
    # 16 and 8 ran out of memory; halves of 4 ran. Nothing failed.
    assert model.sizes()[:7] == [16, 8, 4, 4, 8, 4, 4]
    assert s1.failed == 0 and s1.stages[0].retried == 0
    (dev,) = s1.stages[0].devices
    assert dev.batch_cap == 4 and dev.oom_splits == 3 and dev.largest_batch == 4
    assert layer.freed == ["cuda:0"] * 3  # cached memory given back after each
    # Later batches are formed within the cap (by the worker loop, not cut
    # up in the executor): no more out-of-memory errors.
    assert model.sizes()[7:] == [4, 4, 4, 4]
    assert s2.stages[0].batch_sizes == {16: 1, 4: 4}
    assert s2.stages[0].devices[0].oom_splits == 3
    assert s2.failed == 0


def test_one_item_that_does_not_fit_fails_alone() -> None:
    model = Model(fits=0)
    st = fb.stage(model, devices=devices("cuda:0"), batch=fb.Batch(max_size=4, max_wait=60))

    async def main() -> list[Any]:
        async with fb.Pipeline([st]).open() as runner:
            return await asyncio.gather(
                *(runner.submit(i) for i in range(4)), return_exceptions=True
            )

    outs = asyncio.run(main())
    assert all(isinstance(o, fb.ItemFailed) and isinstance(o.__cause__, FakeOOM) for o in outs)


def test_the_cap_is_probed_upward_after_a_while_on_the_runner_clock() -> None:
    model = Model(fits=4)
    clock = Clock()
    st = fb.stage(
        model,
        devices=devices("cuda:0", probe_after=10),
        batch=fb.Batch(max_size=16, max_wait=60),
    )

    async def burst(runner: fb.Runner, n: int = 16) -> None:
        outs = await asyncio.gather(*(runner.submit(i) for i in range(n)))
        assert len(outs) == n

    async def main() -> list[int | None]:
        caps: list[int | None] = []
        async with fb.Pipeline([st]).open(clock=clock) as runner:
            await burst(runner)  # 16 and 8 fail: cap 4
            caps.append(runner.stats().stages[0].devices[0].batch_cap)
            model.fits = 16  # memory freed elsewhere
            await burst(runner)  # not yet time to probe
            caps.append(runner.stats().stages[0].devices[0].batch_cap)
            # Batches are held open (max_wait) until full: each burst is a
            # whole number of batches at the cap the probe will allow.
            for n in (12, 14, 16, 16):
                clock.now += 10
                await burst(runner, n)
                caps.append(runner.stats().stages[0].devices[0].batch_cap)
        return caps

    caps = asyncio.run(main())
    # 4, still 4, then halfway to 8 (the smallest failure), 7, 8, then the
    # cap reaches max_size and is lifted.
    assert caps == [4, 4, 6, 7, 8, None]
    assert model.sizes()[-1] == 16


def test_the_token_budget_is_learned_and_parts_are_cut_longest_first() -> None:
    model = Model(fits_cost=40)
    texts = ["x" * n for n in (1, 9, 2, 8, 3, 7, 4, 6)]
    st = fb.stage(
        model,
        devices=devices("cuda:0"),
        batch=fb.Batch(max_size=8, max_wait=60, cost=len, max_cost=10_000),
    )

    async def main() -> tuple[list[Any], fb.PipelineStats]:
        async with fb.Pipeline([st]).open() as runner:
            outs = await asyncio.gather(*(runner.submit(t) for t in texts))
            return outs, runner.stats()

    outs, stats = asyncio.run(main())
    assert [x for _, x in outs] == texts  # in order, none failed
    assert stats.failed == 0
    first, second = model.calls[1][1], model.calls[2][1]
    # The failed batch of 8 (padded 72) is split longest first: the longest
    # half, then the shortest, so each half pads little.
    assert sorted(map(len, first)) == [6, 7, 8, 9]
    assert len(model.calls[0][1]) == 8
    assert sorted(map(len, second)) == [1, 2, 3, 4]
    dev = stats.stages[0].devices[0]
    assert dev.cost_cap is not None and dev.cost_cap <= 40
    assert dev.batch_cap is None  # the budget is learned, not a size: short items still batch


def test_learned_limit_bisects_up_to_the_failure_and_lifts_at_the_ceiling() -> None:
    lim = LearnedLimit(probe_after=5, ceiling=32, whole=True)
    assert lim.allowed(0) is None
    lim.overflowed(32, now=0)
    assert lim.cap == 16  # half, until a part runs
    lim.fitted(16)
    lim.overflowed(16, now=1)  # memory got tighter: what fitted does not now
    assert lim.cap == 8 and lim.failed == 16
    lim.fitted(8)
    assert lim.allowed(5.9) == 8  # not yet
    assert lim.allowed(6) == 12
    lim.overflowed(12, now=6)
    assert lim.cap == 8 and lim.failed == 12  # back to what fitted
    assert lim.allowed(11) == 10
    lim.fitted(10)
    assert lim.allowed(16) == 11
    lim.fitted(11)
    assert lim.allowed(21) == 12  # adjacent: try the failure again
    lim.fitted(12)
    assert lim.failed is None
    assert lim.allowed(26) == 24
    assert lim.allowed(31) is None  # reached the ceiling: no cap


def test_learned_cost_limit_is_fractional() -> None:
    lim = LearnedLimit(probe_after=1, ceiling=None, whole=False)
    lim.overflowed(100.0, now=0)
    assert lim.cap == 50.0
    lim.fitted(60.0)
    assert lim.cap == 60.0
    assert lim.allowed(1) == 80.0


def test_is_oom_recognises_torch_and_its_message() -> None:
    torch = pytest.importorskip("torch")
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_oom(RemoteError("OutOfMemoryError: CUDA out of memory. (could not be pickled)"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(FakeOOM("x"))
    assert Devices(["cuda:0"], oom=lambda e: isinstance(e, FakeOOM)).is_oom(FakeOOM("x"))


# -------------------------------------------------------------------- figures


def test_stats_and_prometheus_show_each_replica() -> None:
    pytest.importorskip("prometheus_client")
    from flowbatch.prometheus import render

    model = Model(fits=2)
    st = fb.stage(
        model,
        name="embed",
        devices=devices("cuda:0", "cuda:1"),
        batch=fb.Batch(max_size=4, max_wait=60),
    )

    async def main() -> tuple[fb.PipelineStats, str]:
        async with fb.Pipeline([st], name="p").open() as runner:
            # A full batch of 4 for each replica (a fair share of 8): both split.
            await asyncio.gather(*(runner.submit(i) for i in range(8)))
            return runner.stats(), render({"p": runner}).decode()

    stats, text = asyncio.run(main())
    devs = stats.stages[0].devices
    assert [(d.device, d.replica) for d in devs] == [("cuda:0", 0), ("cuda:1", 1)]
    assert all(d.memory_used == 1000 + int(d.device[-1]) and d.memory_total == 8000 for d in devs)
    assert all(d.utilization == 0.25 for d in devs)
    assert [d.batch_cap for d in devs] == [2, 2]
    assert [d.oom_splits for d in devs] == [1, 1]
    assert stats.stages[0].to_dict()["devices"][0]["device"] == "cuda:0"
    assert isinstance(devs[0], DeviceStats)
    def sample(metric: str, device: str) -> str:
        (line,) = [
            x for x in text.splitlines()
            if x.startswith(metric + "{") and f'device="{device}"' in x
        ]
        assert 'pipeline="p"' in line and 'stage="embed"' in line
        return line.rsplit(" ", 1)[1]

    assert sample("flowbatch_device_batch_cap", "cuda:0") == "2.0"
    assert sample("flowbatch_device_oom_splits_total", "cuda:1") == "1.0"
    assert sample("flowbatch_device_memory_used_bytes", "cuda:1") == "1001.0"
    assert sample("flowbatch_device_memory_total_bytes", "cuda:0") == "8000.0"
    assert sample("flowbatch_device_utilization", "cuda:0") == "0.25"


# ------------------------------------------------------------------ processes


class PidModel:
    def __init__(self) -> None:
        self.device = ""

    def setup(self, device: str) -> None:
        self.device = device

    def __call__(self, batch: list[int]) -> list[tuple[str, int]]:
        return [(self.device, os.getpid()) for _ in batch]


def test_process_workers_one_per_device() -> None:
    st = fb.stage(
        PidModel(),
        executor="process",
        devices=["cuda:0", "cuda:1"],
        batch=fb.Batch(max_size=2),
    )

    async def main() -> tuple[set[tuple[str, int]], fb.PipelineStats]:
        seen: set[tuple[str, int]] = set()
        async with fb.Pipeline([st]).open() as runner:
            for _ in range(50):  # until both replicas have answered
                seen |= set(await asyncio.gather(*(runner.submit(i) for i in range(8))))
                if len(seen) == 2:
                    break
            return seen, runner.stats()

    seen, stats = asyncio.run(main())
    assert [d.device for d in stats.stages[0].devices] == ["cuda:0", "cuda:1"]
    assert {d for d, _ in seen} == {"cuda:0", "cuda:1"}
    assert len({p for _, p in seen}) == 2
    assert os.getpid() not in {p for _, p in seen}


def test_flowbatch_top_reads_and_shows_the_devices() -> None:
    pytest.importorskip("prometheus_client")
    pytest.importorskip("rich")
    from rich.console import Console

    from flowbatch.observe import top
    from flowbatch.prometheus import render

    st = fb.stage(
        Model(fits=2),
        name="embed",
        devices=devices("cuda:0", "cuda:1"),
        batch=fb.Batch(max_size=4, max_wait=60),
    )

    async def main() -> str:
        async with fb.Pipeline([st], name="p").open() as runner:
            await asyncio.gather(*(runner.submit(i) for i in range(8)))
            return render({"p": runner}).decode()

    parsed = top.parse(asyncio.run(main()))
    devs = parsed["p"].stages[0].devices
    assert [(d.device, d.replica, d.batch_cap, d.oom_splits) for d in devs] == [
        ("cuda:0", 0, 2, 1),
        ("cuda:1", 1, 2, 1),
    ]
    assert devs[1].memory_used == 1001 and devs[0].utilization == 0.25
    console = Console(width=160, record=True)
    console.print(top.render(top.compute({}, parsed, 1.0)))
    screen = console.export_text()
    assert "embed on cuda:0 x1: cap 2, 1 oom splits" in screen
    assert "gpu 25% busy" in screen
