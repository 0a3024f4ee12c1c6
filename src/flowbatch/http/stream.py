"""``POST /v1/pipelines/{name}/stream``: NDJSON in, NDJSON out, as results complete.

Each non-blank input line is one JSON value, one item. Each answer line is
``{"index": i, "output": y}`` or ``{"index": i, "error": {...}}``, where ``i``
counts the input's non-blank lines from 0; lines come out in the order the
results complete. A line that is not JSON, or longer than the body limit,
gets an error line of its own and the stream goes on.

Backpressure: at most ``stream_window`` lines are read and not yet answered,
and items wait in line for a place in the runner's in-flight limiter
(``runner.admit_many``; a stream is never answered 503 for one item). A client that stops reading the answers stops the
reading of its input; a client that disconnects has its items cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson
from starlette.datastructures import Headers

from flowbatch.errors import FlowbatchError

from .codec import NDJSON, Unencodable, dump_json, loads_json
from .errors import ApiError, bad_request, from_engine, is_fault, new_request_id
from .service import outcome, parse_timeout

if TYPE_CHECKING:
    from starlette.types import Message, Receive, Scope, Send

    from flowbatch.runner import Runner

    from .service import Endpoint, Service

__all__ = ["StreamEndpoint"]

log = logging.getLogger("flowbatch.http")

_NDJSON_TYPES = (
    "application/x-ndjson", "application/ndjson", "application/jsonl",
    "application/jsonlines", "application/json-lines", "application/json", "text/plain",
)


class StreamEndpoint:
    """The stream route, as a plain ASGI app bound to one service."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = self.service
        ep = service.endpoint(scope["path_params"]["name"])
        headers = Headers(scope=scope)
        ctype = headers.get("content-type")
        if ctype and ctype.split(";", 1)[0].strip().lower() not in _NDJSON_TYPES:
            raise ApiError(
                415, "unsupported_media_type",
                f"Content-Type {ctype!r} is not supported here; send {NDJSON}, one JSON value a line",
            )
        timeout = parse_timeout(headers.get("x-request-timeout"), service.config.default_timeout)
        runner = service.runner_of(ep)
        stream = _Stream(service, ep, runner, timeout)
        await stream.serve(receive, send)


def _error_line(index: int, err: ApiError) -> bytes:
    return dump_json({"index": index, "error": err.as_dict()}) + b"\n"


class _Stream:
    """One stream's state: the reader feeds items in, the writer sends lines out."""

    def __init__(self, service: Service, ep: Endpoint, runner: Runner, timeout: float | None) -> None:
        self.service = service
        self.ep = ep
        self.runner = runner
        self.timeout = timeout
        self.limit = service.config.max_body_bytes
        self.window = asyncio.Semaphore(service.config.stream_window)
        self.out: deque[bytes] = deque()
        self.wake = asyncio.Event()
        self.pending: set[asyncio.Future[Any]] = set()
        self.index = 0
        self.input_done = False
        self.gone = False
        self.request_id: str | None = None  # one for every fault of this stream

    async def serve(self, receive: Receive, send: Send) -> None:
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", NDJSON.encode()), (b"cache-control", b"no-store")],
        })
        try:
            async with asyncio.TaskGroup() as tg:
                reader = tg.create_task(self._read(receive))
                try:
                    await self._write(send)
                finally:
                    reader.cancel()
        finally:
            for fut in self.pending:
                fut.cancel()
        if not self.gone:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    # ---------------------------------------------------------------- out

    def _emit(self, line: bytes) -> None:
        self.out.append(line)
        self.wake.set()

    def _emit_error(self, index: int, err: ApiError) -> None:
        if is_fault(err.status):
            self.request_id = self.request_id or new_request_id()
            err = self.service.faults.conceal(
                err, f"stream of pipeline {self.ep.name!r}, line {index}", self.request_id
            )
        self._emit(_error_line(index, err))

    def _done(self, index: int, fut: asyncio.Future[Any]) -> None:
        self.pending.discard(fut)
        if self.gone:
            return
        value, exc = outcome(fut)
        if exc is not None:
            self._emit_error(index, from_engine(exc, self.service.config.retry_after))
            return
        try:
            line = dump_json({"index": index, "output": value}) + b"\n"
        except Unencodable as exc:
            err = ApiError(
                500, "unencodable_output",
                f"pipeline {self.ep.name!r} returned a value that cannot be sent as JSON: {exc}",
            )
            err.__cause__ = exc
            self._emit_error(index, err)
            return
        self._emit(line)

    async def _write(self, send: Send) -> None:
        while True:
            if self.out:
                n = len(self.out)
                chunk = b"".join(self.out)
                self.out.clear()
                try:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except OSError:
                    self.gone = True
                    return
                for _ in range(n):
                    self.window.release()
                continue
            if self.gone or (self.input_done and not self.pending):
                return
            self.wake.clear()
            await self.wake.wait()

    # ----------------------------------------------------------------- in

    async def _read(self, receive: Receive) -> None:
        buf = bytearray()
        skipping = False  # inside a line that is over the limit
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                for fut in list(self.pending):
                    fut.cancel()
                self.wake.set()
                return
            if self.input_done:
                continue
            buf += message.get("body", b"")
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    break
                line = bytes(buf[:nl])
                del buf[:nl + 1]
                if skipping:
                    skipping = False
                    continue
                await self._line(line)
            if len(buf) > self.limit:
                if not skipping:
                    await self._reject(too_long(self.limit))
                skipping = True
                buf.clear()
            if not message.get("more_body", False):
                if buf and not skipping:
                    await self._line(bytes(buf))
                buf.clear()
                self.input_done = True
                self.wake.set()

    async def _reject(self, err: ApiError) -> None:
        await self.window.acquire()
        index = self.index
        self.index += 1
        self._emit(_error_line(index, err))

    async def _line(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        if len(line) > self.limit:
            await self._reject(too_long(self.limit))
            return
        try:
            value = loads_json(line, "the line")
        except orjson.JSONDecodeError as exc:
            await self._reject(bad_request(f"the line is not valid JSON: {exc}"))
            return
        except ApiError as err:
            await self._reject(err)
            return
        await self.window.acquire()
        index = self.index
        self.index += 1
        try:
            (fut,) = await self.runner.admit_many([value], self.timeout)
        except FlowbatchError as exc:
            self._emit_error(index, from_engine(exc, self.service.config.retry_after))
            return
        self.pending.add(fut)
        fut.add_done_callback(lambda f: self._done(index, f))


def too_long(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"the line is over {limit} bytes, the most this server takes")
