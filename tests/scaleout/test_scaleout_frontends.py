"""Every front end, unchanged, with its model stage on a cluster: the HTTP
service under concurrent requests (Ray actors, Dask workers), a broker
worker, ``pipe.run``; and a pipeline opened with Ray not initialised calls
``ray.init()`` and says so."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import scaleoutstages as st
from scaleouthelpers import through_a_broker_worker

import flowbatch as fb

ray = pytest.importorskip("ray")
fbray = pytest.importorskip("flowbatch.ray")


def model_pipeline(name: str, executor: Any = None) -> fb.Pipeline:
    async def parse(x: Any) -> int:
        await asyncio.sleep(0)
        return int(x)

    return fb.Pipeline(
        [
            fb.stage(parse, concurrency=16),
            fb.stage(st.Counted(), name="model",
                     executor=executor if executor is not None else fbray.actors(num_cpus=0.25),
                     concurrency=2, batch=fb.Batch(max_size=16)),
        ],
        name=name,
    )


@pytest.mark.parametrize("where", ["ray", "dask"])
def test_http_service_with_its_model_on_the_cluster(
    where: str, request: pytest.FixtureRequest
) -> None:
    httpx = pytest.importorskip("httpx")
    from flowbatch.http import ServeConfig, create_app

    config = ServeConfig(max_in_flight=128)  # every request admitted: none answered 503
    if where == "ray":
        request.getfixturevalue("ray_cluster")
        app = create_app(model_pipeline("embed"), config=config)
    else:
        fbdask = pytest.importorskip("flowbatch.dask")
        app = create_app(model_pipeline("embed", fbdask.workers(
            request.getfixturevalue("dask_cluster"))), config=config)

    async def main() -> tuple[list[Any], fb.PipelineStats]:
        async with app.lifespan(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                         timeout=60) as client:

                async def one(i: int) -> Any:
                    r = await client.post("/v1/pipelines/embed", json={"input": str(i)})
                    assert r.status_code == 200, r.text
                    return r.json()["output"]

                outs = await asyncio.gather(*(one(i) for i in range(60)))
            runner = app.service.endpoints["embed"].runner
            assert runner is not None
            return outs, runner.stats()

    outs, stats = asyncio.run(main())
    assert [x for *_, x in outs] == list(range(60))
    assert os.getpid() not in {pid for pid, *_ in outs}  # the model ran in the actors
    assert {setups for _, setups, _, _ in outs} == {1}
    model = stats.stage("model")
    assert model.executor == ("RayActors" if where == "ray" else "DaskWorkers")
    assert model.done == 60
    assert model.mean_batch_size > 1  # concurrent requests shared batches on the actors


@pytest.mark.usefixtures("ray_cluster")
def test_broker_worker_with_its_stage_on_ray_actors() -> None:
    outs = through_a_broker_worker(model_pipeline("t"), [str(i) for i in range(100)])
    assert [x for *_, x in outs] == list(range(100))
    assert os.getpid() not in {pid for pid, *_ in outs}


@pytest.mark.usefixtures("ray_cluster")
def test_pipe_run_unchanged_and_again() -> None:
    """The same executor instance serves a second run (a new event loop)."""
    pipe = fb.Pipeline([fb.stage(st.double_one, executor=fbray.actors(num_cpus=0.25))])
    assert pipe.run(range(7), progress=False) == [2 * i for i in range(7)]
    assert pipe.run(range(3), progress=False) == [0, 2, 4]


def test_opening_without_ray_initialised_calls_ray_init_and_logs_it(
    tmp_path: Path, ray_cluster: Any
) -> None:
    """In a fresh interpreter that finds the cluster through RAY_ADDRESS, as
    ray.init() does (with no cluster named, it starts a local one)."""
    script = tmp_path / "main.py"
    script.write_text(textwrap.dedent('''
        import logging
        import flowbatch as fb

        def double(x):
            return 2 * x

        if __name__ == "__main__":
            import ray
            logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
            assert not ray.is_initialized()
            pipe = fb.Pipeline([fb.stage(double, executor=fb.ray.actors(num_cpus=0))])
            print("results", pipe.run(range(3), progress=False))
            print("initialised", ray.is_initialized())
            ray.shutdown()
    '''))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=110, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "results [0, 2, 4]" in done.stdout
    assert "initialised True" in done.stdout
    assert "Ray was not initialised; called ray.init() for stage 'double'" in done.stderr
