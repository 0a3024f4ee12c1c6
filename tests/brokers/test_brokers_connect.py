"""Wrong settings fail fast, a stop is honoured while the broker is away, and
a waiting client reconnects.

The shared Redis, RabbitMQ and NATS servers are never restarted here (other
tests use them at the same time): a broker that goes away is a private
``redis-server`` on a free port that the test kills; refused credentials come
from the shared servers (an unknown Redis ACL user, a wrong RabbitMQ password,
an unknown virtual host) or from a private ``nats-server`` with a password;
a broken client connection is closed by the server for that one connection
(Redis ``CLIENT KILL``, ``rabbitmqctl close_connection``).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brokerpipes
import brokerservices as services
import pytest
from brokerservices import WorkerProcess

from flowbatch.brokers import Client, MemoryBroker, Worker, WorkerConfig, make_broker
from flowbatch.retry import Retry
from polling import until, wait_until

pytestmark = pytest.mark.timeout(180)


def _private_server(argv: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: services.port_open("127.0.0.1", port), 30, f"{argv[0]} listening")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test alone (killed by the test, not shared)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("these tests need redis-server on PATH")
    port = services.free_port()
    proc = _private_server(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        port, tmp_path / "redis.log",
    )
    yield f"redis://127.0.0.1:{port}/0", proc
    _end(proc)


@pytest.fixture
def private_nats_with_password(tmp_path: Path) -> Iterator[int]:
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not Path(binary).exists():
        pytest.fail("these tests need nats-server")
    port = services.free_port()
    proc = _private_server(
        [binary, "-a", "127.0.0.1", "-p", str(port), "--user", "alice", "--pass", "right"],
        port, tmp_path / "nats.log",
    )
    yield port
    _end(proc)


def closed_port() -> int:
    return services.free_port()  # nothing listens there once the probe socket closed


def run_worker(url: str, queue: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [services.PYTHON, "-m", "flowbatch.brokers", "worker", "brokerpipes:noop",
         "--broker", url, "--queue", queue, *args],
        capture_output=True, text=True, timeout=timeout, env=services.worker_env(),
        cwd=services.HERE, check=False,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in last, last


# ------------------------------------------------------ fail fast at start


@pytest.mark.parametrize("scheme", ["redis", "amqp", "nats"])
def test_a_broker_that_cannot_be_reached_is_exit_2_after_the_connect_timeout(
    scheme: str, queue_name: str
) -> None:
    port = closed_port()
    url = {
        "redis": f"redis://127.0.0.1:{port}/0",
        "amqp": f"amqp://guest:guest@127.0.0.1:{port}/",
        "nats": f"nats://127.0.0.1:{port}",
    }[scheme]
    proc = run_worker(url, queue_name, "--connect-timeout", "2")
    assert_one_line_error(proc, "broker unreachable at", f"127.0.0.1:{port}")
    # The log said what it was waiting for while it retried.
    assert f"broker unreachable at {url.replace('guest:guest', 'guest:***')}" in proc.stderr
    assert "retrying in" in proc.stderr


REFUSED = {
    "rabbitmq-wrong-password": ("amqp://guest:wrong@127.0.0.1:5672/", "ACCESS_REFUSED"),
    "rabbitmq-unknown-vhost": (
        "amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "virtual host 'no-such-vhost'"
    ),
    "redis-unknown-user": ("redis://nobody:secret@127.0.0.1:6379/0", "invalid username-password"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_credentials_are_exit_2_at_once(case: str, queue_name: str) -> None:
    if case.startswith("redis"):
        services.ensure_redis()
    else:
        services.ensure_rabbitmq()
    url, needle = REFUSED[case]
    # A connect timeout far beyond the subprocess's own: a refusal must not
    # be retried as if the broker were unreachable.
    proc = run_worker(url, queue_name, "--connect-timeout", "3600", timeout=90)
    assert_one_line_error(proc, "refused", needle)
    assert "wrong" not in proc.stderr and "secret" not in proc.stderr  # passwords redacted


def test_nats_authorization_violation_is_exit_2_at_once(
    private_nats_with_password: int, queue_name: str
) -> None:
    url = f"nats://alice:wrong@127.0.0.1:{private_nats_with_password}"
    proc = run_worker(url, queue_name, "--connect-timeout", "3600", timeout=90)
    assert_one_line_error(proc, "refused", "Authorization Violation")


def test_a_redis_password_given_when_the_server_has_none_is_accepted(queue_name: str) -> None:
    # Redis answers AUTH with a password for the passwordless default user
    # by accepting the connection (redis-py falls back); nothing to refuse.
    services.ensure_redis()

    async def main() -> None:
        broker: Any = make_broker("redis://:not-set@127.0.0.1:6379/0", queue_name)
        async with broker:
            await broker.publish([b"{}"])
            assert len(await broker.fetch(10, 1.0)) == 1  # the connection works both ways
            await broker.delete()

    asyncio.run(main())


# ------------------------------------------- a stop while the broker is away


def test_sigterm_while_connecting_at_start_exits_0_at_once(queue_name: str, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    url = f"redis://127.0.0.1:{closed_port()}/0"
    w = WorkerProcess(url, queue_name, ("--connect-timeout", "3600"), log=log)
    try:
        wait_until(lambda: "broker unreachable at" in log.read_text(), 60, "a retry logged")
        stats = w.stop(timeout=30)
    finally:
        w.ensure_dead()
    assert stats["fetched"] == 0
    assert "Traceback" not in log.read_text()


def test_sigterm_while_reconnecting_exits_0_and_the_log_says_what_it_waits_for(
    private_redis: tuple[str, subprocess.Popen[bytes]], queue_name: str, tmp_path: Path
) -> None:
    url, server = private_redis
    log = tmp_path / "worker.log"
    w = WorkerProcess(url, queue_name, ("--backoff", "0.05"), log=log)
    try:

        async def one_job_done() -> None:
            async with Client(url, queue_name) as client:
                job = await client.submit({"n": 1})
                assert (await client.result(job, timeout=60))["n"] == 1

        asyncio.run(one_job_done())  # the worker is consuming
        server.send_signal(signal.SIGKILL)  # the broker goes away for good
        server.wait(30)
        wait_until(
            lambda: f"broker unreachable at {url}" in log.read_text()
            and "retrying in" in log.read_text(),
            60, "the worker logging what it waits for",
        )
        stats = w.stop(timeout=30)  # exits 0 with its statistics, well before
    finally:
        w.ensure_dead()
    assert stats["succeeded"] == 1
    assert "Traceback" not in log.read_text()


# --------------------------------------------- a waiting client reconnects


def _kill_redis_client(client: Client) -> int:
    """CLIENT KILL every connection of ``client``'s pool, from the server."""
    pool: Any = client.broker._r.connection_pool  # type: ignore[attr-defined]
    addrs = []
    for conn in [*pool._available_connections, *pool._in_use_connections]:
        writer = getattr(conn, "_writer", None)
        if writer is not None:
            host, port = writer.get_extra_info("sockname")[:2]
            addrs.append(f"{host}:{port}")
    killed = 0
    for addr in addrs:
        out = services.sh(f"redis-cli -p 6379 client kill addr {addr} skipme yes")
        killed += int(out.stdout.strip() or 0)
    return killed


def _close_rabbitmq_connection(name: str) -> int:
    out = services.sh("rabbitmqctl list_connections pid client_properties -q --no-table-headers")
    pids = [line.split("\t")[0] for line in out.stdout.splitlines() if name in line]
    for pid in pids:
        services.sh(f"rabbitmqctl close_connection '{pid}' 'test breaks the client'")
    return len(pids)


def _abort_nats_transport(client: Client) -> int:
    # NATS has no per-connection kill without a system account: the socket
    # is aborted under the client library instead.
    client.broker._nc._transport._io_writer.transport.abort()  # type: ignore[attr-defined]
    return 1


@pytest.mark.parametrize("scheme", ["redis", "amqp", "nats"])
def test_a_client_waiting_on_a_result_reconnects_after_the_server_drops_it(
    scheme: str, queue_name: str
) -> None:
    if scheme == "redis":
        services.ensure_redis()
        url = "redis://127.0.0.1:6379/0"
    elif scheme == "amqp":
        services.ensure_rabbitmq()
        url = f"amqp://guest:guest@127.0.0.1:5672/?name=fbtest-{queue_name}"
    else:
        services.ensure_nats()
        url = "nats://127.0.0.1:4222"

    async def main() -> None:
        async with Client(url, queue_name) as client:
            job = await client.submit({"n": 7})
            waiting = asyncio.create_task(client.result(job, timeout=120))
            # the client has read the (still empty) result store at least once
            await until(
                lambda: _has_read(client), 30, "the client polling", every=0.05
            )
            if scheme == "redis":
                killed = await asyncio.to_thread(_kill_redis_client, client)
            elif scheme == "amqp":
                killed = await asyncio.to_thread(_close_rabbitmq_connection, f"fbtest-{queue_name}")
            else:
                killed = _abort_nats_transport(client)
            assert killed >= 1
            assert not waiting.done()
            worker = Worker(
                brokerpipes.noop(), make_broker(url, queue_name), WorkerConfig(poll=0.05)
            )
            running = asyncio.create_task(worker.run())
            try:
                value = await waiting
            finally:
                worker.stop()
                await running
            assert value["n"] == 7

    asyncio.run(main())


async def _has_read(client: Client) -> bool:
    broker: Any = client.broker
    if hasattr(broker, "_reading_results"):
        return bool(broker._reading_results)
    if hasattr(broker, "_nc"):
        return broker._nc is not None
    return broker._r is not None



# ------------------------------------------------------------ one backoff


def test_every_broker_wait_is_the_jittered_retry_delay(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Start-up retries, reconnects, Client.result polls and the SQLite poll all
    wait ``Retry.delay`` (so with jitter, not in lockstep across workers)."""
    calls: list[tuple[float, int]] = []
    real = Retry.delay

    def spy(self: Retry, attempt: int) -> float:
        calls.append((self.backoff, attempt))
        return real(self, attempt)

    monkeypatch.setattr(Retry, "delay", spy)

    async def main() -> None:
        broker = MemoryBroker("backoff")
        cfg = WorkerConfig(poll=0.02, reconnect_backoff=0.001, max_reconnect_backoff=0.002)
        worker = Worker(brokerpipes.noop(), broker, cfg)
        broker.fail_next(3)  # open fails three times
        running = asyncio.create_task(worker.run())
        try:
            await worker.wait_started()
            async with Client(broker) as client:
                job = await client.submit({"n": 1})
                assert (await client.result(job, timeout=30))["n"] == 1
                broker.fail_next(2)  # the next fetch, then the reconnect after it
                await until(
                    _reconnected(worker), 30, "the worker reconnecting", every=0.01
                )
        finally:
            worker.stop()
            await running
        sqlite: Any = make_broker(f"sqlite:///{tmp_path}/q.db", "backoff")
        async with sqlite:
            assert await sqlite.fetch(10, 0.05) == []

    asyncio.run(main())
    assert [a for b, a in calls if b == 0.001] == [1, 2, 3, 1]  # open x3, reconnect x1
    assert any(b == 0.002 for b, _ in calls)  # Client.result's and SQLite's polls


def _reconnected(worker: Worker) -> Any:
    async def cond() -> bool:
        return worker.statistics().reconnects >= 1

    return cond
