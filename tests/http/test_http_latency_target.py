"""ServeConfig(latency_target=...) and `flowbatch serve --latency-target`: settings checks,
and the embedding model served by default admitting a closed loop of 64 clients."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from httphelpers import closed_loop_statuses, serve_in_thread

import flowbatch as fb
from flowbatch.http import ServeConfig, create_app
from flowbatch.http.cli import serve


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"latency_target": 0}, "latency_target must be seconds > 0"),
        ({"latency_target": -2.0}, "latency_target must be seconds > 0"),
        ({"latency_target": float("inf")}, "latency_target must be seconds > 0"),
        ({"latency_target": "fast"}, "latency_target must be seconds > 0"),
        ({"latency_target": 0.5, "max_in_flight": 8}, "not both"),
    ],
)
def test_bad_latency_targets_are_refused_with_a_reason(kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        ServeConfig(**kwargs)


def test_a_latency_target_is_a_setting() -> None:
    assert ServeConfig(latency_target=0.25).latency_target == 0.25
    assert ServeConfig().latency_target is None  # derived from the service time


def test_serve_takes_latency_target_and_refuses_it_with_max_in_flight() -> None:
    cli = CliRunner()
    out = cli.invoke(serve, ["--help"])
    assert out.exit_code == 0 and "--latency-target" in out.output
    out = cli.invoke(serve, ["x:y", "--latency-target", "0.5", "--max-in-flight", "8"])
    assert out.exit_code == 2 and "not both" in out.output
    out = cli.invoke(serve, ["x:y", "--latency-target", "0"])
    assert out.exit_code == 2 and "--latency-target" in out.output


def test_the_embedding_model_served_by_default_admits_64_clients() -> None:
    # The served shape of benchmarks/serving.py (2 replicas, batches of 64),
    # no admission setting: a closed loop of 64 clients, each sending again
    # when answered, is never refused (the floor is 2 x 2 x 64 = 256).
    from flowbatch.models import SentenceEmbedder

    embed = fb.stage(SentenceEmbedder(torch_threads=1), name="embed", concurrency=2,
                     batch=fb.Batch(max_size=64))
    app = create_app(fb.Pipeline([embed], name="embed"))

    def check(k: int, i: int, r: httpx.Response) -> None:
        assert len(r.json()["output"]) == 384

    async def main(url: str) -> None:
        codes = await closed_loop_statuses(
            url, "/v1/pipelines/embed", lambda k, i: {"input": f"sentence {k} number {i}"},
            check, requests=3, timeout=120,
        )
        assert codes == [200] * 64 * 3
        runner = app.service.endpoints["embed"].runner
        assert runner is not None and runner.admission is not None
        s = runner.stats()
        assert s.rejected == 0 and s.completed == 64 * 3
        assert s.in_flight_limit is not None and 256 <= s.in_flight_limit < 1e9

    with serve_in_thread(app) as srv:
        asyncio.run(main(srv.url))
