"""``python -m flowbatch.brokers worker ...`` until the main CLI registers ``worker``."""

from __future__ import annotations

import click

from .cli import worker


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """flowbatch broker tools."""


main.add_command(worker)

if __name__ == "__main__":
    main()
