"""The live ``/dashboard`` page for the HTTP service, and its JSON figures.

:func:`dashboard_routes` returns two Starlette routes to mount in the app:

- ``GET {path}``: a self-contained page (no external script or style) that
  polls the JSON route and draws, per pipeline, the same charts as the bench
  report: throughput and latency over time, per-stage utilization (over time
  and now), batch-size histograms, the bottleneck and advice;
- ``GET {path}/stats``: ``{"t": <server monotonic seconds>, "pipelines":
  {name: figures}}``, the figures since the runner opened
  (:meth:`flowbatch.PipelineStats.to_dict`) plus ``advice`` and ``recent``:
  throughput, latency, utilization and the bottleneck since the previous
  poll (:meth:`flowbatch.PipelineStats.since`; ``null`` on the first). The
  server keeps the last snapshot of each pipeline for this and no more
  history; the page keeps the timeline. Every figure is computed by
  :mod:`flowbatch.metrics`; the page only draws.

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

from .analysis import advise
from .page import finite, live_page

if TYPE_CHECKING:
    from flowbatch.metrics import PipelineStats
    from flowbatch.runner import Runner

__all__ = ["DEFAULT_INTERVAL_MS", "dashboard_routes", "snapshot"]

#: How often the page polls its JSON route.
DEFAULT_INTERVAL_MS = 1000


def recent(stats: PipelineStats, prev: PipelineStats | None) -> dict[str, Any] | None:
    """The figures since ``prev`` (the previous poll) as the page draws them."""
    if prev is None or prev.name != stats.name:
        return None
    w = stats.since(prev)
    dt = max(w.elapsed, 1e-9)
    return {
        "seconds": w.elapsed,
        "items_per_s": w.completed / dt,
        "errors_per_s": (w.failed + w.expired) / dt,
        "p50": w.latency.p50 if w.latency.count else None,
        "p99": w.latency.p99 if w.latency.count else None,
        "utilization": {s.name: s.utilization for s in w.stages},
        "bottleneck": w.bottleneck,
    }


def snapshot(
    runners: Mapping[str, Runner], previous: dict[str, PipelineStats] | None = None
) -> dict[str, Any]:
    """The JSON figures of every runner, as the stats route serves them.

    ``previous`` holds each pipeline's snapshot of the last call; it is read
    for the ``recent`` figures and replaced by this call's.
    """
    pipelines: dict[str, Any] = {}
    for name, runner in runners.items():
        stats = runner.stats()
        d = stats.to_dict()
        d["advice"] = advise(stats, runner.pipeline)
        if previous is not None:
            d["recent"] = recent(stats, previous.get(name))
            previous[name] = stats
        pipelines[name] = d
    if previous is not None:
        for gone in previous.keys() - runners.keys():
            del previous[gone]
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

    previous: dict[str, PipelineStats] = {}  # this route's last snapshot, for "recent"

    async def stats(_: Request) -> Response:
        body = json.dumps(
            snapshot(get_runners(), previous), separators=(",", ":"), allow_nan=False
        )
        return Response(
            body, media_type="application/json", headers={"Cache-Control": "no-store"}
        )

    return [
        Route(path, dashboard, methods=["GET"], name="flowbatch_dashboard"),
        Route(stats_path, stats, methods=["GET"], name="flowbatch_dashboard_stats"),
    ]
