"""The native routes: inference, jobs, health, readiness, metrics, schema.

- ``POST /v1/pipelines/{name}``: ``{"input": x}`` -> ``{"output": y}``;
  ``{"inputs": [...]}`` -> ``{"outputs": [...], "errors": [...]}``.
- ``POST /v1/pipelines/{name}/jobs`` -> 202 and a status URL;
  ``GET`` / ``DELETE /v1/jobs/{id}``.
- ``/healthz``, ``/readyz``, ``/metrics``, ``/openapi.json``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .body import parse_inputs, receive_body
from .codec import JSON, JSON_CODEC, Codec, Unencodable, decode_body, dump_json, pick_codec
from .errors import ApiError, ClientGone, from_engine, internal_error, not_found
from .jobs import job_document
from .openapi import openapi_schema
from .service import outcome, parse_timeout, result_document

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from starlette.types import Receive, Scope, Send

    from .service import Endpoint, Service
    from .stores import Job

__all__ = ["InferEndpoint", "NativeRoutes"]


def encode(codec: Codec, doc: Any, ep: Endpoint | None = None) -> bytes:
    """Encode an answer; a value the pipeline made that cannot be sent is a 500."""
    try:
        return codec.dump(doc)
    except Unencodable as exc:
        where = f"pipeline {ep.name!r}" if ep is not None else "the server"
        raise ApiError(
            500, "unencodable_output",
            f"{where} returned a value that cannot be sent as {codec.media_type}: {exc}",
        ) from exc


def scope_headers(scope: Scope) -> dict[bytes, bytes]:
    """An ASGI request's headers by (lower-case) name; the first of repeated ones."""
    headers: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name, value)
    return headers


class InferEndpoint:
    """``POST /v1/pipelines/{name}`` as a bare ASGI app: the service's hot route.

    It reads the request straight from the ASGI scope and answers with two
    ``send`` calls, without Starlette's router or its request and response
    objects: the innermost middleware (``InferFastPath`` in ``app.py``,
    inside the API-key check and every middleware a user adds) calls
    :meth:`serve` directly for this route, which cuts the server's own CPU
    per request by about a quarter (0.47 to 0.36 ms, measured under
    ``benchmarks/serving.py``'s load);
    that CPU is taken from the model on a small machine. It answers its
    errors itself, in the native routes' shape, so it behaves the same when
    reached through the router.
    """

    def __init__(self, routes: NativeRoutes) -> None:
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.serve(scope["path_params"]["name"], scope, receive, send)

    async def serve(self, name: str, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a request for pipeline ``name``."""
        raw = scope_headers(scope)

        def header(key: str) -> str | None:
            value = raw.get(key.encode())
            return None if value is None else value.decode("latin-1")

        extra: dict[str, str] = {}
        try:
            status, body, media = await self.routes.infer(name, header, receive)
        except ClientGone:
            return  # nobody is left to answer
        except Exception as exc:
            err = exc if isinstance(exc, ApiError) else internal_error(exc)
            err = self.routes.service.faults.conceal(err, f"POST {scope['path']}")
            status, body, media = err.status, dump_json({"error": err.as_dict()}), JSON
            extra = err.headers
        headers = [(b"content-type", media.encode()), (b"content-length", b"%d" % len(body))]
        headers.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items())
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class NativeRoutes:
    """Handlers of the native routes, bound to one service."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.infer_endpoint = InferEndpoint(self)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/pipelines/{name}", self.infer_endpoint, methods=["POST"], name="infer"),
            Route("/v1/pipelines/{name}/jobs", self.create_job, methods=["POST"],
                  name="create_job"),
            Route("/v1/jobs/{job_id}", self.get_job, methods=["GET"], name="job"),
            Route("/v1/jobs/{job_id}", self.cancel_job, methods=["DELETE"], name="cancel_job"),
            Route("/healthz", self.healthz, methods=["GET"], name="healthz"),
            Route("/readyz", self.readyz, methods=["GET"], name="readyz"),
            Route("/metrics", self.metrics, methods=["GET"], name="metrics"),
            Route("/openapi.json", self.openapi, methods=["GET"], name="openapi"),
        ]

    async def _read(
        self, name: str, header: Callable[[str], str | None], receive: Receive
    ) -> tuple[Endpoint, Codec, float | None, bool, list[Any]]:
        """Everything a request for a pipeline says, checked (4xx when it is wrong)."""
        service = self.service
        ep = service.endpoint(name)
        codec = pick_codec(header("content-type"), header("accept"))
        timeout = parse_timeout(header("x-request-timeout"), service.config.default_timeout)
        body = await receive_body(receive, header("content-length"), service.config.max_body_bytes)
        single, values = parse_inputs(decode_body(body, codec.msgpack_in))
        service.check_count(ep, len(values))
        return ep, codec, timeout, single, values

    async def infer(
        self, name: str, header: Callable[[str], str | None], receive: Receive
    ) -> tuple[int, bytes, str]:
        """The status, body and media type answering one inference request."""
        service = self.service
        ep, codec, timeout, single, values = await self._read(name, header, receive)
        if not values:
            return 200, encode(codec, {"outputs": []}), codec.media_type
        futs = service.admit(ep, values, timeout)
        await service.wait(futs, receive)
        if single:
            value, exc = outcome(futs[0])
            if exc is not None:
                raise from_engine(exc, service.config.retry_after)
            return 200, encode(codec, {"output": value}, ep), codec.media_type
        status, doc = result_document(
            futs, single, service.config.retry_after, faults=service.faults,
            where=f"pipeline {name!r}",
        )
        if status != 200:  # every input failed: an error answer, and errors are JSON
            return status, encode(JSON_CODEC, doc, ep), JSON
        return 200, encode(codec, doc, ep), codec.media_type

    async def create_job(self, request: Request) -> Response:
        ep, codec, timeout, single, values = await self._read(
            request.path_params["name"], request.headers.get, request.receive
        )
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
