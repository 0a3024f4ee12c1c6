"""ServeConfig(latency_target=...) and `flowbatch serve --latency-target`: settings checks."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from flowbatch.http import ServeConfig
from flowbatch.http.cli import serve


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"latency_target": 0}, "latency_target must be seconds > 0"),
        ({"latency_target": -2.0}, "latency_target must be seconds > 0"),
        ({"latency_target": float("inf")}, "latency_target must be seconds > 0"),
        ({"latency_target": "fast"}, "latency_target must be seconds > 0"),
        ({"latency_target": 0.5, "max_in_flight": 8}, "not both"),
    ],
)
def test_bad_latency_targets_are_refused_with_a_reason(kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        ServeConfig(**kwargs)


def test_a_latency_target_is_a_setting() -> None:
    assert ServeConfig(latency_target=0.25).latency_target == 0.25
    assert ServeConfig().latency_target is None  # derived from the service time


def test_serve_takes_latency_target_and_refuses_it_with_max_in_flight() -> None:
    cli = CliRunner()
    out = cli.invoke(serve, ["--help"])
    assert out.exit_code == 0 and "--latency-target" in out.output
    out = cli.invoke(serve, ["x:y", "--latency-target", "0.5", "--max-in-flight", "8"])
    assert out.exit_code == 2 and "not both" in out.output
    out = cli.invoke(serve, ["x:y", "--latency-target", "0"])
    assert out.exit_code == 2 and "--latency-target" in out.output
