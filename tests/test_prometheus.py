"""Prometheus export: the text parses and carries the engine's figures."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

import flowbatch as fb
from flowbatch.prometheus import CONTENT_TYPE, render
from polling import until


async def double(x: str) -> str:
    return x * 2


def embed(xs: list[str]) -> list[Any]:
    return [ValueError("bad") if x == "bad" * 2 else len(x) for x in xs]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_render_exports_the_engine_statistics() -> None:
    pipe = fb.Pipeline(
        [
            fb.stage(double, name="prep"),
            fb.stage(embed, name="embed", batch=fb.Batch(max_size=8, cost=len, max_cost=1000)),
        ],
        name="p",
    )
    items = ["a", "bb", "bad", "ccc"] * 5

    async def main() -> bytes:
        async with pipe.open() as runner:
            out = [y async for y in runner.map(items, return_exceptions=True)]
            assert sum(isinstance(y, fb.ItemFailed) for y in out) == 5
            return render({"p": runner})

    body = asyncio.run(main())
    assert CONTENT_TYPE.startswith("text/plain")
    got = samples(body.decode())
    p = (("pipeline", "p"),)
    assert got[("flowbatch_pipeline_submitted_total", p)] == 20
    assert got[("flowbatch_pipeline_items_total", (("outcome", "completed"), *p))] == 15
    assert got[("flowbatch_pipeline_items_total", (("outcome", "failed"), *p))] == 5
    assert got[("flowbatch_pipeline_latency_seconds_count", p)] == 15
    embed_l = (("pipeline", "p"), ("stage", "embed"))
    assert got[("flowbatch_stage_items_total", (("outcome", "ok"), *embed_l))] == 15
    assert got[("flowbatch_stage_items_total", (("outcome", "failed"), *embed_l))] == 5
    assert got[("flowbatch_stage_queue_depth", embed_l)] == 0
    assert got[("flowbatch_stage_batch_size_count", embed_l)] >= 1
    assert got[("flowbatch_stage_batch_size_sum", embed_l)] >= 20
    assert got[("flowbatch_stage_service_seconds_count", embed_l)] >= 1
    assert got[("flowbatch_stage_batch_cost_count", embed_l)] >= 1
    assert 0.0 <= got[("flowbatch_stage_padding_waste_ratio", embed_l)] < 1.0
    assert got[("flowbatch_stage_bottleneck", embed_l)] + got[
        ("flowbatch_stage_bottleneck", (("pipeline", "p"), ("stage", "prep")))
    ] == 1
    # Histogram buckets are cumulative and end with +Inf == count.
    les = sorted(
        (float(dict(k[1])["le"]), v)
        for k, v in got.items()
        if k[0] == "flowbatch_stage_queue_wait_seconds_bucket" and dict(k[1])["stage"] == "embed"
    )
    counts = [v for _, v in les]
    assert counts == sorted(counts)
    assert counts[-1] == got[("flowbatch_stage_queue_wait_seconds_count", embed_l)] == 20


def test_serve_metrics_answers_scrapes_on_the_event_loop() -> None:
    from flowbatch.prometheus import serve_metrics

    async def get(url: str) -> tuple[str, str]:
        host, port_path = url.removeprefix("http://").split(":", 1)
        port, path = port_path.split("/", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /{path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
        writer.close()
        head, _, body = raw.decode().partition("\r\n\r\n")
        return head.split("\r\n")[0], body

    pipe = fb.Pipeline([fb.stage(double, name="prep")], name="served")

    async def main() -> None:
        async with pipe.open() as runner, serve_metrics({"served": runner}) as url:
            assert await runner.submit("ab") == "abab"
            status, body = await get(url)
            assert status == "HTTP/1.1 200 OK"
            got = samples(body)
            assert got[("flowbatch_pipeline_submitted_total", (("pipeline", "served"),))] == 1
            status, _ = await get(url.replace("/metrics", "/nope"))
            assert status == "HTTP/1.1 404 Not Found"

    asyncio.run(main())


def test_label_values_with_quotes_backslashes_and_newlines_are_escaped() -> None:
    pipeline, stage = 'say "hi"\\n\nnow', 'st"a\\ge\nx'
    pipe = fb.Pipeline([fb.stage(double, name=stage)], name="p")

    async def main() -> bytes:
        async with pipe.open() as runner:
            assert await runner.submit("ab") == "abab"
            return render({pipeline: runner})

    text = asyncio.run(main()).decode()
    # The text format's escapes: \\ for a backslash, \" for a quote, \n for a newline.
    assert 'pipeline="say \\"hi\\"\\\\n\\nnow"' in text
    assert 'stage="st\\"a\\\\ge\\nx"' in text
    assert all(line.startswith(("#", "flowbatch_")) for line in text.splitlines() if line)
    got = samples(text)
    assert got[("flowbatch_pipeline_submitted_total", (("pipeline", pipeline),))] == 1
    key = ("flowbatch_stage_items_total", (("outcome", "ok"), ("pipeline", pipeline), ("stage", stage)))
    assert got[key] == 1


def test_http_series_are_written_by_the_same_writer() -> None:
    from flowbatch.http.config import ServeConfig
    from flowbatch.http.metrics import render_metrics
    from flowbatch.http.service import Service

    service = Service({"a.b-c_1": fb.Pipeline([fb.stage(double)], name="p")}, ServeConfig())
    text = render_metrics(service).decode()
    families = {fam.name: fam for fam in text_string_to_metric_families(text)}
    assert families["flowbatch_http_rejected"].type == "counter"
    assert families["flowbatch_http_ready"].samples[0].value == 0  # not started
    labelled = [
        s for fam in families.values() if fam.name.startswith("flowbatch_http_") for s in fam.samples
        if "pipeline" in s.labels
    ]
    assert labelled and {s.labels["pipeline"] for s in labelled} == {"a.b-c_1"}


def test_rejections_restarts_and_pending_workers_are_exported_and_read_back() -> None:
    import dataclasses

    import pytest

    from flowbatch.observe.top import parse

    pipe = fb.Pipeline([fb.stage(double, name="prep")], name="p")

    async def main() -> fb.PipelineStats:
        async with pipe.open(max_in_flight=1) as runner:
            first = runner.submit_nowait("a")
            with pytest.raises(fb.Overloaded):
                runner.admit_many_nowait(["b", "c"])
            assert await first == "aa"
            return runner.stats()

    s = asyncio.run(main())
    (st,) = s.stages
    # a stage whose executor replaced 2 workers and waits for 1 (as a Ray pool reports)
    s = dataclasses.replace(s, stages=(dataclasses.replace(st, restarts=2, pending=1),))

    class Snapshot:
        def stats(self) -> fb.PipelineStats:
            return s

    text = render({"p": Snapshot()}).decode()  # type: ignore[dict-item]
    got = samples(text)
    lab = (("pipeline", "p"), ("stage", "prep"))
    assert got[("flowbatch_pipeline_rejected_total", (("pipeline", "p"),))] == 2
    assert got[("flowbatch_stage_restarts_total", lab)] == 2
    assert got[("flowbatch_stage_pending_workers", lab)] == 1
    back = parse(text)["p"]
    assert back.rejected == 2
    assert (back.stages[0].restarts, back.stages[0].pending) == (2, 1)


class Held:
    """A batched async stage whose first call waits for ``release``."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.release = asyncio.Event()

    async def __call__(self, xs: list[int]) -> list[int]:
        self.calls.append(list(xs))
        if len(self.calls) == 1:
            await self.release.wait()
        return xs


def test_batches_by_reason_and_the_learned_batch_time_are_exported() -> None:
    model = Held()
    opts = fb.Batch(max_size=8, latency_target=600, linger=0)
    pipe = fb.Pipeline([fb.stage(model, name="m", batch=opts)], name="p")

    async def main() -> bytes:
        async with pipe.open() as runner:
            first = asyncio.create_task(runner.submit(0))
            await until(lambda: len(model.calls) == 1)
            rest = [asyncio.create_task(runner.submit(i)) for i in range(1, 12)]
            await until(lambda: runner.stats().stage("m").queued == 11)
            model.release.set()
            await asyncio.gather(first, *rest)
            return render({"p": runner})

    got = samples(asyncio.run(main()).decode())
    assert model.calls == [[0], list(range(1, 9)), [9, 10, 11]]
    lab = (("pipeline", "p"), ("stage", "m"))

    def by(name: str, reason: str) -> float:
        return got[(name, (("pipeline", "p"), ("reason", reason), ("stage", "m")))]

    assert by("flowbatch_stage_batches_total", "worker_free") == 2
    assert by("flowbatch_stage_batches_total", "full") == 1
    assert by("flowbatch_stage_batch_items_total", "worker_free") == 4  # mean 2
    assert by("flowbatch_stage_batch_items_total", "full") == 8
    assert not [k for k in got if k[0] == "flowbatch_stage_batches_total" and
                dict(k[1])["reason"] not in ("worker_free", "full")]
    # The first batch, held, took longest: the fit has a > 0 and b clamped at 0.
    a = got[("flowbatch_stage_batch_time_fixed_seconds", lab)]
    b = got[("flowbatch_stage_batch_time_per_item_seconds", lab)]
    assert a > 0 and b >= 0
