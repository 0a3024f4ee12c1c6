"""distributed: stages on Ray actors, against local replicas and Ray Data.

Measured in one run, on one local Ray (``ray.init(num_cpus=2)``; Ray's own
processes share the machine's cores with the workload):

(a) overlap: ``fetch`` (``await asyncio.sleep(0.02)``, 64 in flight) then the
    embedder (``Batch(max_size=64)``, 2 replicas x 1 torch thread) with the
    model on 2 Ray actors against the same on 2 local process replicas;
    the runners are opened once and timed runs alternate (target: >= 0.85x).
(b) offline embedding of the sentence corpus, end to end (actors started,
    models loaded, every embedding back in the driver): Ray Data
    ``map_batches`` on an actor pool of 2 against flowbatch on 2 Ray actors,
    same model, batch size 64 (target: flowbatch >= 1.2x), alternated.
(c) the driver's ceiling: items/s one pipeline process pushes through no-op
    Ray actors, one item per call and in batches of 64.
(d) 4 MB per item from one Ray stage to the next: the driver's peak RSS
    growth with ``pass_refs=True`` (object references; the default between
    two Ray stages) and with ``pass_refs=False`` (values through the driver).

Usage: .venv/bin/python benchmarks/distributed.py [--items 1024] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from time import perf_counter
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cycle, load_sentences, median, quiet_model_loading, r3, report, verdict

TARGET_OVERLAP = 0.85
TARGET_RAY_DATA = 1.2
BATCH = 64


def overlap_pipeline(on_ray: bool, fetch_ms: float) -> Any:
    import flowbatch as fb
    from flowbatch.models import SentenceEmbedder

    delay = fetch_ms / 1000

    async def fetch(text: str) -> str:
        await asyncio.sleep(delay)
        return text

    executor: Any = fb.ray.actors(num_cpus=1) if on_ray else "process"
    return fb.Pipeline(
        [
            fb.stage(fetch, concurrency=64),
            fb.stage(SentenceEmbedder(torch_threads=1), name="embed", executor=executor,
                     concurrency=2, batch=fb.Batch(max_size=BATCH)),
        ],
        name="ray" if on_ray else "process",
    )


async def timed_map(runner: Any, texts: list[str]) -> float:
    t0 = perf_counter()
    n = 0
    async for _ in runner.map(texts):
        n += 1
    assert n == len(texts)
    return n / (perf_counter() - t0)


async def bench_overlap(sentences: list[str], items: int, rounds: int) -> dict[str, Any]:
    ray_pipe = overlap_pipeline(True, 20)
    proc_pipe = overlap_pipeline(False, 20)
    got: dict[str, list[float]] = {"ray": [], "process": []}
    async with ray_pipe.open() as on_ray, proc_pipe.open() as local:
        warm = cycle(sentences, 256, 7)
        await timed_map(on_ray, warm)
        await timed_map(local, warm)
        for rnd in range(rounds):
            texts = cycle(sentences, items, rnd * 131)
            order = [("ray", on_ray), ("process", local)]
            if rnd % 2:
                order.reverse()
            for name, runner in order:
                got[name].append(await timed_map(runner, texts))
    ray_s, proc_s = median(got["ray"]), median(got["process"])
    return {"ray_items_s": ray_s, "process_items_s": proc_s, "ratio": ray_s / proc_s}


class RayDataEmbed:
    """Ray Data's side of (b): the same model, loaded once per pool actor."""

    def __init__(self) -> None:
        from flowbatch.models import SentenceEmbedder

        self.emb = SentenceEmbedder(torch_threads=1)
        self.emb.setup()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        rows = self.emb(list(batch["text"]))
        return {"embedding": np.stack(rows)}


def ray_data_run(sentences: list[str]) -> float:
    import ray

    t0 = perf_counter()
    ds = ray.data.from_items([{"text": s} for s in sentences])
    ds = ds.map_batches(RayDataEmbed, batch_size=BATCH, num_cpus=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=2))
    n = sum(len(b["embedding"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
    assert n == len(sentences)
    return n / (perf_counter() - t0)


def flowbatch_run(sentences: list[str]) -> float:
    import flowbatch as fb
    from flowbatch.models import SentenceEmbedder

    pipe = fb.Pipeline([
        fb.stage(SentenceEmbedder(torch_threads=1), name="embed",
                 executor=fb.ray.actors(num_cpus=1), concurrency=2,
                 batch=fb.Batch(max_size=BATCH)),
    ])

    async def main() -> int:
        n = 0
        async with pipe.open() as runner:
            async for _ in runner.map(sentences):
                n += 1
        return n

    t0 = perf_counter()
    n = asyncio.run(main())
    assert n == len(sentences)
    return n / (perf_counter() - t0)


def noop(xs: Any) -> Any:
    return xs


async def bench_ceiling(calls: int, batched_items: int) -> dict[str, float]:
    import flowbatch as fb

    single = fb.Pipeline([fb.stage(noop, executor=fb.ray.actors(num_cpus=0), concurrency=4)])
    batched = fb.Pipeline([fb.stage(noop, executor=fb.ray.actors(num_cpus=0), concurrency=4,
                                    batch=fb.Batch(max_size=BATCH))])
    out: dict[str, float] = {}
    for name, pipe, n in (("per_item", single, calls), ("batched", batched, batched_items)):
        async with pipe.open() as runner:
            await timed_map(runner, list(range(200)))
            out[name] = await timed_map(runner, list(range(n)))
    return out


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MakeBig:
    def __call__(self, xs: list[int]) -> list[Any]:
        import numpy as np

        return [np.full(1 << 19, x, dtype=np.float64) for x in xs]  # 4 MB each


def first(xs: list[Any]) -> list[float]:
    return [float(a[0]) for a in xs]


async def bench_refs(items: int) -> dict[str, float]:
    """Peak growth of the driver's RSS while ``items`` x 4 MB flow between two Ray stages."""
    import flowbatch as fb

    out: dict[str, float] = {}
    for name, refs in (("pass_refs", True), ("values", False)):
        pipe = fb.Pipeline([
            fb.stage(MakeBig(), executor=fb.ray.actors(num_cpus=0, pass_refs=refs),
                     concurrency=2, batch=fb.Batch(max_size=8)),
            fb.stage(first, executor=fb.ray.actors(num_cpus=0), concurrency=2,
                     batch=fb.Batch(max_size=8)),
        ])
        async with pipe.open() as runner:
            base = peak = rss()
            n = 0
            async for _ in runner.map(range(items)):
                n += 1
                peak = max(peak, rss())
            assert n == items
        out[name] = (peak - base) / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--items", type=int, default=1024, help="items per timed run in (a)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds in (a) and (b)")
    ap.add_argument("--ceiling-calls", type=int, default=3000)
    ap.add_argument("--ceiling-items", type=int, default=50000)
    ap.add_argument("--big-items", type=int, default=200, help="4 MB items in (d)")
    args = ap.parse_args()
    quiet_model_loading()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    sentences = load_sentences()
    try:
        a = asyncio.run(bench_overlap(sentences, args.items, args.rounds))
        ray_data: list[float] = []
        ours: list[float] = []
        for rnd in range(args.rounds):
            if rnd % 2:
                ours.append(flowbatch_run(sentences))
                ray_data.append(ray_data_run(sentences))
            else:
                ray_data.append(ray_data_run(sentences))
                ours.append(flowbatch_run(sentences))
        b = {"ray_data_items_s": median(ray_data), "flowbatch_items_s": median(ours),
             "ratio": median(ours) / median(ray_data)}
        c = asyncio.run(bench_ceiling(args.ceiling_calls, args.ceiling_items))
        d = asyncio.run(bench_refs(args.big_items))
    finally:
        ray.shutdown()
    rows = [
        ["(a) overlap, model on 2 Ray actors", a["ray_items_s"], "items/s"],
        ["(a) overlap, model on 2 local processes", a["process_items_s"], "items/s"],
        ["(a) ratio Ray / local", a["ratio"], f"target >= {TARGET_OVERLAP}: "
         + verdict(a["ratio"], TARGET_OVERLAP)],
        [f"(b) Ray Data map_batches ({len(sentences)} sentences, end to end)",
         b["ray_data_items_s"], "items/s"],
        ["(b) flowbatch on Ray actors (same)", b["flowbatch_items_s"], "items/s"],
        ["(b) ratio flowbatch / Ray Data", b["ratio"], f"target >= {TARGET_RAY_DATA}: "
         + verdict(b["ratio"], TARGET_RAY_DATA)],
        ["(c) driver ceiling, 1 item per call (no-op actors)", c["per_item"], "items/s"],
        [f"(c) driver ceiling, batches of {BATCH}", c["batched"], "items/s"],
        [f"(d) driver RSS growth, {args.big_items} x 4 MB, pass_refs", d["pass_refs"], "MiB"],
        [f"(d) driver RSS growth, {args.big_items} x 4 MB, values", d["values"], "MiB"],
    ]
    report(
        "distributed",
        "Stages on Ray actors (medians of alternated runs; shared noisy 2-core machine)",
        ["measure", "value", "unit / verdict"],
        rows,
        {
            "overlap": {k: r3(v) for k, v in a.items()},
            "ray_data": {k: r3(v) for k, v in b.items()},
            "ceiling_items_s": {k: r3(v) for k, v in c.items()},
            "rss_growth_mib": {k: r3(v) for k, v in d.items()},
            "items": args.items,
            "rounds": args.rounds,
        },
    )


if __name__ == "__main__":
    main()
