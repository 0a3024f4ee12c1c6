"""Bulk jobs on the real PostgreSQL: a server-side cursor in flat memory, the
upserting sink and a rejected row, and `flowbatch run` killed with SIGKILL at
three points and rerun (each row written once, few items recomputed)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from bulkhelpers import pg_run

from flowbatch.bulk import PostgresSink, Record, run_job

asyncpg = pytest.importorskip("asyncpg")

HERE = Path(__file__).parent
FLOWBATCH = [sys.executable, "-c", "from flowbatch.cli import main; main()"]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(HERE), e.get("PYTHONPATH", "")])
    e.update(extra)
    return e


def test_a_hundred_thousand_rows_through_a_cursor_in_flat_memory(pg_dsn: str) -> None:
    pg_run(pg_dsn, "DROP TABLE IF EXISTS big")
    pg_run(pg_dsn, "CREATE TABLE big AS SELECT g AS id, repeat(md5(g::text), 32) AS body "
                   "FROM generate_series(1, 100000) g")  # 1 KiB a row: ~100 MiB in all
    # In a fresh process, so that the RSS figures are this job's alone.
    script = textwrap.dedent(f"""
        import asyncio, json, resource
        import flowbatch as fb
        from flowbatch.bulk import PostgresSource

        def rss_mib():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        async def main():
            src = PostgresSource({pg_dsn!r}, "SELECT id, body FROM big ORDER BY id",
                                 key="id", value="body", prefetch=500)
            pipe = fb.Pipeline([fb.stage(lambda xs: [len(x) for x in xs], name="len",
                                         batch=fb.Batch(max_size=256))])
            n = total = 0
            async with pipe.open() as runner:
                base = rss_mib()
                async for size in runner.map(src.values()):
                    n += 1
                    total += size
            print(json.dumps({{"n": n, "total": total, "base": base, "peak": rss_mib()}}))

        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=100)
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["n"] == 100_000 and got["total"] == 100_000 * 1024
    # The rows hold ~100 MiB (more as Python strings); fetching them all at
    # once grows the peak by that much. Flat: a few chunks and the window.
    growth = got["peak"] - got["base"]
    print(f"RSS before reading {got['base']:.0f} MiB, peak {got['peak']:.0f} MiB "
          f"(+{growth:.1f} MiB for 100,000 rows of 1 KiB)")
    assert growth < 20, got


def test_pg_sink_upserts_and_a_rejected_row_fails_alone(pg_dsn: str, tmp_path: Path) -> None:
    pg_run(pg_dsn, "DROP TABLE IF EXISTS rej")
    pg_run(pg_dsn, "CREATE TABLE rej (id int PRIMARY KEY, out bigint CHECK (out >= 0))")
    import bulkpipes

    rows = [Record(i, {"id": i, "n": -5 if i == 137 else i}) for i in range(400)]
    sink = PostgresSink(pg_dsn, "rej", key="id", column="out", batch_size=100)
    failed = tmp_path / "failed.jsonl"
    for _ in range(2):  # the second run writes every row again: still one per key
        report = asyncio.run(run_job(bulkpipes.square, rows, sink, failed_path=failed))
        assert (report.done, report.failed) == (399, 1)
        entries = [json.loads(line) for line in failed.read_text().splitlines()]
        assert [e["key"] for e in entries] == [137]
        assert "CheckViolationError" in entries[0]["error"]
        assert "rej_out_check" in entries[0]["error"]  # the database's own message
    got = pg_run(pg_dsn, "SELECT id, out FROM rej ORDER BY id")
    assert [(r["id"], r["out"]) for r in got] == [(i, i * i) for i in range(400) if i != 137]


def test_flowbatch_run_rejected_row_exit_code_and_failed_keys(pg_dsn: str,
                                                              tmp_path: Path) -> None:
    pg_run(pg_dsn, "DROP TABLE IF EXISTS src2; DROP TABLE IF EXISTS dst2")
    pg_run(pg_dsn, "CREATE TABLE src2 AS SELECT g AS id, CASE WHEN g = 77 THEN -1 ELSE g END "
                   "AS n FROM generate_series(1, 300) g")
    pg_run(pg_dsn, "CREATE TABLE dst2 (id int PRIMARY KEY, out bigint CHECK (out >= 0))")
    failed = tmp_path / "failed.jsonl"
    cmd = [*FLOWBATCH, "run", "bulkpipes:square",
           "--source", f"{pg_dsn}?query=SELECT id, n FROM src2&key=id",
           "--sink", f"{pg_dsn}?table=dst2&key=id&column=out&batch=64",
           "--failed", str(failed)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=60,
                         cwd=tmp_path, check=False)
    assert out.returncode == 1, out.stderr
    assert "done 299, failed 1" in out.stdout
    assert "pg_sink" in out.stdout  # the stats table names every stage
    entries = [json.loads(line) for line in failed.read_text().splitlines()]
    assert [(e["key"], e["value"]) for e in entries] == [(77, {"id": 77, "n": -1})]
    # The failed keys feed back as a source: with the row fixed, the rerun succeeds.
    pg_run(pg_dsn, "ALTER TABLE dst2 DROP CONSTRAINT dst2_out_check")
    cmd2 = [*cmd[:cmd.index("--source") + 1], f"failed:{failed}", *cmd[cmd.index("--sink"):]]
    cmd2[cmd2.index("--failed") + 1] = str(tmp_path / "failed2.jsonl")
    out2 = subprocess.run(cmd2, capture_output=True, text=True, env=env(), timeout=60,
                          check=False)
    assert out2.returncode == 0, out2.stdout + out2.stderr
    assert "done 1, failed 0" in out2.stdout
    assert pg_run(pg_dsn, "SELECT count(*) AS n FROM dst2")[0]["n"] == 300


async def _wait_for_rows(dsn: str, table: str, at_least: int, proc: subprocess.Popen[str]) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        while proc.poll() is None:
            n = await conn.fetchval(f"SELECT count(*) FROM {table}")
            if n >= at_least:
                return int(n)
            await asyncio.sleep(0.005)  # polling the condition, not standing in for it
    finally:
        await conn.close()
    raise AssertionError(f"the job ended before {at_least} rows: {proc.communicate()}")


def _lines(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_sigkill_at_three_points_then_rerun_writes_each_row_once(pg_dsn: str,
                                                                tmp_path: Path) -> None:
    n_rows, sink_batch, sink_conc = 4000, 100, 2
    pg_run(pg_dsn, "DROP TABLE IF EXISTS src; DROP TABLE IF EXISTS dst")
    pg_run(pg_dsn, f"CREATE TABLE src AS SELECT g AS id, g AS n FROM generate_series(1, {n_rows}) g")
    pg_run(pg_dsn, "CREATE TABLE dst (id int PRIMARY KEY, out bigint)")
    ckpt = tmp_path / "job.ckpt"
    cmd = [*FLOWBATCH, "run", "bulkpipes:square",
           "--source", f"{pg_dsn}?query=SELECT id, n FROM src ORDER BY id&key=id",
           "--sink", (f"{pg_dsn}?table=dst&key=id&column=out&batch={sink_batch}"
                      f"&concurrency={sink_conc}"),
           "--checkpoint", str(ckpt)]
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    points = sorted(rng.uniform(0.1, 0.9) for _ in range(3))
    print(f"seed {seed}: kill at {[round(p, 2) for p in points]} of {n_rows} rows")
    computed_total = 0
    done_at_kill: set[int] = set()  # the checkpoint's keys when the last kill came
    written_at_kill: set[int] = set()  # the sink table's keys then
    for run, point in enumerate([*points, None]):
        log = tmp_path / f"computed-{run}.log"
        proc = subprocess.Popen(cmd, env=env(FB_COMPUTE_LOG=str(log), FB_STAGE_DELAY="0.02"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if point is None:
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, out + err
        else:
            asyncio.run(_wait_for_rows(pg_dsn, "dst", int(point * n_rows), proc))
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
            assert proc.returncode == -signal.SIGKILL
        computed = _lines(log)
        computed_total += len(computed)
        if run > 0:
            # The rerun computes only keys the checkpoint did not hold (all of
            # them when it runs to the end), each once...
            todo = set(range(1, n_rows + 1)) - done_at_kill
            assert len(computed) == len(set(computed)) and set(computed) <= todo
            if point is None:
                assert set(computed) == todo
            # ...and of those, recomputes (writes again) only the few whose batch
            # was committed but not yet marked when the kill came.
            recomputed = len(set(computed) & written_at_kill)
            print(f"run {run}: {len(computed)} computed, {recomputed} recomputed")
            assert recomputed <= sink_batch * sink_conc
        if point is not None:
            written_at_kill = {r["id"] for r in pg_run(pg_dsn, "SELECT id FROM dst")}
            con = sqlite3.connect(ckpt)
            done_at_kill = {json.loads(k) for (k,) in con.execute("SELECT key FROM done")}
            con.close()
            assert done_at_kill <= written_at_kill  # marked only once written
            assert 0 < len(written_at_kill) < n_rows
    rows = pg_run(pg_dsn, "SELECT s.id, d.out, s.n FROM src s LEFT JOIN dst d USING (id)")
    assert len(rows) == n_rows
    assert all(r["out"] == r["n"] * r["n"] for r in rows)  # every row, with its own result
    assert pg_run(pg_dsn, "SELECT count(*) AS n FROM dst")[0]["n"] == n_rows
    print(f"computed {computed_total} times for {n_rows} rows over 4 runs")
