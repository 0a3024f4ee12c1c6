"""http: the embedding model served over HTTP by flowbatch and by three peers.

Servers, one at a time, each its own process, the same model
(all-MiniLM-L6-v2, ``SentenceEmbedder``) and the same parallelism (2
replicas x 1 torch thread; the naive server has one model with torch's
default threads, as the plain way gets):

- ``flowbatch``: ``flowbatch.http.run(create_app(pipeline))``, the embedder as
  a batched stage in 2 worker processes (``executor="process"``,
  ``Batch(max_size=64)``, ``concurrency=2``; like the peers, each replica has
  a process of its own, out of the event loop's GIL; set
  ``FLOWBATCH_BENCH_EXECUTOR=thread`` for threads), default admission.
- ``naive``: FastAPI + uvicorn, ``async def`` endpoint calling the model, no batching.
- ``litserve``: LitServe, ``max_batch_size=64``, ``batch_timeout=0.01``, 2 workers.
- ``mosec``: mosec, ``max_batch_size=64``, ``max_wait_time=10`` ms, 2 workers.

Load: one sentence per request from ``../shared/data/sentences.txt``; closed
loops at concurrency 1, 16 and 64 driven by wrk (one thread, keep-alive; a
lean asyncio client where wrk is missing or with ``--python-client``), then,
with the asyncio client, an open loop at 3x the offline limit
(requests start on a fixed schedule whatever the answers do). Figures:
requests/s, p50 and p99 of the 200s, the ratio to the model's offline
limit, and the status mix under overload.

The model alone (``_common.ProcessReplicas``: the same replicas x threads,
each replica in a process of its own, as the servers run them; no engine) is
the yardstick, and on a shared machine its speed drifts by tens of percent
within minutes, so it is measured around each server's phases: each run
first scans batch sizes 8-64 for the best one; then, per server, c1 runs in
windows of wrk, each followed by the model's batch-of-1 calls (c1's p50, the
windows' median, is compared with those calls' median), and the offline
limit at the best batch size is measured just before and just after the c64
phase (c64's requests/s is divided by their mean). The server is idle and
frozen (SIGSTOP) while the model is measured.

Peers need ``litserve`` and ``mosec``; give ``--peer-python`` a Python that
has them (and the main venv's packages, e.g. a venv with a ``.pth`` file
pointing at them). Missing peers are skipped and said so.

Usage::

    .venv/bin/python benchmarks/serving.py --peer-python /work/bench-venv/bin/python
    .venv/bin/python benchmarks/serving.py --servers flowbatch --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from time import perf_counter
from typing import Any

# This folder is on the import path (it is the script's), so that the model's
# worker processes (spawned) find _common too.
from _common import ProcessReplicas, load_sentences, machine, quiet_model_loading, report

REPLICAS = 2
TORCH_THREADS = 1
MAX_BATCH = 64
#: flowbatch's executor for the model: "process" keeps each replica's Python
#: (tokenizer, module calls) off the server's GIL, as the peers' workers are.
EXECUTOR = "process"
SERVERS = ("flowbatch", "naive", "litserve", "mosec")
PATHS = {
    "flowbatch": "/v1/pipelines/embed",
    "naive": "/embed",
    "litserve": "/predict",
    "mosec": "/inference",
}

# ---------------------------------------------------------------- servers


def serve_flowbatch(port: int) -> None:
    import flowbatch as fb
    from flowbatch.http import ServeConfig, create_app, run
    from flowbatch.models import SentenceEmbedder

    executor = os.environ.get("FLOWBATCH_BENCH_EXECUTOR", EXECUTOR)
    embed = fb.stage(SentenceEmbedder(torch_threads=TORCH_THREADS), name="embed",
                     batch=fb.Batch(max_size=MAX_BATCH), concurrency=REPLICAS,
                     executor=executor)  # type: ignore[arg-type]
    in_flight = os.environ.get("FLOWBATCH_BENCH_IN_FLIGHT")
    config = ServeConfig(max_in_flight=int(in_flight)) if in_flight else None
    app = create_app(fb.Pipeline([embed], name="embed"), config=config)
    run(app, host="127.0.0.1", port=port, log_level="warning")


def serve_naive(port: int) -> None:
    import uvicorn
    from fastapi import FastAPI

    from flowbatch.models import SentenceEmbedder

    model = SentenceEmbedder()  # torch's default threads: the plain way
    model.setup()
    app = FastAPI()

    @app.post("/embed")
    async def embed(body: dict[str, Any]) -> dict[str, Any]:
        return {"output": model([body["input"]])[0].tolist()}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# LitServe and mosec start worker processes that import this file and look
# their classes up by name: the classes must be module-level, so they are
# defined when the environment says which server this process runs.
_SERVING = os.environ.get("FLOWBATCH_BENCH_SERVE", "")

if _SERVING == "litserve":
    import litserve as ls

    class EmbedAPI(ls.LitAPI):  # type: ignore[misc]
        def setup(self, device: str) -> None:
            from flowbatch.models import SentenceEmbedder

            self.model = SentenceEmbedder(torch_threads=TORCH_THREADS)
            self.model.setup()

        def decode_request(self, request):  # type: ignore[no-untyped-def]  # LitServe reads this signature: unannotated = a JSON body
            return str(request["input"])

        def predict(self, texts: list[str]) -> list[Any]:
            return self.model(texts)  # type: ignore[no-any-return]

        def encode_response(self, output: Any) -> dict[str, Any]:
            return {"output": output.tolist()}

if _SERVING == "mosec":
    from mosec import Worker

    class Embed(Worker):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            from flowbatch.models import SentenceEmbedder

            self.model = SentenceEmbedder(torch_threads=TORCH_THREADS)
            self.model.setup()

        def forward(self, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
            vecs = self.model([d["input"] for d in data])
            return [{"output": v.tolist()} for v in vecs]


def serve_litserve(port: int) -> None:
    import litserve as ls

    api = EmbedAPI(max_batch_size=MAX_BATCH, batch_timeout=0.01)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=REPLICAS)
    server.run(host="127.0.0.1", port=port, generate_client_file=False)


def serve_mosec(port: int) -> None:
    from mosec import Server

    sys.argv = [sys.argv[0], "--port", str(port), "--address", "127.0.0.1", "--log-level", "warning"]
    server = Server()
    server.append_worker(Embed, num=REPLICAS, max_batch_size=MAX_BATCH, max_wait_time=10)
    server.run()


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


def build_requests(path: str, texts: list[str]) -> list[bytes]:
    out = []
    for t in texts:
        body = json.dumps({"input": t}).encode()
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


def start_server(kind: str, python: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FLOWBATCH_BENCH_SERVE": kind, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    # Read only if the server dies: an unread pipe could fill and block it.
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed when the run ends
    proc = subprocess.Popen(
        [python, __file__, "--serve", kind, "--port", str(port)],
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


def wrk_closed_loop(port: int, path: str, texts: list[str], concurrency: int, *, warmup: float,
                    duration: float) -> dict[str, Any]:
    """The closed loop with wrk (C, one thread): leaves the CPU to the server.

    On a 2-core machine the load generator shares the cores with the model,
    so a lean one matters; every server is measured with the same one.
    """
    bodies = ",\n".join("[==[" + json.dumps({"input": t}) + "]==]" for t in texts)
    script = f"""
local bodies = {{
{bodies}
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
    """The model alone (``_common.ProcessReplicas``): the figures every server is held to.

    On a shared machine the model's own speed drifts by tens of percent from
    minute to minute, so each server's figures are compared with the model
    measured right around them: its batch-of-1 time just before and just
    after the c1 phase, its offline limit just before and just after the c64
    phase (at the batch size that was best in this run's scan).
    """

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.reps = ProcessReplicas(REPLICAS, TORCH_THREADS)
        self.reps.throughput(texts[:128], 16)  # warm up
        self.scan = {b: self.reps.throughput(texts[:1024], b) for b in (8, 16, 32, 64)}
        self.best_batch = max(self.scan, key=self.scan.__getitem__)
        self._b1_start = 0

    def limit(self) -> float:
        return float(self.reps.throughput(self.texts[:1024], self.best_batch))

    def batch1_times(self, n: int = 60) -> list[float]:
        k = self._b1_start
        self._b1_start = (k + n) % (len(self.texts) - n)
        return list(self.reps.call_times(self.texts[k:k + n]))

    def close(self) -> None:
        self.reps.close()


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds used so far by the processes of process group ``pgid``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # the 5th field (pgrp), counted after the name
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


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
            alone.extend(model.reps.call_times([model.texts[i % len(model.texts)]]))
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


def bench_server(kind: str, python: str, texts: list[str], args: argparse.Namespace,
                 model: Model) -> dict[str, Any]:
    port = free_port()
    requests = build_requests(PATHS[kind], texts)
    proc = start_server(kind, python, port)
    out: dict[str, Any] = {}
    use_wrk = bool(shutil.which("wrk")) and not args.python_client

    def closed(c: int, duration: float, warmup: float) -> dict[str, Any]:
        if use_wrk:
            return wrk_closed_loop(port, PATHS[kind], texts, c, warmup=warmup, duration=duration)
        return asyncio.run(closed_loop(port, requests, c, warmup, duration))

    def say(phase: str) -> None:
        r = out[phase]
        print(f"  {kind} {phase}: {r['rps']:.1f} req/s p50 {r['p50_ms']:.1f} ms "
              f"p99 {r['p99_ms']:.1f} ms {r['statuses']}", file=sys.stderr, flush=True)

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

        parts, b1s = windowed(1, lambda: statistics.median(model.batch1_times(30)) * 1000)
        out["c1"] = merged(parts)
        out["c1"]["over_ms"] = statistics.median(
            p["p50_ms"] - (b1s[w] + b1s[w + 1]) / 2 for w, p in enumerate(parts))
        out["batch1_ms"] = statistics.median(b1s)
        say("c1")
        if args.paired:
            out["c1_paired"] = asyncio.run(paired_c1(port, requests, model, args.paired))
        out["c16"] = closed(16, args.duration, args.warmup)
        say("c16")
        parts, limits = windowed(64, model.limit)
        out["c64"] = merged(parts)
        out["c64"]["ratio"] = statistics.median(
            p["rps"] / ((limits[w] + limits[w + 1]) / 2) for w, p in enumerate(parts))
        out["limit"] = statistics.mean(limits)
        say("c64")
        print(f"  {kind}: the model: batch of 1 {', '.join(f'{x:.1f}' for x in b1s)} ms around "
              f"the c1 windows (p50 {', '.join(f'{p:.1f}' for p in out['c1']['windows'])}; "
              f"{out['c1']['over_ms']:+.2f} ms); limit {', '.join(f'{x:.0f}' for x in limits)} "
              f"sentences/s around the c64 windows (x{out['c64']['ratio']:.3f})",
              file=sys.stderr, flush=True)
        if "c1_paired" in out:
            paired = out["c1_paired"]
            print(f"  {kind}: c1 paired: p50 {paired['p50_ms']:.2f} ms vs "
                  f"{paired['batch1_ms']:.2f} ms alone ({paired['over_ms']:+.2f})",
                  file=sys.stderr, flush=True)
        out["overload"] = asyncio.run(open_loop(port, requests, 3 * out["limit"], args.duration))
        say("overload")
    finally:
        stop_server(proc)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--peer-python", default=sys.executable,
                   help="Python with litserve and mosec installed (and flowbatch importable)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per phase")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds not counted per phase")
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
         "mosec": serve_mosec}[args.serve](args.port)
        return

    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # a leaner client
    texts = load_sentences()
    kinds = [k for k in args.servers.split(",") if k]
    skipped = []
    pythons = {}
    for k in kinds:
        py = sys.executable if k in ("flowbatch", "naive") else args.peer_python
        if k in ("litserve", "mosec") and not has_module(py, k):
            skipped.append(k)
            continue
        pythons[k] = py
    runs: list[dict[str, Any]] = []
    for r in range(args.runs):
        model = Model(texts)
        try:
            print(f"run {r + 1}: the model offline, sentences/s by batch size "
                  f"{ {b: round(v, 1) for b, v in model.scan.items()} }",
                  file=sys.stderr, flush=True)
            run: dict[str, Any] = {"scan": model.scan, "servers": {}}
            for k, py in pythons.items():
                run["servers"][k] = bench_server(k, py, texts, args, model)
        finally:
            model.close()
        runs.append(run)

    def med(get: Any) -> float:
        return float(statistics.median([get(r) for r in runs]))

    rows = []
    figures: dict[str, Any] = {"runs": runs, "skipped": skipped}
    for k in pythons:
        limit = med(lambda r, k=k: r["servers"][k]["limit"])
        batch1 = med(lambda r, k=k: r["servers"][k]["batch1_ms"])
        figures[f"{k}_model"] = {"limit_sps": round(limit, 1), "batch1_ms": round(batch1, 2)}
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
            rows.append([k, phase, rps, p50, p99, ratio,
                         ", ".join(f"{s}: {n}" for s, n in mix.items())])
            figures[f"{k}_{phase}"] = {"rps": round(rps, 1), "p50_ms": round(p50, 2),
                                       "p99_ms": round(p99, 2), "ratio": round(ratio, 3),
                                       "statuses": mix}
        figures[f"{k}_c1"]["over_batch1_ms"] = round(
            med(lambda r, k=k: r["servers"][k]["c1"]["over_ms"]), 2)
        if args.paired:
            figures[f"{k}_c1_paired"] = {
                key: round(med(lambda r, k=k, key=key: r["servers"][k]["c1_paired"][key]), 2)
                for key in ("p50_ms", "batch1_ms", "over_ms")
            }
    notes = [
        (f"model: {REPLICAS} replicas x {TORCH_THREADS} torch thread, each in a process; "
         "limit = its offline sentences/s at the run's best batch size; "
         f"c1 and c64 ran in {args.windows} wrk windows each, the model measured before the "
         "first and after each (batch of 1 for c1, the limit for c64; the server stopped by "
         "SIGSTOP meanwhile); each window is compared with the model around it and the "
         f"medians are reported; load {machine()['loadavg_1m']}"),
        f"overload: open loop at 3x the limit for {args.duration:.0f} s",
        f"statuses: the answers of all {len(runs)} runs together",
    ]
    notes.extend(f"{k}: limit {figures[f'{k}_model']['limit_sps']} sentences/s, batch of 1 "
                 f"{figures[f'{k}_model']['batch1_ms']} ms" for k in pythons)
    if "flowbatch" in pythons:
        fb64 = figures["flowbatch_c64"]
        notes.append(f"targets: c64 >= 0.9x limit: {fb64['ratio']:.3f}x; c1 p50 within 2 ms of "
                     f"batch-of-1: {figures['flowbatch_c1']['over_batch1_ms']:+.2f} ms; overload "
                     f"p99 < 2x c64 p99: {figures['flowbatch_overload']['p99_ms'] / fb64['p99_ms']:.2f}x")
        if args.paired:
            notes.append(f"c1 with think time (--paired): "
                         f"{figures['flowbatch_c1_paired']['over_ms']:+.2f} ms")
        if "mosec" in pythons:
            notes.append(f"flowbatch / mosec at c64: "
                         f"{fb64['rps'] / max(figures['mosec_c64']['rps'], 1e-9):.2f}x")
    if skipped:
        notes.append(f"skipped (not installed for --peer-python): {', '.join(skipped)}")
    report("http", "HTTP serving: all-MiniLM-L6-v2, one sentence per request",
           ["server", "load", "req/s", "p50 ms", "p99 ms", "x limit", "statuses"],
           rows, figures, notes=notes)


if __name__ == "__main__":
    main()
