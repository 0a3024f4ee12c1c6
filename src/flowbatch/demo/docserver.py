"""A local HTTP document server and client for the demo, standing in for cloud storage.

The server answers ``GET /docs/{i}`` with a plain-text document made of
sentences shipped in this package, after a random 5-50 ms delay. It speaks
just enough HTTP/1.1 (keep-alive, Content-Length bodies) for the demo's own
client and for ``urllib``; it is not a general web server.

Usage::

    async with DocServer(docs=100) as base_url:
        async with DocClient(base_url) as client:
            text = await client.get_text("/docs/7")
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from functools import cache
from importlib import resources
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_LATENCY",
    "DocClient",
    "DocServer",
    "HTTPError",
    "demo_sentences",
    "make_document",
]

#: Seconds of delay per response, drawn uniformly: cloud storage latency.
DEFAULT_LATENCY = (0.005, 0.050)
_MAX_HEADER_BYTES = 16 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


@cache
def demo_sentences() -> tuple[str, ...]:
    """The sentences shipped with the package that documents are built from."""
    text = resources.files(__package__).joinpath("sentences.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def make_document(doc_id: int, seed: int = 0) -> str:
    """Document ``doc_id``: 4-16 sentences, the same for the same id and seed."""
    rng = random.Random(seed * 1_000_003 + doc_id)
    sentences = demo_sentences()
    return " ".join(rng.choice(sentences) for _ in range(rng.randint(4, 16)))


class HTTPError(Exception):
    """The document server answered with a status other than 200."""

    def __init__(self, status: int, path: str) -> None:
        super().__init__(f"GET {path} answered HTTP {status}")
        self.status = status
        self.path = path


class DocServer:
    """Serves ``docs`` generated documents on 127.0.0.1, on a free port.

    An async context manager; entering starts the server and gives its base
    URL (``http://127.0.0.1:PORT``), leaving closes the listener and every
    open connection.

    Args:
        docs: documents ``/docs/0`` .. ``/docs/{docs-1}`` exist; others are 404.
        latency: (low, high) seconds of random delay before each response.
        seed: changes the documents' content and the delay sequence.
    """

    def __init__(
        self,
        docs: int,
        *,
        latency: tuple[float, float] = DEFAULT_LATENCY,
        seed: int = 0,
    ) -> None:
        if docs < 0:
            raise ValueError(f"docs must be >= 0, got {docs}")
        low, high = latency
        if not 0 <= low <= high:
            raise ValueError(f"latency must be (low, high) with 0 <= low <= high, got {latency}")
        self.docs = docs
        self.latency = latency
        self.seed = seed
        self.requests = 0
        self.connections = 0
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._url: str | None = None

    @property
    def url(self) -> str:
        """The base URL; only while the server runs."""
        if self._url is None:
            raise RuntimeError("DocServer is not running: use `async with DocServer(...)`")
        return self._url

    def document(self, doc_id: int) -> str:
        """The body served at ``/docs/{doc_id}``."""
        return make_document(doc_id, self.seed)

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self._url = f"http://127.0.0.1:{port}"
        return self._url

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        server, self._server, self._url = self._server, None, None
        if server is None:
            return
        server.close()
        # Python 3.11's wait_closed() does not wait for open connections.
        # Closing their transports ends each handler at its next read (a
        # request in progress is still answered); cancelling the handler
        # tasks instead makes asyncio 3.11 log a spurious CancelledError.
        for writer in self._connections.values():
            writer.close()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        self.connections += 1
        try:
            while not writer.is_closing() and await self._serve_one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away mid-request
        finally:
            del self._connections[task]
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; return whether the connection stays open."""
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > _MAX_HEADER_BYTES:
            await self._respond(writer, 400, b"request head too large\n", keep_alive=False)
            return False
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._respond(writer, 400, b"malformed request line\n", keep_alive=False)
            return False
        method, target, version = parts
        if int(headers.get("content-length", "0") or "0") > 0:
            await reader.readexactly(int(headers["content-length"]))
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
        self.requests += 1
        await asyncio.sleep(self._rng.uniform(*self.latency))
        if method not in ("GET", "HEAD"):
            await self._respond(writer, 405, b"only GET\n", keep_alive=keep_alive)
            return keep_alive
        status, body = self._route(urlsplit(target).path)
        await self._respond(
            writer, status, body, keep_alive=keep_alive, include_body=method == "GET"
        )
        return keep_alive

    def _route(self, path: str) -> tuple[int, bytes]:
        prefix, _, tail = path.rpartition("/")
        if prefix == "/docs" and tail.isdigit() and int(tail) < self.docs:
            return 200, self.document(int(tail)).encode("utf-8")
        return 404, f"no document at {path}\n".encode()

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        *,
        keep_alive: bool,
        include_body: bool = True,
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        )
        if writer.is_closing():
            return  # the server is shutting down
        writer.write(head.encode("latin-1") + (body if include_body else b""))
        await writer.drain()


class DocClient:
    """A small keep-alive HTTP/1.1 GET client for :class:`DocServer`.

    Up to ``max_connections`` requests run at once, each on its own
    connection; idle connections are reused. A request on a reused
    connection that the server has closed is retried once on a new one.
    """

    def __init__(self, base_url: str, *, max_connections: int = 64, timeout: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"DocClient needs an http:// URL, got {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.timeout = timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every idle connection; later requests fail."""
        self._closed = True
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        for _, writer in idle:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def get_text(self, path: str) -> str:
        """GET ``path``; the body as text. Raises :class:`HTTPError` unless 200."""
        status, body = await self.get(path)
        if status != 200:
            raise HTTPError(status, path)
        return body.decode("utf-8")

    async def get(self, path: str) -> tuple[int, bytes]:
        """GET ``path``; the status and the body."""
        if self._closed:
            raise RuntimeError("DocClient is closed")
        async with self._slots:
            async with asyncio.timeout(self.timeout):
                while self._idle:
                    conn = self._idle.pop()
                    try:
                        return await self._exchange(conn, path)
                    except (ConnectionError, asyncio.IncompleteReadError):
                        continue  # a stale keep-alive connection: try the next
                conn = await asyncio.open_connection(self.host, self.port)
                return await self._exchange(conn, path)

    async def _exchange(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], path: str
    ) -> tuple[int, bytes]:
        reader, writer = conn
        reuse = False
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode("latin-1")
            )
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            headers = {}
            for line in header_lines:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            reuse = headers.get("connection", "").lower() != "close"
            return status, body
        finally:
            if reuse and not self._closed:
                self._idle.append(conn)
            else:
                writer.close()
