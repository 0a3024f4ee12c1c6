"""Pipelines the bulk tests run (also through `flowbatch run` in a subprocess).

``square`` takes a row ``{"id", "n"}`` and returns ``n * n`` (a negative ``n``
passes through, for the sink's CHECK to reject). With ``FB_COMPUTE_LOG`` set,
each batch appends the keys it computed to that file (one write per batch,
so a SIGKILL loses none that returned); ``FB_STAGE_DELAY`` seconds per batch
stretch the job so that a test can kill it part-way.
"""

from __future__ import annotations

import os
import time
from typing import Any

import flowbatch as fb


def _log(rows: list[dict[str, Any]]) -> None:
    path = os.environ.get("FB_COMPUTE_LOG")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, "".join(f"{r['id']}\n" for r in rows).encode())
        finally:
            os.close(fd)


def _square(rows: list[dict[str, Any]]) -> list[int]:
    delay = float(os.environ.get("FB_STAGE_DELAY", "0"))
    if delay:
        time.sleep(delay)
    _log(rows)
    return [r["n"] * r["n"] if r["n"] >= 0 else r["n"] for r in rows]


square = fb.Pipeline([fb.stage(_square, name="square", batch=fb.Batch(max_size=50))],
                     name="square")


def _upper(texts: list[str]) -> list[str]:
    return [t.upper() for t in texts]


upper = fb.Pipeline([fb.stage(_upper, name="upper", batch=fb.Batch(max_size=64))], name="upper")


def _size(files: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    return [{"name": os.path.basename(p), "size": len(b)} for p, b in files]


sizes = fb.Pipeline([fb.stage(_size, name="size", batch=fb.Batch(max_size=100))], name="sizes")
