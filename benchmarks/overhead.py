"""overhead: flowbatch's per-item cost against a bare chain of asyncio.Queues.

Both sides move N integers through 3 no-op ``async def`` stages and collect
every result, on one event loop:

- flowbatch: ``Pipeline([f, f, f])`` (async stages, concurrency 1) and
  ``runner.map(items)`` (``--ordered`` picks ordered or unordered map; both
  are measured by default);
- flowbatch limited: the ordered map under ``pipe.open(max_in_flight=64)``
  (``--max-in-flight``), a limit that binds, so the map waits in the
  limiter's line;
- bare: a feeder task, 3 hop tasks (``await q_in.get()`` -> ``await f(x)``
  -> ``await q_out.put(y)``), and the consumer reading the last queue; every
  ``asyncio.Queue`` has flowbatch's ``queue_size`` as its bound.

The sides run interleaved (A B A B ...) ``--repeats`` times; the figures are
medians, and the ratio is flowbatch items/s over bare items/s. Target: >= 0.8.

Usage: .venv/bin/python benchmarks/overhead.py [--items 200000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import sys
from pathlib import Path
from time import perf_counter

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median, r3, report, verdict

import flowbatch as fb
from flowbatch.runner import DEFAULT_QUEUE_SIZE

TARGET = 0.8
_END = object()


async def noop(x: int) -> int:
    return x


async def bare_chain(n: int, hops: int, queue_size: int) -> float:
    """Seconds to move ``n`` items through ``hops`` queue hops and consume them."""
    queues: list[asyncio.Queue[object]] = [asyncio.Queue(queue_size) for _ in range(hops + 1)]

    async def feeder() -> None:
        q = queues[0]
        for i in range(n):
            await q.put(i)
        await q.put(_END)

    async def hop(q_in: asyncio.Queue[object], q_out: asyncio.Queue[object]) -> None:
        f = noop
        while True:
            x = await q_in.get()
            if x is _END:
                await q_out.put(_END)
                return
            await q_out.put(await f(x))  # type: ignore[arg-type]

    got = 0
    t0 = perf_counter()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(feeder())
        for a, b in itertools.pairwise(queues):
            tg.create_task(hop(a, b))
        last = queues[-1]
        while True:
            x = await last.get()
            if x is _END:
                break
            got += 1
    dt = perf_counter() - t0
    assert got == n, (got, n)
    return dt


async def flowbatch_chain(
    n: int, hops: int, queue_size: int, ordered: bool, max_in_flight: int | None = None
) -> float:
    """Seconds to map ``n`` items through ``hops`` no-op async stages (open and drain included)."""
    pipe = fb.Pipeline([fb.stage(noop, name=f"s{i}") for i in range(hops)], name="overhead")
    got = 0
    t0 = perf_counter()
    async with pipe.open(queue_size=queue_size, max_in_flight=max_in_flight) as runner:
        async for _ in runner.map(range(n), ordered=ordered):
            got += 1
    dt = perf_counter() - t0
    assert got == n, (got, n)
    return dt


async def main_async(args: argparse.Namespace) -> dict[str, list[float]]:
    n, hops, qs = args.items, args.hops, args.queue_size
    sides = {"bare": lambda: bare_chain(n, hops, qs)}
    if args.ordered in ("both", "yes"):
        sides["flowbatch_ordered"] = lambda: flowbatch_chain(n, hops, qs, True)
    if args.ordered in ("both", "no"):
        sides["flowbatch_unordered"] = lambda: flowbatch_chain(n, hops, qs, False)
    if args.max_in_flight:
        # the same ordered map with an in-flight limit that binds (map waits in its line)
        sides["flowbatch_limited"] = lambda: flowbatch_chain(n, hops, qs, True, args.max_in_flight)
    # Warm-up: one small pass of each side (imports, allocator, caches).
    await bare_chain(1000, hops, qs)
    await flowbatch_chain(1000, hops, qs, True)
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.repeats):
        for name, run in sides.items():
            gc.collect()
            times[name].append(await run())
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--hops", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE)
    p.add_argument("--ordered", choices=("both", "yes", "no"), default="both")
    p.add_argument("--max-in-flight", type=int, default=64,
                   help="also an ordered map under pipe.open(max_in_flight=N), a limit that "
                        "binds (0: skip)")
    args = p.parse_args()

    times = asyncio.run(main_async(args))
    n = args.items
    rate = {k: n / median(v) for k, v in times.items()}
    bare = rate["bare"]
    rows = []
    figures: dict[str, object] = {
        "items": n,
        "hops": args.hops,
        "queue_size": args.queue_size,
        "repeats": args.repeats,
        "bare_items_per_s": round(bare),
        "target_ratio": TARGET,
    }
    rows.append(["bare asyncio.Queue chain", bare, 1.0, "baseline"])
    for k in times:
        if k == "bare":
            continue
        ratio = rate[k] / bare
        figures[f"{k}_items_per_s"] = round(rate[k])
        figures[f"{k}_ratio"] = r3(ratio)
        label = (f"flowbatch ordered map, max_in_flight={args.max_in_flight}"
                 if k == "flowbatch_limited" else f"{k.replace('_', ' ')} map")
        rows.append([label, rate[k], ratio, verdict(ratio, TARGET)])
    headline = "flowbatch_ordered" if "flowbatch_ordered" in times else "flowbatch_unordered"
    figures["ratio"] = figures[f"{headline}_ratio"]
    figures["target_met"] = figures["ratio"] >= TARGET  # type: ignore[operator]
    figures["runs_s"] = {k: [r3(x) for x in v] for k, v in times.items()}
    report(
        "overhead",
        f"{n:,} items through {args.hops} no-op async stages (median of {args.repeats}, interleaved)",
        ["side", "items/s", "ratio to bare", f"target >= {TARGET}"],
        rows,
        figures,
        notes=[f"headline ratio = {headline} (runner.map's default is ordered=True)"],
    )


if __name__ == "__main__":
    main()
