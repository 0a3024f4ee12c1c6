"""Checkpoints: the keys whose results are written, kept durably in SQLite (WAL).

Usage::

    with Checkpoint.open("job.ckpt") as ckpt:
        if not ckpt.done(key): ...
        ckpt.mark([key1, key2])   # once their sink write has committed

A key is stored as its JSON text, so ``1`` and ``"1"`` are different keys
and a tuple key reads back as the same key. Each ``mark`` is one
transaction, committed with ``synchronous=FULL``: once it returns, the keys
survive a SIGKILL (and a power cut). A job killed between its sink's commit
and the ``mark`` writes those few rows again on the rerun, which an
upserting sink makes harmless.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["Checkpoint", "encode_key"]


def encode_key(key: Any) -> str:
    """The text a key is stored under (JSON; tuples as lists)."""
    return json.dumps(key, separators=(",", ":"), default=str)


class Checkpoint:
    """The done keys of one bulk job, in one SQLite file.

    ``fresh=True`` forgets every key (starts the job over). Not thread-safe:
    the job calls it from its event loop only.
    """

    def __init__(self, path: str | os.PathLike[str], *, fresh: bool = False) -> None:
        self.path = Path(path)
        if fresh:
            for suffix in ("", "-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS done (key TEXT PRIMARY KEY) WITHOUT ROWID")

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, fresh: bool = False) -> Checkpoint:
        """Open (or create) the checkpoint at ``path``; ``fresh`` empties it."""
        return cls(path, fresh=fresh)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def done(self, key: Any) -> bool:
        """Whether ``key``'s result has been written."""
        row = self._db.execute("SELECT 1 FROM done WHERE key = ?", (encode_key(key),)).fetchone()
        return row is not None

    def mark(self, keys: Iterable[Any]) -> None:
        """Record ``keys`` as written, in one durable transaction."""
        rows = [(encode_key(k),) for k in keys]
        if not rows:
            return
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR IGNORE INTO done (key) VALUES (?)", rows)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def count(self) -> int:
        """How many keys are done."""
        row = self._db.execute("SELECT count(*) FROM done").fetchone()
        return int(row[0])
