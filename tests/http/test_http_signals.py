"""The HTTP service's /metrics carries the autoscaling signals (docs/autoscaling.md)."""

from __future__ import annotations

import asyncio

import httpx
from http_pipelines import HOLD, make_hold
from httphelpers import serve_in_thread
from prometheus_client.parser import text_string_to_metric_families

from flowbatch.http import ServeConfig, create_app
from polling import until


def gauges(text: str, pipeline: str) -> dict[str, float]:
    return {
        s.name: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name.startswith("flowbatch_pipeline_") and s.labels == {"pipeline": pipeline}
    }


def test_backlog_and_drain_time_follow_the_requests_held() -> None:
    app = create_app(make_hold(), config=ServeConfig(max_in_flight=16))

    async def main(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            held = [asyncio.ensure_future(c.post("/v1/pipelines/hold", json={"input": i}))
                    for i in range(3)]
            await until(lambda: HOLD.entered == 3, what="three items in the stage")
            got = gauges((await c.get("/metrics")).text, "hold")
            # 3 in flight over the 64 workers of the busy stage, "hold"; its
            # speed is not known before it finishes one: no drain time yet.
            assert got["flowbatch_pipeline_in_flight"] == 3
            assert got["flowbatch_pipeline_backlog_per_replica"] == 3 / 64
            assert "flowbatch_pipeline_drain_seconds" not in got
            assert "flowbatch_pipeline_capacity_items_per_second" not in got
            HOLD.release()
            assert [r.json()["output"] for r in await asyncio.gather(*held)] == [0, 1, 2]
            got = gauges((await c.get("/metrics")).text, "hold")
            assert got["flowbatch_pipeline_backlog_per_replica"] == 0
            assert got["flowbatch_pipeline_drain_seconds"] == 0
            assert got["flowbatch_pipeline_capacity_items_per_second"] > 0
            runner = app.service.endpoints["hold"].runner
            assert runner is not None
            assert got["flowbatch_pipeline_capacity_items_per_second"] == runner.stats().capacity

    with serve_in_thread(app) as srv:
        asyncio.run(main(srv.url))
