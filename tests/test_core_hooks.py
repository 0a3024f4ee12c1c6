"""Hooks: every item and call is seen, and the carrier reaches the worker."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import flowbatch as fb
from flowbatch.hooks import Hooks, ItemView, StageView

CURRENT: contextvars.ContextVar[str] = contextvars.ContextVar("current", default="none")


@contextlib.contextmanager
def activate(carrier: Any) -> Iterator[None]:
    token = CURRENT.set(str(carrier))
    try:
        yield
    finally:
        CURRENT.reset(token)


class Recorder(Hooks):
    activate = staticmethod(activate)

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[Any, ...]] = []

    def admitted(self, item: ItemView) -> Any:
        self.events.append(("admitted", item.id))
        return f"trace-{item.id}"

    def started(self, stage: StageView, items: Sequence[ItemView], batch: bool) -> Any:
        self.events.append(("started", stage.name, tuple(i.id for i in items), batch))
        return (stage.name, [i.trace for i in items])

    def carrier(self, state: Any) -> Any:
        return f"{state[0]}:{','.join(state[1])}"

    def ended(self, state: Any, error: BaseException | None, errors: Any) -> None:
        self.events.append(("ended", state[0], type(error).__name__ if error else None,
                            None if errors is None else [e is not None for e in errors]))

    def resolved(self, item: ItemView, error: BaseException | None) -> None:
        self.events.append(("resolved", item.id, error is None))


async def tag_async(x: int) -> str:
    return f"{x}@{CURRENT.get()}"


def tag_thread(xs: list[str]) -> list[Any]:
    return [ValueError("no") if x.startswith("2@") else f"{x}|{CURRENT.get()}" for x in xs]


def tag_process(x: str) -> str:
    return f"{x}#{CURRENT.get()}"


def test_hooks_see_items_and_calls_and_carry_context() -> None:
    rec = Recorder()
    pipe = fb.Pipeline(
        [
            fb.stage(tag_async, name="a"),
            fb.stage(tag_thread, name="b", batch=fb.Batch(max_size=4)),
            fb.stage(tag_process, name="c", executor="process"),
        ],
        name="hooked",
    )

    async def main() -> list[Any]:
        async with pipe.open(hooks=rec) as runner:
            return [y async for y in runner.map([1, 2], return_exceptions=True)]

    out = asyncio.run(main())
    assert rec.pipeline == "hooked"
    # Each stage saw its own carrier; the batch's carrier names the items in it.
    first, rest = out[0].split("|")
    assert first == "1@a:trace-1"
    assert rest.startswith("b:trace-1") and rest.endswith("#c:trace-1")
    assert isinstance(out[1], fb.ItemFailed)
    kinds = [e[0] for e in rec.events]
    assert kinds.count("admitted") == 2 and kinds.count("resolved") == 2
    assert ("resolved", 1, True) in rec.events and ("resolved", 2, False) in rec.events
    batch_ends = [e for e in rec.events if e[0] == "ended" and e[1] == "b"]
    assert any(e[3] is not None and True in e[3] for e in batch_ends)
    assert ("started", "c", (1,), False) in rec.events


def test_a_failing_hook_never_fails_an_item() -> None:
    class Broken(Hooks):
        def started(self, stage: StageView, items: Sequence[ItemView], batch: bool) -> Any:
            raise RuntimeError("hook bug")

    pipe = fb.Pipeline([fb.stage(tag_async)])

    async def main() -> Any:
        async with pipe.open(hooks=Broken()) as runner:
            return await runner.submit(5)

    assert asyncio.run(main()) == "5@none"
