"""Run the demo: the pipeline against the naive sequential loop, with a report.

Usage::

    from flowbatch.demo import run_demo
    result = run_demo(docs=300, db_path="demo.db", sample=20, progress=True)
    print(result["speedup"])
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from flowbatch.demo.docserver import DEFAULT_LATENCY, DocClient, DocServer
from flowbatch.demo.pipeline import (
    SCHEMA,
    Document,
    SQLiteStore,
    build_pipeline,
    create_schema,
    split_document,
)
from flowbatch.models import EMBEDDING_DIMENSION, SentenceEmbedder
from flowbatch.prometheus import serve_metrics

__all__ = ["run_demo", "run_demo_async", "run_sequential"]


def run_demo(
    docs: int = 300,
    db_path: str | Path = "flowbatch-demo.db",
    sample: int = 20,
    progress: bool = True,
    *,
    console: Console | None = None,
    latency: tuple[float, float] = DEFAULT_LATENCY,
    seed: int = 0,
    metrics_port: int | None = None,
) -> dict[str, Any]:
    """Run the demo and print its report; return the figures as a dict.

    Args:
        docs: how many documents the pipeline embeds.
        db_path: the SQLite file for the vectors; its ``chunks`` table is replaced.
        sample: how many documents the sequential loop does (it is slow);
            its rate is extrapolated to ``docs``.
        progress: show a progress bar while the pipeline runs.
        console: where the report goes (default: standard output).
        latency: (low, high) seconds of delay per document fetch.
        seed: varies the documents and the delays.
        metrics_port: serve ``/metrics`` on this port (0: any free one)
            while the pipeline runs, for ``flowbatch top``.
    """
    return asyncio.run(
        run_demo_async(
            docs=docs,
            db_path=db_path,
            sample=sample,
            progress=progress,
            console=console,
            latency=latency,
            seed=seed,
            metrics_port=metrics_port,
        )
    )


async def run_demo_async(
    docs: int = 300,
    db_path: str | Path = "flowbatch-demo.db",
    sample: int = 20,
    progress: bool = True,
    *,
    console: Console | None = None,
    latency: tuple[float, float] = DEFAULT_LATENCY,
    seed: int = 0,
    metrics_port: int | None = None,
) -> dict[str, Any]:
    """The async body of :func:`run_demo`, for callers that have a loop."""
    if docs < 1:
        raise ValueError(f"docs must be >= 1, got {docs}")
    if sample < 1:
        raise ValueError(f"sample must be >= 1, got {sample}")
    console = console if console is not None else Console()
    db_path = Path(db_path)
    create_schema(db_path, fresh=True)

    async with DocServer(docs, latency=latency, seed=seed) as base_url:
        console.print(
            f"[bold]flowbatch demo[/]: {docs} documents from {base_url} "
            f"({latency[0] * 1000:.0f}-{latency[1] * 1000:.0f} ms each) "
            f"-> chunks -> all-MiniLM-L6-v2 -> {db_path}"
        )
        pipelined = await _run_pipeline(
            base_url, db_path, docs, progress, console, metrics_port
        )
        console.print(f"Sequential loop on a sample of {min(sample, docs)} documents ...")
        sequential = await asyncio.to_thread(run_sequential, base_url, min(sample, docs))

    with contextlib.closing(sqlite3.connect(db_path)) as db:
        rows, dims = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT length(vector) / 4) FROM chunks"
        ).fetchone()
    result: dict[str, Any] = {
        **pipelined,
        "db_path": str(db_path),
        "db_rows": rows,
        "sequential": sequential,
        "sequential_docs_per_s": sequential["docs_per_s"],
        "sequential_estimate_s": docs / sequential["docs_per_s"],
        "speedup": pipelined["docs_per_s"] / sequential["docs_per_s"],
    }
    assert dims in (0, 1)
    _print_report(console, result)
    return result


async def _run_pipeline(  # noqa: PLR0917 - private helper of run_demo_async
    base_url: str,
    db_path: Path,
    docs: int,
    progress: bool,
    console: Console,
    metrics_port: int | None,
) -> dict[str, Any]:
    store = SQLiteStore(db_path)
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(DocClient(base_url, max_connections=64))
        pipe = build_pipeline(client, db_path, store=store)
        t_load = time.perf_counter()
        runner = await stack.enter_async_context(pipe.open())
        load_s = time.perf_counter() - t_load
        if metrics_port is not None:
            url = await stack.enter_async_context(
                serve_metrics({pipe.name: runner}, metrics_port)
            )
            console.print(f"metrics: {url}  (watch: flowbatch top {url})")
        chunks = failed = 0
        errors: list[str] = []
        bar = _progress_bar(console, enabled=progress)
        task = bar.add_task("embedding", total=docs, chunks=0)
        t0 = time.perf_counter()
        with bar:
            async for keys in runner.map(range(docs), ordered=False, return_exceptions=True):
                if isinstance(keys, BaseException):
                    failed += 1
                    errors.append(f"{type(keys).__name__}: {keys}")
                else:
                    chunks += len(keys)
                bar.update(task, advance=1, chunks=chunks)
        elapsed = time.perf_counter() - t0
        stats = runner.stats()
    return {
        "docs": docs,
        "chunks": chunks,
        "failed": failed,
        "errors": errors[:5],
        "model_load_s": load_s,
        "elapsed_s": elapsed,
        "docs_per_s": docs / elapsed,
        "chunks_per_s": chunks / elapsed,
        "bottleneck": stats.bottleneck,
        "stages": [
            {
                "name": s.name,
                "executor": s.executor,
                "workers": s.workers,
                "done": s.done,
                "failed": s.failed,
                "utilization": s.utilization,
                "service_ms": s.service_time.mean * 1000,
                "queue_wait_ms": s.queue_wait.mean * 1000,
                "mean_batch_size": s.mean_batch_size,
            }
            for s in stats.stages
        ],
    }


def _progress_bar(console: Console, *, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("docs, {task.fields[chunks]} chunks"),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def run_sequential(base_url: str, docs: int) -> dict[str, Any]:
    """The naive way, for comparison: one document at a time, one chunk at a time.

    Blocking code as a first script would have it: ``urllib`` for the fetch,
    the model called once per chunk, one INSERT per chunk and a commit per
    document. The model loads before the clock starts, as the pipeline's does.
    """
    # All cores for the one model call in flight: the naive loop's best case.
    embedder = SentenceEmbedder(torch_threads=os.cpu_count() or 1)
    embedder.setup()
    chunks = 0
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.execute(SCHEMA)
        t0 = time.perf_counter()
        for doc_id in range(docs):
            url = f"{base_url}/docs/{doc_id}"
            with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 (a local http:// URL we built)
                text = response.read().decode("utf-8")
            for chunk in split_document(Document(doc_id, text)):
                (vector,) = embedder([chunk.text])
                db.execute(
                    "INSERT INTO chunks VALUES (?, ?, ?, ?, ?)",
                    (doc_id, chunk.index, chunk.text, EMBEDDING_DIMENSION, vector.tobytes()),
                )
                chunks += 1
            db.commit()
        elapsed = time.perf_counter() - t0
    return {
        "docs": docs,
        "chunks": chunks,
        "elapsed_s": elapsed,
        "docs_per_s": docs / elapsed,
        "chunks_per_s": chunks / elapsed,
    }


def _print_report(console: Console, r: dict[str, Any]) -> None:
    table = Table(title="per stage (* = bottleneck)", title_justify="left")
    for column in ("stage", "executor", "workers", "done", "util", "service ms", "wait ms", "batch"):
        table.add_column(column, justify="left" if column in ("stage", "executor") else "right")
    for s in r["stages"]:
        table.add_row(
            f"{s['name']}{' *' if s['name'] == r['bottleneck'] else ''}",
            str(s["executor"]),
            str(s["workers"]),
            str(s["done"]),
            f"{s['utilization']:.0%}",
            f"{s['service_ms']:.1f}",
            f"{s['queue_wait_ms']:.1f}",
            f"{s['mean_batch_size']:.1f}" if s["mean_batch_size"] else "-",
        )
    console.print(table)
    seq = r["sequential"]
    console.print(
        f"pipeline:   {r['docs']} docs, {r['chunks']} chunks in {r['elapsed_s']:.2f} s = "
        f"[bold]{r['docs_per_s']:.1f} docs/s[/], {r['chunks_per_s']:.0f} chunks/s "
        f"(models loaded in {r['model_load_s']:.1f} s, not counted)"
    )
    console.print(f"bottleneck: [bold]{r['bottleneck']}[/]")
    console.print(
        f"sequential: {seq['docs']} docs, {seq['chunks']} chunks in {seq['elapsed_s']:.2f} s = "
        f"{seq['docs_per_s']:.1f} docs/s, {seq['chunks_per_s']:.0f} chunks/s "
        f"(~{r['sequential_estimate_s']:.0f} s for {r['docs']} docs)"
    )
    console.print(f"speed-up:   [bold green]{r['speedup']:.1f}x[/]")
    if r["failed"]:
        console.print(f"[red]{r['failed']} documents failed[/], e.g. {r['errors'][0]}")
    console.print(f"vectors:    {r['db_rows']} rows in {r['db_path']}")
