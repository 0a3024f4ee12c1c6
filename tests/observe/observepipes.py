"""Pipelines and a small live server for the observability tests.

Run as a program it opens a pipeline whose batched ``embed`` stage is the
bottleneck, keeps it under load, and serves ``/metrics`` (and, with
``--dashboard``, the dashboard routes through Starlette and uvicorn) on
127.0.0.1; it prints ``READY <port>`` once it answers. It runs until killed.

    python tests/observe/observepipes.py [--dashboard] [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
import time
from typing import Any

import flowbatch as fb
from flowbatch.prometheus import CONTENT_TYPE, render


async def prep(x: str) -> str:
    return x.strip()


def embed(xs: list[str]) -> list[Any]:
    # A model whose call costs a fixed overhead plus a little per item.
    time.sleep(0.01 + 0.0005 * len(xs))
    return [ValueError("bad input") if x == "bad" else len(x) for x in xs]


async def store(n: int) -> int:
    return n


def build(name: str = "demo") -> fb.Pipeline:
    return fb.Pipeline(
        [
            fb.stage(prep, concurrency=4),
            fb.stage(embed, batch=fb.Batch(max_size=64)),
            fb.stage(store),
        ],
        name=name,
    )


#: What ``flowbatch bench`` loads in the tests: ``observepipes:PIPELINE``.
PIPELINE = build("bench")


def make_pipeline() -> fb.Pipeline:
    """A factory, as ``module:attr`` may also name one."""
    return build("factory")


async def load(runner: fb.Runner, clients: int) -> None:
    """``clients`` closed-loop callers, forever; every 50th input fails."""

    async def client(k: int) -> None:
        i = 0
        while True:
            i += 1
            x = "bad" if (i * clients + k) % 50 == 0 else f"sentence {i}"
            with contextlib.suppress(fb.ItemFailed):
                await runner.submit(x)

    async with asyncio.TaskGroup() as tg:
        for k in range(clients):
            tg.create_task(client(k))


async def serve_metrics(runners: dict[str, fb.Runner], port: int) -> asyncio.Server:
    """A minimal HTTP/1.0 server: ``GET /metrics`` answers the exposition."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if path.split(b"?")[0] == b"/metrics":
                body, status, ctype = render(runners), b"200 OK", CONTENT_TYPE.encode()
            else:
                body, status, ctype = b"not found\n", b"404 Not Found", b"text/plain"
            writer.write(
                b"HTTP/1.0 " + status + b"\r\nContent-Type: " + ctype
                + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def main_metrics(port: int, clients: int) -> None:
    async with build().open() as runner:
        server = await serve_metrics({"demo": runner}, port)
        bound = server.sockets[0].getsockname()[1]
        print(f"READY {bound}", flush=True)
        async with server:
            await load(runner, clients)


async def main_dashboard(port: int, clients: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from flowbatch.observe.dashboard import dashboard_routes

    runners: dict[str, fb.Runner] = {}

    async def metrics(_: Request) -> Response:
        return Response(render(runners), media_type=CONTENT_TYPE)

    app = Starlette(routes=[Route("/metrics", metrics), *dashboard_routes(lambda: runners)])
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen(128)  # connections wait in the backlog until uvicorn serves
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    async with build().open() as runner, build("second").open() as second:
        runners.update({"demo": runner, "second": second})
        async with asyncio.TaskGroup() as tg:
            loads = [tg.create_task(load(runner, clients)), tg.create_task(load(second, 2))]
            print(f"READY {sock.getsockname()[1]}", flush=True)
            await server.serve(sockets=[sock])  # until SIGTERM or SIGINT
            for task in loads:
                task.cancel()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--clients", type=int, default=48)
    p.add_argument("--dashboard", action="store_true")
    args = p.parse_args()
    run = main_dashboard if args.dashboard else main_metrics
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args.port, args.clients))


if __name__ == "__main__":
    sys.exit(main())
