"""The demo: its document server, its chunking, and a small end-to-end run."""

from __future__ import annotations

import asyncio
import contextlib
import io
import sqlite3
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

from flowbatch.cli import main
from flowbatch.demo import run_demo
from flowbatch.demo.docserver import DocClient, DocServer, HTTPError, demo_sentences
from flowbatch.demo.pipeline import Document, split_document
from flowbatch.models import EMBEDDING_DIMENSION


def test_shipped_sentences_are_package_data() -> None:
    sentences = demo_sentences()
    assert len(sentences) >= 200
    assert all(s.endswith(".") for s in sentences)


def test_docserver_serves_documents_with_keep_alive() -> None:
    async def main() -> None:
        server = DocServer(5, latency=(0.0, 0.001), seed=1)
        async with server as url, DocClient(url, max_connections=4) as client:
            assert url.startswith("http://127.0.0.1:")
            texts = await asyncio.gather(*(client.get_text(f"/docs/{i}") for i in range(5)))
            assert texts == [server.document(i) for i in range(5)]
            # Sequential requests reuse one connection.
            for i in range(5):
                assert await client.get_text(f"/docs/{i}") == server.document(i)
            with pytest.raises(HTTPError, match="404"):
                await client.get_text("/docs/5")
            assert (await client.get("/nothing"))[0] == 404
            # A blocking client works too (the sequential baseline uses it).
            def fetch() -> str:
                with urllib.request.urlopen(f"{url}/docs/3", timeout=5) as resp:
                    return str(resp.read().decode())

            assert await asyncio.to_thread(fetch) == server.document(3)
            assert server.requests == 13
            assert server.connections <= 5  # 4 pooled + 1 from urllib

    asyncio.run(main())


def test_docserver_delays_each_response() -> None:
    async def main() -> float:
        async with (
            DocServer(1, latency=(0.02, 0.03)) as url,
            DocClient(url) as client,
        ):
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await client.get_text("/docs/0")
            return loop.time() - t0

    assert asyncio.run(main()) >= 0.02


def test_docserver_closes_open_connections_on_exit() -> None:
    async def main() -> None:
        async with DocServer(1, latency=(0.0, 0.0)) as url:
            client = DocClient(url)
            await client.get_text("/docs/0")  # leaves a keep-alive connection open
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await client.get("/docs/0")
            pytest.fail("the server should be gone")
        await client.aclose()

    asyncio.run(main())


def test_split_document_makes_chunks_of_one_to_three_sentences() -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(10))
    chunks = split_document(Document(7, text))
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.doc_id == 7 for c in chunks)
    assert " ".join(c.text for c in chunks) == text
    assert all(1 <= c.text.count(".") <= 3 for c in chunks)
    assert split_document(Document(1, "   ")) == []


def test_demo_end_to_end(tmp_path: Path) -> None:
    db_path = tmp_path / "demo.db"
    out = io.StringIO()
    result = run_demo(
        docs=12,
        db_path=db_path,
        sample=3,
        progress=False,
        console=Console(file=out, width=120),
    )
    report = out.getvalue()

    assert result["failed"] == 0
    assert result["docs"] == 12
    assert result["chunks"] > 12
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        rows = db.execute("SELECT doc_id, chunk_index, dim, vector FROM chunks").fetchall()
    assert len(rows) == result["chunks"] == result["db_rows"]
    assert {r[0] for r in rows} == set(range(12))
    for _, _, dim, blob in rows:
        vector = np.frombuffer(blob, dtype=np.float32)
        assert dim == EMBEDDING_DIMENSION
        assert vector.shape == (EMBEDDING_DIMENSION,)
        assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-4)

    stage_names = [s["name"] for s in result["stages"]]
    assert stage_names == ["fetch", "split", "embed", "store"]
    assert result["bottleneck"] in stage_names
    assert f"bottleneck: {result['bottleneck']}" in report
    assert result["sequential"]["docs"] == 3
    assert result["speedup"] > 0
    assert "speed-up" in report
    assert all(0.0 <= s["utilization"] <= 1.0 for s in result["stages"])


def test_cli_demo_runs(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "demo", "--docs", "4", "--sample", "1", "--db", str(tmp_path / "d.db"),
            "--no-progress", "--metrics-port", "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "speed-up" in result.output
    assert "bottleneck" in result.output
    assert "metrics: http://127.0.0.1:" in result.output  # served while it ran
