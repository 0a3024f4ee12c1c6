"""Stages on a Dask LocalCluster of 2 worker processes: setup once per
worker, per-item errors from the runner, a dead worker loses nothing."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import scaleoutstages as st
from scaleouthelpers import through_a_broker_worker

import flowbatch as fb

fbdask = pytest.importorskip("flowbatch.dask")


def test_setup_runs_once_per_dask_worker_not_per_task(dask_cluster: Any) -> None:
    stage = fb.stage(st.DaskCounted(), executor=fbdask.workers(dask_cluster), concurrency=4,
                     batch=fb.Batch(max_size=4))

    async def main() -> tuple[list[Any], fb.PipelineStats]:
        async with fb.Pipeline([stage]).open() as runner:
            return [x async for x in runner.map(range(100))], runner.stats()

    out, stats = asyncio.run(main())
    assert [x for *_, x in out] == list(range(100))
    pids = {pid for pid, _, _ in out}
    assert os.getpid() not in pids and len(pids) <= 2
    assert {setups for _, setups, _ in out} == {1}
    assert stats.stages[0].batches >= 25  # many tasks, one setup per worker


@pytest.mark.parametrize("batched", [True, False])
def test_one_bad_item_fails_alone(dask_cluster: Any, batched: bool) -> None:
    if batched:
        stage = fb.stage(st.double_or_fail, executor=fbdask.workers(dask_cluster.scheduler_address),
                         concurrency=2, batch=fb.Batch(max_size=8))
    else:
        stage = fb.stage(st.double_one, executor=fbdask.workers(dask_cluster), concurrency=2)

    async def main() -> list[Any]:
        async with fb.Pipeline([stage]).open() as runner:
            return [x async for x in runner.map(range(20), return_exceptions=True)]

    out = asyncio.run(main())
    bad = {7, 13} if batched else {7}
    for i, r in enumerate(out):
        if i in bad:
            assert isinstance(r, fb.ItemFailed) and type(r.error) is ValueError
        else:
            assert r == 2 * i


def test_a_dead_dask_worker_loses_nothing(dask_cluster: Any, tmp_path: Path) -> None:
    """The task holding item 5 kills its worker process once: Dask runs it
    again on a worker that lives; every item has exactly one result."""
    stage = fb.stage(st.DieOnce(str(tmp_path), victim=5), executor=fbdask.workers(dask_cluster),
                     concurrency=2, batch=fb.Batch(max_size=4))

    async def main() -> tuple[list[Any], fb.PipelineStats]:
        async with fb.Pipeline([stage]).open() as runner:
            return [x async for x in runner.map(range(40))], runner.stats()

    out, stats = asyncio.run(main())
    assert Path(tmp_path, "died").exists()  # a worker did die
    assert out == [2 * i for i in range(40)]
    assert stats.stages[0].failed == 0


def test_an_exception_class_of_the_users_script_comes_back_as_itself(dask_cluster: Any) -> None:
    """A class Dask ships by value (the script's ``__main__``, or local as
    here): it comes back as its own type, not a RemoteError "could not be
    pickled back"."""

    class Flaky(Exception):
        pass

    def fail_three(xs: list[int]) -> list[Any]:
        if 3 in xs:
            raise Flaky("three")
        return [Flaky("four") if x == 4 else x for x in xs]

    stage = fb.stage(fail_three, executor=fbdask.workers(dask_cluster),
                     batch=fb.Batch(max_size=8))

    async def main() -> list[Any]:
        async with fb.Pipeline([stage]).open() as runner:
            return await asyncio.gather(*(runner.submit(i) for i in range(6)),
                                        return_exceptions=True)

    out = asyncio.run(main())
    assert out[:3] == [0, 1, 2] and out[5] == 5
    assert type(out[3].__cause__) is Flaky and type(out[4].__cause__) is Flaky


def test_setup_failure_fails_the_open(dask_cluster: Any) -> None:
    stage = fb.stage(st.BrokenSetup(), executor=fbdask.workers(dask_cluster))

    async def main() -> None:
        async with fb.Pipeline([stage]).open():
            pass

    with pytest.raises(fb.PipelineError, match="setup\\(\\) failed on Dask worker"):
        asyncio.run(main())


def test_retries_order_and_a_broken_contract_on_dask(dask_cluster: Any, tmp_path: Path) -> None:
    retry = fb.Retry(attempts=2, backoff=0.001, on=(ConnectionError,))
    flaky = fb.stage(st.FlakyOnce(str(tmp_path)), executor=fbdask.workers(dask_cluster),
                     concurrency=2, batch=fb.Batch(max_size=8), retry=retry)
    broken = fb.stage(st.wrong_length, executor=fbdask.workers(dask_cluster),
                      batch=fb.Batch(max_size=4))

    async def main() -> tuple[list[Any], fb.PipelineStats, list[Any]]:
        async with fb.Pipeline([flaky]).open() as runner:
            out = [x async for x in runner.map(range(30), ordered=True)]
            stats = runner.stats()
        async with fb.Pipeline([broken]).open() as runner:
            bad = [x async for x in runner.map(range(4), return_exceptions=True)]
        return out, stats, bad

    out, stats, bad = asyncio.run(main())
    assert out == [2 * i for i in range(30)]  # each once, in input order
    assert stats.stages[0].retried == 30
    assert len(bad) == 4 and all(
        isinstance(r, fb.ItemFailed) and isinstance(r.error, fb.BatchContractError) for r in bad
    )


def test_broker_worker_with_its_stage_on_dask(dask_cluster: Any) -> None:
    pipe = fb.Pipeline([fb.stage(st.DaskCounted(), executor=fbdask.workers(dask_cluster),
                                 concurrency=2, batch=fb.Batch(max_size=16))], name="t")
    outs = through_a_broker_worker(pipe, range(100))
    assert [x for *_, x in outs] == list(range(100))
    assert os.getpid() not in {pid for pid, *_ in outs}
    assert {setups for _, setups, _ in outs} == {1}


def test_resources_no_worker_has_are_reported_as_pending_and_leaving_does_not_hang(
    dask_cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    stage = fb.stage(st.double_one, executor=fbdask.workers(dask_cluster, resources={"GPU": 1}))

    async def main() -> fb.PipelineStats:
        async with fb.Pipeline([stage]).open() as runner:
            with pytest.raises(fb.DeadlineExceeded):
                await runner.submit(1, timeout=0.5)
            return runner.stats()

    flog = logging.getLogger("flowbatch")
    flog.addHandler(caplog.handler)
    try:
        stats = asyncio.run(asyncio.wait_for(main(), 60))  # leaving used to hang
    finally:
        flog.removeHandler(caplog.handler)
    assert stats.stages[0].pending == 1
    assert "workers has them" in caplog.text
