"""The public executor interface: a pipeline runs on an executor written here."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import flowbatch as fb


class Model:
    """A stateful stage object: ``setup()`` once per worker, then calls."""

    def __init__(self) -> None:
        self.ready = False
        self.closed = False

    def setup(self) -> None:
        self.ready = True

    def teardown(self) -> None:
        self.closed = True

    def __call__(self, xs: list[int]) -> list[int]:
        assert self.ready
        return [x * 10 for x in xs]


class FakeExecutor(fb.Executor):
    """Runs calls inline, records what the runner asked, and 'loses' a worker
    on the call that carries ``crash_on``."""

    def __init__(self, crash_on: Any = None) -> None:
        self.log: list[Any] = []
        self.crash_on = crash_on
        self.fn: Any = None
        self.in_flight = 0
        self.most_in_flight = 0

    async def start(self, stage: fb.Stage) -> None:
        self.log.append(("start", stage.name, stage.concurrency))
        self.fn = stage.fn
        setup = getattr(self.fn, "setup", None)
        if setup is not None:
            setup()

    async def call(self, arg: Any, timeout: float | None, carrier: Any = None) -> Any:
        self.log.append(("call", arg))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)
            if self.crash_on is not None and self.crash_on in (arg if isinstance(arg, list) else [arg]):
                self.restarts += 1  # its worker died and was replaced
                raise fb.WorkerCrashed("the fake worker died")
            return self.fn(arg)
        finally:
            self.in_flight -= 1

    async def stop(self) -> None:
        self.log.append(("stop",))
        teardown = getattr(self.fn, "teardown", None)
        if teardown is not None:
            teardown()


def test_a_pipeline_runs_on_an_executor_written_in_the_test() -> None:
    model = Model()
    ex = FakeExecutor()
    pipe = fb.Pipeline(
        [fb.stage(model, name="m", executor=ex, batch=fb.Batch(max_size=4), concurrency=2)]
    )

    async def main() -> fb.PipelineStats:
        async with pipe.open() as runner:
            out = [y async for y in runner.map(range(10))]
            assert out == [x * 10 for x in range(10)]
            return runner.stats()

    stats = asyncio.run(main())
    assert ex.log[0] == ("start", "m", 2) and ex.log[-1] == ("stop",)
    calls = [e[1] for e in ex.log if e[0] == "call"]
    assert sorted(x for batch in calls for x in batch) == list(range(10))
    assert all(len(batch) <= 4 for batch in calls)
    assert ex.most_in_flight <= 2
    assert model.closed
    st = stats.stage("m")
    assert st.executor == "FakeExecutor" and st.done == 10 and st.restarts == 0


def test_restarts_reported_by_an_executor_appear_in_stats() -> None:
    ex = FakeExecutor(crash_on=3)
    pipe = fb.Pipeline([fb.stage(lambda x: x + 1, name="inc", executor=ex)])

    async def main() -> None:
        async with pipe.open() as runner:
            with pytest.raises(fb.ItemFailed) as info:
                await runner.submit(3)
            assert isinstance(info.value.__cause__, fb.WorkerCrashed)
            assert await runner.submit(4) == 5
            assert runner.stats().stage("inc").restarts == 1

    asyncio.run(main())


def test_the_runner_tells_each_executor_which_executor_follows_it() -> None:
    """At open, before start(): the next stage's executor, None for the last."""

    class Linked(FakeExecutor):
        def followed_by(self, executor: fb.Executor | None) -> None:
            self.log.append(("followed_by", executor))

    first, last = Linked(), Linked()
    pipe = fb.Pipeline([
        fb.stage(lambda x: x + 1, name="a", executor=first),
        fb.stage(lambda x: x * 2, name="b"),  # a local thread stage
        fb.stage(lambda x: -x, name="c", executor=last),
    ])
    assert pipe.run([1, 2], progress=False) == [-4, -6]
    kind, nxt = first.log[0]
    assert kind == "followed_by" and isinstance(nxt, fb.Executor) and nxt is not last
    assert first.log[1][0] == "start"
    assert last.log[:2] == [("followed_by", None), ("start", "c", 1)]


def test_an_async_function_can_run_on_a_custom_executor() -> None:
    class OnTheLoop(FakeExecutor):
        async def call(self, arg: Any, timeout: float | None, carrier: Any = None) -> Any:
            return await self.fn(arg)

    async def double(x: int) -> int:
        return 2 * x

    pipe = fb.Pipeline([fb.stage(double, executor=OnTheLoop())])
    assert pipe.run([1, 2, 3], progress=False) == [2, 4, 6]


def test_executor_must_be_a_name_or_an_executor() -> None:
    with pytest.raises(fb.PipelineError, match=r"'thread', 'process' or a flowbatch.Executor|flowbatch.Executor"):
        fb.stage(lambda x: x, executor=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fb.Executor()  # type: ignore[abstract]


def test_one_executor_instance_for_two_stages_is_refused() -> None:
    """An instance serves one stage: a second stage's start() replaced the
    first's function, and both stages ran the second one (wrong results)."""
    shared = FakeExecutor()
    with pytest.raises(fb.PipelineError, match=r"stages 'a' and 'b' share one executor instance"):
        fb.Pipeline([
            fb.stage(lambda x: x + 1, name="a", executor=shared),
            fb.stage(lambda x: x * 10, name="b", executor=shared),
        ])


def test_an_object_with_the_methods_but_not_the_class_is_told_to_subclass() -> None:
    class Duck:
        async def start(self, stage: Any) -> None: ...
        async def call(self, arg: Any, timeout: float | None, carrier: Any = None) -> Any: ...
        async def stop(self) -> None: ...

    with pytest.raises(fb.PipelineError, match=r"Duck does not subclass flowbatch.Executor"):
        fb.stage(lambda x: x, executor=Duck())  # type: ignore[arg-type]
