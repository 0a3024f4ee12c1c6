"""``flowbatch dlq`` and ``flowbatch queue``: act on dead letters, see a queue's depth.

Usage::

    flowbatch dlq list   --broker redis://127.0.0.1:6379/0 --queue embed
    flowbatch dlq show   KEY --broker ... --queue embed
    flowbatch dlq replay KEY [KEY ...] | --all --broker ... --queue embed
    flowbatch dlq purge  KEY [KEY ...] | --all [--yes] --broker ... --queue embed
    flowbatch queue stats --broker ... --queue embed [--json]

A dead letter's KEY is the one ``dlq list`` prints (the broker's id for it
where it has one). ``replay`` puts each job back with the same job id (the
producer's idempotency key) and its attempts reset; its failed result is
withdrawn first, so that ``Client.result`` gets the new outcome. A broker
that refuses the settings or cannot be reached within ``--connect-timeout``
is a one-line error and exit code 2, as for ``flowbatch worker``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import msgspec

from .base import (
    Broker,
    BrokerRefused,
    BrokerUnreachable,
    BrokerUnsupported,
    DeadLetter,
    ResultRecord,
    redact,
)
from .cli import BrokerFailed
from .config import DEFAULT_CONNECT_TIMEOUT
from .connect import open_within
from .registry import DEFAULT_BROKER_URL, DEFAULT_QUEUE, make_broker

__all__ = ["dlq", "queue"]

T = TypeVar("T")

def _with_broker(url: str, queue: str, timeout: float, fn: Callable[[Broker], Awaitable[T]]) -> T:
    """Run ``fn(broker)`` on an open broker; broker failures become click errors."""
    try:
        broker = make_broker(url, queue)
    except (ValueError, ImportError) as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from exc

    async def run() -> T:
        await open_within(broker, timeout, who="flowbatch")
        try:
            return await fn(broker)
        finally:
            await broker.close()

    try:
        return asyncio.run(run())
    except (BrokerRefused, BrokerUnreachable) as exc:
        raise BrokerFailed(str(exc)) from None
    except BrokerUnsupported as exc:
        raise click.ClickException(str(exc)) from None


def _broker_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--connect-timeout", default=DEFAULT_CONNECT_TIMEOUT, show_default=True,
        type=click.FloatRange(min=0.001),
        help="Seconds to retry an unreachable broker before exiting 2.",
    )(fn)
    fn = click.option("--queue", default=DEFAULT_QUEUE, show_default=True, help="Queue name.")(fn)
    return click.option(
        "--broker", "url", default=DEFAULT_BROKER_URL, show_default=True,
        help="Broker URL: sqlite:///file.db, redis://, amqp://, nats://, kafka://.",
    )(fn)


def _record(letter: DeadLetter) -> ResultRecord | None:
    try:
        return letter.decode()
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # not written by a worker (e.g. a message RabbitMQ rejected)


def _when(ts: float) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------- dlq


@click.group()
def dlq() -> None:
    """List, show, replay or purge the dead letters of a queue."""


@dlq.command("list")
@_broker_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (without bodies).")
def dlq_list(url: str, queue: str, connect_timeout: float, as_json: bool) -> None:
    """List dead letters: key, job id, attempts, first seen (UTC), error."""
    letters = _with_broker(url, queue, connect_timeout, lambda b: b.list_dead_letters())
    if not as_json:
        click.echo(f"{'KEY':<20} {'JOB ID':<34} {'ATTEMPTS':>8}  {'FIRST SEEN (UTC)':<19}  ERROR")
    for letter in letters:
        rec = _record(letter)
        if as_json:
            row: dict[str, Any] = {"key": letter.key}
            if rec is not None:
                row.update(
                    id=rec.id, attempts=rec.attempts, first_seen=rec.first_seen,
                    finished_at=rec.finished_at, error=rec.error,
                )
            else:
                row["error"] = "not a dead-letter record (rejected by the broker itself?)"
            click.echo(json.dumps(row))
        elif rec is None:
            click.echo(f"{letter.key:<20} {'?':<34} {'?':>8}  {'-':<19}  (raw message, no record)")
        else:
            error = (rec.error or "").replace("\n", " ")
            if len(error) > 100:
                error = error[:99] + "…"
            click.echo(
                f"{letter.key:<20} {rec.id or '?':<34} {rec.attempts:>8}  "
                f"{_when(rec.first_seen):<19}  {error}"
            )
    if not as_json:
        click.echo(f"{len(letters)} dead letter(s) in queue {queue!r}", err=True)


@dlq.command("show")
@click.argument("key")
@_broker_options
def dlq_show(key: str, url: str, queue: str, connect_timeout: float) -> None:
    """Print one dead letter's full record (error, attempts, body) as JSON."""
    letters = _with_broker(url, queue, connect_timeout, lambda b: b.list_dead_letters())
    for letter in letters:
        if letter.key == key:
            rec = _record(letter)
            if rec is None:
                click.echo(json.dumps({"key": key, "body": letter.record.decode("utf-8", "replace")}))
            else:
                data = msgspec.to_builtins(rec)
                click.echo(json.dumps({"key": key, **data}, indent=2))
            return
    raise click.ClickException(f"no dead letter with key {key!r} in queue {queue!r}")


def _keys(keys: tuple[str, ...], everything: bool) -> list[str] | None:
    if everything and keys:
        raise click.UsageError("give KEYs or --all, not both")
    if not everything and not keys:
        raise click.UsageError("give the KEYs to act on (see `flowbatch dlq list`) or --all")
    return None if everything else list(keys)


@dlq.command("replay")
@click.argument("keys", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Replay every dead letter.")
@_broker_options
def dlq_replay(
    keys: tuple[str, ...], everything: bool, url: str, queue: str, connect_timeout: float
) -> None:
    """Put dead letters back on the queue: same job id, attempts reset."""
    chosen = _keys(keys, everything)
    done = _with_broker(url, queue, connect_timeout, lambda b: b.replay_dead_letters(chosen))
    click.echo(f"replayed {len(done.job_ids)} dead letter(s)")
    for job_id in done.job_ids:
        click.echo(f"  {job_id}")
    for key, why in done.skipped:
        click.echo(f"skipped {key}: {why}", err=True)
    for key in done.missing:
        click.echo(f"no dead letter with key {key!r}", err=True)
    if done.missing or done.skipped:
        raise SystemExit(1)


@dlq.command("purge")
@click.argument("keys", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Delete every dead letter.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_broker_options
def dlq_purge(  # noqa: PLR0917 - click passes every option positionally
    keys: tuple[str, ...], everything: bool, yes: bool, url: str, queue: str,
    connect_timeout: float,
) -> None:
    """Delete dead letters for good."""
    chosen = _keys(keys, everything)
    if not yes:
        what = "every dead letter" if chosen is None else f"{len(chosen)} dead letter(s)"
        click.confirm(f"delete {what} of queue {queue!r} at {redact(url)}?", abort=True)
    n = _with_broker(url, queue, connect_timeout, lambda b: b.purge_dead_letters(chosen))
    click.echo(f"purged {n} dead letter(s)")


# -------------------------------------------------------------- queue


@click.group()
def queue() -> None:
    """Inspect a queue."""


@queue.command("stats")
@_broker_options
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def queue_stats(url: str, queue: str, connect_timeout: float, as_json: bool) -> None:
    """Depth and lag: waiting, in flight, delayed, dead letters, results, oldest waiting age."""
    stats = _with_broker(url, queue, connect_timeout, lambda b: b.queue_stats())
    data = {
        "waiting": stats.waiting,
        "in_flight": stats.in_flight,
        "delayed": stats.delayed,
        "dead": stats.dead,
        "results": stats.results,
        "oldest_waiting_age": stats.oldest_waiting_age,
    }
    if as_json:
        click.echo(json.dumps(data))
        return
    for name, value in data.items():
        if value is None and name == "oldest_waiting_age" and stats.waiting == 0:
            shown = "- (nothing waiting)"
        elif value is None:
            shown = "n/a (this broker cannot say)"
        elif name == "oldest_waiting_age":
            shown = f"{value:.1f} s"
        else:
            shown = str(value)
        click.echo(f"{name + ':':<20}{shown}")
