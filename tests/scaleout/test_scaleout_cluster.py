"""A two-node Ray cluster on this machine loses a node mid-run: every item
gets exactly one result, none is lost; the lost actor is replaced when the
cluster can place it and reported as pending while it cannot."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import scaleoutstages as st

import flowbatch as fb
from polling import until

ray = pytest.importorskip("ray")
fbray = pytest.importorskip("flowbatch.ray")


def test_a_node_removed_mid_run_loses_no_item(ray_cluster: Any, tmp_path: Path) -> None:
    side = ray_cluster.add_node(num_cpus=1)
    ray_cluster.wait_for_nodes()
    side_id = side.node_id
    # The actor on the side node blocks in its first call: the node goes
    # while it holds a batch.
    Path(tmp_path, "hold-on").write_text(side_id)
    ex = fbray.actors(num_cpus=1, pending_after=0.5)
    stage = fb.stage(st.OnNode(str(tmp_path)), executor=ex, concurrency=3,
                     batch=fb.Batch(max_size=4),
                     retry=fb.Retry(attempts=3, backoff=0.01, on=(fb.WorkerCrashed,)))
    entered = Path(tmp_path, f"node-{side_id}")

    async def main() -> tuple[list[Any], fb.PipelineStats, fb.PipelineStats]:
        async with fb.Pipeline([stage]).open() as runner:
            await until(lambda: ex.ready == 3)  # reported pending after 0.5 s, up since
            nodes = {a.node_id for a in ex.actors()}
            assert side_id in nodes and len(nodes) == 2  # spread over both nodes
            task = asyncio.ensure_future(collect(runner.map(range(60))))
            await until(entered.exists)
            ray_cluster.remove_node(side, allow_graceful=False)
            out = await task
            during = runner.stats()
            # The replacement needs a CPU the head has not got free: pending.
            await until(lambda: runner.stats().stages[0].pending == 1)
            return out, during, runner.stats()

    try:
        out, during, after = asyncio.run(main())
    finally:
        if side in ray_cluster.worker_nodes:
            ray_cluster.remove_node(side)
    assert [x for _, x in out] == list(range(60))  # each item once, in order
    assert {node for node, _ in out} - {side_id}  # the rest ran on the head
    s = during.stages[0]
    assert s.failed == 0 and s.done == 60 and s.restarts == 1
    assert after.stages[0].pending == 1


async def collect(results: Any) -> list[Any]:
    return [x async for x in results]
