"""What users ran into: coroutines returned by mistake, unguarded process
scripts, progress in map, running from inside an event loop."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import flowbatch as fb


async def lookup(x: int) -> int:
    return x + 1


def forgot_await(x: int) -> Any:
    return lookup(x)  # a plain function that calls an async one


def forgot_await_batched(xs: list[int]) -> list[Any]:
    return [lookup(x) for x in xs]


@pytest.mark.parametrize(
    "stage",
    [
        fb.stage(forgot_await, name="s"),  # in a thread
        fb.stage(forgot_await, name="s", executor="process"),
        fb.stage(forgot_await_batched, name="s", batch=fb.Batch(max_size=4)),
    ],
    ids=["thread", "process", "batched"],
)
def test_a_stage_that_returns_a_coroutine_fails_that_item_saying_so(stage: fb.Stage) -> None:
    out = fb.Pipeline([stage]).run([1, 2], progress=False, return_exceptions=True)
    for r in out:
        assert isinstance(r, fb.ItemFailed) and r.stage == "s"
        assert isinstance(r.__cause__, TypeError)
        assert "returned a coroutine" in str(r) and "await" in str(r)


def test_an_async_stage_that_returns_a_coroutine_fails_saying_so() -> None:
    async def forgot(x: int) -> Any:
        return lookup(x)  # 'return await lookup(x)' was meant

    out = fb.Pipeline([fb.stage(forgot, name="a")]).run([1], progress=False, return_exceptions=True)
    assert isinstance(out[0], fb.ItemFailed) and "returned a coroutine (lookup)" in str(out[0])


def test_an_async_callable_object_runs_on_the_event_loop() -> None:
    class Client:
        async def __call__(self, x: int) -> int:
            await asyncio.sleep(0)
            return x * 3

    stage = fb.stage(Client(), name="client")
    assert stage.executor == "async"
    assert fb.Pipeline([stage]).run([1, 2], progress=False) == [3, 6]


def test_a_process_stage_in_a_script_without_a_main_guard_says_what_to_do(
    tmp_path: Path,
) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            """
            import flowbatch as fb

            def square(x):
                return x * x

            print(fb.Pipeline([fb.stage(square, executor="process")]).run([1, 2], progress=False))
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("flowbatch.errors.PipelineError")
    assert "if __name__ == \"__main__\":" in last and "job.py" in last


def test_map_shows_a_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    async def double(x: int) -> int:
        return 2 * x

    pipe = fb.Pipeline([fb.stage(double)], name="doubling")

    async def main() -> list[int]:
        async with pipe.open() as runner:
            return [y async for y in runner.map(range(5), progress=True)]

    assert asyncio.run(main()) == [0, 2, 4, 6, 8]
    shown = capsys.readouterr().out
    assert "doubling" in shown and "100%" in shown


def test_arun_from_inside_an_event_loop() -> None:
    async def double(x: int) -> int:
        return 2 * x

    pipe = fb.Pipeline([fb.stage(double)])

    async def notebook_cell() -> list[int]:
        with pytest.raises(RuntimeError, match="arun"):
            pipe.run([1])
        return await pipe.arun([1, 2, 3], progress=False)

    assert asyncio.run(notebook_cell()) == [2, 4, 6]
