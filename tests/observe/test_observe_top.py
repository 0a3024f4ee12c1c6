"""``flowbatch top``: parsing a scrape, the figures between two, the screen, live in tmux."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import shutil
import subprocess
from typing import Any

import pytest
from click.testing import CliRunner
from observehelpers import PYTHON, env_with_helpers, live_server, wait_for_screen
from rich.console import Console

import flowbatch as fb
from corehelpers import ManualClock, adaptive_api_then_store
from flowbatch.metrics import quantile
from flowbatch.observe.top import compute, metrics_url, parse, render, top
from flowbatch.prometheus import render as exposition
from polling import until


async def fast(x: int) -> int:
    return x


def model(xs: list[int]) -> list[Any]:
    return [ValueError("odd one") if x == 13 else x for x in xs]


def test_quantile_interpolates_like_prometheus() -> None:
    buckets = [(1.0, 0.0), (2.0, 50.0), (4.0, 100.0), (math.inf, 100.0)]
    assert quantile(buckets, 0.5) == 2.0
    assert quantile(buckets, 0.25) == 1.5
    assert quantile(buckets, 0.99) == pytest.approx(3.96)
    assert quantile([(1.0, 0.0), (math.inf, 5.0)], 0.5) == 1.0  # open top: its lower bound
    assert quantile([(1.0, 0.0), (math.inf, 0.0)], 0.5) == 0.0
    assert quantile([], 0.5) == 0.0


def test_figures_between_two_scrapes_of_a_real_runner() -> None:
    pipe = fb.Pipeline(
        [fb.stage(fast, name="prep"), fb.stage(model, name="embed", batch=fb.Batch(max_size=4))],
        name="p",
    )

    async def main() -> tuple[str, str]:
        async with pipe.open() as runner:
            [y async for y in runner.map(range(10), return_exceptions=True)]
            first = exposition({"p": runner}).decode()
            [y async for y in runner.map(range(10, 30), return_exceptions=True)]
            return first, exposition({"p": runner}).decode()

    a_text, b_text = asyncio.run(main())
    a, b = parse(a_text), parse(b_text)
    assert set(b) == {"p"} and [s.name for s in b["p"].stages] == ["prep", "embed"]
    assert b["p"].completed == 29 and b["p"].failed == 1
    assert b["p"].stage("embed").batch_max_size == 4 and b["p"].stage("prep").batch_max_size == 0
    assert b["p"].stage("embed").executor == "thread" and b["p"].elapsed > 0

    (view,) = compute(a, b, 2.0)  # 20 items in "2 seconds"
    assert view.items_per_s == pytest.approx(19 / 2)  # item 13 failed
    assert view.errors_per_s == pytest.approx(1 / 2)
    prep, embed = view.stages
    assert prep.items_per_s == pytest.approx(10.0)
    assert embed.errors_per_s == pytest.approx(0.5) and embed.failed == 1
    assert prep.mean_batch is None and embed.mean_batch is not None
    assert 1.0 <= embed.mean_batch <= 4.0
    assert embed.p50 is not None and embed.p99 is not None and embed.p50 <= embed.p99
    assert view.bottleneck in ("prep", "embed")
    assert sum(st.bottleneck for st in view.stages) == 1

    # A restarted service: counters went down, so the new values are the increase.
    (again,) = compute(b, a, 1.0)
    assert again.items_per_s == pytest.approx(10.0)

    console = Console(record=True, width=120)
    console.print(render([view], "http://x/metrics"))
    screen = console.export_text()
    assert f"bottleneck: {view.bottleneck}" in screen
    for word in ("pipeline p", "items/s", "queue", "busy", "batch", "p50", "p99", "errors"):
        assert word in screen


def test_metrics_url_defaults_the_path() -> None:
    assert metrics_url("127.0.0.1:8000") == "http://127.0.0.1:8000/metrics"
    assert metrics_url("http://h:1/") == "http://h:1/metrics"
    assert metrics_url("http://h:1/custom") == "http://h:1/custom"


def test_once_against_nothing_fails_with_a_message() -> None:
    # Port 9 (discard) on loopback: refused at once.
    result = CliRunner().invoke(top, ["http://127.0.0.1:9/metrics", "--once", "--interval", "0.1"])
    assert result.exit_code == 1
    assert "cannot read http://127.0.0.1:9/metrics" in result.output


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_top_in_tmux_names_the_bottleneck_of_a_live_server() -> None:
    session = f"fbtop-{os.getpid()}"
    with live_server() as port:
        url = f"http://127.0.0.1:{port}"
        cmd = f"{PYTHON} -m flowbatch.observe.top {url} --interval 0.5"
        subprocess.run(
            ["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "30", cmd],
            check=True, env=env_with_helpers(),
        )
        try:
            screen = wait_for_screen(session, ["bottleneck: embed", "every 0.5s"])
        finally:
            subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    rows = {line.split()[1].lstrip("▶"): line for line in screen.splitlines()
            if any(f" {n} " in line for n in ("prep", "▶embed", "embed", "store"))
            and "│" in line}
    assert set(rows) >= {"prep", "embed", "store"}, screen
    assert "▶embed" in rows["embed"]  # the marker sits on the bottleneck's row
    assert "pipeline demo" in screen and "items/s" in screen and "latency p50" in screen


def test_why_batches_went_out_is_read_back_and_shown() -> None:
    release = asyncio.Event()
    calls: list[list[int]] = []

    async def held(xs: list[int]) -> list[int]:
        calls.append(list(xs))
        if len(calls) == 1:
            await release.wait()
        return xs

    opts = fb.Batch(max_size=8, latency_target=600, linger=0)
    pipe = fb.Pipeline([fb.stage(held, name="m", batch=opts)], name="p")

    async def main() -> str:
        async with pipe.open() as runner:
            first = asyncio.create_task(runner.submit(0))
            await until(lambda: len(calls) == 1)
            rest = [asyncio.create_task(runner.submit(i)) for i in range(1, 12)]
            await until(lambda: runner.stats().stage("m").queued == 11)
            release.set()
            await asyncio.gather(first, *rest)
            return exposition({"p": runner}).decode()

    cur = parse(asyncio.run(main()))
    s = cur["p"].stage("m")
    assert s.batch_reasons == {"worker_free": 2, "full": 1}
    assert s.mean_batch_size_by_reason() == {"worker_free": 2.0, "full": 8.0}
    assert s.batch_time_fit is not None
    (view,) = compute({}, cur, 1.0)
    (st,) = view.stages
    assert st.reasons == (("worker_free", 2, 2.0), ("full", 1, 8.0))
    console = Console(record=True, width=160)
    console.print(render([view], "http://x/metrics"))
    screen = console.export_text()
    assert "batches of m: worker_free 2 (mean 2.0), full 1 (mean 8.0); batch time" in screen


def test_an_adaptive_stage_shows_its_limit_and_is_measured_over_it() -> None:
    clock = ManualClock()

    async def main() -> tuple[str, str]:
        hold = asyncio.Event()
        pipe = adaptive_api_then_store(hold)
        async with pipe.open(clock=clock) as runner:
            calls = [asyncio.create_task(runner.submit(0))]
            try:
                await until(lambda: runner.stats().stage("store").in_flight == 1)
                calls += [asyncio.create_task(runner.submit(x)) for x in (100, 101)]
                await until(lambda: runner.stats().stage("api").in_flight == 2)
                clock.now += 1.0
                first = exposition({"p": runner}).decode()
                clock.now += 10.0
                second = exposition({"p": runner}).decode()
            finally:
                hold.set()
            await asyncio.gather(*calls)
            return first, second

    a_text, b_text = asyncio.run(main())
    a, b = parse(a_text), parse(b_text)
    api = b["p"].stage("api")
    assert (api.concurrency_limit, api.workers, api.replicas) == (2, 16, None)
    assert api.worker_seconds == pytest.approx(2 * 11.0)
    (view,) = compute(a, b)  # over the runner's own 10 s
    api_view, store_view = view.stages
    assert (api_view.limit, api_view.workers) == (2, 16)
    assert api_view.utilization == pytest.approx(1.0)  # 2 busy of the 2 allowed
    assert store_view.limit is None and store_view.utilization == pytest.approx(0.5)
    assert view.bottleneck == "api"
    console = Console(record=True, width=160)
    console.print(render([view], "http://x/metrics"))
    screen = console.export_text()
    api_row = next(line for line in screen.splitlines() if "▶api" in line)
    assert " 2/16 " in api_row
    assert "bottleneck: api (100% busy on 2 of 16 workers (adaptive), 0 queued)" in screen


def _screen(view: Any) -> str:
    console = Console(record=True, width=200)
    console.print(render([view], "http://x/metrics"))
    return console.export_text()


def test_the_admission_limit_and_refusals_are_read_back_and_shown() -> None:
    hold = asyncio.Event()

    async def held(x: int) -> int:
        await hold.wait()
        return x

    pipe = fb.Pipeline([fb.stage(held, name="m")], name="p")

    async def main() -> str:
        async with pipe.open(max_in_flight=2) as runner:
            calls = [runner.submit_nowait(i) for i in range(2)]
            try:
                with pytest.raises(fb.Overloaded):
                    runner.submit_nowait(2)
                text = exposition({"p": runner}).decode()
            finally:
                hold.set()
            await asyncio.gather(*calls)
            return text

    cur = parse(asyncio.run(main()))
    p = cur["p"]
    assert (p.in_flight, p.in_flight_limit, p.rejected, p.latency_target) == (2, 2, 1, None)
    (view,) = compute({}, cur, 1.0)
    assert (view.in_flight_limit, view.rejected, view.rejected_per_s) == (2, 1, 1.0)
    assert view.latency_target is None
    screen = _screen(view)
    assert "in flight 2/2 (" in screen
    assert "refused 1 +1.0/s" in screen
    assert "target" not in screen and "None" not in screen


def test_a_latency_target_and_its_limit_are_read_back_and_shown() -> None:
    pipe = fb.Pipeline([fb.stage(fast, name="m")], name="p")

    async def main() -> tuple[str, float | None]:
        async with pipe.open(latency_target=0.5) as runner:
            await runner.submit(1)
            return exposition({"p": runner}).decode(), runner.stats().in_flight_limit

    text, limit = asyncio.run(main())
    assert limit is not None
    p = parse(text)["p"]
    assert p.latency_target == pytest.approx(0.5) and p.in_flight_limit == int(limit)
    (view,) = compute({}, parse(text), 1.0)
    assert view.latency_target == pytest.approx(0.5) and view.in_flight_limit == int(limit)
    screen = _screen(view)
    assert f"in flight 0/{int(limit)} (" in screen
    assert "(target p99 500ms)" in screen and "refused 0" in screen


def test_no_admission_limit_shows_no_limit_target_or_refusals() -> None:
    pipe = fb.Pipeline([fb.stage(fast, name="m")], name="p")

    async def main() -> str:
        async with pipe.open() as runner:
            await runner.submit(1)
            return exposition({"p": runner}).decode()

    text = asyncio.run(main())
    assert "flowbatch_pipeline_in_flight_limit{" not in text
    p = parse(text)["p"]
    assert (p.in_flight_limit, p.latency_target, p.rejected) == (None, None, 0)
    (view,) = compute({}, parse(text), 1.0)
    assert view.in_flight_limit is None and view.latency_target is None
    screen = _screen(view)
    assert "in flight 0 (" in screen
    for word in ("target", "refused", "None"):
        assert word not in screen
    # runner.stats() gives an unbounded limiter as inf (/metrics leaves it out): no limit either.
    (unbounded,) = compute({}, {"p": dataclasses.replace(p, in_flight_limit=math.inf)}, 1.0)
    assert unbounded.in_flight_limit is None and "in flight 0 (" in _screen(unbounded)
