"""Process executor: setup per process, crashes replaced, pickling errors named."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import threading
from typing import Any

import pytest

import flowbatch as fb
from polling import until


def square(x: int) -> int:
    return x * x


def crash_on_13(x: int) -> int:
    if x == 13:
        os._exit(7)
    return x


def segfault_on_13(xs: list[int]) -> list[int]:
    if 13 in xs:
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return [x + 1 for x in xs]


class PidModel:
    """Records which process set it up and which answered."""

    def __init__(self) -> None:
        self.setup_pid = 0

    def setup(self) -> None:
        self.setup_pid = os.getpid()

    def __call__(self, x: int) -> tuple[int, int]:
        return (self.setup_pid, os.getpid())


class Picky(Exception):
    def __init__(self, a: int, b: int) -> None:  # unpicklable: args don't match __init__
        super().__init__(f"picky {a} {b}")


def raise_picky(x: int) -> int:
    raise Picky(x, x)


def returns_lambda(x: int) -> Any:
    return lambda: x


def worker_pid(x: int) -> int:
    return os.getpid()


def echo_size(blob: bytes) -> bytes:
    return bytes(reversed(blob)) + len(blob).to_bytes(8, "little")


def embed_rows(xs: list[int]) -> Any:
    import numpy as np

    cols = np.arange(384, dtype=np.float32)[None, :]
    return cols + np.array(xs, dtype=np.float32)[:, None]  # row i: xs[i], xs[i] + 1, ...


def embed_list(xs: list[int]) -> list[Any]:
    return [*embed_rows(xs), {"not": "an array"}]


def test_array_results_cross_as_raw_buffers_and_arrive_writable() -> None:
    np = pytest.importorskip("numpy")
    from flowbatch.processes import _BUFFERS, _dumps_answer, _loads_answer

    rows = embed_rows([1, 2, 3])
    data = _dumps_answer((True, rows))
    assert data[:1] == _BUFFERS and len(data) > rows.nbytes  # the floats are not pickled
    ok, back = _loads_answer(data)
    assert ok and back.dtype == np.float32 and np.array_equal(back, rows)
    back[0, 0] = -1.0  # writable, as the worker's array was
    ok, mixed = _loads_answer(_dumps_answer((True, embed_list([4, 5]))))
    assert np.array_equal(mixed[1], embed_rows([4, 5])[1]) and mixed[2] == {"not": "an array"}
    assert _loads_answer(_dumps_answer((False, ValueError("x"))))[1].args == ("x",)

    pipe = fb.Pipeline([fb.stage(embed_rows, executor="process", batch=fb.Batch(max_size=4))])
    out = pipe.run(range(10), progress=False)
    assert [float(r[0]) for r in out] == [float(x) for x in range(10)]
    assert all(r.shape == (384,) for r in out)


def test_process_stage_runs_in_other_processes_with_setup_each() -> None:
    pipe = fb.Pipeline([fb.stage(PidModel(), executor="process", concurrency=2)])
    out = pipe.run(range(40), progress=False)
    pids = {p for p, _ in out}
    assert os.getpid() not in pids
    assert all(setup == worker for setup, worker in out)
    assert 1 <= len(pids) <= 2


def test_a_dying_worker_fails_its_item_and_is_replaced() -> None:
    pipe = fb.Pipeline([fb.stage(crash_on_13, executor="process", concurrency=2)])

    async def main() -> None:
        async with pipe.open() as runner:
            out = [y async for y in runner.map(range(30), return_exceptions=True)]
            for i, r in enumerate(out):
                if i == 13:
                    assert isinstance(r, fb.ItemFailed)
                    assert isinstance(r.__cause__, fb.WorkerCrashed)
                    assert "exit code 7" in str(r) and "'crash_on_13'" in str(r)
                else:
                    assert r == i
            # The pipeline goes on with the replacement.
            assert await runner.submit(5) == 5
            assert runner.stats().stage("crash_on_13").restarts == 1

    asyncio.run(main())


def test_a_segfault_in_a_batch_is_split_out_and_retried() -> None:
    stage = fb.stage(
        segfault_on_13,
        executor="process",
        batch=fb.Batch(max_size=16),
        retry=fb.Retry(attempts=2, backoff=0),
    )
    pipe = fb.Pipeline([stage])
    out = pipe.run(range(20), progress=False, return_exceptions=True)
    for i, r in enumerate(out):
        if i == 13:
            assert isinstance(r, fb.ItemFailed) and r.attempts == 2
            assert "signal 11" in str(r.__cause__)
        else:
            assert r == i + 1


def test_unpicklable_item_and_results_are_named() -> None:
    async def main() -> None:
        async with fb.Pipeline([fb.stage(square, executor="process")]).open() as runner:
            with pytest.raises(fb.ItemFailed, match="'square'.*cannot be pickled"):
                await runner.submit(lambda: 1)
            assert await runner.submit(3) == 9
        async with fb.Pipeline([fb.stage(raise_picky, executor="process")]).open() as runner:
            with pytest.raises(fb.ItemFailed, match="picky 2 2.*could not be pickled back"):
                await runner.submit(2)
        async with fb.Pipeline([fb.stage(returns_lambda, executor="process")]).open() as runner:
            with pytest.raises(fb.ItemFailed, match="result .* could not be pickled back"):
                await runner.submit(2)

    asyncio.run(main())


def test_process_stage_errors_keep_their_type() -> None:
    def_pipe = fb.Pipeline([fb.stage(square, executor="process")])
    with pytest.raises(fb.ItemFailed) as info:
        def_pipe.run(["x"], progress=False)
    assert isinstance(info.value.__cause__, TypeError)
    assert any("traceback in worker process" in n for n in info.value.__cause__.__notes__)


class FragileSetup:
    """Sets up unless ``marker`` exists; item 13 kills its worker."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def setup(self) -> None:
        if os.path.exists(self.marker):
            raise RuntimeError("model file is gone")

    def __call__(self, x: int) -> int:
        if x == 13:
            os._exit(3)
        return x


def test_a_replacement_that_cannot_set_up_fails_callers_instead_of_looping(
    tmp_path: Any,
) -> None:
    marker = str(tmp_path / "gone")
    pipe = fb.Pipeline([fb.stage(FragileSetup(marker), name="m", executor="process")])

    async def main() -> None:
        async with pipe.open() as runner:
            assert await runner.submit(1) == 1
            (tmp_path / "gone").touch()
            with pytest.raises(fb.ItemFailed, match="died"):
                await runner.submit(13)
            with pytest.raises(fb.ItemFailed, match="failed its setup.*model file is gone") as info:
                await runner.submit(2)
            crashed = info.value.__cause__
            assert isinstance(crashed, fb.WorkerCrashed)
            assert "model file is gone" in str(crashed.__cause__)  # the setup error, chained
            assert runner.stats().stage("m").restarts == 1

    asyncio.run(main())


def test_process_stage_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")
    pipe = fb.Pipeline([fb.stage(square, executor="process", concurrency=2)])

    async def main() -> list[int]:
        async with pipe.open() as runner:
            return [y async for y in runner.map(range(50))]

    assert uvloop.run(main()) == [x * x for x in range(50)]


def test_at_low_load_one_warm_worker_takes_every_call() -> None:
    # The most recently used worker goes first: its model is warm in the caches.
    pipe = fb.Pipeline([fb.stage(worker_pid, executor="process", concurrency=3)])

    async def main() -> set[int]:
        async with pipe.open() as runner:
            return {await runner.submit(i) for i in range(20)}

    pids = asyncio.run(main())
    assert len(pids) == 1 and os.getpid() not in pids


@pytest.mark.parametrize("size", [0, 1, 70_000, 6_000_000])
def test_items_and_results_of_any_size_cross_the_pipes(size: int) -> None:
    blob = bytes(i % 251 for i in range(size))
    pipe = fb.Pipeline([fb.stage(echo_size, executor="process", concurrency=2)])

    async def main() -> list[bytes]:
        async with pipe.open() as runner:
            return list(await asyncio.gather(*(runner.submit(blob) for _ in range(3))))

    for out in asyncio.run(main()):
        assert out[:-8] == blob[::-1] and int.from_bytes(out[-8:], "little") == size


def test_a_worker_killed_while_idle_is_replaced() -> None:
    pipe = fb.Pipeline([fb.stage(worker_pid, name="w", executor="process")])

    async def main() -> None:
        async with pipe.open() as runner:
            pid = await runner.submit(0)
            os.kill(pid, signal.SIGKILL)
            await until(lambda: runner.stats().stage("w").restarts == 1)
            assert await runner.submit(1) not in (pid, os.getpid())

    asyncio.run(main())


def test_a_dying_worker_is_never_joined_on_the_event_loop(monkeypatch: Any) -> None:
    from multiprocessing.process import BaseProcess

    loop_thread = threading.current_thread()  # asyncio.run runs the loop here
    joined_on_loop: list[int | None] = []
    real_join = BaseProcess.join

    def join(self: BaseProcess, timeout: float | None = None) -> None:
        if threading.current_thread() is loop_thread:
            joined_on_loop.append(self.pid)
        real_join(self, timeout)

    monkeypatch.setattr(BaseProcess, "join", join)
    pipe = fb.Pipeline([fb.stage(crash_on_13, executor="process")])

    async def main() -> None:
        async with pipe.open() as runner:
            with pytest.raises(fb.ItemFailed, match="exit code 7") as info:
                await runner.submit(13)
            assert isinstance(info.value.__cause__, fb.WorkerCrashed)
            assert await runner.submit(2) == 2

    asyncio.run(main())
    assert joined_on_loop == []
