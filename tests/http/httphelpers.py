"""Helpers for the HTTP tests: real uvicorn servers on free loopback ports.

``serve_in_thread`` runs an app in this process (its state can be inspected);
``ServerProcess`` runs ``python -m flowbatch.http`` as a child (for signals and
restarts). Both wait for conditions, never for a clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from polling import wait_until

if TYPE_CHECKING:
    import httpx

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class ThreadServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False,
                                timeout_graceful_shutdown=30)
        self.server = uvicorn.Server(config)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), 120, "server start")
        if not self.server.started:
            raise RuntimeError(f"server did not start: {self.error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        import http_pipelines

        http_pipelines.HOLD.release()  # a drain finishes the calls in flight: let them
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
        assert not self.thread.is_alive(), "server thread did not stop"


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[ThreadServer]:
    with ThreadServer(app) as server:
        yield server


async def closed_loop_statuses(
    url: str,
    path: str,
    body: Callable[[int, int], Any],
    check: Callable[[int, int, httpx.Response], None],
    *,
    clients: int = 64,
    requests: int = 3,
    timeout: float = 60,
) -> list[int]:
    """A closed loop: ``clients`` clients, each POSTing ``requests`` times to
    ``url + path``, the next request once the last is answered; every status.
    ``body(k, i)`` is the JSON of client ``k``'s ``i``-th request and
    ``check(k, i, response)`` asserts on each 200."""
    import httpx

    async def client(c: httpx.AsyncClient, k: int) -> list[int]:
        codes = []
        for i in range(requests):
            r = await c.post(path, json=body(k, i))
            codes.append(r.status_code)
            if r.status_code == 200:
                check(k, i, r)
        return codes

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as c:
        codes = await asyncio.gather(*(client(c, k) for k in range(clients)))
    return [code for cs in codes for code in cs]


_RUNNING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


class ServerProcess:
    """``python -m flowbatch.http TARGET --port 0 ...`` as a child process.

    ``--shutdown-grace 0`` unless ``args`` give one: SIGTERM closes at once.
    """

    def __init__(self, target: str, *args: str, env: dict[str, str] | None = None) -> None:
        grace = () if "--shutdown-grace" in args else ("--shutdown-grace", "0")
        cmd = [sys.executable, "-m", "flowbatch.http", target, "--port", "0",
               "--app-dir", str(HERE), "--log-level", "info", *grace, *args]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
        )
        self.log: list[str] = []
        self.port = 0
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            m = _RUNNING.search(line)
            if m:
                self.port = int(m.group(1))
                break
        if not self.port:
            self.proc.wait(30)
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        self.url = f"http://127.0.0.1:{self.port}"
        self._reader = threading.Thread(target=self._drain_stderr, daemon=True)
        self._reader.start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def wait(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr is not None:
            self._reader.join(10)
            self.proc.stderr.close()
