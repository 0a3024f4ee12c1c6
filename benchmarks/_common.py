"""Shared helpers for the benchmarks: inputs, timing, output.

Every benchmark prints a readable table and then, as its last line of
stdout, one JSON object (``json.loads(out.splitlines()[-1])``). The machine
these run on is shared and noisy, so every figure that matters is a ratio
against a baseline measured in the same run, interleaved where possible.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from time import perf_counter
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED_SENTENCES = ROOT.parent / "shared" / "data" / "sentences.txt"
DEMO_SENTENCES = ROOT / "src" / "flowbatch" / "demo" / "sentences.txt"


def load_sentences(limit: int | None = None) -> list[str]:
    """The benchmark sentences: ../shared/data/sentences.txt, else the demo's copy."""
    path = SHARED_SENTENCES if SHARED_SENTENCES.is_file() else DEMO_SENTENCES
    lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
    sentences = [s for s in lines if s]
    if not sentences:
        raise SystemExit(f"no sentences in {path}")
    return sentences[:limit] if limit else sentences


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def machine() -> dict[str, Any]:
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_1m": None if load is None else round(load, 2),
    }


def run_in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a fresh OS thread and return its result (or raise its error).

    torch's thread setting is per OS thread, so each model replica is set up
    and driven from its own thread, as the engine's thread workers do.
    """
    box: dict[str, Any] = {}

    def main() -> None:
        try:
            box["out"] = fn()
        except BaseException as exc:
            box["err"] = exc

    t = threading.Thread(target=main)
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box["out"]


class Timer:
    """``with Timer() as t: ...``; then ``t.s`` is the elapsed seconds."""

    def __enter__(self) -> Timer:
        self.t0 = perf_counter()
        self.s = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = perf_counter() - self.t0


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "MISSED"


def report(
    name: str,
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    figures: dict[str, Any],
    *,
    notes: Sequence[str] = (),
    tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]]]] = (),
) -> None:
    """Print a table (rich when available) and then the figures as one JSON line.

    ``tables``: more ``(title, columns, rows)`` tables, printed after the first.
    """
    all_tables = [(title, columns, rows), *tables]
    try:
        from rich.console import Console
        from rich.table import Table

        console = Console(file=sys.stdout, width=max(120, Console().width))
        for t_title, t_columns, t_rows in all_tables:
            table = Table(title=t_title)
            for c in t_columns:
                first = c == t_columns[0]
                table.add_column(c, justify="left" if first else "right", no_wrap=first)
            for r in t_rows:
                table.add_row(*(_fmt(x) for x in r))
            console.print(table)
        for n in notes:
            console.print(n, highlight=False, markup=False)
    except ImportError:
        for t_title, t_columns, t_rows in all_tables:
            print(t_title)
            print(" | ".join(t_columns))
            for r in t_rows:
                print(" | ".join(_fmt(x) for x in r))
        for n in notes:
            print(n)
    sys.stdout.flush()
    out = {"benchmark": name, **figures, "machine": machine()}
    print(json.dumps(out, separators=(",", ":")), flush=True)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 1:
            return f"{x:.2f}"
        return f"{x:.3f}"
    return str(x)


def r3(x: float) -> float:
    return round(x, 3)


# ------------------------------------------------------------------ the model

#: Serving configurations worth trying on a small CPU: replicas x torch threads.
CONFIGS = {"1x2": (1, 2), "2x1": (2, 1), "1x1": (1, 1)}
#: The ones "both" runs.
MAIN_CONFIGS = ("1x2", "2x1")


def quiet_model_loading() -> None:
    """No weight-loading progress bars or advisory warnings in benchmark output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Replicas:
    """``n`` model replicas, each set up in and driven from its own OS thread.

    This is how the engine's thread executor holds a model (one copy per
    worker thread, ``setup()`` in that thread, so ``torch_threads`` applies),
    without the engine: the offline baseline that "the limit" is measured on.
    """

    def __init__(self, n: int, torch_threads: int) -> None:
        import queue

        from flowbatch.models import SentenceEmbedder

        self.n = n
        self.torch_threads = torch_threads
        self._inboxes: list[queue.SimpleQueue[Any]] = [queue.SimpleQueue() for _ in range(n)]
        self._outbox: queue.SimpleQueue[tuple[int, bool, Any]] = queue.SimpleQueue()
        self._threads = []
        for i in range(n):
            emb = SentenceEmbedder(torch_threads=torch_threads)
            t = threading.Thread(target=self._main, args=(i, emb), daemon=True)
            t.start()
            self._threads.append(t)
        self._collect(range(n))  # every replica has run setup()

    def _main(self, i: int, emb: Any) -> None:
        try:
            emb.setup()
        except BaseException as exc:
            self._outbox.put((i, False, exc))
            return
        self._outbox.put((i, True, None))
        inbox = self._inboxes[i]
        while True:
            job = inbox.get()
            if job is None:
                return
            try:
                self._outbox.put((i, True, job(emb)))
            except BaseException as exc:
                self._outbox.put((i, False, exc))

    def _collect(self, which: Any) -> list[Any]:
        want = set(which)
        out: dict[int, Any] = {}
        err: BaseException | None = None
        while want:
            i, ok, value = self._outbox.get()
            want.discard(i)
            if ok:
                out[i] = value
            else:
                err = value
        if err is not None:
            raise err
        return [out[i] for i in sorted(out)]

    def run_all(self, job: Callable[[Any], Any]) -> list[Any]:
        """Run ``job(embedder)`` on every replica at once; their results."""
        for box in self._inboxes:
            box.put(job)
        return self._collect(range(self.n))

    def run_one(self, job: Callable[[Any], Any], i: int = 0) -> Any:
        self._inboxes[i].put(job)
        return self._collect([i])[0]

    def throughput(self, texts: Sequence[str], batch_size: int) -> float:
        """Items/s embedding ``texts`` in batches of ``batch_size``, all replicas pulling
        from one shared list of batches (wall time, start to last batch done)."""
        batches = [list(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        lock = threading.Lock()
        it = iter(batches)

        def job(emb: Any) -> None:
            while True:
                with lock:
                    b = next(it, None)
                if b is None:
                    return
                emb(b)

        t0 = perf_counter()
        self.run_all(job)
        return len(texts) / (perf_counter() - t0)

    def call_times(self, texts: Sequence[str], i: int = 0) -> list[float]:
        """Seconds of each ``embedder([text])`` call on replica ``i``, measured in its thread."""

        def job(emb: Any) -> list[float]:
            out = []
            for t in texts:
                t0 = perf_counter()
                emb([t])
                out.append(perf_counter() - t0)
            return out

        return self.run_one(job, i)

    def handoff_times(self, texts: Sequence[str], i: int = 0) -> list[float]:
        """Seconds of each ``embedder([text])`` as seen by a caller handing it to
        replica ``i``'s waiting thread and blocking for the answer (the cost of a
        bare thread handoff around the model call, without any engine)."""
        out = []
        for t in texts:
            t0 = perf_counter()
            self.run_one(lambda emb, t=t: emb([t]), i)
            out.append(perf_counter() - t0)
        return out

    def close(self) -> None:
        for box in self._inboxes:
            box.put(None)
        for t in self._threads:
            t.join()


def _replica_process(conn: Any, counter: Any, torch_threads: int | None,
                     factory: Callable[[], Any] | None = None) -> None:
    """Body of one :class:`ProcessReplicas` worker: a model, then jobs until None."""
    if factory is None:
        from flowbatch.models import SentenceEmbedder

        emb = SentenceEmbedder(torch_threads=torch_threads)
    else:
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)  # this thread runs the model below
        emb = factory()
    emb.setup()
    conn.send(None)
    while True:
        job = conn.recv()
        if job is None:
            return
        kind, payload = job
        if kind == "batches":  # pull batch numbers from the shared counter
            while True:
                with counter.get_lock():
                    i = counter.value
                    counter.value += 1
                if i >= len(payload):
                    break
                emb(payload[i])
            conn.send(None)
        else:  # "times": each text alone, timed in this process
            times = []
            for t in payload:
                t0 = perf_counter()
                emb([t])
                times.append(perf_counter() - t0)
            conn.send(times)


class ProcessReplicas:
    """``n`` model replicas, each in a spawned process of its own (no shared GIL).

    The same interface as :class:`Replicas`; the yardstick for servers whose
    replicas are processes (flowbatch's ``executor="process"``, LitServe's
    and mosec's workers). Batches are shared among the replicas as they come
    free, through one counter.

    The model is a ``SentenceEmbedder(torch_threads=...)``, or ``factory()``
    (picklable: a module-level class or function; the object it returns has
    ``setup()`` and a batched ``__call__``), with ``torch.set_num_threads``
    called first unless ``torch_threads`` is None (torch's default: all
    cores).
    """

    def __init__(self, n: int, torch_threads: int | None,
                 factory: Callable[[], Any] | None = None) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.n = n
        self._counter = ctx.Value("i", 0)
        self._conns = []
        self._procs = []
        for _ in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_replica_process,
                               args=(child, self._counter, torch_threads, factory), daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)
        for c in self._conns:
            c.recv()

    def throughput(self, texts: Sequence[str], batch_size: int) -> float:
        batches = [list(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        self._counter.value = 0
        t0 = perf_counter()
        for c in self._conns:
            c.send(("batches", batches))
        for c in self._conns:
            c.recv()
        return len(texts) / (perf_counter() - t0)

    def call_times(self, texts: Sequence[str], i: int = 0) -> list[float]:
        self._conns[i].send(("times", list(texts)))
        return list(self._conns[i].recv())

    def close(self) -> None:
        for c in self._conns:
            c.send(None)
        for p in self._procs:
            p.join(10)


def cycle(texts: Sequence[str], n: int, start: int = 0) -> list[str]:
    """``n`` texts taken round-robin from ``texts``, starting at ``start``."""
    return [texts[(start + i) % len(texts)] for i in range(n)]
