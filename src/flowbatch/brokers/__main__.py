"""``python -m flowbatch.brokers worker|dlq|queue ...``: the broker commands without the main CLI."""

from __future__ import annotations

import click

from .admin import dlq, queue
from .cli import worker


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """flowbatch broker tools."""


main.add_command(worker)
main.add_command(dlq)
main.add_command(queue)

if __name__ == "__main__":
    main()
