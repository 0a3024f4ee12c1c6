"""Ray actor options checked when the pipeline opens, before Ray is touched
(no cluster needed: the ``ray`` package only)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import flowbatch as fb

ray = pytest.importorskip("ray")
fbray = pytest.importorskip("flowbatch.ray")


def double(x: int) -> int:
    return 2 * x


@pytest.mark.parametrize(
    "options", [{"max_replicas": 4}, {"min_replicas": 2, "max_replicas": 4}, {"min_replicas": 2}]
)
def test_the_pools_own_scaling_and_adaptive_together_are_refused(options: dict[str, Any]) -> None:
    ex = fbray.actors(num_cpus=0.25, **options)
    stage = fb.stage(double, name="embed", executor=ex, concurrency=fb.Adaptive(min=1, max=4))

    async def main() -> None:
        async with fb.Pipeline([stage]).open():
            pass

    was_up = ray.is_initialized()
    with pytest.raises(fb.PipelineError) as err:
        asyncio.run(main())
    msg = str(err.value)
    assert "stage 'embed'" in msg and "fb.Adaptive(min=1, max=4)" in msg
    assert "pick one" in msg and "max_replicas" in msg
    assert ray.is_initialized() == was_up  # refused before Ray was started
