"""module:attr loading shared by serve, worker and bench."""

from __future__ import annotations

import pytest

import flowbatch as fb
from flowbatch.target import TargetError, load_pipeline, load_target

PIPE = fb.Pipeline([fb.stage(str.upper)], name="t")
PIPES = {"a": PIPE}
NOT_A_PIPELINE = 42


def make() -> fb.Pipeline:
    return PIPE


def test_load_target_variants() -> None:
    assert load_pipeline("test_target:PIPE") is PIPE
    assert load_pipeline("test_target:make") is PIPE
    assert load_target("test_target:PIPES", many=True) == PIPES


@pytest.mark.parametrize(
    ("spec", "many", "message", "usage"),
    [
        ("test_target", False, "expected module:attr", True),
        ("no_such_module_xyz:p", False, "cannot import 'no_such_module_xyz'", False),
        ("test_target:missing", False, "has no attribute 'missing'", False),
        ("test_target:NOT_A_PIPELINE", False, "is a int; name a flowbatch.Pipeline", False),
        ("test_target:PIPES", False, "is a dict", False),
    ],
)
def test_load_target_errors_say_what_to_fix(spec: str, many: bool, message: str, usage: bool) -> None:
    with pytest.raises(TargetError, match=message) as info:
        load_target(spec, many=many)
    assert info.value.usage is usage
