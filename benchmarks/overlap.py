"""overlap: I/O before the model, overlapped, against the limit and the naive loop.

The pipeline: ``fetch`` (``async def``: ``await asyncio.sleep(--fetch-ms)``,
standing in for a storage or HTTP read; ``--fetch-concurrency`` in flight)
then the embedder as a batched thread stage (``Batch(max_size=64)``, the
``--config`` replicas x torch threads), driven by ``runner.map`` over the
benchmark sentences. Measured in the same run:

- the limit: the same replicas called directly (no I/O, no engine) at batch
  sizes 1..128, the best of them (target: pipeline >= 0.9x the limit);
- the sequential loop, on a sample: for each item, fetch (the same sleep),
  then embed it alone, the plain way (the model called inline, torch's
  default threads) (target: pipeline >= 10x).

Limit, pipeline and sequential runs are interleaved ``--rounds`` times
(the sequential sample is split across rounds); figures are medians.

Usage: .venv/bin/python benchmarks/overlap.py [--config 2x1] [--items 2048]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from pathlib import Path
from time import perf_counter
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    CONFIGS,
    Replicas,
    cycle,
    load_sentences,
    median,
    quiet_model_loading,
    r3,
    report,
    verdict,
)

TARGET_LIMIT = 0.9
TARGET_SEQUENTIAL = 10.0


def build_pipeline(args: argparse.Namespace) -> Any:
    import flowbatch as fb
    from flowbatch.models import SentenceEmbedder

    replicas, threads = CONFIGS[args.config]
    delay = args.fetch_ms / 1000

    async def fetch(text: str) -> str:
        await asyncio.sleep(delay)
        return text

    return fb.Pipeline(
        [
            fb.stage(fetch, concurrency=args.fetch_concurrency),
            fb.stage(
                SentenceEmbedder(torch_threads=threads),
                name="embed",
                concurrency=replicas,
                batch=fb.Batch(max_size=args.max_batch),
            ),
        ],
        name="overlap",
    )


async def sequential(emb: Any, texts: list[str], delay: float) -> float:
    """Items/s of the naive loop: fetch one, embed it, next."""
    t0 = perf_counter()
    for t in texts:
        await asyncio.sleep(delay)
        emb([t])
    return len(texts) / (perf_counter() - t0)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sentences = load_sentences()
    replicas, threads = CONFIGS[args.config]
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    reps = Replicas(replicas, threads)
    reps.run_all(lambda e: (e(sentences[:64]), e(sentences[:1])))
    limit: dict[int, list[float]] = {b: [] for b in sizes}
    served: list[float] = []
    util: list[float] = []
    seq: list[float] = []
    from flowbatch.models import SentenceEmbedder

    naive = SentenceEmbedder()  # torch's default threads, called inline
    naive.setup()
    naive(sentences[:2])  # warm-up
    async with build_pipeline(args).open() as runner:
        async for _ in runner.map(sentences[:128]):  # warm-up
            pass
        for rnd in range(args.rounds):
            for b in sizes:
                n = max(args.limit_items // 4 if b == 1 else args.limit_items, 2 * replicas * b)
                gc.collect()
                limit[b].append(reps.throughput(cycle(sentences, n, rnd * 97), b))
            texts = cycle(sentences, args.items, rnd * 131)
            gc.collect()
            busy0 = runner.stats().stage("embed").busy_seconds
            t0 = perf_counter()
            got = 0
            async for _ in runner.map(texts, ordered=False):
                got += 1
            dt = perf_counter() - t0
            assert got == len(texts)
            served.append(got / dt)
            util.append((runner.stats().stage("embed").busy_seconds - busy0) / (dt * replicas))
            gc.collect()
            per_round = max(1, args.sequential_items // args.rounds)
            seq_texts = cycle(sentences, per_round, 500 + rnd * per_round)
            seq.append(await sequential(naive, seq_texts, args.fetch_ms / 1000))
        stats = runner.stats()
    reps.close()
    seq_med = median(seq)
    per_b = {b: median(v) for b, v in limit.items()}
    best_b = max(per_b, key=per_b.__getitem__)
    served_med = median(served)
    embed = stats.stage("embed")
    return {
        "config": args.config,
        "replicas": replicas,
        "torch_threads": threads,
        "fetch_ms": args.fetch_ms,
        "fetch_concurrency": args.fetch_concurrency,
        "items": args.items,
        "limit_by_batch_size": {str(b): round(v, 1) for b, v in per_b.items()},
        "limit_batch_size": best_b,
        "limit_items_per_s": round(per_b[best_b], 1),
        "pipeline_items_per_s": round(served_med, 1),
        "pipeline_runs": [round(x, 1) for x in served],
        "ratio_to_limit": r3(served_med / per_b[best_b]),
        "sequential_items": args.sequential_items,
        "sequential_items_per_s": round(seq_med, 2),
        "sequential_runs": [round(x, 2) for x in seq],
        "speedup_vs_sequential": round(served_med / seq_med, 2),
        "embed_utilization": r3(median(util)),
        "embed_mean_batch_size": round(embed.mean_batch_size, 1),
        "bottleneck": stats.bottleneck,
        "target_limit_ratio": TARGET_LIMIT,
        "target_speedup": TARGET_SEQUENTIAL,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=tuple(CONFIGS), default="2x1")
    p.add_argument("--items", type=int, default=2048, help="sentences per pipeline run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--fetch-ms", type=float, default=20.0)
    p.add_argument("--fetch-concurrency", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,8,16,32,64,128")
    p.add_argument("--limit-items", type=int, default=512)
    p.add_argument("--sequential-items", type=int, default=60)
    args = p.parse_args()
    quiet_model_loading()
    f = asyncio.run(run(args))
    f["limit_met"] = f["ratio_to_limit"] >= TARGET_LIMIT
    f["speedup_met"] = f["speedup_vs_sequential"] >= TARGET_SEQUENTIAL
    rows = [
        ["sequential loop (fetch, embed 1)", f["sequential_items_per_s"], "", ""],
        [f"limit (model alone, b={f['limit_batch_size']})", f["limit_items_per_s"], "", ""],
        [
            f"pipeline: fetch x{args.fetch_concurrency} -> embed",
            f["pipeline_items_per_s"],
            f"{f['ratio_to_limit']} ({verdict(f['ratio_to_limit'], TARGET_LIMIT)}, >= {TARGET_LIMIT})",
            f"{f['speedup_vs_sequential']}x ({verdict(f['speedup_vs_sequential'], TARGET_SEQUENTIAL)}, >= {TARGET_SEQUENTIAL:g}x)",
        ],
    ]
    report(
        "overlap",
        f"{args.fetch_ms:g} ms async fetch + SentenceEmbedder ({args.config}), {args.items} items, "
        f"medians of {args.rounds}",
        ["side", "items/s", "vs limit", "vs sequential"],
        rows,
        f,
        notes=[
            f"limits by batch size: {f['limit_by_batch_size']}",
            (f"embed utilization {f['embed_utilization']}, "
             f"mean batch {f['embed_mean_batch_size']}, bottleneck {f['bottleneck']}"),
        ],
    )


if __name__ == "__main__":
    main()
