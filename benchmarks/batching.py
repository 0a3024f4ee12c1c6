"""batching: dynamic batching against the model's own best offline throughput.

The default case (``--config default``) is the model as users write it
(serving.py's ``Embed``: sentence-transformers ``encode``, rows as lists) in
``fb.stage(Embed(), batch=fb.Batch(max_size=64))`` with nothing else set, so
``executor="auto"`` picks where it runs. Its yardstick is the best
configuration of that model on this machine: the model alone (no engine) in
1 process with all cores' threads and in N processes (N = cores) of 1
thread each, batch sizes scanned, the best taken. Then 64 closed-loop
callers of ``runner.submit`` (target >= 0.95x that limit) and one caller
alone (p50 against the batch-of-1 time of the shape the default runs;
target: within 1 ms; p99 within 2x p50).

The thread configurations (``--config both|1x2|2x1``): for each serving configuration (replicas x torch threads; on 2 cores:
``1x2`` = one replica with 2 torch threads, ``2x1`` = two replicas with one
each), in one process and one run:

(a) the limit: SentenceEmbedder called directly (no engine) on the benchmark
    sentences, the same replicas and threads as served, at batch sizes
    1..128; the limit is the best of those throughputs;
(b) served: 64 closed-loop callers, each awaiting ``runner.submit(sentence)``
    one at a time, through a pipeline whose only stage is the embedder as a
    batched thread stage (``Batch(max_size=64)``, ``concurrency`` = replicas);
    throughput and its ratio to the limit (target >= 0.9);
(c) one caller alone: mean latency of ``await runner.submit(sentence)``
    against the mean time of the model's own batch-of-1 call (measured in a
    replica's thread), in ms (target: within 1 ms). Also shown, to tell the
    engine's cost from the cost of any thread handoff: the same call through
    a bare handoff to a waiting thread (no engine) and the model's time
    inside the pipeline's own calls.

(a), (b) and (c) are interleaved ``--rounds`` times; figures are medians
over rounds (each batch size's own median, then the best of them).

Usage: .venv/bin/python benchmarks/batching.py [--config default|both|1x2|2x1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from statistics import fmean
from time import perf_counter
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    CONFIGS,
    MAIN_CONFIGS,
    ProcessReplicas,
    Replicas,
    cycle,
    load_sentences,
    median,
    quiet_model_loading,
    r3,
    report,
    verdict,
)

TARGET_RATIO = 0.9
#: The default stage's target (issue 12): 64 callers at 0.95x the best configuration.
DEFAULT_TARGET_RATIO = 0.95
TARGET_LATENCY_MS = 1.0
CALLERS = 64
MAX_BATCH = 64


def timed_embedder(torch_threads: int) -> Any:
    """A SentenceEmbedder that records ``(batch size, seconds)`` of every call it
    serves, measured inside its worker thread: the model's own time within the
    pipeline, so that what the engine adds per request can be told apart."""
    from flowbatch.models import SentenceEmbedder

    class TimedEmbedder(SentenceEmbedder):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.calls: list[tuple[int, float]] = []  # shared by the worker copies

        def __call__(self, texts: Any) -> Any:
            t0 = perf_counter()
            out = super().__call__(texts)
            self.calls.append((len(texts), perf_counter() - t0))
            return out

    return TimedEmbedder(torch_threads=torch_threads)


def build_pipeline(model: Any, replicas: int, max_size: int = MAX_BATCH) -> Any:
    import flowbatch as fb

    embed = fb.stage(
        model,
        name="embed",
        concurrency=replicas,
        batch=fb.Batch(max_size=max_size),
    )
    return fb.Pipeline([embed], name="batching")


async def closed_loop(runner: Any, texts: list[str], callers: int) -> float:
    """Items/s with ``callers`` tasks each submitting its share of ``texts`` one at a time."""

    async def caller(c: int) -> None:
        for k in range(c, len(texts), callers):
            await runner.submit(texts[k])

    t0 = perf_counter()
    async with asyncio.TaskGroup() as tg:
        for c in range(callers):
            tg.create_task(caller(c))
    return len(texts) / (perf_counter() - t0)


async def lone_latencies(runner: Any, texts: list[str]) -> list[float]:
    out = []
    for t in texts:
        t0 = perf_counter()
        await runner.submit(t)
        out.append(perf_counter() - t0)
    return out


def stage_counts(runner: Any) -> tuple[dict[int, int], float]:
    s = runner.stats().stage("embed")
    return dict(s.batch_sizes), s.busy_seconds


async def measure(name: str, args: argparse.Namespace, sentences: list[str]) -> dict[str, Any]:
    replicas, threads = CONFIGS[name]
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    reps = Replicas(replicas, threads)
    reps.run_all(lambda e: (e(sentences[:64]), e(sentences[:1])))  # warm-up
    limit: dict[int, list[float]] = {b: [] for b in sizes}
    served: list[float] = []
    lone: list[float] = []
    direct: list[float] = []
    batch_sizes: dict[int, int] = {}
    busy = 0.0
    served_wall = 0.0
    handoff: list[float] = []
    in_pipe: list[float] = []
    model = timed_embedder(threads)
    pipe = build_pipeline(model, replicas, args.max_batch)
    async with pipe.open() as runner:
        await asyncio.gather(*(runner.submit(s) for s in sentences[:CALLERS]))  # warm-up
        await lone_latencies(runner, sentences[:4])
        for rnd in range(args.rounds):
            for b in sizes:
                n = max(args.items // 4 if b == 1 else args.items, 2 * replicas * b)
                gc.collect()
                limit[b].append(reps.throughput(cycle(sentences, n, rnd * 97), b))
            gc.collect()
            before, busy0 = stage_counts(runner)
            t0 = perf_counter()
            served.append(await closed_loop(runner, cycle(sentences, args.served_items), CALLERS))
            served_wall += perf_counter() - t0
            after, busy1 = stage_counts(runner)
            busy += busy1 - busy0
            for k, v in after.items():
                d = v - before.get(k, 0)
                if d:
                    batch_sizes[k] = batch_sizes.get(k, 0) + d
            # (c) alternate direct batch-of-1 calls, bare handoffs and lone submits.
            lone_texts = cycle(sentences, args.lone, 1000 + rnd * 31)
            for i in range(len(lone_texts)):
                block = lone_texts[i : i + 1]
                direct.extend(reps.call_times(block))
                handoff.extend(reps.handoff_times(block))
                mark = len(model.calls)
                lone.extend(await lone_latencies(runner, block))
                in_pipe.extend(d for _, d in model.calls[mark:])
    reps.close()
    per_b = {b: median(v) for b, v in limit.items()}
    best_b = max(per_b, key=per_b.__getitem__)
    served_med = median(served)
    n_batches = sum(batch_sizes.values())
    return {
        "config": name,
        "replicas": replicas,
        "torch_threads": threads,
        "limit_by_batch_size": {str(b): round(v, 1) for b, v in per_b.items()},
        "limit_batch_size": best_b,
        "limit_items_per_s": round(per_b[best_b], 1),
        "served_items_per_s": round(served_med, 1),
        "served_runs": [round(x, 1) for x in served],
        "ratio": r3(served_med / per_b[best_b]),
        "served_mean_batch_size": round(
            sum(k * v for k, v in batch_sizes.items()) / n_batches, 1
        ) if n_batches else 0.0,
        "served_batch_sizes": {str(k): v for k, v in sorted(batch_sizes.items())},
        # Fraction of replica-time spent inside the model while serving.
        "served_utilization": r3(busy / (served_wall * replicas)) if served_wall else 0.0,
        "lone_latency_ms": round(1000 * fmean(lone), 3),
        "batch1_ms": round(1000 * fmean(direct), 3),
        "lone_overhead_ms": round(1000 * (fmean(lone) - fmean(direct)), 3),
        "lone_latency_p50_ms": round(1000 * median(lone), 3),
        # The same batch-of-1 calls timed inside the pipeline's worker thread.
        "batch1_in_pipeline_ms": round(1000 * fmean(in_pipe), 3),
        # A bare thread handoff (caller blocks on a queue; no engine, no asyncio).
        "bare_handoff_ms": round(1000 * fmean(handoff), 3),
        "batch1_p50_ms": round(1000 * median(direct), 3),
    }


@contextlib.contextmanager
def thread_env(threads: int) -> Iterator[None]:
    """Spawned yardstick replicas get the thread pools flowbatch gives its own
    process workers (torch/OpenMP/BLAS and the tokenizer's, from the environment)."""
    from flowbatch.processes import THREAD_VARS

    saved = {v: os.environ.get(v) for v in THREAD_VARS}
    os.environ.update({v: str(threads) for v in THREAD_VARS})
    try:
        yield
    finally:
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old


async def measure_default(args: argparse.Namespace, sentences: list[str]) -> dict[str, Any]:
    """The default stage against the best offline configuration of the same model."""
    from serving import Embed

    import flowbatch as fb
    from flowbatch.stage import auto_shape, usable_cores

    cores = usable_cores()
    shapes = sorted({(1, cores), (cores, 1)})
    # The stage's max_size bounds what it can batch: the yardstick's sizes too.
    sizes = [b for b in (int(x) for x in args.batch_sizes.split(",")) if 1 < b <= args.max_batch]
    default_shape = auto_shape()
    yardsticks = {}
    for n, threads in shapes:
        with thread_env(threads):
            yardsticks[(n, threads)] = ProcessReplicas(n, threads, factory=Embed)
    for reps in yardsticks.values():
        reps.throughput(sentences[: 4 * max(sizes)], max(sizes))  # warm-up
    alone = yardsticks.get(default_shape) or ProcessReplicas(*default_shape, factory=Embed)
    limit: dict[tuple[int, int, int], list[float]] = {}
    served: list[float] = []
    lone: list[float] = []
    direct: list[float] = []
    stage = fb.stage(Embed(), name="embed", batch=fb.Batch(max_size=MAX_BATCH))
    pipe = fb.Pipeline([stage], name="batching")
    async with pipe.open() as runner:
        await asyncio.gather(*(runner.submit(s) for s in sentences[:CALLERS]))  # warm-up
        await lone_latencies(runner, sentences[:4])
        before, _ = stage_counts(runner)
        for rnd in range(args.rounds):
            for (n, threads), reps in yardsticks.items():
                for b in sizes:
                    gc.collect()
                    texts = cycle(sentences, max(args.items, 2 * n * b), rnd * 97)
                    limit.setdefault((n, threads, b), []).append(reps.throughput(texts, b))
            gc.collect()
            served.append(await closed_loop(runner, cycle(sentences, args.served_items), CALLERS))
            lone_texts = cycle(sentences, args.lone, 1000 + rnd * 31)
            for i in range(len(lone_texts)):
                block = lone_texts[i : i + 1]
                direct.extend(alone.call_times(block))
                lone.extend(await lone_latencies(runner, block))
        after, _ = stage_counts(runner)
    for reps in {*yardsticks.values(), alone}:
        reps.close()
    per = {k: median(v) for k, v in limit.items()}
    best = max(per, key=per.__getitem__)
    served_med = median(served)
    sizes_seen = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    n_batches = sum(sizes_seen.values())
    p50, p99 = median(lone), sorted(lone)[int(0.99 * (len(lone) - 1))]
    return {
        "stage": f"{stage.executor} x{stage.concurrency}, {stage.cpu_threads} thread each",
        "limit_by_shape": {f"{n}x{t} b{b}": round(v, 1) for (n, t, b), v in per.items()},
        "best_shape": f"{best[0]} process x {best[1]} thread, batch {best[2]}",
        "limit_items_per_s": round(per[best], 1),
        "served_items_per_s": round(served_med, 1),
        "served_runs": [round(x, 1) for x in served],
        "ratio": r3(served_med / per[best]),
        "served_mean_batch_size": round(
            sum(k * v for k, v in sizes_seen.items()) / n_batches, 1) if n_batches else 0.0,
        "batch1_p50_ms": round(1000 * median(direct), 3),
        "lone_p50_ms": round(1000 * p50, 3),
        "lone_p99_ms": round(1000 * p99, 3),
        "lone_p50_minus_batch1_ms": round(1000 * (p50 - median(direct)), 3),
        "lone_p99_over_p50": r3(p99 / p50),
    }


def report_default(r: dict[str, Any], args: argparse.Namespace) -> None:
    ok_ratio = r["ratio"] >= DEFAULT_TARGET_RATIO
    ok_lone = r["lone_p50_minus_batch1_ms"] <= TARGET_LATENCY_MS and r["lone_p99_over_p50"] <= 2
    report(
        "batching",
        f"the default stage (Embed, no settings): {CALLERS} closed-loop submit callers "
        f"vs the best offline configuration (medians of {args.rounds} rounds)",
        ["default stage (auto)", "best config", "limit/s", "served/s", "ratio", "mean batch",
         "b=1 p50 ms", "lone p50 ms", "lone p99 ms"],
        [[r["stage"], r["best_shape"], r["limit_items_per_s"],
          r["served_items_per_s"], r["ratio"], r["served_mean_batch_size"],
          r["batch1_p50_ms"], r["lone_p50_ms"], r["lone_p99_ms"]]],
        {**r, "target_ratio": DEFAULT_TARGET_RATIO, "ratio_met": ok_ratio,
         "lone_met": ok_lone, "rounds": args.rounds},
        notes=[
            "limits: " + "; ".join(f"{k}: {v}" for k, v in r["limit_by_shape"].items()),
            (f"ratio {r['ratio']} ({verdict(r['ratio'], DEFAULT_TARGET_RATIO)}, target >= "
             f"{DEFAULT_TARGET_RATIO}); lone p50 - batch-of-1 p50 "
             f"{r['lone_p50_minus_batch1_ms']} ms (target <= {TARGET_LATENCY_MS}); "
             f"lone p99/p50 {r['lone_p99_over_p50']} (target <= 2)"),
        ],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=("default", "both", *CONFIGS), default="default")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-sizes", default="1,8,16,32,64,128")
    p.add_argument("--items", type=int, default=512, help="sentences per limit measurement")
    p.add_argument("--served-items", type=int, default=1024, help="sentences per served run")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="Batch(max_size=...)")
    p.add_argument("--lone", type=int, default=100, help="lone-caller submits per round")
    args = p.parse_args()
    quiet_model_loading()
    sentences = load_sentences()
    if args.config == "default":
        report_default(asyncio.run(measure_default(args, sentences)), args)
        return
    names = list(MAIN_CONFIGS) if args.config == "both" else [args.config]
    results = [asyncio.run(measure(n, args, sentences)) for n in names]

    best_served = max(results, key=lambda r: r["served_items_per_s"])
    best_limit = max(r["limit_items_per_s"] for r in results)
    rows = [
        [
            f"{r['config']} ({r['replicas']} replica x {r['torch_threads']} torch thr)",
            r["limit_items_per_s"],
            r["limit_batch_size"],
            r["served_items_per_s"],
            r["ratio"],
            r["served_mean_batch_size"],
            r["served_utilization"],
            r["batch1_ms"],
            r["lone_latency_ms"],
            r["lone_overhead_ms"],
            r["bare_handoff_ms"] - r["batch1_ms"],
        ]
        for r in results
    ]
    figures = {
        "config": best_served["config"],
        "callers": CALLERS,
        "max_batch": args.max_batch,
        "limit_items_per_s": best_served["limit_items_per_s"],
        "served_items_per_s": best_served["served_items_per_s"],
        "ratio": best_served["ratio"],
        "ratio_to_best_limit_any_config": r3(best_served["served_items_per_s"] / best_limit),
        "lone_latency_ms": best_served["lone_latency_ms"],
        "batch1_ms": best_served["batch1_ms"],
        "lone_overhead_ms": best_served["lone_overhead_ms"],
        "target_ratio": TARGET_RATIO,
        "target_latency_ms": TARGET_LATENCY_MS,
        "ratio_met": best_served["ratio"] >= TARGET_RATIO,
        "latency_met": best_served["lone_overhead_ms"] <= TARGET_LATENCY_MS,
        "configs": results,
        "rounds": args.rounds,
    }
    notes = [
        "limits by batch size: "
        + "; ".join(f"{r['config']}: {r['limit_by_batch_size']}" for r in results),
        "served batch sizes: "
        + "; ".join(f"{r['config']}: {r['served_batch_sizes']}" for r in results),
        (f"headline config = {best_served['config']} (highest served throughput); "
        f"ratio {best_served['ratio']} ({verdict(best_served['ratio'], TARGET_RATIO)}, "
        f"target >= {TARGET_RATIO}); lone overhead {best_served['lone_overhead_ms']} ms "
        f"({verdict(best_served['lone_overhead_ms'], TARGET_LATENCY_MS, False)}, "
        f"target <= {TARGET_LATENCY_MS} ms)"),
    ]
    report(
        "batching",
        f"SentenceEmbedder: {CALLERS} closed-loop submit callers vs offline limit "
        f"(medians of {args.rounds} rounds)",
        ["config", "limit/s", "best b", "served/s", "ratio", "mean batch",
         "util", "b=1 ms", "lone ms", "lone-b1 ms", "bare handoff-b1 ms"],
        rows,
        figures,
        notes=notes,
    )


if __name__ == "__main__":
    main()
