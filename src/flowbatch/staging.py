"""Copies to and from a GPU that overlap with compute: a replica's stream and pinned buffers.

A model replica placed on a CUDA device (``fb.stage(..., devices=...)``)
makes one :class:`Staging` in its ``setup(device=...)``. Each replica then
has its own CUDA stream: its host-to-device copies, its kernels and its
device-to-host copies are queued on that stream, so with two replicas per
device one replica's copies run while the other's batch computes (the
default stream would serialise them). Inputs are written into preallocated
page-locked (pinned) host buffers, which the device copies from without a
staging copy of its own and which ``non_blocking=True`` needs to be truly
asynchronous; outputs come back the same way. Buffers grow to the largest
batch seen and are reused: no allocation per batch.

A call ends with :meth:`Staging.synchronize` (the caller reads its outputs),
so a buffer is never rewritten while a copy from it is in flight. On a CPU
device everything is a plain tensor operation.

torch is reached through :class:`CudaOps`, the one place that touches the
CUDA API; tests replace it with a recording double (there is no GPU here).

Usage (inside a model's ``__call__``)::

    ids = staging.host("ids", (n, width), torch.int64)   # pinned, reused
    ids.numpy()[...] = ...                               # fill on the host
    with staging.stream():
        out = model(staging.to_device("ids", ids))       # copy + compute, queued
        host = staging.to_host("out", out)               # copy back, queued
    staging.synchronize()                                # now read ``host``
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

__all__ = ["CudaOps", "Staging"]


class CudaOps:
    """The CUDA calls :class:`Staging` makes, on the real torch."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch

    def stream(self, device: Any) -> Any:
        """A new stream on ``device``."""
        return self.torch.cuda.Stream(device=device)

    def use(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        """Make ``stream`` current: kernels launched inside are queued on it."""
        return self.torch.cuda.stream(stream)  # type: ignore[no-any-return]

    def pinned(self, numel: int, dtype: Any) -> Any:
        """A flat page-locked host tensor of ``numel`` elements."""
        return self.torch.empty(numel, dtype=dtype, pin_memory=True)

    def empty(self, numel: int, dtype: Any, device: Any) -> Any:
        """A flat tensor on ``device`` (the device side of a copy)."""
        return self.torch.empty(numel, dtype=dtype, device=device)

    def copy(self, dst: Any, src: Any) -> None:
        """Queue ``dst.copy_(src)`` without waiting (on the current stream)."""
        dst.copy_(src, non_blocking=True)

    def synchronize(self, stream: Any) -> None:
        """Wait for everything queued on ``stream`` (torch releases the GIL here)."""
        stream.synchronize()


class Staging:
    """One replica's stream and pinned host buffers, by name (see the module docstring).

    ``device``: a torch device string. ``ops``: the CUDA calls (a test double
    in tests); ``None`` uses torch's.
    """

    def __init__(self, device: str, ops: CudaOps | None = None, torch: Any = None) -> None:
        if torch is None:
            import torch as _torch

            torch = _torch
        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.ops = ops if ops is not None else CudaOps(torch)
        self._stream = self.ops.stream(self.device) if self.cuda else None
        self._host: dict[str, Any] = {}  # flat pinned buffers, grown to the largest use
        self._dev: dict[str, Any] = {}  # flat device buffers for inputs, likewise

    @property
    def cuda_stream(self) -> Any:
        """The replica's stream (``None`` on a CPU device)."""
        return self._stream

    def _grown(self, pool: dict[str, Any], name: str, numel: int, dtype: Any, pinned: bool) -> Any:
        buf = pool.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            # Grow by a quarter more than asked: batch shapes vary a little.
            size = max(numel, math.ceil(numel * 1.25))
            if pinned:
                buf = self.ops.pinned(size, dtype)
            else:
                buf = self.ops.empty(size, dtype, self.device)
            pool[name] = buf
        return buf

    def host(self, name: str, shape: tuple[int, ...], dtype: Any) -> Any:
        """A host tensor of ``shape`` backed by the pinned buffer ``name`` (reused).

        Its contents are left over from the last use: write every element.
        On a CPU device it is an ordinary tensor.
        """
        numel = math.prod(shape)
        if not self.cuda:
            return self.torch.empty(shape, dtype=dtype)
        return self._grown(self._host, name, numel, dtype, pinned=True)[:numel].view(shape)

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """Run the block's kernels (and copies) on the replica's stream."""
        if self._stream is None:
            yield
            return
        with self.ops.use(self._stream):
            yield

    def to_device(self, name: str, tensor: Any) -> Any:
        """``tensor`` (from :meth:`host`) on the device: a non-blocking copy on the stream."""
        if not self.cuda:
            return tensor
        numel = tensor.numel()
        dev = self._grown(self._dev, name, numel, tensor.dtype, pinned=False)[:numel]
        dev = dev.view(tuple(tensor.shape))
        with self.stream():
            self.ops.copy(dev, tensor)
        return dev

    def to_host(self, name: str, tensor: Any) -> Any:
        """``tensor`` (on the device) copied into the pinned buffer ``name``: queued,
        valid after :meth:`synchronize`."""
        if not self.cuda:
            return tensor
        out = self.host(name, tuple(tensor.shape), tensor.dtype)
        with self.stream():
            self.ops.copy(out, tensor)
        return out

    def synchronize(self) -> None:
        """Wait for this replica's queued copies and kernels (not other replicas')."""
        if self._stream is not None:
            self.ops.synchronize(self._stream)
