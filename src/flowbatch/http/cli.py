"""``flowbatch serve module:attr``: serve a pipeline (or a dict of them) over HTTP."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from .config import (
    DEFAULT_GRACEFUL_TIMEOUT,
    DEFAULT_JOB_TTL,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_INPUTS,
    DEFAULT_RETRY_AFTER,
    DEFAULT_SHUTDOWN_GRACE,
    ServeConfig,
)

__all__ = ["load_target", "serve"]


def load_target(target: str) -> Any:
    """The pipeline, or dict of pipelines, that ``target`` names; errors for click."""
    from flowbatch.target import TargetError
    from flowbatch.target import load_target as load

    try:
        return load(target, many=True)
    except TargetError as exc:
        if exc.usage:
            raise click.BadParameter(str(exc), param_hint="TARGET") from exc
        raise click.ClickException(str(exc)) from exc


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("target")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key-env", metavar="NAME",
              help="Require 'Authorization: Bearer <key>', the key read from this variable.")
@click.option("--max-body-size", default=DEFAULT_MAX_BODY_BYTES, show_default=True,
              type=click.IntRange(min=1), help="Largest body in bytes (413 past it).")
@click.option("--latency-target", type=click.FloatRange(min=0, min_open=True),
              metavar="SECONDS",
              help="p99 latency the admission limit keeps admitted requests under (503 past "
                   "it). [default: 4x the measured batch service time, at least 0.05]")
@click.option("--max-in-flight", type=click.IntRange(min=1),
              help="A fixed limit of items admitted at once per pipeline instead (503 past "
                   "it); not with --latency-target.")
@click.option("--max-inputs", default=DEFAULT_MAX_INPUTS, show_default=True,
              type=click.IntRange(min=1), help="Most inputs in one request.")
@click.option("--timeout", "default_timeout", type=click.FloatRange(min=0, min_open=True),
              help="Seconds an item may take when the client sends no X-Request-Timeout.")
@click.option("--retry-after", default=DEFAULT_RETRY_AFTER, show_default=True,
              type=click.IntRange(min=0), help="Seconds in Retry-After on a 503.")
@click.option("--jobs-db", type=click.Path(dir_okay=False, path_type=Path),
              help="SQLite file for async jobs, kept across restarts. [default: in memory]")
@click.option("--job-ttl", default=DEFAULT_JOB_TTL, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="Seconds a job result is kept.")
@click.option("--graceful-timeout", default=DEFAULT_GRACEFUL_TIMEOUT, show_default=True,
              type=click.IntRange(min=0), help="Seconds to wait for open requests on SIGTERM.")
@click.option("--shutdown-grace", default=DEFAULT_SHUTDOWN_GRACE, show_default=True,
              type=click.FloatRange(min=0),
              help="Seconds to keep accepting after SIGTERM, /readyz answering 503, before "
                   "closing (for load balancers); Ctrl-C skips it.")
@click.option("--expose-errors", is_flag=True,
              help="Put the message of a server fault (500) in the answer, for development. "
                   "[default: 'internal error' and a request id; the log has the details]")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--access-log/--no-access-log", default=False, show_default=True)
@click.option("--app-dir", default=".", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory put first on sys.path to import TARGET.")
def serve(  # noqa: PLR0917 - click passes each option as an argument
    target: str, host: str, port: int, api_key_env: str | None, max_body_size: int,
    latency_target: float | None, max_in_flight: int | None, max_inputs: int,
    default_timeout: float | None, retry_after: int, jobs_db: Path | None, job_ttl: float,
    graceful_timeout: int, shutdown_grace: float, expose_errors: bool, log_level: str, access_log: bool,
    app_dir: Path,
) -> None:
    """Serve TARGET (module:attr, a Pipeline or a dict of them) over HTTP.

    Routes: POST /v1/pipelines/{name} (and /jobs, /stream), /v1/embeddings,
    the Open Inference Protocol v2 under /v2, /healthz, /readyz, /metrics.
    SIGTERM: /readyz turns 503 while requests are still served for
    --shutdown-grace seconds; then the server closes, finishes the requests
    in flight and exits 0.
    """
    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise click.BadParameter(
                f"environment variable {api_key_env!r} is not set or empty",
                param_hint="--api-key-env",
            )
    if latency_target is not None and max_in_flight is not None:
        raise click.UsageError("give --latency-target or --max-in-flight, not both")
    sys.path.insert(0, str(app_dir.resolve()))
    pipelines = load_target(target)

    from .app import create_app
    from .server import run
    from .stores import SQLiteJobStore

    config = ServeConfig(
        api_key=api_key, max_in_flight=max_in_flight, latency_target=latency_target,
        max_body_bytes=max_body_size,
        max_inputs=max_inputs, default_timeout=default_timeout, retry_after=retry_after,
        job_ttl=job_ttl, expose_errors=expose_errors, shutdown_grace=shutdown_grace,
    )
    store = SQLiteJobStore(jobs_db) if jobs_db is not None else None
    app = create_app(pipelines, config=config, job_store=store)
    run(app, host=host, port=port, log_level=log_level, access_log=access_log,
        graceful_timeout=graceful_timeout)
