"""bulk: embed every row of a PostgreSQL table and write the vectors back.

A table of ``--rows`` sentences (``docs(id, body)``) in a database made for
the run (dropped after); each job embeds every body with the sentence model
and upserts the vector into ``docs_vec(id, embedding real[])``. The table
is done in ``--rounds`` slices (``id % rounds``); in each round the limit,
flowbatch, the naive loop and Ray Data run one after the other on that
slice, and each ratio is the median over the rounds (the machine is shared:
read the ratios, not the absolute figures):

- the limit: the model alone, the same replicas, batches of ``--batch``
  (no database), on ``--limit-rows`` of the rows;
- flowbatch: ``run_job(pipe, PostgresSource, PostgresSink)`` on every row
  (server-side cursor in, upsert in batches out), wall time including the
  model's load, and its steady rate (first row in to last row out);
  target >= 0.9x the limit;
- the naive loop: for each row read through a cursor, embed it alone,
  insert it, commit; on ``--naive-rows`` rows, extrapolated;
- Ray Data (when ``ray`` is importable): the rows read into
  ``ray.data.from_items``, ``map_batches`` with the same model, replicas and
  batch size (actors), the vectors written back through the same upsert
  from the driver; wall time including its actors' model load, not
  ``ray.init``; target flowbatch >= 1.3x Ray Data;
- resume: ``flowbatch run`` in a subprocess, a full run, then a fresh run
  SIGKILLed once half the rows are written and rerun with its checkpoint;
  target: the rerun takes <= 0.55x the full run (both pay the process start
  and the model load).

Usage: .venv/bin/python benchmarks/bulk.py [--rows 20000] [--config 2x1]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from time import perf_counter
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    CONFIGS,
    Replicas,
    cycle,
    load_sentences,
    median,
    quiet_model_loading,
    r3,
    report,
)

HERE = Path(__file__).resolve().parent
TARGET_LIMIT = 0.9
TARGET_RAY = 1.3
TARGET_RESUME = 0.55
ADMIN = os.environ.get("FLOWBATCH_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def pipeline() -> Any:
    """The job's pipeline (also loaded by ``flowbatch run bulk:pipeline``)."""
    import flowbatch as fb
    from flowbatch.models import SentenceEmbedder

    replicas, threads = CONFIGS[os.environ.get("FB_BENCH_CONFIG", "2x1")]
    batch = int(os.environ.get("FB_BENCH_BATCH", "64"))
    return fb.Pipeline(
        [fb.stage(SentenceEmbedder(torch_threads=threads), name="embed",
                  concurrency=replicas, batch=fb.Batch(max_size=batch))],
        name="embed",
    )


async def admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def prepare(dsn: str, rows: int) -> None:
    import asyncpg

    texts = cycle(load_sentences(), rows)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text NOT NULL)")
        await conn.copy_records_to_table("docs", records=list(enumerate(texts, 1)))
        await reset(conn)
    finally:
        await conn.close()


async def reset(conn: Any) -> None:
    await conn.execute("DROP TABLE IF EXISTS docs_vec; "
                       "CREATE TABLE docs_vec (id int PRIMARY KEY, embedding real[] NOT NULL)")


async def fresh_table(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await reset(conn)
    finally:
        await conn.close()


async def count(dsn: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM docs_vec"))
    finally:
        await conn.close()


UPSERT = ("INSERT INTO docs_vec (id, embedding) VALUES ($1, $2) "
          "ON CONFLICT (id) DO UPDATE SET embedding = EXCLUDED.embedding")
QUERY = "SELECT id, body FROM docs ORDER BY id"


def sliced(rounds: int, r: int) -> str:
    return f"SELECT id, body FROM docs WHERE id % {rounds} = {r} ORDER BY id"


async def flowbatch_job(dsn: str, query: str, rows: int) -> tuple[float, float]:
    """(end-to-end rows/s including the model's load, steady rows/s) of one job."""
    from flowbatch.bulk import PostgresSink, PostgresSource, run_job

    t0 = perf_counter()
    report_ = await run_job(
        pipeline(),
        PostgresSource(dsn, query, key="id", value="body"),
        PostgresSink(dsn, "docs_vec", key="id", column="embedding", batch_size=500),
    )
    wall = perf_counter() - t0
    assert report_.ok, report_
    assert report_.done == rows, report_
    return rows / wall, report_.stats.items_per_s


async def naive_loop(dsn: str, emb: Any, query: str, rows: int) -> float:
    """Rows/s: read one (cursor), embed it alone, insert it, commit; next."""
    import asyncpg

    read = await asyncpg.connect(dsn)
    write = await asyncpg.connect(dsn)
    try:
        t0 = perf_counter()
        async with read.transaction():
            async for row in read.cursor(f"{query} LIMIT {rows}"):
                vec = emb([row["body"]])[0]
                await write.execute(UPSERT, row["id"], vec.tolist())  # autocommit: one commit
        return rows / (perf_counter() - t0)
    finally:
        await read.close()
        await write.close()


def ray_start() -> bool:
    try:
        import ray
    except ImportError:
        return False
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             log_to_driver=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return True


def ray_job(dsn: str, query: str, rows: int, *, replicas: int, threads: int,
            batch: int) -> float:
    """Rows/s of Ray Data on ``query``'s rows, its actors' model load included."""
    import asyncpg
    import numpy as np
    import ray

    class Embed:
        def __init__(self) -> None:
            from flowbatch.models import SentenceEmbedder

            self.emb = SentenceEmbedder(torch_threads=threads)
            self.emb.setup()

        def __call__(self, b: dict[str, Any]) -> dict[str, Any]:
            return {"id": b["id"], "embedding": np.stack(self.emb(list(b["body"])))}

    loop = asyncio.new_event_loop()
    try:
        t0 = perf_counter()

        async def read() -> list[dict[str, Any]]:
            conn = await asyncpg.connect(dsn)
            try:
                return [dict(r.items()) for r in await conn.fetch(query)]
            finally:
                await conn.close()

        ds = ray.data.from_items(loop.run_until_complete(read()))
        ds = ds.map_batches(Embed, batch_size=batch, concurrency=replicas, num_cpus=threads,
                            batch_format="numpy")
        conn = loop.run_until_complete(asyncpg.connect(dsn))
        n = 0
        for out in ds.iter_batches(batch_size=500, batch_format="numpy"):
            got = [(int(i), v.tolist()) for i, v in zip(out["id"], out["embedding"], strict=True)]
            loop.run_until_complete(conn.executemany(UPSERT, got))
            n += len(got)
        loop.run_until_complete(conn.close())
        assert n == rows, (n, rows)
        return rows / (perf_counter() - t0)
    finally:
        loop.close()


def cli_job(dsn: str, ckpt: Path, *, fresh: bool, kill_at: int | None) -> float:
    """Seconds of ``flowbatch run bulk:pipeline`` (killed once ``kill_at`` rows are in)."""
    cmd = [sys.executable, "-c", "from flowbatch.cli import main; main()", "run",
           "bulk:pipeline", "--source", f"{dsn}?query={QUERY}&key=id&value=body",
           "--sink", f"{dsn}?table=docs_vec&key=id&column=embedding",
           "--checkpoint", str(ckpt), "--no-progress"]
    if fresh:
        cmd.append("--fresh")
    t0 = perf_counter()
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    if kill_at is None:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"flowbatch run failed:\n{out}\n{err}")
        return perf_counter() - t0

    async def wait() -> None:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            while proc.poll() is None:
                if await conn.fetchval("SELECT count(*) FROM docs_vec") >= kill_at:
                    return
                await asyncio.sleep(0.02)
        finally:
            await conn.close()
        raise SystemExit(f"the job ended before {kill_at} rows: {proc.communicate()}")

    asyncio.run(wait())
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3,
                    help="the table is done in this many slices, each measured between "
                         "the limit and the baselines (medians of the ratios)")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="2x1",
                    help="model replicas x torch threads")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--limit-rows", type=int, default=3000, help="in all rounds together")
    ap.add_argument("--naive-rows", type=int, default=300, help="in all rounds together")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray Data column")
    args = ap.parse_args()
    quiet_model_loading()
    os.environ["FB_BENCH_CONFIG"] = args.config
    os.environ["FB_BENCH_BATCH"] = str(args.batch)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    replicas, threads = CONFIGS[args.config]
    rounds = args.rounds
    name = f"fb_bench_{uuid.uuid4().hex[:8]}"
    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    dsn = ADMIN.rsplit("/", 1)[0] + "/" + name
    notes = [
        (f"{args.rows:,} rows in {rounds} slices, config {args.config}, batch {args.batch}; "
         "a shared, noisy machine: read the ratios (medians over the slices)"),
    ]
    limit: list[float] = []
    fb_e2e: list[float] = []
    fb_steady: list[float] = []
    naive: list[float] = []
    ray_rate: list[float] = []
    try:
        asyncio.run(prepare(dsn, args.rows))
        table = cycle(load_sentences(), args.rows)
        reps = Replicas(replicas, threads)
        reps.run_all(lambda e: e(table[:args.batch]))
        from flowbatch.models import SentenceEmbedder

        plain = SentenceEmbedder()  # the naive loop's model: torch's defaults, inline
        plain.setup()
        plain(["warm up"])
        use_ray = not args.no_ray and ray_start()
        if args.no_ray:
            notes.append("Ray Data: skipped (--no-ray)")
        elif not use_ray:
            notes.append("Ray Data: skipped (ray is not installed: pip install 'ray[data]')")
        for r in range(rounds):
            query = sliced(rounds, r)
            n = len(range(r or rounds, args.rows + 1, rounds))  # ids r, r+R, ... <= rows
            # The model alone on the same slice's texts (a sample of them).
            sample = table[(r - 1) % rounds :: rounds]  # row id i+1 holds table[i]
            sample = sample[: max(args.batch * replicas, args.limit_rows // rounds)]
            limit.append(reps.throughput(sample, args.batch))
            asyncio.run(fresh_table(dsn))
            e2e, steady = asyncio.run(flowbatch_job(dsn, query, n))
            fb_e2e.append(e2e)
            fb_steady.append(steady)
            naive.append(asyncio.run(naive_loop(dsn, plain, query, args.naive_rows // rounds)))
            if use_ray:
                asyncio.run(fresh_table(dsn))
                ray_rate.append(ray_job(dsn, query, n, replicas=replicas, threads=threads,
                                        batch=args.batch))
            print(f"round {r + 1}/{rounds}: limit {limit[-1]:.1f}, flowbatch {e2e:.1f} "
                  f"(steady {steady:.1f}), naive {naive[-1]:.1f}"
                  + (f", Ray Data {ray_rate[-1]:.1f}" if ray_rate else "") + " rows/s",
                  flush=True)
        reps.close()
        if use_ray:
            import ray

            ray.shutdown()

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "job.ckpt"
            asyncio.run(fresh_table(dsn))
            full = cli_job(dsn, ckpt, fresh=True, kill_at=None)
            asyncio.run(fresh_table(dsn))
            cli_job(dsn, ckpt, fresh=True, kill_at=args.rows // 2)
            written = asyncio.run(count(dsn))
            resume = cli_job(dsn, ckpt, fresh=False, kill_at=None)
            assert asyncio.run(count(dsn)) == args.rows
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def ratio(a: list[float], b: list[float]) -> float:
        return median([x / y for x, y in zip(a, b, strict=True)])

    rows: list[list[Any]] = [
        ["model alone (the limit)", median(limit), "", ""],
        ["flowbatch, steady (first in to last out)", median(fb_steady), ratio(fb_steady, limit),
         f">= {TARGET_LIMIT}x limit"],
        ["flowbatch, end to end (with model load)", median(fb_e2e), ratio(fb_e2e, limit), ""],
        ["naive loop (one row, insert, commit)", median(naive), ratio(fb_e2e, naive),
         "flowbatch / naive"],
    ]
    figures: dict[str, Any] = {
        "rows": args.rows, "rounds": rounds, "config": args.config,
        "limit_rows_s": r3(median(limit)), "flowbatch_rows_s": r3(median(fb_steady)),
        "flowbatch_e2e_rows_s": r3(median(fb_e2e)),
        "flowbatch_vs_limit": r3(ratio(fb_steady, limit)),
        "flowbatch_e2e_vs_limit": r3(ratio(fb_e2e, limit)),
        "naive_rows_s": r3(median(naive)), "flowbatch_vs_naive": r3(ratio(fb_e2e, naive)),
    }
    if ray_rate:
        rows.append(["Ray Data (with actors' model load)", median(ray_rate),
                     ratio(fb_e2e, ray_rate), f"flowbatch / Ray, >= {TARGET_RAY}x"])
        figures.update(ray_rows_s=r3(median(ray_rate)),
                       flowbatch_vs_ray=r3(ratio(fb_e2e, ray_rate)))
    rows.append([(f"flowbatch run, resumed after a kill at {written:,} rows "
                  f"({resume:.1f}s vs {full:.1f}s full)"),
                 args.rows / resume, resume / full, f"<= {TARGET_RESUME}x full"])
    figures.update(full_run_s=r3(full), resume_s=r3(resume), resume_vs_full=r3(resume / full),
                   written_at_kill=written)
    report("bulk", "embed a PostgreSQL table and write the vectors back",
           ["job", "rows/s", "ratio", "target"], rows, figures, notes=notes)


if __name__ == "__main__":
    main()
