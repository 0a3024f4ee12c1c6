"""Overload, deadlines, disconnects, batching across requests, streams, mounting."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import httpx
import orjson
import pytest
from http_pipelines import COUNT, HOLD, make_batched, make_echo, make_hold
from httphelpers import closed_loop_statuses, serve_in_thread
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import flowbatch as fb
from flowbatch.admission import AdmissionController, floor_limit
from flowbatch.http import ServeConfig, create_app
from flowbatch.http.service import MIN_IN_FLIGHT
from polling import until


def test_overload_answers_503_at_once_without_touching_the_model() -> None:
    app = create_app(make_hold(), config=ServeConfig(max_in_flight=2, retry_after=3))

    async def main(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            held = [asyncio.ensure_future(c.post("/v1/pipelines/hold", json={"input": i}))
                    for i in range(2)]
            await until(lambda: HOLD.entered == 2, what="two items in the stage")
            r = await c.post("/v1/pipelines/hold", json={"input": "x"})
            assert r.status_code == 503
            assert r.headers["retry-after"] == "3"
            assert "capacity" in r.json()["error"]["message"]
            r = await c.post("/v1/pipelines/hold", json={"inputs": [1]})
            assert r.status_code == 503
            assert HOLD.entered == 2  # the rejected requests never reached a stage
            metrics = (await c.get("/metrics")).text
            assert 'flowbatch_http_rejected_total{pipeline="hold"} 2' in metrics
            # the engine counted the refused items: the runner's limiter refused them
            assert 'flowbatch_pipeline_rejected_total{pipeline="hold"} 2.0' in metrics
            runner = app.service.endpoints["hold"].runner
            assert runner is not None and runner.stats().rejected == 2
            HOLD.release()
            answers = await asyncio.gather(*held)
            assert [a.json() for a in answers] == [{"output": 0}, {"output": 1}]
            r = await c.post("/v1/pipelines/hold", json={"input": "y"})
            assert r.json() == {"output": "y"}

    with serve_in_thread(app) as srv:
        asyncio.run(main(srv.url))
        limiter = app.service.endpoints["hold"].limiter
        assert limiter is not None and limiter.borrowed == 0


def test_deadline_gives_504_and_the_item_is_dropped() -> None:
    app = create_app(make_hold())

    async def main(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            r = await c.post("/v1/pipelines/hold", json={"input": "late"},
                             headers={"X-Request-Timeout": "0.05"})
            assert r.status_code == 504
            assert r.json()["error"]["type"] == "deadline_exceeded"
            r = await c.post("/v1/pipelines/hold", json={"inputs": ["a", "b"]},
                             headers={"X-Request-Timeout": "0.05"})
            assert r.status_code == 504
            assert [e["status"] for e in r.json()["errors"]] == [504, 504]
            HOLD.release()
            runner = app.service.endpoints["hold"].runner
            assert runner is not None
            await until(lambda: runner.stats().stage("count").dropped == 3, what="drops")
            assert COUNT.seen == []  # past their deadline: never reached the next stage

    with serve_in_thread(app) as srv:
        asyncio.run(main(srv.url))


def test_client_disconnect_cancels_its_items() -> None:
    app = create_app(make_hold())

    async def main(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            task = asyncio.ensure_future(
                c.post("/v1/pipelines/hold", json={"inputs": ["gone-1", "gone-2"]})
            )
            await until(lambda: HOLD.entered == 2, what="items in the stage")
            task.cancel()  # closes the connection
            with contextlib.suppress(asyncio.CancelledError):
                await task
        limiter = app.service.endpoints["hold"].limiter
        assert limiter is not None
        await until(lambda: limiter.borrowed == 0, what="the items to be cancelled")
        HOLD.release()
        runner = app.service.endpoints["hold"].runner
        assert runner is not None
        await until(lambda: runner.stats().stage("count").dropped == 2, what="drops")
        assert COUNT.seen == []

    with serve_in_thread(app) as srv:
        asyncio.run(main(srv.url))


def test_concurrent_requests_are_batched_together() -> None:
    app = create_app(make_batched())

    async def main(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            calls = [c.post("/v1/pipelines/batched", json={"input": i}) for i in range(8)]
            tasks = [asyncio.ensure_future(x) for x in calls]
            await until(lambda: HOLD.entered == 8, what="8 requests in the first stage")
            HOLD.release()
            answers = await asyncio.gather(*tasks)
            assert sorted(a.json()["output"] for a in answers) == [0, 2, 4, 6, 8, 10, 12, 14]
        runner = app.service.endpoints["batched"].runner
        assert runner is not None
        stats = runner.stats().stage("batched")
        assert stats.done == 8
        assert stats.batches < 8  # requests from 8 connections shared model calls

    with serve_in_thread(app) as srv:
        asyncio.run(main(srv.url))


def test_stream_ndjson_with_errors_per_line() -> None:
    app = create_app(make_echo(), config=ServeConfig(max_body_bytes=64))
    lines = [b'"a"', b"", b"{broken", b'"bad"', b'{"k": [1, 2]}', b'"' + b"x" * 100 + b'"', b"7"]
    body = b"\n".join(lines) + b"\n"
    with serve_in_thread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/pipelines/echo/stream", content=body,
                   headers={"Content-Type": "application/x-ndjson"})
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-ndjson"
        got = {d["index"]: d for d in map(orjson.loads, r.content.splitlines())}
        assert sorted(got) == [0, 1, 2, 3, 4, 5]  # the blank line is not an input
        assert got[0]["output"] == "a"
        assert got[1]["error"]["status"] == 400 and "not valid JSON" in got[1]["error"]["message"]
        assert got[2]["error"]["status"] == 422
        assert got[3]["output"] == {"k": [1, 2]}
        assert got[4]["error"]["status"] == 413
        assert got[5]["output"] == 7
        r = c.post("/v1/pipelines/echo/stream", content=b"1",
                   headers={"Content-Type": "image/png"})
        assert r.status_code == 415


def test_stream_answers_before_the_input_ends() -> None:
    """Results flow back while the client is still sending (chunked upload)."""
    app = create_app(make_echo())

    async def main(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/pipelines/echo/stream HTTP/1.1\r\nHost: t\r\n"
                     b"Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")

        def chunk(data: bytes) -> bytes:
            return b"%x\r\n%s\r\n" % (len(data), data)

        writer.write(chunk(b'"first"\n'))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        first = await reader.readexactly(size + 2)
        assert orjson.loads(first.strip()) == {"index": 0, "output": "first"}
        writer.write(chunk(b'"second"\n') + b"0\r\n\r\n")
        await writer.drain()
        rest = await reader.readuntil(b"0\r\n\r\n")  # the last chunk
        assert b'{"index":1,"output":"second"}' in rest
        writer.close()
        await writer.wait_closed()

    with serve_in_thread(app) as srv:
        asyncio.run(asyncio.wait_for(main(srv.port), 60))


def test_stream_stops_reading_lines_while_its_answers_cannot_be_sent() -> None:
    """Backpressure: a client that reads no answers holds the stream to its window.

    The app is driven as ASGI (a real server's send blocks the same way once
    the socket's buffers fill, but when that happens depends on the kernel).
    """
    window, total = 4, 50
    app = create_app(make_echo(), config=ServeConfig(stream_window=window))
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/pipelines/echo/stream",
        "raw_path": b"/v1/pipelines/echo/stream", "root_path": "", "query_string": b"",
        "headers": [(b"host", b"t"), (b"content-type", b"application/x-ndjson")],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80),
    }

    async def main() -> None:
        taken = 0  # input messages the app has asked for, one line each
        client_reads = asyncio.Event()
        received: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal taken
            if taken == total:
                await asyncio.Future()  # no disconnect: the client waits for its answers
            taken += 1
            return {"type": "http.request", "body": b"%d\n" % (taken - 1),
                    "more_body": taken < total}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                await client_reads.wait()
                received.append(message["body"])

        async with app.lifespan(app):
            runner = app.service.endpoints["echo"].runner
            assert runner is not None
            served = asyncio.ensure_future(app(scope, receive, send))
            await until(lambda: runner.stats().stage("echo").done == window,
                        what="a window of items answered")
            await until(lambda: taken == window + 1, what="the next line read")
            for _ in range(50):  # loop turns, not a clock: nothing more may be read
                await asyncio.sleep(0)
            assert taken == window + 1  # the line past the window waits for room
            assert runner.stats().stage("echo").done == window
            assert not received
            client_reads.set()
            await asyncio.wait_for(served, 60)
        got = [orjson.loads(line) for line in b"".join(received).splitlines()]
        assert sorted(d["index"] for d in got) == list(range(total))
        assert all(d["output"] == d["index"] for d in got)
        assert taken == total

    asyncio.run(main())


def test_mounted_in_a_starlette_app() -> None:
    fb_app = create_app(make_echo())

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("host")

    host = Starlette(routes=[Route("/", home), Mount("/ml", app=fb_app)],
                     lifespan=fb_app.lifespan)
    with serve_in_thread(host) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.get("/").text == "host"
        r = c.post("/ml/v1/pipelines/echo", json={"input": "hi"})
        assert r.json() == {"output": "hi"}
        assert c.get("/ml/readyz").status_code == 200
        r = c.post("/ml/v1/pipelines/echo/jobs", json={"input": 5})
        assert r.status_code == 202
        assert r.json()["status_url"].startswith(f"{srv.url}/ml/v1/jobs/")
        assert c.get("/ml/nope").json()["error"]["message"] == "no route GET /nope"


def test_mounted_in_a_fastapi_app() -> None:
    from fastapi import FastAPI

    fb_app = create_app(make_echo(), config=ServeConfig(api_key="k"))
    host = FastAPI(lifespan=fb_app.lifespan)

    @host.get("/hello")
    def hello() -> dict[str, str]:
        return {"hello": "world"}

    host.mount("/models", fb_app)
    with serve_in_thread(host) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.get("/hello").json() == {"hello": "world"}
        assert c.get("/models/healthz").status_code == 200
        assert c.post("/models/v1/pipelines/echo", json={"input": 1}).status_code == 401
        r = c.post("/models/v1/pipelines/echo", json={"input": 1},
                   headers={"Authorization": "Bearer k"})
        assert r.json() == {"output": 1}


def test_not_ready_without_the_lifespan() -> None:
    """Mounted without passing its lifespan: a clear 503, not a crash."""
    fb_app = create_app(make_echo())
    host = Starlette(routes=[Mount("/ml", app=fb_app)])
    with serve_in_thread(host) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.get("/ml/readyz").status_code == 503
        r = c.post("/ml/v1/pipelines/echo", json={"input": 1})
        assert r.status_code == 503 and "starting" in r.json()["error"]["message"]


def test_not_ready_while_draining() -> None:
    app = create_app(make_echo())
    with serve_in_thread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.get("/readyz").status_code == 200
        app.service.begin_drain()  # what SIGTERM does first
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "draining"
        assert c.get("/v2/health/ready").status_code == 503
        assert c.get("/healthz").status_code == 200
        r = c.post("/v1/pipelines/echo", json={"input": 1})
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert "retry-after" in r.headers


def test_not_ready_but_serving_in_the_shutdown_grace_period() -> None:
    app = create_app(make_echo())
    with serve_in_thread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        app.service.begin_grace()  # what SIGTERM does first under run()
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "stopping"
        assert c.get("/v2/health/ready").status_code == 503
        assert c.post("/v1/pipelines/echo", json={"input": 1}).json() == {"output": 1}
        assert c.post("/v1/pipelines/echo/jobs", json={"input": 1}).status_code == 202
        r = c.post("/v1/pipelines/echo/stream", content=b"1\n")
        assert orjson.loads(r.content) == {"index": 0, "output": 1}
        app.service.begin_drain()  # the grace period is over
        assert c.post("/v1/pipelines/echo", json={"input": 1}).status_code == 503


def test_shutdown_grace_is_checked() -> None:
    with pytest.raises(ValueError, match="shutdown_grace"):
        ServeConfig(shutdown_grace=-1)
    with pytest.raises(ValueError, match="shutdown_grace"):
        ServeConfig(shutdown_grace=float("nan"))


def test_a_users_middleware_sees_every_route() -> None:
    """``app.add_middleware`` wraps the hot inference route too, before the API-key check."""
    seen: list[str] = []

    class Tag:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            seen.append(f"{scope['method']} {scope['path']}")

            async def tagged(message: Any) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message["headers"], (b"x-tag", b"1")]}
                await send(message)

            await self.app(scope, receive, tagged)

    app = create_app(make_echo(), config=ServeConfig(api_key="k"))
    app.add_middleware(Tag)
    auth = {"Authorization": "Bearer k"}
    with serve_in_thread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/pipelines/echo", json={"input": 1}, headers=auth)
        assert r.json() == {"output": 1} and r.headers.get("x-tag") == "1"
        r = c.post("/v1/pipelines/echo", json={"input": 1})  # no key: 401, tagged too
        assert r.status_code == 401 and r.headers.get("x-tag") == "1"
        r = c.post("/v1/pipelines/echo", json={"nope": 1}, headers=auth)
        assert r.status_code == 400 and r.headers.get("x-tag") == "1"
        assert c.get("/healthz").headers.get("x-tag") == "1"
        r = c.post("/v1/pipelines/echo/jobs", json={"input": 1}, headers=auth)
        assert r.status_code == 202 and r.headers.get("x-tag") == "1"
    assert seen.count("POST /v1/pipelines/echo") == 3


def test_defaults_admit_a_few_items_to_an_unbatched_slow_stage_and_503_the_rest() -> None:
    release, entered = threading.Event(), threading.Event()

    def slow(x: Any) -> Any:  # one worker, no batch: every call is one item's service time
        entered.set()
        assert release.wait(30)
        return x

    app = create_app(fb.Pipeline([fb.stage(slow, name="slow")], name="slow"))

    async def main(url: str) -> None:
        ep = app.service.endpoints["slow"]
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            first = asyncio.ensure_future(c.post("/v1/pipelines/slow", json={"input": 0}))
            await until(entered.is_set, what="the first item in the stage")
            more = [asyncio.ensure_future(c.post("/v1/pipelines/slow", json={"input": i}))
                    for i in (1, 2, 3)]
            await until(lambda: ep.limiter is not None and ep.limiter.borrowed == 4,
                        what="three more items admitted")
            # Admitted: a few (the floor of 4). The rest are told at once.
            for i in range(4, 10):
                r = await c.post("/v1/pipelines/slow", json={"input": i}, timeout=10)
                assert r.status_code == 503
            release.set()
            answers = await asyncio.gather(first, *more)
            assert [a.json() for a in answers] == [{"output": i} for i in range(4)]

    with serve_in_thread(app) as srv:
        asyncio.run(main(srv.url))
        assert app.service.endpoints["slow"].capacity == MIN_IN_FLIGHT == 4


def test_the_default_limit_starts_at_the_floor_of_the_stage_shapes() -> None:
    # No max_in_flight: a latency target derived from the service time, and
    # a limit never below two full batches per worker of the widest stage.
    def model(xs: list[Any]) -> list[Any]:
        return xs

    def prep(x: Any) -> Any:
        return x

    batched = fb.stage(model, name="model", batch=fb.Batch(max_size=64), concurrency=2)
    pipe = fb.Pipeline([fb.stage(prep, name="prep"), batched], name="p")
    app = create_app(pipe)
    ep = app.service.endpoints["p"]
    assert ep.capacity == floor_limit(pipe.stages) == 256 and not ep.fixed
    with serve_in_thread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.post("/v1/pipelines/p", json={"input": 2}).json() == {"output": 2}
        runner = ep.runner
        assert runner is not None and runner.admission is not None
        assert runner.stats().in_flight_limit == 256
        assert 'flowbatch_pipeline_in_flight_limit{pipeline="p"} 256.0' in c.get("/metrics").text
    fixed = create_app(pipe, config=ServeConfig(max_in_flight=10)).service.endpoints["p"]
    assert fixed.capacity == 10 and fixed.fixed


def test_past_a_latency_target_503_carries_the_measured_drain_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One worker, no batch: the floor of the limit is 4 items.
    release = threading.Event()
    release.set()

    def gated(x: Any) -> Any:
        assert release.wait(30)
        return x

    pipe = fb.Pipeline([fb.stage(gated, name="gated")], name="gated")
    app = create_app(pipe, config=ServeConfig(latency_target=30.0, retry_after=99))

    async def main(url: str) -> None:
        ep = app.service.endpoints["gated"]
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            for i in range(40):  # the drain rate is measured from these
                assert (await c.post("/v1/pipelines/gated", json={"input": i})).status_code == 200
            runner = ep.runner
            assert runner is not None and runner.admission is not None
            ctl = runner.admission.controller
            await until(lambda: ctl.throughput > 0, what="a measured throughput")
            # From here the limit stays where it is: with its places all in use
            # and answers fast, the controller may grow it between the fourth
            # admission and the fifth request (its growth is tested on a fake
            # clock in tests/test_core_latency_target.py).
            monkeypatch.setattr(AdmissionController, "update", lambda self, *a, **k: self.limit)
            release.clear()
            held = [asyncio.ensure_future(c.post("/v1/pipelines/gated", json={"input": i}))
                    for i in range(4)]
            await until(lambda: ep.limiter is not None and ep.limiter.borrowed == 4,
                        what="four items admitted")
            r = await c.post("/v1/pipelines/gated", json={"input": "more"})
            assert r.status_code == 503
            assert "capacity" in r.json()["error"]["message"]
            # in flight / measured completions per second, rounded up: not the fixed 99
            assert 1 <= int(r.headers["retry-after"]) < 99
            assert runner.stats().latency_target == 30.0
            metrics = (await c.get("/metrics")).text
            assert 'flowbatch_pipeline_latency_target_seconds{pipeline="gated"} 30.0' in metrics
            release.set()
            answers = await asyncio.gather(*held)  # the admitted ones succeed
            assert [a.json() for a in answers] == [{"output": i} for i in range(4)]

    with serve_in_thread(app) as srv:
        asyncio.run(main(srv.url))


def test_before_the_drain_rate_is_known_503_carries_the_configured_retry_after() -> None:
    app = create_app(make_hold(), config=ServeConfig(latency_target=5.0, retry_after=6))

    async def main(url: str) -> None:
        ep = app.service.endpoints["hold"]
        limits = httpx.Limits(max_connections=256)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
            n = ep.capacity  # the floor: 2 x 64 workers of the hold stage
            assert n == 128
            held = [asyncio.ensure_future(c.post("/v1/pipelines/hold", json={"input": i}))
                    for i in range(n)]
            await until(lambda: HOLD.entered == 64, what="every worker holding an item")
            await until(lambda: ep.limiter is not None and ep.limiter.borrowed == n,
                        what="the floor's items admitted")
            r = await c.post("/v1/pipelines/hold", json={"input": "x"})
            assert r.status_code == 503 and r.headers["retry-after"] == "6"
            HOLD.release()
            answers = await asyncio.gather(*held)
            assert sorted(a.json()["output"] for a in answers) == list(range(n))

    with serve_in_thread(app) as srv:
        asyncio.run(main(srv.url))


def test_the_default_admits_a_closed_loop_the_model_keeps_up_with() -> None:
    # 64 clients, each sending again when answered, on a batched model
    # (max_size 64) served with default settings: none is refused.
    def model(xs: list[Any]) -> list[Any]:
        return [x * 2 for x in xs]

    pipe = fb.Pipeline(
        [fb.stage(model, name="embed", batch=fb.Batch(max_size=64), concurrency=2)], name="embed"
    )
    app = create_app(pipe)

    def check(k: int, i: int, r: httpx.Response) -> None:
        assert r.json() == {"output": 2 * (k * 100 + i)}

    async def main(url: str) -> None:
        codes = await closed_loop_statuses(
            url, "/v1/pipelines/embed", lambda k, i: {"input": k * 100 + i}, check, requests=8
        )
        assert codes == [200] * 64 * 8
        runner = app.service.endpoints["embed"].runner
        assert runner is not None and runner.stats().rejected == 0

    with serve_in_thread(app) as srv:
        asyncio.run(main(srv.url))
