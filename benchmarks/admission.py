"""admission: the latency-target admission (flowbatch/admission.py) on a served model shape.

A batched model stage (2 replicas, ``Batch(max_size=64)``) opened as the HTTP
service opens it by default (``latency_target="auto"``), driven in process
(no HTTP, so the client costs little):

1. the offline limit: ``runner.map`` over many inputs, no limit;
2. an open loop at ``--overload`` x that limit (requests on a fixed
   schedule, ``submit_nowait``; refusals are not retried): goodput (answers
   per second after ``--settle`` seconds) over the limit, and the admitted
   requests' p99 against the target;
3. a closed loop of 64 clients that never wait (``submit_nowait``; a
   refused one tries again 10 ms later): how many were refused (target: 0).

``--model sleep`` (default): a stand-in whose batch of n sleeps
``0.05 + 0.005 * n`` s (0.37 s a full batch; sleeping needs no CPU, so the
figures hold on a busy machine); ``--model embed``: all-MiniLM-L6-v2
(``SentenceEmbedder``, 1 torch thread per replica; its speed drifts with
the machine's load, which the offline limit measured before and after shows).
Targets: goodput >= 0.9, p99 < target, 0 refused in the closed loop.

Usage: .venv/bin/python benchmarks/admission.py [--model sleep|embed] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import flowbatch as fb

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "sentences.txt"


def sleeper(xs: list[Any]) -> list[Any]:
    time.sleep(0.05 + 0.005 * len(xs))
    return xs


def make_pipe(model: str) -> fb.Pipeline:
    fn: Any = sleeper
    if model == "embed":
        from flowbatch.models import SentenceEmbedder

        fn = SentenceEmbedder(torch_threads=1)
    return fb.Pipeline([fb.stage(fn, name="model", concurrency=2, executor="thread",
                                 batch=fb.Batch(max_size=64))], name="model")


def inputs() -> list[str]:
    if DATA.exists():
        return [line for line in DATA.read_text().splitlines() if line.strip()]
    return [f"sentence number {i}" for i in range(1000)]


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[math.ceil(0.99 * len(xs)) - 1] if xs else math.nan


async def offline(model: str, texts: list[str], n: int = 2048) -> float:
    async with make_pipe(model).open() as r:
        async for _ in r.map(texts[:256]):
            pass  # warm up
        t = time.perf_counter()
        async for _ in r.map((texts[i % len(texts)] for i in range(n)), ordered=False):
            pass
        return n / (time.perf_counter() - t)


async def open_loop(model: str, texts: list[str], rate: float, seconds: float,
                    settle: float, *, trace: bool) -> dict[str, Any]:
    async with make_pipe(model).open(latency_target="auto") as r:
        async for _ in r.map(texts[:256]):
            pass
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        done: list[tuple[float, float]] = []
        sent = refused = 0

        def answered(ts: float, f: asyncio.Future[Any]) -> None:
            if not f.cancelled() and f.exception() is None:
                done.append((loop.time() - t0, loop.time() - ts))

        shown = 0
        targets: list[float] = []
        while (now := loop.time() - t0) < seconds:
            if now >= settle and r.admission is not None:
                targets.append(r.admission.controller.target)
            if trace and now >= shown and r.admission is not None:
                shown += 2
                ctl = r.admission.controller
                service = sum(s.service_time.mean for s in r.stats().stages)
                print(f"t={now:5.1f}s limit={ctl.limit} target={ctl.target:.2f}s "
                      f"p99={ctl.p99:.2f}s X={ctl.throughput:.0f}/s in_flight="
                      f"{r.limiter.borrowed if r.limiter else 0} batch={service:.2f}s", flush=True)
            for _ in range(int(now * rate) - sent):
                sent += 1
                try:
                    f = r.submit_nowait(texts[sent % len(texts)])
                except fb.Overloaded:
                    refused += 1
                    continue
                f.add_done_callback(functools.partial(answered, loop.time()))
            await asyncio.sleep(0.002)
        s = r.stats()
        window = [lat for t, lat in done if t >= settle]
        return {"sent": sent, "refused": refused, "goodput": len(window) / (seconds - settle),
                "p99": p99(window), "target": sum(targets) / len(targets),
                "target_range": [min(targets), max(targets)], "limit": s.in_flight_limit}


async def closed_loop(model: str, texts: list[str], clients: int, seconds: float) -> dict[str, Any]:
    async with make_pipe(model).open(latency_target="auto") as r:
        async for _ in r.map(texts[:256]):
            pass
        ok = refused = 0
        end = time.perf_counter() + seconds

        async def client(k: int) -> None:
            nonlocal ok, refused
            j = 0
            while time.perf_counter() < end:
                j += 1
                try:
                    await r.submit_nowait(texts[(k * 997 + j) % len(texts)])
                    ok += 1
                except fb.Overloaded:
                    refused += 1
                    await asyncio.sleep(0.01)

        await asyncio.gather(*(client(k) for k in range(clients)))
        return {"ok": ok, "refused": refused, "limit": r.stats().in_flight_limit}


async def main(args: argparse.Namespace) -> None:
    texts = inputs()
    limit = await offline(args.model, texts)
    ol = await open_loop(args.model, texts, args.overload * limit, args.seconds, args.settle,
                         trace=args.trace)
    cl = await closed_loop(args.model, texts, 64, args.seconds / 2)
    after = await offline(args.model, texts)
    out = {
        "benchmark": "admission", "model": args.model, "offline_items_per_s": round(limit, 1),
        "offline_after_items_per_s": round(after, 1),
        "overload": args.overload, "goodput_ratio": round(ol["goodput"] / limit, 3),
        "admitted_p99_s": round(ol["p99"], 3), "target_s": round(ol["target"], 3),
        "p99_under_target": ol["p99"] < ol["target"], "open_loop": ol,
        "closed_loop_64": cl,
    }
    print(f"offline limit {limit:.0f}/s (after: {after:.0f}/s); {args.overload}x open loop: "
          f"goodput {out['goodput_ratio']:.2f}x, admitted p99 {ol['p99']:.3f} s vs target "
          f"{out['target_s']:.3f} s (mean while measured; range {ol['target_range'][0]:.3f}-"
          f"{ol['target_range'][1]:.3f}), limit at end {ol['limit']}; closed loop of 64: "
          f"{cl['refused']} refused of {cl['ok'] + cl['refused']}")
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("sleep", "embed"), default="sleep")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--settle", type=float, default=10.0)
    p.add_argument("--overload", type=float, default=2.0)
    p.add_argument("--trace", action="store_true", help="print the controller every 2 s")
    asyncio.run(main(p.parse_args()))
