"""The public surface: exported names, the stage decorator, pipeline validation."""

from __future__ import annotations

import asyncio
import types
from typing import Any

import pytest

import flowbatch as fb

EXPECTED = {
    "Adaptive",
    "Backpressure",
    "Batch",
    "BatchContractError",
    "CapacityLimiter",
    "Client",
    "DeadlineExceeded",
    "Devices",
    "Executor",
    "FlowbatchError",
    "ItemFailed",
    "JobFailed",
    "LimiterStats",
    "Overloaded",
    "Pipeline",
    "PipelineClosed",
    "PipelineError",
    "PipelineStats",
    "ReplicaRule",
    "Retry",
    "Runner",
    "Stage",
    "StageStats",
    "Summary",
    "WorkerCrashed",
    "__version__",
    "stage",
}


def test_exported_names() -> None:
    assert set(fb.__all__) == EXPECTED
    for name in fb.__all__:
        assert hasattr(fb, name), name
    public = {n for n in dir(fb) if not n.startswith("_")}
    # Submodules appear as attributes; every other public name is in __all__.
    modules = {n for n in public if isinstance(getattr(fb, n), types.ModuleType)}
    assert public - modules <= EXPECTED


def test_error_tree() -> None:
    for err in (fb.ItemFailed, fb.DeadlineExceeded, fb.Overloaded, fb.PipelineClosed,
                fb.PipelineError, fb.BatchContractError, fb.WorkerCrashed):
        assert issubclass(err, fb.FlowbatchError)
    assert not issubclass(fb.DeadlineExceeded, TimeoutError)
    assert fb.Overloaded.http_status == 503
    assert fb.DeadlineExceeded.http_status == 504
    cause = ValueError("bad")
    e = fb.ItemFailed("embed", 3, cause)
    assert e.__cause__ is cause and e.stage == "embed" and e.attempts == 3
    assert "embed" in str(e) and "3 attempts" in str(e) and "bad" in str(e)


def plain(x: int) -> int:
    return x + 1


async def coro(x: int) -> int:
    return x + 1


def test_stage_forms() -> None:
    s1 = fb.stage(plain)
    assert s1.name == "plain" and s1.executor == "thread" and s1.concurrency == 1

    @fb.stage
    async def a(x: int) -> int:
        return x

    assert isinstance(a, fb.Stage) and a.executor == "async"

    @fb.stage(name="b2", concurrency=4, executor="process")
    def b(x: int) -> int:
        return x

    assert b.name == "b2" and b.executor == "process" and b.concurrency == 4

    class Model:
        def setup(self) -> None: ...

        def __call__(self, xs: list[int]) -> list[int]:
            return xs

    m = fb.stage(Model(), batch=fb.Batch(max_size=8))
    assert m.name == "Model" and m.has_setup and m.batch == fb.Batch(max_size=8)


@pytest.mark.parametrize(
    ("kwargs", "fn", "message"),
    [
        ({}, 42, "is not callable"),
        ({"executor": "async"}, plain, "needs an async def"),
        ({"executor": "thread"}, coro, "async function runs on the event loop"),
        ({"executor": "gpu"}, plain, "executor must be one of"),
        ({"concurrency": 0}, plain, "concurrency must be an int >= 1"),
        ({"batch": 32}, plain, "batch must be a flowbatch.Batch"),
        ({"retry": 3}, plain, "retry must be a flowbatch.Retry"),
        ({"timeout": -1}, plain, "timeout must be a number > 0"),
    ],
)
def test_stage_rejects_bad_options(kwargs: dict[str, Any], fn: Any, message: str) -> None:
    with pytest.raises(fb.PipelineError, match=message):
        fb.stage(fn, name="s", **kwargs)


def test_not_callable_names_the_stage() -> None:
    with pytest.raises(fb.PipelineError, match="'tokenize'.*not callable"):
        fb.stage("not a function", name="tokenize")  # type: ignore[call-overload]
    with pytest.raises(fb.PipelineError, match="stage #1.*not callable"):
        fb.Pipeline([plain, 3])


def test_pipeline_validation() -> None:
    with pytest.raises(fb.PipelineError, match="at least one stage"):
        fb.Pipeline([])
    with pytest.raises(fb.PipelineError, match="two stages are named 'plain'"):
        fb.Pipeline([plain, plain])
    with pytest.raises(fb.PipelineError, match="cannot be pickled"):
        fb.Pipeline([fb.stage(lambda x: x, name="lam", executor="process")])
    with pytest.raises(fb.PipelineError, match="must be a list"):
        fb.Pipeline(plain)  # type: ignore[arg-type]


def test_config_objects_validate() -> None:
    with pytest.raises(ValueError, match="max_size"):
        fb.Batch(max_size=0)
    with pytest.raises(ValueError, match="needs a cost function"):
        fb.Batch(max_cost=10)
    with pytest.raises(ValueError, match="attempts"):
        fb.Retry(attempts=0)
    r = fb.Retry(attempts=4, backoff=0.1, max_backoff=0.3, jitter=False)
    assert [r.delay(n) for n in (1, 2, 3)] == [0.1, 0.2, 0.3]
    j = fb.Retry(backoff=0.1, jitter=True)
    assert all(0.05 <= j.delay(1) <= 0.1 for _ in range(50))


def test_run_sync_and_submit() -> None:
    pipe = fb.Pipeline([coro, plain], name="p")
    assert pipe.run(range(5), progress=False) == [2, 3, 4, 5, 6]

    async def main() -> int:
        async with pipe.open() as runner:
            return int(await runner.submit(10))

    assert asyncio.run(main()) == 12


def test_run_refuses_running_loop() -> None:
    pipe = fb.Pipeline([plain])

    async def main() -> None:
        with pytest.raises(RuntimeError, match="running event loop"):
            pipe.run([1])

    asyncio.run(main())


def test_closed_runner_refuses_items() -> None:
    pipe = fb.Pipeline([coro])

    async def main() -> None:
        runner = pipe.open()
        with pytest.raises(fb.PipelineClosed, match="not open"):
            await runner.submit(1)
        async with runner:
            pass
        with pytest.raises(fb.PipelineClosed, match="closed"):
            await runner.submit(1)
        with pytest.raises(fb.PipelineClosed):
            runner.submit_nowait(1)

    asyncio.run(main())
