"""``/metrics``: the engine's figures (``flowbatch.prometheus``) plus the gate's.

The HTTP layer adds only what the engine cannot see: requests turned away
at admission, and the places taken in each pipeline's gate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowbatch.prometheus import CONTENT_TYPE, render

if TYPE_CHECKING:
    from flowbatch.runner import Runner

    from .service import Service

__all__ = ["CONTENT_TYPE", "render_metrics"]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(service: Service) -> bytes:
    """The Prometheus text exposition for the service."""
    runners: dict[str, Runner] = {
        name: ep.runner for name, ep in service.endpoints.items() if ep.runner is not None
    }
    lines = [
        "# HELP flowbatch_http_rejected_total Requests answered 503 at admission: the pipeline was at capacity.",
        "# TYPE flowbatch_http_rejected_total counter",
    ]
    eps = service.endpoints.items()
    lines += [f'flowbatch_http_rejected_total{{pipeline="{_label(n)}"}} {ep.gate.rejected}' for n, ep in eps]
    lines += [
        "# HELP flowbatch_http_admitted_items Items admitted by the HTTP service and not finished.",
        "# TYPE flowbatch_http_admitted_items gauge",
    ]
    lines += [f'flowbatch_http_admitted_items{{pipeline="{_label(n)}"}} {ep.gate.used}' for n, ep in eps]
    lines += [
        "# HELP flowbatch_http_admission_capacity The most items admitted at once (max_in_flight).",
        "# TYPE flowbatch_http_admission_capacity gauge",
    ]
    lines += [
        f'flowbatch_http_admission_capacity{{pipeline="{_label(n)}"}} {ep.gate.capacity}'
        for n, ep in eps
    ]
    lines += [
        "# HELP flowbatch_http_jobs_pending Jobs accepted and not finished.",
        "# TYPE flowbatch_http_jobs_pending gauge",
        f"flowbatch_http_jobs_pending {service.jobs.pending}",
        "# HELP flowbatch_http_ready Whether the service is ready (1) or not (0).",
        "# TYPE flowbatch_http_ready gauge",
        f"flowbatch_http_ready {int(service.ready)}",
        "",
    ]
    return render(runners) + "\n".join(lines).encode()
