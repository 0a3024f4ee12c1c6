"""Async jobs (memory and SQLite stores), SIGTERM draining, and the serve command."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from http_pipelines import HOLD, make_echo, make_hold
from httphelpers import ROOT, ServerProcess, serve_in_thread

from flowbatch.http import MemoryJobStore, ServeConfig, create_app
from polling import until, wait_until

Start = Callable[..., ServerProcess]


def poll_job(c: httpx.Client, url: str, done: set[str] | None = None) -> dict[str, Any]:
    """GET the job until it is finished (a bounded loop over its state)."""
    final = done or {"succeeded", "failed", "cancelled"}
    doc: dict[str, Any] = {}

    def finished() -> bool:
        nonlocal doc
        doc = c.get(url).json()
        return doc["status"] in final

    wait_until(finished, 60, "the job to finish")
    return doc


def test_job_lifecycle_in_memory() -> None:
    store = MemoryJobStore()
    app = create_app({"echo": make_echo()}, job_store=store)
    with serve_in_thread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/pipelines/echo/jobs", json={"inputs": ["a", "bad", "c"]})
        assert r.status_code == 202
        job = r.json()
        assert r.headers["location"] == job["status_url"]
        assert job["status"] == "queued"
        doc = poll_job(c, job["status_url"])
        assert doc["status"] == "succeeded"
        assert doc["result"]["outputs"] == ["a", None, "c"]
        assert doc["result"]["errors"][0]["index"] == 1
        assert doc["finished_at"] and doc["expires_at"]

        r = c.post("/v1/pipelines/echo/jobs", json={"input": "boom"})
        doc = poll_job(c, r.json()["status_url"])
        assert doc["status"] == "failed" and doc["result"] is None
        assert doc["error"]["status"] == 500 and "internal error" in doc["error"]["message"]

        # DELETE of a finished job removes it
        assert c.delete(job["status_url"]).json()["status"] == "succeeded"
        assert c.get(job["status_url"]).status_code == 404
        assert c.delete(job["status_url"]).status_code == 404
        r = c.get("/v1/jobs/does-not-exist")
        assert r.status_code == 404 and "never existed" in r.json()["error"]["message"]
        r = c.post("/v1/pipelines/echo/jobs", json={"nope": 1})
        assert r.status_code == 400


def test_job_cancel_and_ttl() -> None:
    app = create_app(make_hold(), config=ServeConfig(job_ttl=0.001))
    with serve_in_thread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/pipelines/hold/jobs", json={"inputs": ["x", "y"]})
        url = r.json()["status_url"]
        wait_until(lambda: HOLD.entered == 2, what="the job's items to run")
        assert c.get(url).json()["status"] == "running"
        doc = c.delete(url).json()
        assert doc["status"] == "cancelled" and doc["result"] is None
        limiter = app.service.endpoints["hold"].limiter
        assert limiter is not None
        wait_until(lambda: limiter.borrowed == 0, what="the job's places to be freed")
        # finished long ago by a 1 ms TTL: gone
        wait_until(lambda: c.get(url).status_code == 404, what="the result to expire")


def test_sqlite_jobs_survive_a_restart(tmp_path: Path, server_process: Start) -> None:
    db = tmp_path / "jobs.db"
    first = server_process("http_pipelines:all_pipelines", "--jobs-db", str(db))
    with httpx.Client(base_url=first.url, timeout=60) as c:
        r = c.post("/v1/pipelines/echo/jobs", json={"inputs": [1, {"k": "v"}]})
        job_id = r.json()["id"]
        doc = poll_job(c, r.json()["status_url"])
        assert doc["status"] == "succeeded"
        # a job that cannot finish in this process: held at the gate
        r = c.post("/v1/pipelines/hold/jobs", json={"input": "later"})
        held_id = r.json()["id"]
        wait_until(lambda: c.get(f"/v1/jobs/{held_id}").json()["status"] == "running",
                   what="the held job to run")
    first.proc.kill()  # a crash: no drain
    first.wait()

    second = server_process("http_pipelines:all_pipelines", "--jobs-db", str(db))
    with httpx.Client(base_url=second.url, timeout=60) as c:
        doc = c.get(f"/v1/jobs/{job_id}").json()
        assert doc["status"] == "succeeded"
        assert doc["result"] == {"outputs": [1, {"k": "v"}]}
        # the unfinished job was run again; let it through
        assert c.post("/v1/pipelines/hold", json={"input": "open"}).json() == {"output": "opened"}
        doc = poll_job(c, f"/v1/jobs/{held_id}")
        assert doc["status"] == "succeeded" and doc["result"] == {"output": "later"}
    second.stop()
    assert second.proc.returncode == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM flowbatch_jobs").fetchone() == (2,)


async def until_refused(url: str) -> None:
    """Wait until the server at ``url`` serves no new connection."""
    async with httpx.AsyncClient(base_url=url, timeout=5) as fresh:

        async def refused() -> bool:
            try:
                await fresh.get("/healthz")
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                # Refused, or accepted into the kernel's backlog just as the
                # listener closed and dropped unanswered (closed, or reset while
                # the probe reads): not served.
                return True
            return False

        await until(refused)


def test_sigterm_finishes_in_flight_requests_and_exits_0(server_process: Start) -> None:
    srv = server_process("http_pipelines:all_pipelines")

    async def main() -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            in_flight = asyncio.ensure_future(
                c.post("/v1/pipelines/hold", json={"inputs": ["p", "q"]})
            )

            async def entered() -> bool:
                text = (await c.get("/metrics")).text
                return 'flowbatch_http_admitted_items{pipeline="hold"} 2' in text

            await until(entered)
            srv.proc.send_signal(signal.SIGTERM)
            await until_refused(srv.url)  # the server stops accepting connections ...
            # ... and still answers the request it had
            srv.proc.send_signal(signal.SIGUSR1)  # opens the stage's gate
            r = await in_flight
            assert r.status_code == 200
            assert r.json() == {"outputs": ["p", "q"]}

    asyncio.run(main())
    assert srv.wait() == 0
    log = "".join(srv.log)
    assert "draining" in log and "Traceback" not in log


def test_sigterm_keeps_serving_with_readyz_503_through_the_grace_period(
    server_process: Start,
) -> None:
    srv = server_process("http_pipelines:all_pipelines", "--shutdown-grace", "600")

    async def main() -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            in_flight = asyncio.ensure_future(
                c.post("/v1/pipelines/hold", json={"inputs": ["p", "q"]})
            )
            assert (await c.get("/readyz")).status_code == 200
            srv.proc.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                return (await c.get("/readyz")).status_code == 503

            await until(not_ready)  # answered, not refused
            r = await c.get("/readyz")
            assert r.json()["status"] == "stopping" and "retry-after" in r.headers
            assert (await c.get("/v2/health/ready")).status_code == 503
            assert (await c.get("/healthz")).status_code == 200
            # a load balancer that has not seen it yet still gets answers, on new connections too
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as fresh:
                r = await fresh.post("/v1/pipelines/echo", json={"input": 1})
                assert r.status_code == 200 and r.json() == {"output": 1}
                r = await fresh.post("/v1/pipelines/echo/jobs", json={"input": 2})
                assert r.status_code == 202
            srv.proc.send_signal(signal.SIGTERM)  # a second one ends the grace period
            await until_refused(srv.url)
            srv.proc.send_signal(signal.SIGUSR1)  # opens the stage's gate
            r = await in_flight
            assert r.status_code == 200 and r.json() == {"outputs": ["p", "q"]}

    asyncio.run(main())
    assert srv.wait() == 0
    log = "".join(srv.log)
    assert "still serving for 600 s" in log and "Traceback" not in log


def test_the_grace_period_ends_by_itself(server_process: Start) -> None:
    srv = server_process("http_pipelines:echo_pipeline", "--shutdown-grace", "0.2")
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.wait() == 0
    assert "still serving for 0.2 s" in "".join(srv.log)


def test_serve_command_errors() -> None:
    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flowbatch.http", *args, "--app-dir", "tests/http"],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
            env=env,
        )

    r = run("no_colon")
    assert r.returncode == 2 and "module:attr" in r.stderr
    r = run("no_such_module_xyz:p")
    assert r.returncode == 1 and "cannot import" in r.stderr
    r = run("http_pipelines:HOLD")
    assert r.returncode == 1 and "name a flowbatch.Pipeline, a dict" in r.stderr
    r = run("http_pipelines:echo_pipeline", "--api-key-env", "FLOWBATCH_TEST_UNSET_KEY")
    assert r.returncode == 2 and "FLOWBATCH_TEST_UNSET_KEY" in r.stderr


def test_serve_command_with_api_key(server_process: Start) -> None:
    srv = server_process("http_pipelines:echo_pipeline", "--api-key-env", "MY_KEY",
                         env={"MY_KEY": "sekret"})
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.post("/v1/pipelines/echo", json={"input": 1}).status_code == 401
        r = c.post("/v1/pipelines/echo", json={"input": 1},
                   headers={"Authorization": "Bearer sekret"})
        assert r.json() == {"output": 1}


def test_jobs_wait_for_room_instead_of_503() -> None:
    app = create_app(make_hold(), config=ServeConfig(max_in_flight=1))

    async def main(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            first = (await c.post("/v1/pipelines/hold/jobs", json={"input": 1})).json()
            second = (await c.post("/v1/pipelines/hold/jobs", json={"input": 2})).json()
            assert second["status"] == "queued"
            await until(lambda: HOLD.entered == 1, what="the first job to run")
            r = await c.post("/v1/pipelines/hold", json={"input": 3})
            assert r.status_code == 503  # a request does not jump the jobs' line
            HOLD.release()
            for job in (first, second):

                async def succeeded(url: str = job["status_url"]) -> bool:
                    return bool((await c.get(url)).json()["status"] == "succeeded")

                await until(succeeded)

    with serve_in_thread(app) as srv:
        asyncio.run(asyncio.wait_for(main(srv.url), 60))


@pytest.mark.parametrize("bad", ["0", "nan", "inf"])
def test_job_with_bad_timeout(bad: str) -> None:
    app = create_app(make_echo())
    with serve_in_thread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/pipelines/echo/jobs", json={"input": 1},
                   headers={"X-Request-Timeout": bad})
        assert r.status_code == 400
