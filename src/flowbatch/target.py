"""Find the pipeline a command names as ``module:attr``.

Shared by ``flowbatch serve``, ``worker`` and ``bench``. ``attr`` may be
dotted and may name a function of no arguments that returns the pipeline
(a factory); the current directory is importable, as for ``python -m``.

Usage::

    pipe = load_pipeline("myapp.pipelines:embed")
    pipes = load_target("myapp.pipelines:all", many=True)  # or a dict of them
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping
from typing import Any

from .pipeline import Pipeline

__all__ = ["TargetError", "load_pipeline", "load_target"]


class TargetError(ValueError):
    """``module:attr`` does not name a pipeline; the message says what to fix.

    ``usage`` is true when the text itself is malformed (a usage error).
    """

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def _takes_no_arguments(fn: Any) -> bool:
    try:
        inspect.signature(fn).bind()
    except (TypeError, ValueError):
        return False
    return True


def load_target(spec: str, *, many: bool = False) -> Pipeline | dict[str, Pipeline]:
    """The ``Pipeline`` that ``spec`` names (with ``many``, also a non-empty
    mapping of name -> ``Pipeline``). Raises :class:`TargetError`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TargetError(
            f"expected module:attr (for example myapp.pipelines:embed), got {spec!r}", usage=True
        )
    if "" not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: the current directory's modules
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise TargetError(f"cannot import {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, Pipeline | Mapping) and callable(obj) and _takes_no_arguments(obj):
        obj = obj()  # a factory
    if isinstance(obj, Pipeline):
        return obj
    if (
        many
        and isinstance(obj, Mapping)
        and obj
        and all(isinstance(k, str) and isinstance(p, Pipeline) for k, p in obj.items())
    ):
        return dict(obj)
    wanted = "a flowbatch.Pipeline, a dict of name -> Pipeline" if many else "a flowbatch.Pipeline"
    raise TargetError(f"{spec} is a {type(obj).__name__}; name {wanted}, or a function returning one")


def load_pipeline(spec: str) -> Pipeline:
    """:func:`load_target` for commands that run exactly one pipeline."""
    pipe = load_target(spec)
    assert isinstance(pipe, Pipeline)
    return pipe
