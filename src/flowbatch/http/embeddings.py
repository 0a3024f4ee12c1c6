"""OpenAI-compatible ``POST /v1/embeddings`` for pipelines that produce vectors.

``model`` names the pipeline; ``input`` is a string or a list of strings
(each one item for the batcher). ``encoding_format`` ``"float"`` or
``"base64"`` (little-endian float32, what the ``openai`` client asks for).
Token-id inputs are refused: the pipeline takes text. ``usage`` counts
tokens when the pipeline's first stage can (a ``count_tokens(texts) ->
list[int]`` method, as ``SentenceEmbedder`` has; run in a thread while the
model works, so it adds no latency), else it reports 0. Errors have OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .body import read_body
from .codec import JSON, decode_json_object, dump_json
from .errors import ApiError, bad_request, from_engine
from .service import outcome, parse_timeout

if TYPE_CHECKING:
    from flowbatch.pipeline import Pipeline

    from .service import Service

log = logging.getLogger("flowbatch.http")

__all__ = ["EmbeddingRoutes", "openai_error"]

_KNOWN = {"input", "model", "encoding_format", "dimensions", "user"}


def openai_error(err: ApiError) -> Response:
    if err.status == 401:
        kind = "authentication_error"
    elif err.status < 500:
        kind = "invalid_request_error"
    else:
        kind = "server_error"
    code = "model_not_found" if err.code == "model_not_found" else err.code
    doc = {"error": {"message": err.message, "type": kind, "param": err.param, "code": code}}
    return Response(dump_json(doc), err.status, err.headers, media_type=JSON)


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        if not value:
            raise bad_request("'input' is an empty string", param="input")
        return [value]
    if not isinstance(value, list) or not value:
        raise bad_request("'input' must be a string or a non-empty array of strings", param="input")
    if all(isinstance(x, str) for x in value):
        if any(not x for x in value):
            raise bad_request("'input' holds an empty string", param="input")
        return value
    if all(isinstance(x, int | list) for x in value):
        raise bad_request(
            "token-id inputs are not supported by this server; send text", param="input"
        )
    raise bad_request("'input' must be a string or an array of strings", param="input")


def _vector(value: Any, model: str) -> np.ndarray[Any, np.dtype[np.float32]]:
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        arr = np.empty((0, 0), dtype=np.float32)
    if arr.ndim != 1 or arr.size == 0:
        raise ApiError(
            400, "not_an_embedding_model",
            f"model {model!r} does not produce embeddings (its output is {type(value).__name__})",
            param="model",
        )
    return arr


def _count_tokens(pipeline: Pipeline, texts: list[str]) -> asyncio.Future[list[int]] | None:
    """Start counting the texts' tokens in a thread, if the pipeline can."""
    counter = getattr(pipeline.stages[0].fn, "count_tokens", None)
    if not callable(counter):
        return None
    return asyncio.ensure_future(asyncio.to_thread(counter, texts))


async def _counted(counting: asyncio.Future[list[int]] | None, model: str) -> int:
    if counting is None:
        return 0
    try:
        return int(sum(await counting))
    except Exception:
        # Usage is a report, not the answer: the embeddings still go out.
        log.exception("counting the tokens of a request for %r failed; usage reports 0", model)
        return 0


class EmbeddingRoutes:
    """The ``/v1/embeddings`` handler, bound to one service."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def models(self) -> list[str]:
        allowed = self.service.embedding_models
        return sorted(self.service.endpoints if allowed is None else allowed)

    def routes(self) -> list[Route]:
        return [Route("/v1/embeddings", self.create, methods=["POST"], name="embeddings")]

    async def create(self, request: Request) -> Response:
        service = self.service
        timeout = parse_timeout(request.headers.get("x-request-timeout"), service.config.default_timeout)
        body = await read_body(request, service.config.max_body_bytes)
        doc = decode_json_object(
            body, 'send {"model": ..., "input": ...}', what="the request body"
        )
        unknown = sorted(str(k) for k in doc if k not in _KNOWN)
        if unknown:
            raise bad_request(f"unknown parameter(s): {', '.join(unknown)}", param=unknown[0])
        model = doc.get("model")
        if not isinstance(model, str) or not model:
            raise bad_request("'model' is required: the name of a pipeline", param="model")
        fmt = doc.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise bad_request("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        dims = doc.get("dimensions")
        if "dimensions" in doc and (
            not isinstance(dims, int) or isinstance(dims, bool) or dims < 1
        ):
            raise bad_request("'dimensions' must be an integer >= 1", param="dimensions")
        if "user" in doc and not isinstance(doc["user"], str):
            raise bad_request("'user' must be a string", param="user")
        texts = _texts(doc.get("input"))
        ep = service.endpoints.get(model)
        allowed = service.embedding_models
        if ep is None or (allowed is not None and model not in allowed):
            raise ApiError(
                404, "model_not_found",
                f"the model {model!r} does not exist; models: {self.models()}",
                param="model",
            )
        service.check_count(ep, len(texts))
        futs = service.admit(ep, texts, timeout)
        counting = _count_tokens(ep.pipeline, texts)
        try:
            await service.wait(futs, request.receive)
        except BaseException:
            if counting is not None:
                counting.cancel()
            raise
        data = []
        for i, fut in enumerate(futs):
            value, error = outcome(fut)
            if error is not None:
                err = from_engine(error, service.config.retry_after)
                err.message = f"input {i}: {err.message}"
                err.param = "input"
                raise err
            vec = _vector(value, model)
            if dims is not None and dims != vec.size:
                raise bad_request(
                    f"model {model!r} makes {vec.size}-dimensional embeddings; "
                    f"dimensions={dims} is not supported",
                    param="dimensions",
                )
            emb: Any = (
                base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
                if fmt == "base64" else vec
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = await _counted(counting, model)
        answer = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return Response(dump_json(answer), media_type=JSON)
