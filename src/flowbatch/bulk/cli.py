"""``flowbatch run``: a bulk job from the command line (see flowbatch.bulk.urls for URLs)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from flowbatch.bulk.job import run_job
from flowbatch.bulk.urls import open_sink, open_source

__all__ = ["run"]

_URLS = """\b
Sources: lines:PATH, jsonl:PATH[?key=F&value=F], csv:PATH[?columns=a,b&key=F&value=F],
  parquet:PATH[?columns=..&key=..&value=..], glob:PATTERN[?read=bytes|path|open],
  postgresql://USER@HOST/DB?query=SQL[&key=F&value=F], sqlite:PATH?table=T|query=SQL,
  failed:PATH (the failed keys of an earlier run).
Sinks: postgresql://USER@HOST/DB?table=T[&key=id&column=value], sqlite:PATH?table=T,
  parquet:FOLDER[?rows=10000], jsonl:PATH.
"""


@click.command("run", context_settings={"help_option_names": ["-h", "--help"]},
               epilog=_URLS)
@click.argument("target")
@click.option("--source", "source_url", required=True, metavar="URL",
              help="Where the items come from (see below).")
@click.option("--sink", "sink_url", default=None, metavar="URL",
              help="Where the results go (see below); without it the pipeline's last "
                   "stage is the writer.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="SQLite file of the keys written; a rerun skips them.")
@click.option("--fresh", is_flag=True, help="Forget the checkpoint (and empty a file sink) first.")
@click.option("--failed", "failed_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              help="Where the failed keys go (JSON Lines; rerun them with --source "
                   "failed:PATH). Default: CHECKPOINT.failed.jsonl, else flowbatch-failed.jsonl.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: when stderr is a terminal).")
@click.option("--queue-size", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Each stage's queue bound.")
def run(  # noqa: PLR0917 - click passes every option positionally
    target: str,
    source_url: str,
    sink_url: str | None,
    checkpoint: Path | None,
    fresh: bool,
    failed_path: Path | None,
    progress: bool | None,
    queue_size: int,
) -> None:
    """Run every item of --source through the pipeline TARGET (module:attr) into --sink.

    Exits 0 only when every item succeeded; otherwise 1, with the failed keys
    in the --failed file. With --checkpoint a killed job resumes where it
    stopped: rerun the same command.
    """
    from flowbatch.target import TargetError, load_pipeline

    try:
        pipe = load_pipeline(target)
    except TargetError as exc:
        if exc.usage:
            raise click.BadParameter(str(exc), param_hint="TARGET") from exc
        raise click.ClickException(str(exc)) from exc
    try:
        source = open_source(source_url)
        sink = open_sink(sink_url) if sink_url is not None else None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if failed_path is None:
        failed_path = (
            Path(f"{checkpoint}.failed.jsonl") if checkpoint is not None
            else Path("flowbatch-failed.jsonl")
        )
    if progress is None:
        progress = sys.stderr.isatty()
    report = asyncio.run(
        run_job(pipe, source, sink, checkpoint=checkpoint, fresh=fresh,
                failed_path=failed_path, progress=progress, queue_size=queue_size)
    )
    click.echo(str(report.stats))
    line = (
        f"done {report.done}, failed {report.failed}, skipped {report.skipped} "
        f"(done before), in {report.elapsed:.1f}s"
    )
    if report.failed:
        line += f"; failed keys in {report.failed_path}"
    click.echo(line)
    if not report.ok:
        raise SystemExit(1)
