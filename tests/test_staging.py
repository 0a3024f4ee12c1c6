"""Overlapped copies for GPU replicas: streams, pinned buffers, the embedder on a device.

No GPU here: the staging logic runs with a recording double of the CUDA
calls (:class:`RecordingOps`, CPU tensors underneath). Tests that need a
real CUDA device are marked ``gpu`` and skipped with the reason.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import flowbatch as fb
from flowbatch.devices import is_oom
from flowbatch.staging import CudaOps, Staging

torch = pytest.importorskip("torch")

HAS_CUDA = bool(torch.cuda.is_available())
NO_GPU = (
    "needs an NVIDIA GPU and torch built for CUDA; this machine has "
    f"torch {torch.__version__} without a CUDA device (benchmarks/gpu.py is the device check)"
)


class Stream:
    def __init__(self, device: Any, n: int) -> None:
        self.device = device
        self.n = n
        self.synced = 0

    def __repr__(self) -> str:
        return f"<stream {self.n} on {self.device}>"


class RecordingOps(CudaOps):
    """CUDA calls on CPU tensors, recording which stream each copy was queued on."""

    def __init__(self) -> None:
        super().__init__(torch)
        self.streams: list[Stream] = []
        self.current: Stream | None = None
        self.copies: list[tuple[Stream | None, tuple[int, ...]]] = []
        self.pinned_allocs: list[int] = []
        self.device_allocs: list[int] = []

    def stream(self, device: Any) -> Stream:
        s = Stream(device, len(self.streams))
        self.streams.append(s)
        return s

    @contextmanager
    def use(self, stream: Any) -> Any:  # type: ignore[override]
        before, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = before

    def pinned(self, numel: int, dtype: Any) -> Any:
        self.pinned_allocs.append(numel)
        return torch.empty(numel, dtype=dtype)

    def empty(self, numel: int, dtype: Any, device: Any) -> Any:
        self.device_allocs.append(numel)
        return torch.empty(numel, dtype=dtype)

    def copy(self, dst: Any, src: Any) -> None:
        self.copies.append((self.current, tuple(src.shape)))
        dst.copy_(src)

    def synchronize(self, stream: Any) -> None:
        stream.synced += 1


def test_each_replica_copies_on_its_own_stream_through_reused_pinned_buffers() -> None:
    ops = RecordingOps()
    a = Staging("cuda:0", ops=ops, torch=torch)
    b = Staging("cuda:0", ops=ops, torch=torch)
    assert a.cuda_stream is not b.cuda_stream and len(ops.streams) == 2

    host = a.host("ids", (4, 8), torch.int64)
    host.copy_(torch.arange(32).view(4, 8))
    dev = a.to_device("ids", host)
    assert torch.equal(dev, torch.arange(32).view(4, 8))
    out = a.to_host("out", dev.float())
    a.synchronize()
    assert torch.equal(out, torch.arange(32, dtype=torch.float32).view(4, 8))
    assert ops.copies == [(a.cuda_stream, (4, 8)), (a.cuda_stream, (4, 8))]
    assert a.cuda_stream.synced == 1 and b.cuda_stream.synced == 0

    # A smaller batch reuses the buffers; a larger one grows them once.
    allocs = (list(ops.pinned_allocs), list(ops.device_allocs))
    small = a.host("ids", (2, 8), torch.int64)
    a.to_device("ids", small)
    assert (ops.pinned_allocs, ops.device_allocs) == allocs
    a.host("ids", (8, 8), torch.int64)
    assert len(ops.pinned_allocs) == len(allocs[0]) + 1 and ops.pinned_allocs[-1] >= 64

    b.to_device("x", b.host("x", (3,), torch.float32))
    assert ops.copies[-1][0] is b.cuda_stream


def test_kernels_in_the_block_run_on_the_replica_stream() -> None:
    ops = RecordingOps()
    st = Staging("cuda:1", ops=ops, torch=torch)
    with st.stream():
        assert ops.current is st.cuda_stream
    assert ops.current is None
    assert st.cuda_stream.device == torch.device("cuda:1")


def test_on_a_cpu_device_nothing_is_staged() -> None:
    ops = RecordingOps()
    st = Staging("cpu", ops=ops, torch=torch)
    t = st.host("ids", (2, 3), torch.int64)
    assert st.to_device("ids", t) is t and st.to_host("out", t) is t
    with st.stream():
        pass
    st.synchronize()
    assert st.cuda_stream is None
    assert ops.streams == [] and ops.copies == [] and ops.pinned_allocs == []


# --------------------------------------------------------------- the embedder


models = pytest.importorskip("flowbatch.models")
SentenceEmbedder = models.SentenceEmbedder

TEXTS = [
    "A cat sits on the mat.",
    "Stock markets fell sharply on Monday after the announcement.",
    "hi",
    "The quick brown fox jumps over the lazy dog, again and again and again.",
]


@pytest.fixture(scope="module")
def cpu_model() -> Any:
    model = SentenceEmbedder(torch_threads=1)
    model.setup()
    return model


def test_token_ids_from_the_tokenizer_stage_embed_like_the_texts(cpu_model: Any) -> None:
    tokens = cpu_model.tokenizer()(TEXTS)
    assert all(t.dtype == np.int64 for t in tokens)
    assert [len(t) for t in tokens] == cpu_model.count_tokens(TEXTS)
    np.testing.assert_allclose(
        cpu_model.encode_tokens(tokens), cpu_model.encode(TEXTS), rtol=0, atol=1e-5
    )


def test_the_embedder_stages_its_copies_when_on_a_device(cpu_model: Any) -> None:
    ops = RecordingOps()
    model = SentenceEmbedder(torch_threads=1)
    model.setup(device="cpu")
    # The model runs on the CPU; its staging is a recorded "cuda:0" (no GPU here).
    model._staging = Staging("cuda:0", ops=ops, torch=torch)
    tokens = model.tokenizer()(TEXTS)
    first = np.stack(model(tokens))
    second = np.stack(model(TEXTS[:2]))
    np.testing.assert_allclose(first, cpu_model.encode(TEXTS), rtol=0, atol=1e-5)
    np.testing.assert_allclose(second, cpu_model.encode(TEXTS[:2]), rtol=0, atol=1e-5)
    stream = model._staging.cuda_stream
    # ids and mask in, embeddings out, each batch, all on the replica's stream.
    assert [s for s, _ in ops.copies] == [stream] * 6
    assert [shape for _, shape in ops.copies][2] == (4, 384)
    assert stream.synced == 2
    assert len(ops.pinned_allocs) == 3  # the second batch reused the buffers
    # The rows are copies: the pinned buffer's next use does not change them.
    assert not np.shares_memory(first, second)


def test_a_tokenize_stage_ahead_of_a_placed_embed_stage(cpu_model: Any) -> None:
    model = SentenceEmbedder(torch_threads=1)
    pipe = fb.Pipeline([
        fb.stage(model.tokenizer(), name="tokenize", batch=fb.Batch(max_size=8)),
        fb.stage(model, name="embed", devices=["cpu"], batch=fb.Batch(max_size=8, cost=len)),
    ])

    async def main() -> list[Any]:
        async with pipe.open() as runner:
            return list(await asyncio.gather(*(runner.submit(t) for t in TEXTS)))

    rows = np.stack(asyncio.run(main()))
    np.testing.assert_allclose(rows, cpu_model.encode(TEXTS), rtol=0, atol=1e-5)


def test_dtype_is_checked_and_bfloat16_stays_close(cpu_model: Any) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        SentenceEmbedder(dtype="int8")
    half = SentenceEmbedder(torch_threads=1, dtype="bfloat16")
    half.setup()
    rows = half.encode(TEXTS)
    assert rows.dtype == np.float32
    cos = (rows * cpu_model.encode(TEXTS)).sum(axis=1)
    assert (cos > 0.98).all()


# --------------------------------------------------------------- on a real GPU


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
def test_gpu_float16_replicas_match_the_cpu(cpu_model: Any) -> None:
    model = SentenceEmbedder(dtype="float16")
    pipe = fb.Pipeline([
        fb.stage(model.tokenizer(), name="tokenize", batch=fb.Batch(max_size=8)),
        fb.stage(model, devices="auto", replicas_per_device=2, batch=fb.Batch(max_size=8)),
    ])
    rows = np.stack(pipe.run(TEXTS))
    cos = (rows * cpu_model.encode(TEXTS)).sum(axis=1)
    assert (cos > 0.99).all()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
def test_gpu_out_of_memory_is_recognised() -> None:
    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(torch.cuda.OutOfMemoryError, match="out of memory") as info:
        torch.empty(free * 4, dtype=torch.uint8, device="cuda")
    assert is_oom(info.value)


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is here: run benchmarks/gpu.py itself")
def test_the_device_check_exits_2_and_says_why_without_a_gpu() -> None:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"
    done = subprocess.run(
        [sys.executable, str(script), "--seconds", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "nothing measured" in done.stderr
    assert "sees no CUDA device" in done.stderr or "torch is not installed" in done.stderr
    assert done.stdout == ""
