"""The command line: every front end is reachable from `flowbatch`."""

from __future__ import annotations

from click.testing import CliRunner

from flowbatch.cli import main


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for name in ("demo", "serve", "worker", "dlq", "queue", "run", "top", "bench"):
        assert f"  {name} " in result.output


def test_each_command_has_help() -> None:
    for name in ("demo", "serve", "worker", "dlq", "queue", "run", "top", "bench"):
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage: " in result.output


def test_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["nope"])
    assert result.exit_code == 2
    assert "No such command 'nope'" in result.output
