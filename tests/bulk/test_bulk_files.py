"""Bulk jobs over files: each source's keys and values, the file sinks' round
trips and crash recovery, checkpoints and --fresh, a glob of 1,000 files."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import flowbatch as fb
from flowbatch.bulk import (
    Checkpoint,
    CsvSource,
    GlobSource,
    JsonlSink,
    JsonlSource,
    LinesSource,
    ParquetSink,
    ParquetSource,
    Record,
    Sink,
    SqliteSink,
    SqliteSource,
    open_sink,
    open_source,
    run_job,
)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


async def collect(src: Any) -> list[Record]:
    return [r async for r in src]


def upper_pipe() -> fb.Pipeline:
    return fb.Pipeline(
        [fb.stage(lambda xs: [x.upper() for x in xs], name="upper", batch=fb.Batch(max_size=16))],
        name="upper",
    )


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lines_and_jsonl_sources_key_by_line_or_field(tmp_path: Path) -> None:
    lines = tmp_path / "a.txt"
    lines.write_text("one\n\nthree\n")
    assert asyncio.run(collect(LinesSource(lines))) == [(1, "one"), (3, "three")]
    docs = tmp_path / "d.jsonl"
    write_jsonl(docs, [{"id": "x", "text": "hi", "n": 1}, {"id": "y", "text": "yo", "n": 2}])
    assert asyncio.run(collect(JsonlSource(docs, key="id", value="text"))) == [
        ("x", "hi"), ("y", "yo"),
    ]
    assert asyncio.run(collect(JsonlSource(docs)))[1] == (2, {"id": "y", "text": "yo", "n": 2})
    assert asyncio.run(JsonlSource(docs).count()) == 2


def test_csv_and_parquet_sources_read_only_the_columns_asked(tmp_path: Path) -> None:
    csv = tmp_path / "r.csv"
    csv.write_text("id,body,stars\n1,good,5\n2,bad,1\n")
    src = CsvSource(csv, columns=["body"], key="id")
    assert asyncio.run(collect(src)) == [(1, {"body": "good"}), (2, {"body": "bad"})]
    pqf = tmp_path / "r.parquet"
    pq.write_table(pa.table({"id": [10, 11], "text": ["a", "b"], "blob": [b"x" * 9, b"y"]}), pqf)
    src2 = ParquetSource(pqf, columns=["text"], key="id", value="text")
    assert asyncio.run(collect(src2)) == [(10, "a"), (11, "b")]
    assert asyncio.run(src2.count()) == 2


def test_sqlite_source_and_sink_upsert(tmp_path: Path) -> None:
    db = tmp_path / "in.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
    con.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"doc {i}") for i in range(300)])
    con.commit()
    con.close()
    src = SqliteSource(db, table="docs", key="id", value="text")
    out = tmp_path / "out.db"
    sink = SqliteSink(out, "upper", key="id", column="text", batch_size=64)
    for _ in range(2):  # the second run rewrites every row: the upsert keeps one per key
        report = asyncio.run(run_job(upper_pipe(), src, sink))
        assert (report.done, report.failed) == (300, 0)
    con = sqlite3.connect(out)
    rows = con.execute("SELECT id, text FROM upper ORDER BY id").fetchall()
    con.close()
    assert rows == [(i, f"DOC {i}") for i in range(300)]


def test_parquet_round_trip_in_part_files(tmp_path: Path) -> None:
    pqf = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(1000)), "text": [f"t{i}" for i in range(1000)]}), pqf)
    out = tmp_path / "parts"
    sink = ParquetSink(out, rows_per_file=300, max_wait=0)
    report = asyncio.run(run_job(upper_pipe(), ParquetSource(pqf, key="id", value="text"), sink))
    assert (report.done, report.failed) == (1000, 0)
    parts = sorted(out.iterdir())
    assert len(parts) >= 4 and all(p.suffix == ".parquet" for p in parts)
    back = asyncio.run(collect(ParquetSource(out, key="key", value="value")))
    assert sorted(back) == [(i, f"T{i}") for i in range(1000)]


def test_jsonl_round_trip_and_resume_after_a_torn_line(tmp_path: Path) -> None:
    src_path = tmp_path / "in.jsonl"
    write_jsonl(src_path, [{"id": i, "text": f"t{i}"} for i in range(500)])
    source = JsonlSource(src_path, key="id", value="text")
    out = tmp_path / "out.jsonl"
    ckpt = tmp_path / "job.ckpt"
    report = asyncio.run(run_job(upper_pipe(), source, JsonlSink(out), checkpoint=ckpt))
    assert (report.done, report.skipped) == (500, 0)
    assert [(r["key"], r["value"]) for r in read_jsonl(out)] == [(i, f"T{i}") for i in range(500)]
    # A crash after the sink's fsync but before the checkpoint's mark, with a
    # line torn by the kill: rows 400.. are in the file, not in the checkpoint.
    con = sqlite3.connect(ckpt)
    con.execute("DELETE FROM done WHERE CAST(key AS INTEGER) >= 400")
    con.commit()
    con.close()
    with out.open("a") as f:
        f.write('{"key":450,"val')
    report = asyncio.run(run_job(upper_pipe(), source, JsonlSink(out), checkpoint=ckpt))
    assert (report.done, report.skipped) == (0, 500)
    keys = [r["key"] for r in read_jsonl(out)]
    assert sorted(keys) == list(range(500))  # each once, the torn line gone


def test_checkpoint_skips_done_keys_and_fresh_starts_over(tmp_path: Path) -> None:
    seen: list[str] = []

    def record(xs: list[str]) -> list[str]:
        seen.extend(xs)
        return [x.upper() for x in xs]

    def fail_b(x: str) -> str:
        if x.startswith("b"):
            raise ValueError(f"no {x}")
        return x

    pipe = fb.Pipeline([fb.stage(fail_b), fb.stage(record, batch=fb.Batch(max_size=8))])
    items = [Record(f"k{i}", ("b" if i % 10 == 3 else "a") + str(i)) for i in range(100)]
    ckpt = tmp_path / "c.ckpt"
    failed = tmp_path / "failed.jsonl"
    r1 = asyncio.run(run_job(pipe, items, checkpoint=ckpt, failed_path=failed))
    assert (r1.done, r1.failed, r1.skipped) == (90, 10, 0)
    bad = read_jsonl(failed)
    assert sorted(e["key"] for e in bad) == sorted(f"k{i}" for i in range(100) if i % 10 == 3)
    assert "ValueError: no b3" in next(e["error"] for e in bad if e["key"] == "k3")
    seen.clear()
    r2 = asyncio.run(run_job(pipe, items, checkpoint=ckpt, failed_path=failed))
    assert (r2.done, r2.failed, r2.skipped) == (0, 10, 90)  # only the failed ones again
    assert seen == []
    r3 = asyncio.run(run_job(pipe, items, checkpoint=ckpt, fresh=True))
    assert (r3.done, r3.skipped) == (90, 0)
    assert Checkpoint(ckpt).count() == 90


def test_failed_keys_file_is_a_source(tmp_path: Path) -> None:
    def picky(x: dict[str, Any]) -> int:
        if x["n"] % 7 == 0:
            raise ValueError("multiple of seven")
        return int(x["n"])

    items = [Record(f"r{i}", {"n": i}) for i in range(1, 50)]
    failed = tmp_path / "failed.jsonl"
    asyncio.run(run_job(fb.Pipeline([picky]), items, failed_path=failed))
    again = asyncio.run(collect(open_source(f"failed:{failed}")))
    assert again == [(f"r{i}", {"n": i}) for i in range(7, 50, 7)]


def test_a_sink_write_that_fails_briefly_is_retried(tmp_path: Path) -> None:
    class Flaky(Sink):
        name = "flaky"
        retry = fb.Retry(attempts=3, backoff=0, on=(OSError,))

        def __init__(self) -> None:
            self.calls = 0
            self.rows: list[tuple[Any, Any]] = []

        async def write(self, rows: list[tuple[Any, Any]]) -> None:
            self.calls += 1
            if self.calls == 1:
                raise ConnectionResetError("the database went away")
            self.rows.extend(rows)

    sink = Flaky()
    report = asyncio.run(run_job(upper_pipe(), [Record(1, "a"), Record(2, "b")], sink))
    assert (report.done, report.failed) == (2, 0)
    assert sorted(sink.rows) == [(1, "A"), (2, "B")]
    assert report.stats.stage("flaky").retried >= 1


def test_glob_of_a_thousand_files(tmp_path: Path) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    for i in range(1000):
        (folder / f"f{i:04d}.txt").write_bytes(b"x" * (i % 37))
    pytest.importorskip("fsspec")
    src = GlobSource(str(folder / "*.txt"))
    assert asyncio.run(src.count()) == 1000
    out = tmp_path / "sizes.jsonl"
    sizes = fb.Pipeline([fb.stage(lambda fs: [len(b) for _, b in fs], name="size",
                                  batch=fb.Batch(max_size=100))])
    report = asyncio.run(run_job(sizes, src, open_sink(f"jsonl:{out}")))
    assert (report.done, report.failed) == (1000, 0)
    got = {r["key"]: r["value"] for r in read_jsonl(out)}
    assert got == {str(folder / f"f{i:04d}.txt"): i % 37 for i in range(1000)}
    streams = asyncio.run(collect(GlobSource(str(folder / "f000[0-2].txt"), read="open")))
    read_back = []
    for _, opened in streams:
        with opened as f:
            read_back.append(f.read())
    assert read_back == [b"", b"x", b"xx"]


def test_urls_name_their_sources_and_sinks(tmp_path: Path) -> None:
    src = open_source("postgresql://u@h:5/db?query=SELECT%20a+1%20FROM%20t&key=a&sslmode=disable")
    assert src.query == "SELECT a+1 FROM t" and src.key == "a"  # type: ignore[attr-defined]
    assert src.dsn == "postgresql://u@h:5/db?sslmode=disable"  # type: ignore[attr-defined]
    assert isinstance(open_source(str(tmp_path / "x.jsonl")), JsonlSource)
    assert isinstance(open_source("csv:a.csv?columns=a,b&key=a"), CsvSource)
    with pytest.raises(ValueError, match="unknown parameter"):
        open_source("jsonl:a.jsonl?colums=a")
    with pytest.raises(ValueError, match="cannot tell"):
        open_source("a.bin")
    with pytest.raises(ValueError, match="needs \\?table="):
        open_sink("sqlite:out.db")


def test_pipe_run_and_runner_map_take_a_checkpoint(tmp_path: Path) -> None:
    calls: list[str] = []
    broken = {"b", "d"}

    def shout(x: str) -> str:
        calls.append(x)
        if x in broken:
            raise ValueError(x)
        return x.upper()

    pipe = fb.Pipeline([shout])
    ckpt = tmp_path / "run.ckpt"
    items = [Record(c, c) for c in "abcdef"]
    first = pipe.run(items, checkpoint=ckpt, progress=False, return_exceptions=True)
    assert [r if isinstance(r, str) else "!" for r in first] == ["A", "!", "C", "!", "E", "F"]
    broken.clear()
    calls.clear()
    assert pipe.run(items, checkpoint=ckpt, progress=False) == ["B", "D"]  # the rest
    assert calls == ["b", "d"]
    assert pipe.run(items, checkpoint=ckpt, progress=False) == []

    async def with_runner() -> list[str]:
        async with pipe.open() as runner:
            return [r async for r in runner.map("xyz", checkpoint=ckpt, fresh=True)]

    assert asyncio.run(with_runner()) == ["X", "Y", "Z"]  # keyed by position: 0, 1, 2
    calls.clear()
    assert asyncio.run(with_runner()) == ["X", "Y", "Z"]  # fresh: all again
    assert calls == ["x", "y", "z"]


def test_flowbatch_run_from_a_file_with_progress_and_stats(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from flowbatch.cli import main

    src = tmp_path / "in.txt"
    src.write_text("alpha\nbeta\n\ngamma\n")
    out = tmp_path / "out.jsonl"
    args = ["run", "bulkpipes:upper", "--source", f"lines:{src}", "--sink", f"jsonl:{out}",
            "--checkpoint", str(tmp_path / "c.ckpt"), "--progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "done 3, failed 0, skipped 0" in result.output
    assert "jsonl_sink" in result.output and "upper" in result.output  # the stats table
    assert [(r["key"], r["value"]) for r in read_jsonl(out)] == [
        (1, "ALPHA"), (2, "BETA"), (4, "GAMMA"),
    ]
    again = CliRunner().invoke(main, args)
    assert "done 0, failed 0, skipped 3" in again.output
    bad = CliRunner().invoke(main, ["run", "bulkpipes:upper", "--source", "x.bin"])
    assert bad.exit_code == 2 and "cannot tell what 'x.bin' is" in bad.output
    helped = CliRunner().invoke(main, ["run", "--help"])
    assert "postgresql://USER@HOST/DB?query=SQL" in helped.output
