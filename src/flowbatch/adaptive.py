"""Limits that follow the load: the ``fb.Adaptive`` option.

``fb.stage(call_api, concurrency=fb.Adaptive(min=1, max=256))`` lets the
runner choose a stage's concurrency between ``min`` and ``max`` from what it
measures, instead of a number the user guesses.

Usage::

    fb.stage(call_api, concurrency=fb.Adaptive(min=1, max=256))
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Adaptive"]


@dataclass(frozen=True, slots=True)
class Adaptive:
    """A stage's concurrency chosen at run time, between ``min`` and ``max``.

    - ``min``: the fewest calls in flight (workers, replicas) ever allowed.
    - ``max``: the most; the stage's workers are sized for it.
    - ``initial``: where the limit starts (default: ``min``).
    """

    min: int = 1
    max: int = 256
    initial: int | None = None

    def __post_init__(self) -> None:
        for name in ("min", "max"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Adaptive.{name} must be an int >= 1, got {v!r}")
        if self.max < self.min:
            raise ValueError(f"Adaptive.max ({self.max}) must be >= Adaptive.min ({self.min})")
        if self.initial is not None and (
            not isinstance(self.initial, int)
            or isinstance(self.initial, bool)
            or not self.min <= self.initial <= self.max
        ):
            raise ValueError(
                f"Adaptive.initial must be an int between min ({self.min}) and max "
                f"({self.max}), got {self.initial!r}"
            )

    @property
    def start(self) -> int:
        """The limit the stage starts with."""
        return self.initial if self.initial is not None else self.min
