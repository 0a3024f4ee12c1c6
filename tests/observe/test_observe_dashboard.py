"""The /dashboard page and its JSON figures, mounted in a Starlette app."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from observehelpers import chromium, dump_dom, live_server
from starlette.applications import Starlette
from starlette.routing import Mount

import flowbatch as fb
from flowbatch.observe.dashboard import dashboard_routes


async def prep(x: int) -> int:
    return x


def embed(xs: list[int]) -> list[Any]:
    return [ValueError("no") if x == 3 else x for x in xs]


def test_dashboard_page_and_figures_under_a_prefix() -> None:
    pipe = fb.Pipeline(
        [fb.stage(prep), fb.stage(embed, batch=fb.Batch(max_size=16))], name="p"
    )

    async def main() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with pipe.open() as runner:
            [y async for y in runner.map(range(10), return_exceptions=True)]
            app = Starlette(routes=[
                *dashboard_routes(lambda: {"main": runner}),
                Mount("/admin", routes=dashboard_routes(dict, "/board/")),
            ])
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                page = await client.get("/dashboard")
                stats = await client.get("/dashboard/stats")
                empty = await client.get("/admin/board/stats")
                assert (await client.get("/admin/board")).status_code == 200
                return page, stats, empty

    page, stats, empty = asyncio.run(main())
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "FB.live(" in html and '"dashboard/stats"' in html  # relative: works under a prefix
    assert not re.search(r"(src|href)\s*=|@import|url\(|https?:", html)  # nothing external

    assert stats.status_code == 200 and stats.headers["cache-control"] == "no-store"
    data = stats.json()
    assert isinstance(data["t"], float)
    p = data["pipelines"]["main"]
    assert (p["completed"], p["failed"]) == (9, 1)
    assert [s["name"] for s in p["stages"]] == ["prep", "embed"]
    assert p["stages"][1]["batch_max_size"] == 16
    assert p["latency"]["buckets"][-1] == [None, 9]  # +Inf as null
    assert any("failed 1 item" in a for a in p["advice"])
    assert empty.json()["pipelines"] == {}


@pytest.mark.skipif(chromium() is None, reason="needs chromium")
def test_dashboard_draws_live_charts_in_a_browser() -> None:
    browser = chromium()
    assert browser is not None
    with live_server("--dashboard") as port:
        dom = dump_dom(browser, f"http://127.0.0.1:{port}/dashboard", 5000)
    assert "pipeline demo" in dom and "pipeline second" in dom
    assert dom.count('class="chart"') >= 10
    assert "Utilization per stage (last 1 s)" in dom
    assert "embed ◀ bottleneck" in dom
