"""The live ``/dashboard`` page for the HTTP service, and its JSON figures.

:func:`dashboard_routes` returns two Starlette routes to mount in the app:

- ``GET {path}``: a self-contained page (no external script or style) that
  polls the JSON route and draws, per pipeline, the same charts as the bench
  report: throughput and latency over time, per-stage utilization (over time
  and now), batch-size histograms, the bottleneck and advice;
- ``GET {path}/stats``: ``{"t": <server monotonic seconds>, "pipelines":
  {name: figures}}``, the figures of :func:`flowbatch.observe.analysis.stats_dict`
  plus ``advice``. Counters are cumulative; the page computes rates from the
  difference between polls, so the server keeps no history.

Usage::

    from flowbatch.observe.dashboard import dashboard_routes
    app = Starlette(routes=[*api_routes, *dashboard_routes(lambda: service.runners)])
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from .analysis import advise, stats_dict
from .page import finite, live_page

if TYPE_CHECKING:
    from flowbatch.runner import Runner

__all__ = ["DEFAULT_INTERVAL_MS", "dashboard_routes", "snapshot"]

#: How often the page polls its JSON route.
DEFAULT_INTERVAL_MS = 1000


def snapshot(runners: Mapping[str, Runner]) -> dict[str, Any]:
    """The JSON figures of every runner, as the stats route serves them."""
    pipelines: dict[str, Any] = {}
    for name, runner in runners.items():
        stats = runner.stats()
        d = stats_dict(stats, runner.pipeline)
        d["advice"] = advise(stats, runner.pipeline)
        pipelines[name] = d
    return finite({"t": time.monotonic(), "pipelines": pipelines})  # type: ignore[no-any-return]


def dashboard_routes(
    get_runners: Callable[[], Mapping[str, Runner]],
    path: str = "/dashboard",
    *,
    interval_ms: int = DEFAULT_INTERVAL_MS,
) -> list[Route]:
    """The dashboard page at ``path`` and its figures at ``path + "/stats"``.

    ``get_runners`` is called on every request and returns the runners to
    show by name (the service's open runners).
    """
    path = "/" + path.strip("/")
    stats_path = path.rstrip("/") + "/stats"
    # Relative, so that the page still works when the app is mounted under a prefix.
    last = path.rsplit("/", 1)[1]
    page = live_page(f"{last}/stats" if last else "stats", interval_ms)

    async def dashboard(_: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def stats(_: Request) -> Response:
        body = json.dumps(snapshot(get_runners()), separators=(",", ":"), allow_nan=False)
        return Response(
            body, media_type="application/json", headers={"Cache-Control": "no-store"}
        )

    return [
        Route(path, dashboard, methods=["GET"], name="flowbatch_dashboard"),
        Route(stats_path, stats, methods=["GET"], name="flowbatch_dashboard_stats"),
    ]
