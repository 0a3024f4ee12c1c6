"""``create_app``: one ASGI application that serves pipelines over HTTP.

It composes a router (native, jobs, stream, OIP v2 and OpenAI routes), a
pure-ASGI API-key check, the hot route's fast path as the innermost
middleware (so every middleware, a user's too, sees every request), and
error handlers that answer every failure in the calling protocol's shape,
with no stack trace. The service's lifespan
opens the pipelines and drains them on the way out.

Usage::

    from flowbatch.http import create_app
    app = create_app({"embed": embed_pipeline, "tag": tag_pipeline})
    # uvicorn module:app, or mount it in a FastAPI/Starlette app:
    host = FastAPI(lifespan=app.lifespan); host.mount("/ml", app)
"""

from __future__ import annotations

import hmac
from collections.abc import Collection, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from flowbatch.observe.dashboard import dashboard_routes
from flowbatch.pipeline import Pipeline

from .body import route_path
from .codec import JSON, dump_json
from .config import ServeConfig
from .embeddings import EmbeddingRoutes, openai_error
from .errors import ApiError, ClientGone, Faults, internal_error
from .oip import OIPRoutes, Signature, oip_error
from .routes import InferEndpoint, NativeRoutes
from .service import Service
from .stores import JobStore
from .stream import StreamEndpoint

__all__ = ["HEALTH_PATHS", "FlowbatchApp", "create_app"]


#: Routes open without an API key (probes).
HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})


def render_error(path: str, err: ApiError) -> Response:
    """``err`` in the shape of the protocol that ``path`` belongs to."""
    if path.startswith("/v2"):
        return oip_error(err)
    if path.startswith("/v1/embeddings"):
        return openai_error(err)
    return Response(dump_json({"error": err.as_dict()}), err.status, err.headers, media_type=JSON)


def _authorization(scope: Scope) -> bytes:
    for key, value in scope["headers"]:
        if key == b"authorization":
            return bytes(value)
    return b""


def _key_matches(given: bytes, key: bytes) -> bool:
    # Scheme names are case-insensitive; the key is compared in constant time.
    return given[:7].lower() == b"bearer " and hmac.compare_digest(given[7:].strip(), key)


class ApiKeyMiddleware:
    """Requires ``Authorization: Bearer <key>`` on every route but the probes."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if path in HEALTH_PATHS:
            await self.app(scope, receive, send)
            return
        given = _authorization(scope)
        if _key_matches(given, self.key):
            await self.app(scope, receive, send)
            return
        message = (
            "this server needs an API key: send 'Authorization: Bearer <key>'"
            if not given else "the API key is not valid"
        )
        err = ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})
        await render_error(path, err)(scope, receive, send)


def _faults(request: Request) -> Faults:
    app = request.scope.get("app")  # this app: Starlette sets it, also when mounted
    return app.service.faults if isinstance(app, FlowbatchApp) else Faults(expose=False)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    err = _faults(request).conceal(exc, f"{request.method} {request.url.path}")
    return render_error(route_path(request.scope), err)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = route_path(request.scope)
    if exc.status_code == 404:
        message = f"no route {request.method} {path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {path}"
    else:
        message = str(exc.detail)
    err = ApiError(exc.status_code, "not_found" if exc.status_code == 404 else "http_error",
                   message, dict(exc.headers or {}))
    return render_error(path, err)


async def _client_gone(request: Request, exc: Exception) -> Response:
    # Nobody will read this; the server drops it. 499 as nginx logs it.
    return Response(status_code=499)


async def _internal(request: Request, exc: Exception) -> Response:
    # Logged under a request id here; Starlette re-raises after this answer,
    # so the server logs the traceback once more.
    err = _faults(request).conceal(internal_error(exc), f"{request.method} {request.url.path}")
    return render_error(route_path(request.scope), err)


_INFER_PREFIX = "/v1/pipelines/"


class FlowbatchApp(Starlette):
    """The ASGI app ``create_app`` returns; ``service`` is what it serves.

    ``lifespan`` opens the pipelines: uvicorn runs it for this app; a host
    application that mounts this one passes it as its own lifespan.
    """

    service: Service

    def lifespan(self, app: object = None) -> AbstractAsyncContextManager[None]:
        """The service's lifespan, for a host app: ``Starlette(lifespan=app.lifespan)``."""
        return self.service.lifespan(app)


class InferFastPath:
    """The innermost middleware: ``POST /v1/pipelines/{name}`` straight to its handler.

    It sits inside every other middleware (the API-key check and whatever
    the user adds with ``app.add_middleware``), so they all see this route
    too; only Starlette's router and request objects are skipped (see
    :class:`InferEndpoint` for what that saves). Every other request goes on
    to the router.
    """

    def __init__(self, app: ASGIApp, infer: InferEndpoint) -> None:
        self.app = app
        self.infer = infer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = route_path(scope)
            if path.startswith(_INFER_PREFIX):
                name = path[len(_INFER_PREFIX):]
                if name and "/" not in name:
                    await self.infer.serve(name, scope, receive, send)
                    return
        await self.app(scope, receive, send)


def create_app(
    pipelines: Pipeline | Mapping[str, Pipeline],
    *,
    config: ServeConfig | None = None,
    job_store: JobStore | None = None,
    signatures: Mapping[str, Signature] | None = None,
    embedding_models: Collection[str] | None = None,
) -> FlowbatchApp:
    """An ASGI app serving one pipeline (at its name) or a dict of named ones.

    - ``config``: limits, API key, timeouts (:class:`ServeConfig`).
    - ``job_store``: where async jobs live; in memory by default,
      ``SQLiteJobStore(path)`` to survive a restart.
    - ``signatures``: the tensors ``GET /v2/models/{name}`` reports, per pipeline.
    - ``embedding_models``: the pipelines ``/v1/embeddings`` serves (others
      are "not found" there); ``None``: any pipeline, checked per answer.
    """
    cfg = config if config is not None else ServeConfig()
    service = Service(pipelines, cfg, job_store)
    if embedding_models is not None:
        unknown = sorted(set(embedding_models) - set(service.endpoints))
        if unknown:
            raise ValueError(f"embedding_models {unknown} are not among the pipelines served")
        service.embedding_models = frozenset(embedding_models)
    native = NativeRoutes(service)
    routes: list[Any] = [
        *native.routes(),
        Route("/v1/pipelines/{name}/stream", StreamEndpoint(service), methods=["POST"],
              name="stream"),
        *EmbeddingRoutes(service).routes(),
        *OIPRoutes(service, dict(signatures or {})).routes(),
        # The live dashboard (same charts as `flowbatch bench`'s report).
        *dashboard_routes(service.open_runners),
    ]
    # add_middleware puts a user's middleware outside these: it sees every request.
    middleware = [Middleware(ApiKeyMiddleware, api_key=cfg.api_key)] if cfg.api_key else []
    middleware.append(Middleware(InferFastPath, infer=native.infer_endpoint))
    app = FlowbatchApp(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_exception,
            ClientGone: _client_gone,
            Exception: _internal,
        },
        lifespan=service.lifespan,
    )
    app.service = service
    return app
