"""executor="auto": where a stage runs when the user says nothing, and its threads."""

from __future__ import annotations

import asyncio
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import flowbatch as fb
from flowbatch.processes import THREAD_VARS
from flowbatch.stage import MAX_AUTO_REPLICAS, auto_shape, usable_cores


class Model:
    """A model as users write it: loads in setup(), batched __call__."""

    def setup(self) -> None:
        self.env = {v: os.environ.get(v) for v in THREAD_VARS}
        self.pid = os.getpid()

    def __call__(self, xs: list[Any]) -> list[Any]:
        out: list[Any] = []
        for x in xs:
            if x == "env":
                torch = sys.modules.get("torch")
                out.append((self.pid, self.env, torch.get_num_threads() if torch else None))
            else:
                out.append(x)
        return out


def plain_batched(xs: list[int]) -> list[int]:
    return xs


def test_a_batched_model_with_setup_runs_in_process_replicas_sized_to_the_cores() -> None:
    st = fb.stage(Model(), batch=fb.Batch(max_size=64))
    replicas, threads = auto_shape()
    assert st.executor == "process"
    assert st.concurrency == replicas == min(usable_cores(), MAX_AUTO_REPLICAS)
    assert st.cpu_threads == threads == max(1, usable_cores() // replicas)


def test_given_replicas_keep_their_count_and_get_a_share_of_the_cores() -> None:
    st = fb.stage(Model(), batch=fb.Batch(max_size=8), concurrency=3)
    assert (st.executor, st.concurrency) == ("process", 3)
    assert st.cpu_threads == max(1, usable_cores() // 3)
    assert fb.stage(Model(), batch=fb.Batch(), cpu_threads=5).cpu_threads == 5


@pytest.mark.parametrize(
    ("cores", "replicas", "shape"),
    [(1, None, (1, 1)), (2, None, (2, 1)), (4, None, (4, 1)), (16, None, (4, 4)),
     (2, 3, (3, 1)), (16, 2, (2, 8))],
)
def test_auto_shape(cores: int, replicas: int | None, shape: tuple[int, int]) -> None:
    assert auto_shape(replicas, cores=cores) == shape


def test_everything_else_keeps_its_old_place() -> None:
    class Local:  # cannot be pickled for a worker process
        def setup(self) -> None: ...

        def __call__(self, xs: list[int]) -> list[int]:
            return xs

    assert fb.stage(Local(), batch=fb.Batch()).executor == "thread"
    assert fb.stage(Model()).executor == "thread"  # not batched
    st = fb.stage(plain_batched, batch=fb.Batch())  # no setup: not a model
    assert (st.executor, st.concurrency, st.cpu_threads) == ("thread", 1, None)
    st = fb.stage(Model(), batch=fb.Batch(), executor="thread", concurrency=2)
    assert (st.executor, st.concurrency, st.cpu_threads) == ("thread", 2, None)
    st = fb.stage(Model(), batch=fb.Batch(), executor="process")
    assert (st.executor, st.concurrency) == ("process", 1)


def test_a_script_without_a_main_guard_keeps_the_model_in_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "serve.py"
    script.write_text("import flowbatch as fb\nfb.Pipeline([]).run([])\n")
    main = types.ModuleType("__main__")
    main.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert fb.stage(Model(), batch=fb.Batch()).executor == "thread"
    script.write_text('if __name__ == "__main__":\n    pass\n')
    assert fb.stage(Model(), batch=fb.Batch()).executor == "process"


def test_cpu_threads_is_checked() -> None:
    with pytest.raises(fb.PipelineError, match="cpu_threads must be an int >= 1"):
        fb.stage(Model(), batch=fb.Batch(), cpu_threads=0)
    with pytest.raises(fb.PipelineError, match="'plain_batched'.*cpu_threads.*thread workers"):
        fb.stage(plain_batched, batch=fb.Batch(), cpu_threads=2)


def test_worker_processes_size_their_thread_pools_and_the_parent_is_untouched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for v in THREAD_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "7")  # the user's own setting wins
    st = fb.stage(Model(), batch=fb.Batch(max_size=4), concurrency=2, cpu_threads=3)
    [(pid, env, _)] = fb.Pipeline([st]).run(["env"], progress=False)
    assert pid != os.getpid()
    assert env["OMP_NUM_THREADS"] == env["RAYON_NUM_THREADS"] == "3"
    assert env["MKL_NUM_THREADS"] == "7"
    assert "OMP_NUM_THREADS" not in os.environ


def test_adaptive_is_checked() -> None:
    with pytest.raises(ValueError, match="Adaptive.min must be an int >= 1"):
        fb.Adaptive(min=0)
    with pytest.raises(ValueError, match=r"Adaptive.max \(2\) must be >= Adaptive.min \(3\)"):
        fb.Adaptive(min=3, max=2)
    with pytest.raises(ValueError, match="Adaptive.initial"):
        fb.Adaptive(min=2, max=4, initial=9)
    assert fb.Adaptive(min=2, max=8).start == 2
    st = fb.stage(plain_batched, concurrency=fb.Adaptive(min=1, max=16))
    assert st.concurrency == 16 and st.adaptive == fb.Adaptive(min=1, max=16)


class TorchThreads:
    """Reports the torch threads each call ran with; ``own`` set in setup()."""

    def __init__(self, own: int | None = None) -> None:
        self.own = own

    def setup(self) -> None:
        import torch

        if self.own is not None:
            torch.set_num_threads(self.own)

    def __call__(self, xs: list[int]) -> list[int]:
        import torch

        return [torch.get_num_threads() for _ in xs]


def test_a_lone_caller_gets_every_core_once_calls_come_one_at_a_time() -> None:
    pytest.importorskip("torch")
    from flowbatch.processes import LONE_RUN

    cores = usable_cores()
    st = fb.stage(TorchThreads(), batch=fb.Batch(max_size=4), concurrency=2)
    assert st.cpu_threads == max(1, cores // 2)
    assert st.lone_threads == (cores if cores > st.cpu_threads else None)
    assert fb.stage(TorchThreads(), batch=fb.Batch(), concurrency=2, cpu_threads=1).lone_threads is None
    if st.lone_threads is None:
        pytest.skip("one core: no other core to lend a lone call")

    async def main() -> tuple[list[int], list[int]]:
        async with fb.Pipeline([st]).open() as runner:
            alone = [await runner.submit(i) for i in range(LONE_RUN + 3)]
            together = await asyncio.gather(*(runner.submit(i) for i in range(16)))
        return alone, together

    alone, together = asyncio.run(main())
    assert alone[:LONE_RUN] == [st.cpu_threads] * LONE_RUN  # its share until the run is long
    assert alone[-1] == cores
    assert min(together) == st.cpu_threads  # overlapping calls go back to the share


def test_a_setup_that_sets_its_own_torch_threads_keeps_them() -> None:
    pytest.importorskip("torch")
    from flowbatch.processes import LONE_RUN

    st = fb.stage(TorchThreads(own=3), batch=fb.Batch(max_size=4), concurrency=2)
    out = fb.Pipeline([st]).run(range(LONE_RUN + 3), progress=False)
    assert set(out) == {3}
