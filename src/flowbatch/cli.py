"""The ``flowbatch`` command line."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import click

__all__ = ["main"]


# Subcommands that live with their front end, loaded only when invoked (or
# listed), so that `flowbatch demo` needs no HTTP or broker packages.
_LAZY = {
    "serve": ("flowbatch.http.cli", "serve", "http"),
    "worker": ("flowbatch.brokers.cli", "worker", "brokers"),
    "dlq": ("flowbatch.brokers.admin", "dlq", "brokers"),
    "queue": ("flowbatch.brokers.admin", "queue", "brokers"),
    "run": ("flowbatch.bulk.cli", "run", "bulk"),
    "top": ("flowbatch.observe.top", "top", None),
    "bench": ("flowbatch.observe.bench", "bench", None),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *_LAZY])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _LAZY:
            return super().get_command(ctx, cmd_name)
        module, attr, extra = _LAZY[cmd_name]
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            hint = f"pip install 'flowbatch[{extra}]'" if extra else "reinstall flowbatch"
            message = f"'flowbatch {cmd_name}' needs {exc.name!r}, which is not installed: {hint}"

            def missing() -> None:
                raise click.ClickException(message)

            return click.Command(cmd_name, callback=missing, help=f"(unavailable: {hint})")
        command = getattr(mod, attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flowbatch")
def main() -> None:
    """flowbatch: overlapped, batched AI pipelines on asyncio."""


@main.command()
@click.option("--docs", default=300, show_default=True, type=click.IntRange(min=1),
              help="Documents to embed through the pipeline.")
@click.option("--db", "db_path", default="flowbatch-demo.db", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="SQLite file for the vectors (its chunks table is replaced).")
@click.option("--sample", default=20, show_default=True, type=click.IntRange(min=1),
              help="Documents for the sequential comparison (extrapolated).")
@click.option("--no-progress", is_flag=True, help="Do not show a progress bar.")
@click.option("--metrics-port", type=click.IntRange(min=0), default=None,
              help="Serve /metrics on this port while the pipeline runs (0: any free "
                   "port), to watch it with `flowbatch top`.")
def demo(
    docs: int, db_path: Path, sample: int, no_progress: bool, metrics_port: int | None
) -> None:
    """Embed documents from a local server into SQLite, then compare with a plain loop."""
    # The weights ship in a package: never reach for a hub, and keep the
    # loader's own progress bars out of the demo's display. Set here, at the
    # program's entry point, before transformers is imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from flowbatch.demo import run_demo
        from flowbatch.models import default_model_path

        default_model_path()
    except ImportError as exc:
        raise click.ClickException(
            f"the demo needs the models extra ({exc.name} is missing): "
            "pip install 'flowbatch[models]'"
        ) from exc
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    result = run_demo(
        docs=docs,
        db_path=db_path,
        sample=sample,
        progress=not no_progress,
        metrics_port=metrics_port,
    )
    if result["failed"]:
        raise SystemExit(1)
