"""Bulk jobs: sources, sinks, checkpoints and :func:`run_job` (``flowbatch run``).

Usage::

    from flowbatch.bulk import JsonlSource, PostgresSink, run_job

    report = asyncio.run(run_job(pipe, JsonlSource("docs.jsonl", key="id", value="text"),
                                 PostgresSink(dsn, "vectors", key="id", column="embedding"),
                                 checkpoint="job.ckpt"))

See docs/bulk.md. The file and SQLite parts need nothing more than
flowbatch; PostgreSQL needs asyncpg, Parquet and CSV pyarrow, globs fsspec:
``pip install 'flowbatch[bulk]'``.
"""

from .checkpoint import Checkpoint
from .job import JobReport, checkpointed_map, records_of, run_job
from .sinks import JsonlSink, ParquetSink, PostgresSink, Sink, SqliteSink
from .sources import (
    CsvSource,
    GlobSource,
    JsonlSource,
    LinesSource,
    ParquetSource,
    PostgresSource,
    Record,
    Source,
    SqliteSource,
)
from .urls import open_sink, open_source

__all__ = [
    "Checkpoint",
    "CsvSource",
    "GlobSource",
    "JobReport",
    "JsonlSink",
    "JsonlSource",
    "LinesSource",
    "ParquetSink",
    "ParquetSource",
    "PostgresSink",
    "PostgresSource",
    "Record",
    "Sink",
    "Source",
    "SqliteSink",
    "SqliteSource",
    "checkpointed_map",
    "open_sink",
    "open_source",
    "records_of",
    "run_job",
]
