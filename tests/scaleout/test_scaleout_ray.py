"""Stages on Ray actors: the engine's rules hold, actors die and are replaced,
pending actors are reported, values travel as object references."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest
import scaleoutstages as st

import flowbatch as fb
from polling import until

ray = pytest.importorskip("ray")
fbray = pytest.importorskip("flowbatch.ray")

pytestmark = pytest.mark.usefixtures("ray_cluster")

RETRY_CRASH = fb.Retry(attempts=3, backoff=0.01, on=(fb.WorkerCrashed,))


def touch(path: Path) -> None:
    path.touch()


def read_pid(path: Path) -> int:
    return int(path.read_text())


def on_ray(**kw: Any) -> Any:
    kw.setdefault("num_cpus", 0.25)
    return fbray.actors(**kw)


def executor(kind: str) -> Any:
    return on_ray() if kind == "ray" else "thread"


KINDS = ["thread", "ray"]


# ------------------------------------------------------- the engine's rules


def test_setup_runs_once_per_actor_and_batches_arrive_whole() -> None:
    stage = fb.stage(st.Counted(), executor=on_ray(), concurrency=2, batch=fb.Batch(max_size=8))

    async def main() -> tuple[list[Any], fb.PipelineStats]:
        async with fb.Pipeline([stage]).open() as runner:
            out = [x async for x in runner.map(range(200))]
            return out, runner.stats()

    out, stats = asyncio.run(main())
    assert [x for *_, x in out] == list(range(200))
    pids = {pid for pid, *_ in out}
    assert len(pids) <= 2 and os.getpid() not in pids  # ran in the actors
    assert {setups for _, setups, _, _ in out} == {1}  # setup() once in each actor
    s = stats.stage("Counted")
    assert s.executor == "RayActors" and s.done == 200
    assert sum(n * c for n, c in s.batch_sizes.items()) == 200  # whole batches from the runner


@pytest.mark.parametrize("kind", KINDS)
def test_one_bad_item_fails_alone_in_a_batch(kind: str) -> None:
    """An error in the returned list fails that item; a batch that raises is
    bisected until the breaking item fails alone."""
    stage = fb.stage(st.double_or_fail, executor=executor(kind), batch=fb.Batch(max_size=16))

    async def main() -> list[Any]:
        async with fb.Pipeline([stage]).open() as runner:
            return [x async for x in runner.map(range(40), return_exceptions=True)]

    out = asyncio.run(main())
    for i, r in enumerate(out):
        if i in (7, 13):
            assert isinstance(r, fb.ItemFailed) and isinstance(r.error, ValueError)
        else:
            assert r == 2 * i
    assert "seven" in str(out[7]) and "thirteen" in str(out[13])


@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_calls_and_the_original_exception_type(kind: str) -> None:
    stage = fb.stage(st.double_one, executor=executor(kind), concurrency=2)

    async def main() -> list[Any]:
        async with fb.Pipeline([stage]).open() as runner:
            return [x async for x in runner.map(range(10), return_exceptions=True)]

    out = asyncio.run(main())
    assert out[:7] == [0, 2, 4, 6, 8, 10, 12]
    assert type(out[7].error) is ValueError  # not wrapped in Ray's error type


def test_an_exception_class_of_the_users_script_comes_back_as_itself() -> None:
    """A class Ray ships by value (defined in the script's ``__main__``, or
    locally as here) that plain pickle cannot name: it still comes back as
    its own type, so ``Retry(on=...)`` and ``except`` work (it was a
    RemoteError "could not be pickled back")."""

    class Flaky(Exception):
        pass

    def fail_three(xs: list[int]) -> list[Any]:
        if 3 in xs:
            raise Flaky("three")
        return [Flaky("four") if x == 4 else x for x in xs]

    retry = fb.Retry(attempts=2, backoff=0.001, on=(Flaky,))
    stage = fb.stage(fail_three, executor=on_ray(), batch=fb.Batch(max_size=8), retry=retry)

    async def main() -> tuple[list[Any], fb.PipelineStats]:
        async with fb.Pipeline([stage]).open() as runner:
            out = await asyncio.gather(*(runner.submit(i) for i in range(6)),
                                       return_exceptions=True)
            return out, runner.stats()

    out, stats = asyncio.run(main())
    assert out[:3] == [0, 1, 2] and out[5] == 5
    assert type(out[3].__cause__) is Flaky and type(out[4].__cause__) is Flaky
    assert out[3].attempts == 2 and stats.stages[0].retried >= 2  # Retry(on=(Flaky,)) applied


@pytest.mark.parametrize("kind", KINDS)
def test_retries_follow_the_stage_policy(kind: str, tmp_path: Path) -> None:
    retry = fb.Retry(attempts=2, backoff=0.001, on=(ConnectionError,))
    stage = fb.stage(
        st.FlakyOnce(str(tmp_path)), executor=executor(kind), batch=fb.Batch(max_size=8),
        retry=retry,
    )

    async def main() -> tuple[list[Any], fb.PipelineStats]:
        async with fb.Pipeline([stage]).open() as runner:
            return [x async for x in runner.map(range(20))], runner.stats()

    out, stats = asyncio.run(main())
    assert out == [2 * i for i in range(20)]
    assert stats.stages[0].retried == 20


@pytest.mark.parametrize("kind", KINDS)
def test_a_broken_batch_contract_is_reported(kind: str) -> None:
    stage = fb.stage(st.wrong_length, executor=executor(kind), batch=fb.Batch(max_size=4))

    async def main() -> list[Any]:
        async with fb.Pipeline([stage]).open() as runner:
            return [x async for x in runner.map(range(4), return_exceptions=True)]

    out = asyncio.run(main())
    assert all(isinstance(r, fb.ItemFailed) for r in out)
    assert all(isinstance(r.error, fb.BatchContractError) for r in out)
    assert re.search(r"returned \d+ results for a batch of \d+ items", str(out[0]))


@pytest.mark.parametrize("kind", KINDS)
def test_a_fan_out_stage_on_ray(kind: str) -> None:
    """Children made in the actor (a generator per input) flow on and batch."""
    pipe = fb.Pipeline([
        fb.stage(st.split_words, executor=executor(kind), batch=fb.Batch(max_size=4),
                 fan_out=True),
        fb.stage(st.double_one, executor=executor(kind)),
    ])
    out = pipe.run(["1 2", "3", "", "4 5 6"], progress=False)
    assert out == [[2, 4], [6], [], [8, 10, 12]]


def test_an_async_stage_runs_in_the_actors() -> None:
    pipe = fb.Pipeline([fb.stage(st.aio_double, executor=on_ray(), concurrency=2)])
    out = pipe.run(range(10), progress=False)
    assert [x for _, x in out] == [2 * i for i in range(10)]
    assert os.getpid() not in {pid for pid, _ in out}


def test_a_failing_setup_fails_the_open() -> None:
    pipe = fb.Pipeline([fb.stage(st.BrokenSetup(), executor=on_ray())])

    async def main() -> None:
        async with pipe.open():
            pass

    with pytest.raises(fb.PipelineError, match=r"setup\(\) failed: RuntimeError: no model"):
        asyncio.run(main())


class _HoldsALock:
    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self, x: int) -> int:
        return x


def test_a_stage_that_cannot_be_pickled_fails_the_open_naming_the_stage() -> None:
    pipe = fb.Pipeline([fb.stage(_HoldsALock(), name="locked", executor=on_ray())])

    async def main() -> None:
        async with pipe.open():
            pass

    with pytest.raises(fb.PipelineError, match=r"stage 'locked' cannot be sent to Ray actors"):
        asyncio.run(main())


def test_order_and_a_mixed_pipeline_with_local_stages() -> None:
    async def fetch(x: int) -> int:
        await asyncio.sleep(0)
        return x + 1

    def local(x: int) -> int:
        return -x

    pipe = fb.Pipeline([
        fb.stage(fetch, concurrency=8),
        fb.stage(st.double_or_fail, executor=on_ray(), concurrency=2,
                 batch=fb.Batch(max_size=8)),
        fb.stage(local),
    ])

    async def main() -> list[Any]:
        async with pipe.open() as runner:
            return [x async for x in runner.map(range(12), ordered=True,
                                                return_exceptions=True)]

    out = asyncio.run(main())
    assert isinstance(out[6], fb.ItemFailed)  # 6 + 1 == 7 fails in the Ray stage
    out[6] = None
    assert out == [None if i == 6 else -2 * (i + 1) for i in range(12)]  # in input order


def test_a_call_past_the_timeout_kills_the_actor_and_a_replacement_serves() -> None:
    ex = on_ray()
    stage = fb.stage(st.slow_on_first, executor=ex, timeout=1.0, batch=fb.Batch(max_size=1))

    async def main() -> tuple[list[Any], fb.PipelineStats]:
        async with fb.Pipeline([stage]).open() as runner:
            first = await asyncio.gather(runner.submit(0), return_exceptions=True)
            rest = [x async for x in runner.map(range(1, 4))]
            return [*first, *rest], runner.stats()

    out, stats = asyncio.run(main())
    assert isinstance(out[0], fb.ItemFailed) and isinstance(out[0].error, TimeoutError)
    assert out[1:] == [2, 4, 6]
    assert stats.stages[0].restarts == 1


def test_an_expired_item_never_reaches_the_actors(tmp_path: Path) -> None:
    stage = fb.stage(st.Blocking(str(tmp_path)), executor=on_ray(), batch=fb.Batch(max_size=1))

    async def main() -> tuple[Any, Any, fb.PipelineStats]:
        async with fb.Pipeline([stage]).open() as runner:
            first = asyncio.ensure_future(runner.submit(1))
            await until(lambda: runner.stats().stages[0].in_flight == 1)
            late = asyncio.ensure_future(runner.submit(2, timeout=0.05))
            done = await asyncio.gather(late, return_exceptions=True)
            touch(Path(tmp_path, "open"))
            return await first, done[0], runner.stats()

    first, late, stats = asyncio.run(main())
    assert first == 1
    assert isinstance(late, fb.DeadlineExceeded)
    assert stats.stages[0].done == 1  # the expired item was dropped before its call


# ------------------------------------------------------ actors that die


def test_ray_kill_mid_call_fails_only_the_item_it_held(tmp_path: Path) -> None:
    """Without a retry the killed actor's item fails with WorkerCrashed and
    no other; a replacement serves the rest; every item has one result."""
    ex = on_ray()
    stage = fb.stage(st.HoldFirst(str(tmp_path)), executor=ex, concurrency=2)
    held = Path(tmp_path, "held")

    async def main() -> tuple[list[Any], fb.PipelineStats]:
        async with fb.Pipeline([stage]).open() as runner:
            results: list[Any] = []

            async def consume() -> None:
                async for r in runner.map(range(30), return_exceptions=True):
                    results.append(r)

            task = asyncio.ensure_future(consume())
            await until(lambda: held.exists() and held.read_text() != "")
            pid = read_pid(held)
            victim = [a for a in ex.actors() if a.pid == pid]
            assert len(victim) == 1 and victim[0].busy
            ray.kill(victim[0].handle)
            await task
            return results, runner.stats()

    out, stats = asyncio.run(main())
    assert len(out) == 30
    crashed = [i for i, r in enumerate(out) if isinstance(r, fb.ItemFailed)]
    assert len(crashed) == 1 and isinstance(out[crashed[0]].error, fb.WorkerCrashed)
    assert "died while it held this item" in str(out[crashed[0]])
    pid = read_pid(held)
    assert all(r == (r[0], 2 * i) and r[0] != pid for i, r in enumerate(out) if i not in crashed)
    assert stats.stages[0].restarts == 1


def test_ray_kill_mid_batch_loses_nothing(tmp_path: Path) -> None:
    """A batch whose actor was killed is split and run again on the
    replacement (WorkerCrashed splits a batch); with a Retry, or without."""
    ex = on_ray()
    stage = fb.stage(st.HoldFirst(str(tmp_path)), executor=ex, batch=fb.Batch(max_size=4),
                     retry=RETRY_CRASH)
    held = Path(tmp_path, "held")

    async def main() -> tuple[list[Any], fb.PipelineStats]:
        async with fb.Pipeline([stage]).open() as runner:
            task = asyncio.ensure_future(collect(runner.map(range(20))))
            await until(lambda: held.exists() and held.read_text() != "")
            (victim,) = ex.actors()
            ray.kill(victim.handle)
            return await task, runner.stats()

    out, stats = asyncio.run(main())
    assert [v for _, v in out] == [2 * i for i in range(20)]  # each once, in order
    s = stats.stages[0]
    assert s.restarts == 1 and s.failed == 0 and s.done == 20


async def collect(results: Any) -> list[Any]:
    return [x async for x in results]


def test_an_actor_that_cannot_be_placed_is_reported_as_pending(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No node has a GPU: opening returns (no silent hang), stats() and the
    log say the actor is pending."""
    stage = fb.stage(st.double_one, executor=fbray.actors(num_cpus=0, num_gpus=1))

    async def main() -> fb.PipelineStats:
        async with fb.Pipeline([stage]).open() as runner:
            return runner.stats()

    with caplog.at_level(logging.WARNING, logger="flowbatch.ray"):
        stats = asyncio.run(main())
    assert stats.stages[0].pending == 1
    assert any("pending" in r.getMessage() and "GPU" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------- resizing


def test_resize_within_bounds() -> None:
    ex = on_ray(min_replicas=1, max_replicas=2)
    stage = fb.stage(st.double_one, executor=ex, concurrency=2)

    async def main() -> None:
        async with fb.Pipeline([stage]).open() as runner:
            assert ex.replicas == 1
            ex.resize(2)
            await until(lambda: ex.ready == 2)
            assert [x async for x in runner.map(range(7))] == [2 * i for i in range(7)]
            ex.resize(1)
            await until(lambda: ex.replicas == 1)
            with pytest.raises(ValueError, match="outside"):
                ex.resize(3)
            assert await runner.submit(3) == 6

    asyncio.run(main())


def test_max_replicas_above_concurrency_is_refused() -> None:
    stage = fb.stage(st.double_one, executor=on_ray(max_replicas=4), concurrency=2)

    async def main() -> None:
        async with fb.Pipeline([stage]).open():
            pass

    with pytest.raises(fb.PipelineError, match="concurrency=4"):
        asyncio.run(main())


def test_the_built_in_rule_grows_under_a_backlog_and_shrinks_when_idle(tmp_path: Path) -> None:
    rule = fbray.Scaling(up_after=0.05, down_after=0.3, tick=0.05)
    ex = on_ray(min_replicas=1, max_replicas=2, scaling=rule)
    stage = fb.stage(st.Blocking(str(tmp_path)), executor=ex, concurrency=2)

    async def main() -> None:
        async with fb.Pipeline([stage]).open() as runner:
            assert ex.replicas == 1
            calls = [asyncio.ensure_future(runner.submit(i)) for i in range(2)]
            await until(lambda: ex.replicas == 2)  # one call waited for an actor
            touch(Path(tmp_path, "open"))
            assert await asyncio.gather(*calls) == [0, 1]
            await until(lambda: ex.replicas == 1)  # idle: back to min_replicas

    asyncio.run(main())


def test_scale_step_is_a_pure_rule() -> None:
    rule = fbray.Scaling(up_after=2, down_after=60)
    step = fbray.scale_step
    assert step(replicas=1, lo=1, hi=4, waiting_for=2.5, idle_for=None, rule=rule) == 1
    assert step(replicas=1, lo=1, hi=4, waiting_for=1.0, idle_for=None, rule=rule) == 0
    assert step(replicas=4, lo=1, hi=4, waiting_for=9.0, idle_for=None, rule=rule) == 0
    assert step(replicas=3, lo=1, hi=4, waiting_for=None, idle_for=61, rule=rule) == -1
    assert step(replicas=1, lo=1, hi=4, waiting_for=None, idle_for=61, rule=rule) == 0
    assert step(replicas=3, lo=1, hi=4, waiting_for=None, idle_for=10, rule=rule) == 0
    assert step(replicas=0, lo=1, hi=4, waiting_for=None, idle_for=None, rule=rule) == 1


# -------------------------------------------------- object references


def test_values_between_ray_stages_travel_as_references(tmp_path: Path) -> None:
    """4 MB per item from one Ray stage to the next: the pipeline's process
    carries ObjectRefs and never unpickles a value."""
    log = str(tmp_path / "unpickled")
    Path(log).touch()
    pipe = fb.Pipeline([
        fb.stage(st.MakeBig(log), executor=on_ray(pass_refs=True), batch=fb.Batch(max_size=4)),
        fb.stage(st.total, executor=on_ray(), batch=fb.Batch(max_size=4)),
    ])

    async def main() -> list[Any]:
        async with pipe.open() as runner:
            return [x async for x in runner.map(range(40))]

    out = asyncio.run(main())
    assert out == [float(i) * (1 << 19) for i in range(40)]
    readers = {int(line) for line in Path(log).read_text().split()}
    assert readers and os.getpid() not in readers


def big_then_total(log: str, first: Any, second: Any, n: int) -> list[Any]:
    pipe = fb.Pipeline([
        fb.stage(st.MakeBig(log), executor=first, batch=fb.Batch(max_size=4)),
        fb.stage(st.total, executor=second, batch=fb.Batch(max_size=4)),
    ])

    async def main() -> list[Any]:
        async with pipe.open() as runner:
            return [x async for x in runner.map(range(n), return_exceptions=True)]

    return asyncio.run(main())


def unpicklers(log: str) -> set[int]:
    return {int(line) for line in Path(log).read_text().split()}


def test_consecutive_ray_stages_pass_references_without_being_asked(tmp_path: Path) -> None:
    """No pass_refs option: the runner tells the first Ray stage that a Ray
    stage follows, so the 4 MB values stay in the object store and the
    pipeline's process never unpickles one."""
    log = str(tmp_path / "unpickled")
    Path(log).touch()
    out = big_then_total(log, on_ray(), on_ray(), 24)
    assert out == [float(i) * (1 << 19) for i in range(24)]
    readers = unpicklers(log)
    assert readers and os.getpid() not in readers


def test_pass_refs_false_brings_values_back_between_ray_stages(tmp_path: Path) -> None:
    log = str(tmp_path / "unpickled")
    Path(log).touch()
    out = big_then_total(log, on_ray(pass_refs=False), on_ray(), 8)
    assert out == [float(i) * (1 << 19) for i in range(8)]
    assert os.getpid() in unpicklers(log)


def test_a_ray_stage_before_a_local_stage_hands_it_values(tmp_path: Path) -> None:
    """Results going to a local stage (and the last stage's, to the caller)
    are values, not references."""
    log = str(tmp_path / "unpickled")
    Path(log).touch()
    out = big_then_total(log, on_ray(), "thread", 8)
    assert out == [float(i) * (1 << 19) for i in range(8)]  # total() read each array
    assert os.getpid() in unpicklers(log)

    pipe = fb.Pipeline([fb.stage(st.MakeBig(log), executor=on_ray(), batch=fb.Batch(max_size=4))])
    last = pipe.run(range(3), progress=False)
    assert [float(b.arr[0]) for b in last] == [0.0, 1.0, 2.0]


def test_a_pass_refs_stage_hands_the_caller_a_reference() -> None:
    stage = fb.stage(st.double_or_fail, executor=on_ray(pass_refs=True),
                     batch=fb.Batch(max_size=4))

    async def main() -> list[Any]:
        async with fb.Pipeline([stage]).open() as runner:
            return [x async for x in runner.map(range(8), return_exceptions=True)]

    out = asyncio.run(main())
    assert isinstance(out[7], fb.ItemFailed)  # the error itself came back, not a reference
    assert all(isinstance(r, ray.ObjectRef) for r in out[:7])
    assert ray.get(out[:7]) == [2 * i for i in range(7)]
