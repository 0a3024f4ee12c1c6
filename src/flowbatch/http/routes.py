"""The native routes: inference, jobs, health, readiness, metrics, schema.

- ``POST /v1/pipelines/{name}``: ``{"input": x}`` -> ``{"output": y}``;
  ``{"inputs": [...]}`` -> ``{"outputs": [...], "errors": [...]}``.
- ``POST /v1/pipelines/{name}/jobs`` -> 202 and a status URL;
  ``GET`` / ``DELETE /v1/jobs/{id}``.
- ``/healthz``, ``/readyz``, ``/metrics``, ``/openapi.json``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .body import parse_inputs, read_body
from .codec import JSON, JSON_CODEC, Codec, Unencodable, decode_body, dump_json, pick_codec
from .errors import ApiError, from_engine, not_found
from .jobs import job_document
from .openapi import openapi_schema
from .service import outcome, parse_timeout, result_document

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .service import Endpoint, Service
    from .stores import Job

__all__ = ["NativeRoutes"]

log = logging.getLogger("flowbatch.http")


def encode(codec: Codec, doc: Any, ep: Endpoint | None = None) -> bytes:
    """Encode an answer; a value the pipeline made that cannot be sent is a 500."""
    try:
        return codec.dump(doc)
    except Unencodable as exc:
        where = f"pipeline {ep.name!r}" if ep is not None else "the server"
        log.error(  # noqa: TRY400 - a value, not a bug here: no traceback
            "%s returned a value that cannot be encoded: %s", where, exc)
        raise ApiError(
            500, "unencodable_output",
            f"{where} returned a value that cannot be sent as {codec.media_type}: {exc}",
        ) from None


class NativeRoutes:
    """Handlers of the native routes, bound to one service."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def routes(self) -> list[Route]:
        return [
            Route("/v1/pipelines/{name}", self.infer, methods=["POST"], name="infer"),
            Route("/v1/pipelines/{name}/jobs", self.create_job, methods=["POST"],
                  name="create_job"),
            Route("/v1/jobs/{job_id}", self.get_job, methods=["GET"], name="job"),
            Route("/v1/jobs/{job_id}", self.cancel_job, methods=["DELETE"], name="cancel_job"),
            Route("/healthz", self.healthz, methods=["GET"], name="healthz"),
            Route("/readyz", self.readyz, methods=["GET"], name="readyz"),
            Route("/metrics", self.metrics, methods=["GET"], name="metrics"),
            Route("/openapi.json", self.openapi, methods=["GET"], name="openapi"),
        ]

    async def _read(self, request: Request) -> tuple[Endpoint, Codec, float | None, bool, list[Any]]:
        """Everything a request for a pipeline says, checked (4xx when it is wrong)."""
        service = self.service
        ep = service.endpoint(request.path_params["name"])
        headers = request.headers
        codec = pick_codec(headers.get("content-type"), headers.get("accept"))
        timeout = parse_timeout(headers.get("x-request-timeout"), service.config.default_timeout)
        body = await read_body(request, service.config.max_body_bytes)
        single, values = parse_inputs(decode_body(body, codec.msgpack_in))
        service.check_count(ep, len(values))
        return ep, codec, timeout, single, values

    async def infer(self, request: Request) -> Response:
        service = self.service
        ep, codec, timeout, single, values = await self._read(request)
        if not values:
            return Response(encode(codec, {"outputs": []}), media_type=codec.media_type)
        futs = service.admit(ep, values, timeout)
        await service.wait(futs, request.receive)
        if single:
            value, exc = outcome(futs[0])
            if exc is not None:
                raise from_engine(exc, service.config.retry_after)
            return Response(encode(codec, {"output": value}, ep), media_type=codec.media_type)
        status, doc = result_document(futs, single, service.config.retry_after)
        if status != 200:  # every input failed: an error answer, and errors are JSON
            return Response(encode(JSON_CODEC, doc, ep), status, media_type=JSON)
        return Response(encode(codec, doc, ep), media_type=codec.media_type)

    async def create_job(self, request: Request) -> Response:
        _, codec, timeout, single, values = await self._read(request)
        ep = self.service.endpoint(request.path_params["name"])
        job = await self.service.jobs.submit(ep, single, values, timeout)
        url = str(request.url_for("job", job_id=job.id))
        doc = {"id": job.id, "status": job.status, "status_url": url}
        return Response(encode(codec, doc), 202, {"Location": url}, media_type=codec.media_type)

    async def get_job(self, request: Request) -> Response:
        return await self._job_answer(request, self.service.jobs.get)

    async def cancel_job(self, request: Request) -> Response:
        return await self._job_answer(request, self.service.jobs.cancel)

    @staticmethod
    async def _job_answer(
        request: Request, action: Callable[[str], Awaitable[Job | None]]
    ) -> Response:
        """Run ``action`` on the job in the path; its document, or 404."""
        job_id = request.path_params["job_id"]
        job = await action(job_id)
        if job is None:
            raise not_found(f"no job {job_id!r}: it never existed, was deleted or has expired")
        codec = pick_codec(None, request.headers.get("accept"))
        doc = job_document(job, str(request.url_for("job", job_id=job.id)))
        return Response(encode(codec, doc), media_type=codec.media_type)

    async def healthz(self, request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)

    async def readyz(self, request: Request) -> Response:
        service = self.service
        doc = {
            "status": "ready" if service.ready else service.state,
            "pipelines": {name: ep.ready for name, ep in service.endpoints.items()},
        }
        headers = None if service.ready else {"Retry-After": str(service.config.retry_after)}
        return Response(dump_json(doc), 200 if service.ready else 503, headers, media_type=JSON)

    async def metrics(self, request: Request) -> Response:
        from .metrics import CONTENT_TYPE, render_metrics

        return Response(render_metrics(self.service), media_type=CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        schema = openapi_schema(self.service, request.scope.get("root_path", ""))
        return Response(dump_json(schema), media_type=JSON)
