"""Fixtures for the HTTP tests (the helpers live in httphelpers.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from httphelpers import ServerProcess


@pytest.fixture
def server_process() -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(target: str, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
        proc = ServerProcess(target, *args, env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(autouse=True)
def _reset_hold() -> Iterator[None]:
    import http_pipelines

    http_pipelines.HOLD.reset()
    http_pipelines.COUNT.seen.clear()
    yield
    http_pipelines.HOLD.reset()
