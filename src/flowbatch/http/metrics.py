"""``/metrics``: the engine's figures (``flowbatch.prometheus``) plus the service's.

Admission is the runner's in-flight limiter; the engine exports the items it
refused (``flowbatch_pipeline_rejected_total``). The HTTP layer adds the
requests it answered 503 (one per refused acquisition of the limiter: a
request's items are admitted together), the places taken and the limit,
under the names they had when the service kept a gate of its own. Its series are
prometheus_client metric families written by the same writer as the
engine's (:func:`flowbatch.prometheus.render`), so escaping is done once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from flowbatch.prometheus import CONTENT_TYPE, render

if TYPE_CHECKING:
    from flowbatch.runner import Runner

    from .service import Service

__all__ = ["CONTENT_TYPE", "ServiceCollector", "render_metrics"]


class ServiceCollector:
    """The HTTP service's own series, as a prometheus_client collector."""

    def __init__(self, service: Service) -> None:
        self._service = service

    def describe(self) -> list[Metric]:
        return []  # the series depend on the pipelines served: describe nothing up front

    def collect(self) -> Iterator[Metric]:
        service = self._service
        rejected = CounterMetricFamily(
            "flowbatch_http_rejected",
            "Requests answered 503 at admission: the pipeline was at capacity.",
            labels=["pipeline"],
        )
        admitted = GaugeMetricFamily(
            "flowbatch_http_admitted_items",
            "Items admitted by the HTTP service and not finished.",
            labels=["pipeline"],
        )
        capacity = GaugeMetricFamily(
            "flowbatch_http_admission_capacity",
            "The most items admitted at once now (max_in_flight, or the limit a latency "
            "target keeps).",
            labels=["pipeline"],
        )
        for name, ep in service.endpoints.items():
            limiter = ep.limiter
            rejected.add_metric([name], limiter.rejected if limiter is not None else 0)
            admitted.add_metric([name], limiter.borrowed if limiter is not None else 0)
            total = limiter.total if limiter is not None else ep.capacity
            capacity.add_metric([name], total if total != math.inf else ep.capacity)
        yield rejected
        yield admitted
        yield capacity
        yield GaugeMetricFamily(
            "flowbatch_http_jobs_pending", "Jobs accepted and not finished.",
            value=service.jobs.pending,
        )
        yield GaugeMetricFamily(
            "flowbatch_http_ready", "Whether the service is ready (1) or not (0).",
            value=int(service.ready),
        )


def render_metrics(service: Service) -> bytes:
    """The Prometheus text exposition for the service."""
    runners: dict[str, Runner] = {
        name: ep.runner for name, ep in service.endpoints.items() if ep.runner is not None
    }
    return render(runners, ServiceCollector(service))
