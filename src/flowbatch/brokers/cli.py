"""``flowbatch worker``: run a pipeline as a broker worker until SIGTERM.

Usage::

    flowbatch worker mypkg.pipes:embed --broker redis://127.0.0.1:6379/0 --queue embed
    python -m flowbatch.brokers worker mypkg.pipes:embed   # sqlite:///flowbatch-queue.db

SIGTERM or SIGINT stops fetching, lets in-flight messages finish and be
settled, releases what was prefetched and exits 0. The last line on stdout
is the worker's statistics as JSON.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
from typing import Any

import click

from flowbatch.pipeline import Pipeline
from flowbatch.retry import Retry
from flowbatch.target import TargetError
from flowbatch.target import load_pipeline as _load

from .base import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_RESULT_TTL,
    BrokerRefused,
    BrokerUnreachable,
)
from .config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_LAG_INTERVAL,
    DEFAULT_LEASE,
    DEFAULT_PREFETCH,
    DEFAULT_RETRY,
    DEFAULT_WORKER_CONFIG,
    WorkerConfig,
)
from .registry import DEFAULT_BROKER_URL, DEFAULT_QUEUE, make_broker

__all__ = ["BrokerFailed", "load_pipeline", "worker"]


class BrokerFailed(click.ClickException):
    """The broker refused us or could not be reached: one line on stderr, exit 2."""

    exit_code = 2


def load_pipeline(target: str) -> Pipeline:
    """The pipeline ``target`` (``module:attr``) names; errors for click."""
    try:
        return _load(target)
    except TargetError as exc:
        raise click.BadParameter(str(exc), param_hint="TARGET") from exc


@click.command()
@click.argument("target")
@click.option("--broker", "url", default=DEFAULT_BROKER_URL, show_default=True,
              help="Broker URL: sqlite:///file.db, redis://, amqp://, nats://, kafka://.")
@click.option("--queue", default=DEFAULT_QUEUE, show_default=True, help="Queue to consume.")
@click.option("--concurrency", default=DEFAULT_PREFETCH, show_default=True,
              type=click.IntRange(min=1),
              help="Messages in flight at most (fetched, not yet settled).")
@click.option("--max-attempts", default=DEFAULT_RETRY.attempts, show_default=True,
              type=click.IntRange(min=1), help="Attempts per message before the dead-letter queue.")
@click.option("--backoff", default=DEFAULT_RETRY.backoff, show_default=True,
              type=click.FloatRange(min=0), help="Seconds before the first retry; doubles each time.")
@click.option("--max-backoff", default=DEFAULT_RETRY.max_backoff, show_default=True,
              type=click.FloatRange(min=0), help="Upper bound of the retry backoff.")
@click.option("--lease", default=DEFAULT_LEASE, show_default=True,
              type=click.FloatRange(min=0.1),
              help="Seconds a message stays reserved; renewed while it is worked on.")
@click.option("--timeout", default=None, type=click.FloatRange(min=0.001),
              help="Per-message deadline inside the pipeline, seconds.")
@click.option("--max-message-bytes", default=DEFAULT_MAX_MESSAGE_BYTES, show_default=True,
              type=click.IntRange(min=1), help="Larger messages are dead-lettered unread.")
@click.option("--stall-after", default=DEFAULT_WORKER_CONFIG.stall_after, show_default=True,
              type=click.FloatRange(min=0.1),
              help="Seconds without deliveries while a backlog waits before reconnecting.")
@click.option("--connect-timeout", default=DEFAULT_CONNECT_TIMEOUT, show_default=True,
              type=click.FloatRange(min=0.001),
              help="Seconds to retry an unreachable broker at start before exiting 2 "
                   "(refused credentials or virtual host exit 2 at once).")
@click.option("--result-ttl", default=DEFAULT_RESULT_TTL, show_default=True,
              type=click.FloatRange(min=0),
              help="Seconds stored results are kept (0: until deleted); "
                   "Redis, SQLite and NATS (RabbitMQ and Kafka: 7 days, their own retention).")
@click.option("--metrics-port", type=click.IntRange(min=0), default=None,
              help="Serve /metrics on --metrics-host at this port (0: any free port), "
                   "to watch the worker with `flowbatch top` or scrape it with Prometheus.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address /metrics listens on (0.0.0.0 in a container Prometheus scrapes).")
@click.option("--lag-interval", default=DEFAULT_LAG_INTERVAL, show_default=True,
              type=click.FloatRange(min=0),
              help="Seconds between reads of the queue's lag for the flowbatch_broker_* "
                   "gauges on /metrics (0: never read).")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def worker(  # noqa: PLR0917 - click passes every option positionally
    target: str,
    url: str,
    queue: str,
    concurrency: int,
    max_attempts: int,
    backoff: float,
    max_backoff: float,
    lease: float,
    timeout: float | None,
    max_message_bytes: int,
    stall_after: float,
    connect_timeout: float,
    result_ttl: float,
    metrics_port: int | None,
    metrics_host: str,
    lag_interval: float,
    log_level: str,
) -> None:
    """Consume QUEUE from a broker into the pipeline TARGET (module:attribute)."""
    # A SIGTERM that arrives while the pipeline is still being imported must
    # still end in a clean stop (exit 0), not in the default handler's death.
    early: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: early.append(signum))
    # INFO shows the worker's own lines (startup, reconnects, retries), not
    # the client libraries' chatter; DEBUG shows everything.
    level = logging.getLevelName(log_level.upper())
    logging.basicConfig(
        level=level if level == logging.DEBUG else max(level, logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("flowbatch").setLevel(level)
    pipe = load_pipeline(target)
    try:
        broker = make_broker(url, queue)
    except (ValueError, ImportError) as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from exc
    config = WorkerConfig(
        prefetch=concurrency,
        retry=Retry(attempts=max_attempts, backoff=backoff, max_backoff=max_backoff),
        lease=lease,
        timeout=timeout,
        max_message_bytes=max_message_bytes,
        stall_after=stall_after,
        result_ttl=result_ttl,
        connect_timeout=connect_timeout,
        lag_interval=lag_interval or None,
    )
    try:
        stats = asyncio.run(
            _serve(pipe, broker, config, early, metrics_port, metrics_host=metrics_host)
        )
    except (BrokerRefused, BrokerUnreachable) as exc:
        raise BrokerFailed(str(exc)) from None
    click.echo(json.dumps(dataclasses.asdict(stats)))


async def _serve(
    pipe: Pipeline,
    broker: Any,
    config: WorkerConfig,
    early: list[int],
    metrics_port: int | None,
    *,
    metrics_host: str = "127.0.0.1",
) -> Any:
    from .worker import Worker

    w = Worker(pipe, broker, config)
    if metrics_port is not None:
        from flowbatch.prometheus import serve_metrics

        from .metrics import WorkerCollector

        # A callable: the worker's runner opens (and closes) inside ``run``.
        async with serve_metrics(
            lambda: w.runners, metrics_port, metrics_host, more=[WorkerCollector(w)]
        ) as url:
            click.echo(f"metrics: {url}  (watch: flowbatch top {url})", err=True)
            w.metrics_url = url
            return await _run_worker(w, early)
    return await _run_worker(w, early)


async def _run_worker(w: Any, early: list[int]) -> Any:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, w.stop)
    if early:
        w.stop()
    try:
        return await w.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
