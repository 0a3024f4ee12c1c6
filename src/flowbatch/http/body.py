"""Reading request bodies within the size limit, and the shape of a request."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.types import Receive

from .errors import ClientGone, bad_request, too_large

__all__ = ["parse_inputs", "read_body", "receive_body", "route_path"]


def route_path(scope: Any) -> str:
    """The path inside this app, without the prefix it is mounted at."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or 413 as soon as it is known to exceed ``limit`` bytes."""
    return await receive_body(request.receive, request.headers.get("content-length"), limit)


async def receive_body(receive: Receive, length: str | None, limit: int) -> bytes:
    """Read an ASGI request body (``Content-Length`` header value: ``length``).

    413 before reading when ``length`` says the body is too large, or as soon
    as what arrives is; :class:`ClientGone` if the client disconnects.
    """
    if length is not None:
        if not (length.isascii() and length.isdigit()):  # isdigit alone takes "²"
            raise bad_request(f"Content-Length must be a whole number, got {length!r}")
        if int(length) > limit:
            raise too_large(f"the body is {int(length)} bytes; this server takes at most {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(f"the body is over {limit} bytes, the most this server takes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def parse_inputs(doc: Any) -> tuple[bool, list[Any]]:
    """``{"input": x}`` -> ``(True, [x])``; ``{"inputs": [...]}`` -> ``(False, [...])``."""
    if not isinstance(doc, dict):
        raise bad_request(
            f"the body must be an object with \"input\" or \"inputs\", got {_kind(doc)}"
        )
    if len(doc) == 1 and "input" in doc:  # the common case, checked first
        return True, [doc["input"]]
    extra = sorted(str(k) for k in doc if k not in ("input", "inputs"))
    if extra:
        raise bad_request(
            f"unknown field(s) {', '.join(map(repr, extra))}; "
            "send {\"input\": x} or {\"inputs\": [x, ...]}"
        )
    if "input" in doc:
        if "inputs" in doc:
            raise bad_request("send either \"input\" or \"inputs\", not both")
        return True, [doc["input"]]
    if "inputs" not in doc:
        raise bad_request(
            "missing field \"input\" (one item) or \"inputs\" (a list of items)", param="input"
        )
    inputs = doc["inputs"]
    if not isinstance(inputs, list):
        raise bad_request(f"\"inputs\" must be an array, got {_kind(inputs)}", param="inputs")
    return False, inputs
