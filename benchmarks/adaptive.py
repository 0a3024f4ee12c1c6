"""adaptive: limits that follow the load, against the best fixed setting found by a sweep.

One section per controller (``--section``; default: all of them):

- ``io``: an ``async def`` stage calling a local HTTP test service (aiohttp,
  in a subprocess) that has ``K`` parallel slots of ``--base-ms`` each: past
  ``K`` calls in flight, calls queue and latency rises (throughput stays at
  ``K / base``). Measured in the same run:

  1. a sweep of fixed ``concurrency`` values at ``K`` = 32 (each run
     ``--warm`` s, then ``--measure`` s counted); the best is the baseline;
  2. ``concurrency=fb.Adaptive()`` with no setting (min 1, max 256, starting
     at 1) for ``--adaptive-s`` s: its throughput over the last half, as a
     ratio of the best fixed (target >= 0.95), and when its 1-s throughput
     first reached 0.95x; ``--rounds`` Adaptive runs, each after a rerun of
     the best fixed value, compared as medians (the machine is noisy);
  3. short sweeps at ``K`` = 8 and ``K`` = 64 (the new bests);
  4. one Adaptive run while the service's knee moves 32 -> 8 -> 64 (a
     control request, ``POST /knee?k=``): after each move, the time until the
     throughput over the last 1 s is within 10% of the new best (target
     <= 10 s; the figure includes the 1-s window) and until the limit is
     within the knee's band (K .. 1.25 K + 2 sqrt(K) + 2).

  Call latency (mean) is printed next to throughput: a fixed concurrency
  above the knee keeps the throughput but queues every call.

- ``replicas``: a CPU stage (a pure-Python loop of ``--item-ms``, process
  workers, ``concurrency=fb.Adaptive(min=1, max=--max-replicas)``) under an
  open-loop load that steps from 10% to 100% of the best fixed replica
  count's throughput and back (``--low-s`` / ``--high-s`` / ``--low-s``).
  Measured in the same run: each fixed count 1..max saturated (the best is
  measured again after; the reference is the mean of both, or the 100%
  phase's offered rate where that is lower: no stage serves more than it is
  offered), then the
  adaptive stage through the steps. Printed: the replica count each second,
  the seconds until the replicas follow each step (target <= 10 s), and the
  throughput of the 100% phase once they have followed, as a ratio of the
  reference (target >= 0.9).

- ``serving``: the embedding model served over HTTP with no limit given
  (no ``max_in_flight``, no batch or replica setting: the admission's
  latency target derived from the measured service time, ``executor="auto"``)
  at c1, c64 and an open loop at ``--overload`` (2) times the offline limit,
  beside BentoML's adaptive batching on the same model code, in one run of
  ``serving.py`` (``--serving-duration`` s per phase; BentoML needs the peer
  venv of docs/http.md#benchmark, else it is skipped). Targets: c64 >= 0.95x
  the limit, c1 p50 within 1 ms of batch-of-1, overload goodput >= 0.9x the
  limit with the admitted p99 under the latency target.

Usage: .venv/bin/python benchmarks/adaptive.py [--section io|replicas|serving] [--base-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median, r3, report, verdict

TARGET_RATIO = 0.95
TARGET_RECOVERY_S = 10.0
RECOVERED = 0.9  # "within 10% of the new best"


@dataclass
class Section:
    """What a section measured: a table, its figures (JSON), notes."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    figures: dict[str, Any]
    notes: list[str] = field(default_factory=list)


# ====================================================================== io

# ------------------------------------------------------------ the service


def serve_io(base: float, knee: int) -> None:
    """The test service (run in a subprocess): ``GET /work`` holds one of
    ``knee`` slots for ``base`` seconds (calls past the knee queue, first come
    first served); ``POST /knee?k=N`` moves the knee. Prints its port."""
    from aiohttp import web

    class Slots:
        def __init__(self, k: int) -> None:
            self.k = k
            self.active = 0
            self.waiters: deque[asyncio.Future[None]] = deque()

        async def enter(self) -> None:
            if self.active < self.k and not self.waiters:
                self.active += 1
                return
            fut = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self.leave()
                raise

        def leave(self) -> None:
            self.active -= 1
            self.wake()

        def wake(self) -> None:
            while self.waiters and self.active < self.k:
                fut = self.waiters.popleft()
                if not fut.done():
                    self.active += 1
                    fut.set_result(None)

    slots = Slots(knee)

    async def work(request: web.Request) -> web.Response:
        await slots.enter()
        try:
            await asyncio.sleep(base)
        finally:
            slots.leave()
        return web.Response(text="ok")

    async def move(request: web.Request) -> web.Response:
        slots.k = int(request.query["k"])
        slots.wake()
        return web.Response(text=str(slots.k))

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/work", work)
        app.router.add_post("/knee", move)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(port, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# ------------------------------------------------------------ the client


class Run:
    """One pipeline run against the service: completion times and the limit over time."""

    def __init__(self) -> None:
        self.done: list[float] = []
        self.latency: list[float] = []
        self.limits: list[tuple[float, int | None]] = []
        self.t0 = 0.0

    def rate(self, start: float, end: float) -> float:
        """Calls answered per second over [start, end) (seconds since the run began)."""
        a, b = self.t0 + start, self.t0 + end
        return sum(1 for t in self.done if a <= t < b) / (end - start)

    def mean_latency(self, start: float, end: float) -> float:
        a, b = self.t0 + start, self.t0 + end
        xs = [lat for t, lat in zip(self.done, self.latency, strict=True) if a <= t < b]
        return sum(xs) / len(xs) if xs else math.nan

    def mean_limit(self, start: float, end: float) -> float:
        xs = [v for t, v in self.limits if v is not None and start <= t < end]
        return sum(xs) / len(xs) if xs else math.nan

    def first(self, after: float, until: float, ok: Callable[[float], bool]) -> float | None:
        """Seconds after ``after`` until ``ok(t)`` first holds, in 0.1 s steps."""
        t = after
        while t <= until + 1e-9:
            if ok(t):
                return t - after
            t += 0.1
        return None


async def drive(
    url: str,
    concurrency: int | Any,
    seconds: float,
    events: dict[float, Callable[[], Any]] | None = None,
) -> Run:
    """Run the stage against ``url`` for ``seconds`` with ``concurrency``; at
    each ``events`` time (seconds from the start) await the callback."""
    import aiohttp

    import flowbatch as fb

    run = Run()
    stopping = False
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call(i: int) -> int:
            if stopping:
                return i
            t = perf_counter()
            async with session.get(url) as r:
                if (bp := fb.Backpressure.from_response(r.status, r.headers)) is not None:
                    raise bp
                r.raise_for_status()
                await r.read()
            now = perf_counter()
            run.done.append(now)
            run.latency.append(now - t)
            return i

        pipe = fb.Pipeline([fb.stage(call, name="call", concurrency=concurrency)], name="io")

        def items() -> Any:
            i = 0
            while not stopping:
                yield i
                i += 1

        async with pipe.open(window=1024, max_in_flight=4096) as runner:

            async def consume() -> None:
                async for _ in runner.map(items(), ordered=False):
                    pass

            async def watch() -> None:
                nonlocal stopping
                pending = sorted((events or {}).items())
                while (t := perf_counter() - run.t0) < seconds:
                    run.limits.append((t, runner.stats().stages[0].concurrency_limit))
                    while pending and pending[0][0] <= t:
                        await pending.pop(0)[1]()
                    await asyncio.sleep(0.1)
                stopping = True

            run.t0 = perf_counter()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(consume())
                tg.create_task(watch())
    return run


async def set_knee(base_url: str, k: int) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.post(f"{base_url}/knee", params={"k": k}) as r:
        r.raise_for_status()


async def sweep(
    base_url: str, knee: int, values: list[int], warm: float, measure: float
) -> dict[int, tuple[float, float]]:
    """Throughput and mean latency of each fixed concurrency at ``knee``."""
    await set_knee(base_url, knee)
    out = {}
    for c in values:
        run = await drive(f"{base_url}/work", c, warm + measure)
        out[c] = (run.rate(warm, warm + measure), run.mean_latency(warm, warm + measure))
    return out


def _s(x: float | None) -> str:
    return "never" if x is None else f"{x:.1f}"


def band(knee: int) -> tuple[float, float]:
    """Where the limit should settle for a knee (as in tests/test_core_adaptive.py)."""
    return knee, 1.25 * knee + 2 * math.sqrt(knee) + 2


async def io_main(args: argparse.Namespace) -> Section:
    import flowbatch as fb

    base = args.base_ms / 1000
    proc = subprocess.Popen(  # noqa: ASYNC220 (once, before anything is measured)
        [sys.executable, __file__, "--serve-io", str(base), "32"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        base_url = f"http://127.0.0.1:{port}"
        warm, measure = args.warm, args.measure
        rows: list[list[Any]] = []

        # 1. the sweep at K=32
        fixed32 = await sweep(base_url, 32, args.sweep, warm, measure)
        for c, (rate, lat) in fixed32.items():
            rows.append(["K=32", f"fixed {c}", rate, lat * 1e3, c])
        best_c, (best32, best32_lat) = max(fixed32.items(), key=lambda kv: kv[1][0])

        # 2. Adaptive with no setting, interleaved with the best fixed value
        secs = args.adaptive_s
        fixed_rates, ad_rates, ad_lats, ad_limits, reach = [best32], [], [], [], []
        for _ in range(args.rounds):
            again = await drive(f"{base_url}/work", best_c, warm + measure)
            fixed_rates.append(again.rate(warm, warm + measure))
            ad = await drive(f"{base_url}/work", fb.Adaptive(), secs)
            ad_rates.append(ad.rate(secs / 2, secs))
            ad_lats.append(ad.mean_latency(secs / 2, secs))
            ad_limits.append(ad.mean_limit(secs / 2, secs))
            reach.append(
                ad.first(1.0, secs, lambda t, r=ad: r.rate(t - 1.0, t) >= TARGET_RATIO * best32)
            )
        best32 = median(fixed_rates)
        ad_rate, ad_lat, ad_limit = median(ad_rates), median(ad_lats), median(ad_limits)
        rows.append([f"K=32 x{args.rounds}", f"fixed {best_c} (median)", best32, best32_lat * 1e3, best_c])
        rows.append([f"K=32 x{args.rounds}", "Adaptive() (median)", ad_rate, ad_lat * 1e3, ad_limit])
        ratio = ad_rate / best32
        reached = max((x for x in reach if x is not None), default=None)

        # 3. the new bests at K=8 and K=64
        fixed8 = await sweep(base_url, 8, args.sweep8, warm, measure)
        fixed64 = await sweep(base_url, 64, args.sweep64, warm, measure)
        for k, res in ((8, fixed8), (64, fixed64)):
            for c, (rate, lat) in res.items():
                rows.append([f"K={k}", f"fixed {c}", rate, lat * 1e3, c])
        best8 = max(r for r, _ in fixed8.values())
        best64 = max(r for r, _ in fixed64.values())

        # 4. the knee moves 32 -> 8 -> 64 under one Adaptive run
        await set_knee(base_url, 32)
        t8, t64, end = args.step_s, 2 * args.step_s, 3 * args.step_s
        step = await drive(
            f"{base_url}/work",
            fb.Adaptive(),
            end,
            events={t8: lambda: set_knee(base_url, 8), t64: lambda: set_knee(base_url, 64)},
        )
        rec = {}
        settle = {}
        for k, at, until, best in ((8, t8, t64, best8), (64, t64, end, best64)):
            rec[k] = step.first(
                at + 1.0, until, lambda t, b=best: step.rate(t - 1.0, t) >= RECOVERED * b
            )
            if rec[k] is not None:
                rec[k] += 1.0  # from the move, window included
            lo, hi = band(k)
            settle[k] = step.first(
                at,
                until,
                lambda t, lo=lo, hi=hi: lo <= step.mean_limit(t - 0.5, t + 0.01) <= hi,
            )
            tail = (until - 5.0, until)
            rows.append(
                [
                    f"K=32->{k}" if k == 8 else "K=8->64",
                    "Adaptive() last 5 s",
                    step.rate(*tail),
                    step.mean_latency(*tail) * 1e3,
                    step.mean_limit(*tail),
                ]
            )
        worst = max((v if v is not None else math.inf) for v in rec.values())
        figures = {
            "base_ms": args.base_ms,
            "best_fixed_k32": {
                "concurrency": best_c,
                "items_per_s": r3(best32),
                "runs": [r3(x) for x in fixed_rates],
            },
            "adaptive_k32": {
                "items_per_s": r3(ad_rate),
                "runs": [r3(x) for x in ad_rates],
                "ratio": r3(ratio),
                "mean_limit": r3(ad_limit),
                "mean_latency_ms": r3(ad_lat * 1e3),
                "reached_0_95_s": None if reached is None else r3(reached),
            },
            "best_fixed_latency_ms_k32": r3(best32_lat * 1e3),
            "best_fixed_k8": r3(best8),
            "best_fixed_k64": r3(best64),
            "recovery_s": {f"to_k{k}": None if v is None else r3(v) for k, v in rec.items()},
            "limit_in_band_s": {
                f"k{k}": None if v is None else r3(v) for k, v in settle.items()
            },
            "ratio_verdict": verdict(ratio, TARGET_RATIO),
            "recovery_verdict": verdict(worst, TARGET_RECOVERY_S, higher_is_better=False),
        }
        notes = [
            (
                f"Adaptive() / best fixed (concurrency {best_c}) at K=32, medians of "
                f"{len(ad_rates)} and {len(fixed_rates)} runs: {ratio:.3f} (target >= "
                f"{TARGET_RATIO}: {figures['ratio_verdict']}); its first 1-s window at "
                f"0.95x came after {_s(reached)} s (slowest run; it starts at a limit of 1)"
            ),
            (
                "after the knee moved, seconds until the last 1 s ran within 10% of the new "
                f"best: 32->8 {_s(rec[8])}, 8->64 {_s(rec[64])} (target <= "
                f"{TARGET_RECOVERY_S}: {figures['recovery_verdict']}); until the limit was in "
                f"the knee's band: {_s(settle[8])} / {_s(settle[64])} s"
            ),
        ]
        return Section(
            f"io: an async stage against a service whose latency rises past K calls "
            f"({args.base_ms:g} ms below it)",
            ["knee", "stage concurrency", "calls/s", "mean call ms", "limit"],
            rows,
            figures,
            notes,
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def section_io(args: argparse.Namespace) -> Section:
    return asyncio.run(io_main(args))


def add_io_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("io")
    g.add_argument("--base-ms", type=float, default=50.0, help="the service's call time below its knee")
    g.add_argument("--warm", type=float, default=1.0, help="seconds of each fixed run not counted")
    g.add_argument("--measure", type=float, default=3.0, help="seconds of each fixed run counted")
    g.add_argument("--adaptive-s", type=float, default=14.0, help="seconds of each Adaptive run")
    g.add_argument("--rounds", type=int, default=2, help="Adaptive / best fixed pairs at K=32")
    g.add_argument("--step-s", type=float, default=15.0, help="seconds at each knee (32, 8, 64)")
    g.add_argument(
        "--sweep", type=_ints, default=[4, 8, 16, 24, 32, 40, 48, 64, 128, 256],
        help="fixed concurrency values tried at K=32",
    )
    g.add_argument("--sweep8", type=_ints, default=[4, 8, 16, 32])
    g.add_argument("--sweep64", type=_ints, default=[32, 64, 96, 128])


# ================================================================= replicas

REPLICAS_TARGET_FOLLOW_S = 10.0
REPLICAS_TARGET_RATIO = 0.9


def spin(n: int) -> int:
    """The CPU stage: a pure-Python loop of ``n`` steps (holds the GIL throughout)."""
    s = 0
    for i in range(n):
        s += i * i
    return s


def cpu_stage(concurrency: Any) -> Any:
    import flowbatch as fb

    return fb.Pipeline([fb.stage(spin, name="cpu", executor="process", concurrency=concurrency)])


async def saturated(pipe: Any, steps: int, seconds: float, window: int) -> float:
    """Items/s of ``pipe`` with ``window`` items always in flight, counted over
    ``seconds`` after a one-second warm-up."""
    loop = asyncio.get_running_loop()
    done: list[float] = []
    stop = False
    async with pipe.open() as runner:

        async def client() -> None:
            while not stop:
                await runner.submit(steps)
                done.append(loop.time())

        tasks = [asyncio.ensure_future(client()) for _ in range(window)]
        t0 = loop.time() + 1.0
        await asyncio.sleep(1.0 + seconds)
        stop = True
        await asyncio.gather(*tasks)
    return sum(1 for t in done if t0 <= t < t0 + seconds) / seconds


@dataclass
class Stepped:
    """One run through the load steps: replica samples, completions, losses."""

    samples: list[tuple[float, int]] = field(default_factory=list)  # (t, replicas)
    done: list[float] = field(default_factory=list)  # completion times
    failed: int = 0
    shed: int = 0

    def follow(self, at: float, replicas: int) -> float | None:
        """Seconds from ``at`` until the samples first show ``replicas``."""
        return next((t - at for t, n in self.samples if t >= at and n == replicas), None)

    def rate(self, start: float, end: float) -> float:
        return sum(1 for t in self.done if start <= t < end) / max(end - start, 1e-9)

    def per_second(self, seconds: int) -> str:
        """The replica count at the end of each second, as one digit per second."""
        out = []
        for s in range(seconds):
            at = [n for t, n in self.samples if s <= t < s + 1]
            out.append(str(at[-1]) if at else "?")
        return "".join(out)


async def stepped(
    pipe: Any, steps: int, phases: list[tuple[float, float]], backlog: int
) -> Stepped:
    """Offer ``rate`` items/s for ``seconds``, phase after phase (an open loop).

    An arrival that finds ``backlog`` items in flight is shed (counted), as a
    service in front would answer 503: an offered load a little above what
    the shared machine gives at that moment then cannot build a queue that
    the next phase spends its time working off.
    """
    loop = asyncio.get_running_loop()
    run = Stepped()
    async with pipe.open() as runner:
        t0 = loop.time()
        pending: set[asyncio.Future[Any]] = set()

        def finished(fut: asyncio.Future[Any]) -> None:
            pending.discard(fut)
            if fut.exception() is not None:
                run.failed += 1
            else:
                run.done.append(loop.time() - t0)

        async def sampler() -> None:
            while True:
                run.samples.append((loop.time() - t0, runner.stats().stage("cpu").replicas or 0))
                await asyncio.sleep(0.1)

        watch = asyncio.ensure_future(sampler())
        start = 0.0
        for rate, seconds in phases:
            sent = 0
            while (now := loop.time() - t0) < start + seconds:
                while sent < int((now - start) * rate):
                    sent += 1
                    if len(pending) >= backlog:
                        run.shed += 1
                        continue
                    fut = asyncio.ensure_future(runner.submit(steps))
                    pending.add(fut)
                    fut.add_done_callback(finished)
                await asyncio.sleep(0.005)
            start += seconds
        if pending:
            await asyncio.wait(pending)
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
    return run


def calibrate(target_s: float) -> int:
    """Loop steps that make one call of ``spin`` take about ``target_s`` here."""
    n = 200_000
    t = perf_counter()
    spin(n)
    return max(1000, int(n * target_s / max(perf_counter() - t, 1e-6)))


async def replicas_main(args: argparse.Namespace) -> Section:
    import flowbatch as fb

    steps = calibrate(args.item_ms / 1000)
    hi = args.max_replicas
    window = 4 * hi
    fixed = {}
    for n in range(1, hi + 1):
        fixed[n] = await saturated(cpu_stage(n), steps, args.fixed_s, window)
    best_n = max(fixed, key=lambda n: fixed[n])
    low, high = 0.1 * fixed[best_n], fixed[best_n]
    phases = [(low, args.low_s), (high, args.high_s), (low, args.low_s)]
    run = await stepped(cpu_stage(fb.Adaptive(min=1, max=hi)), steps, phases, args.backlog)
    # The best fixed count again: the reference is the mean of the two runs
    # (the machine is shared; its speed drifts within a run).
    again = await saturated(cpu_stage(best_n), steps, args.fixed_s, window)
    best = (fixed[best_n] + again) / 2
    reference = min(best, high)  # no stage serves more than it is offered
    up_at, down_at = args.low_s, args.low_s + args.high_s
    up_s, down_s = run.follow(up_at, hi), run.follow(down_at, 1)
    # The 100% phase once the replicas have followed (all of it if they never did).
    high_rate = run.rate(up_at + (up_s or 0.0), down_at)
    ratio = high_rate / reference
    follow_ok = up_s is not None and down_s is not None and max(up_s, down_s) <= (
        REPLICAS_TARGET_FOLLOW_S
    )
    figures = {
        "item_ms": args.item_ms,
        "fixed_items_per_s": {str(n): round(v, 1) for n, v in fixed.items()},
        "best_fixed_replicas": best_n,
        "best_fixed_again_items_per_s": round(again, 1),
        "best_fixed_mean_items_per_s": round(best, 1),
        "reference_items_per_s": round(reference, 1),
        "offered_items_per_s": [round(low, 1), round(high, 1), round(low, 1)],
        "follow_up_s": None if up_s is None else round(up_s, 2),
        "follow_down_s": None if down_s is None else round(down_s, 2),
        "follow_verdict": "met" if follow_ok else "MISSED",
        "high_items_per_s": round(high_rate, 1),
        "high_whole_phase_items_per_s": round(run.rate(up_at, down_at), 1),
        "ratio_to_best_fixed": r3(ratio),
        "ratio_verdict": verdict(ratio, REPLICAS_TARGET_RATIO),
        "failed": run.failed,
        "shed": run.shed,
        "replicas_per_second": run.per_second(int(sum(s for _, s in phases))),
    }
    rows: list[list[Any]] = [[f"fixed {n}", round(v, 1), ""] for n, v in fixed.items()]
    rows.append([f"fixed {best_n} again", round(again, 1), ""])
    rows.append([
        "Adaptive, 100% phase after following",
        round(high_rate, 1),
        f"{r3(ratio)} ({figures['ratio_verdict']}, >= {REPLICAS_TARGET_RATIO})",
    ])
    return Section(
        title=(
            f"replicas: CPU stage ({args.item_ms:g} ms pure-Python loop per item, "
            f"process workers), fb.Adaptive(min=1, max={hi}) through 10% -> 100% -> 10% "
            f"of the best fixed count ({args.low_s:g} / {args.high_s:g} / {args.low_s:g} s)"
        ),
        columns=["replicas", "items/s", "vs best fixed (mean of both runs, at most offered)"],
        rows=rows,
        figures=figures,
        notes=[
            f"replicas, one digit per second: {figures['replicas_per_second']}",
            (
                f"replicas followed the step up in {figures['follow_up_s']} s and back "
                f"down in {figures['follow_down_s']} s (target <= "
                f"{REPLICAS_TARGET_FOLLOW_S:g} s: {figures['follow_verdict']}); "
                f"failed {run.failed}, arrivals shed past {args.backlog} in flight {run.shed}"
            ),
        ],
    )


def section_replicas(args: argparse.Namespace) -> Section:
    return asyncio.run(replicas_main(args))


def add_replicas_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("replicas")
    g.add_argument("--max-replicas", type=int, default=2)
    g.add_argument("--item-ms", type=float, default=5.0, help="CPU time of one item")
    g.add_argument("--fixed-s", type=float, default=5.0, help="counted seconds per fixed run")
    g.add_argument("--low-s", type=float, default=15.0, help="seconds of each 10%% phase")
    g.add_argument("--high-s", type=float, default=30.0, help="seconds of the 100%% phase")
    g.add_argument(
        "--backlog", type=int, default=64, help="arrivals past this many in flight are shed"
    )


# =================================================================== serving


def section_serving(args: argparse.Namespace) -> Section:
    """serving.py's default shape, flowbatch beside BentoML, read back from its JSON."""
    import json

    cmd = [sys.executable, str(Path(__file__).resolve().parent / "serving.py"),
           "--servers", "flowbatch,bentoml", "--overload", f"{args.overload:g}",
           "--duration", f"{args.serving_duration:g}", "--windows", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [x for x in out.stdout.splitlines() if x.startswith('{"benchmark"')]
    if out.returncode or not lines:
        raise SystemExit(f"serving.py failed ({out.returncode}):\n{out.stderr[-3000:]}")
    fig = json.loads(lines[-1])
    keys = [k[: -len("_c64")] for k in fig if k.endswith("_c64")]
    rows = []
    for k in keys:
        c1, c64, over = fig[f"{k}_c1"], fig[f"{k}_c64"], fig[f"{k}_overload"]
        rows.append([k, c1["rps"], c1["over_batch1_ms"], c64["rps"], c64["ratio"],
                     over["ratio"], over["p99_ms"], over.get("latency_target_ms") or "-",
                     ", ".join(f"{s}: {n}" for s, n in over["statuses"].items())])
    fb1, fb64, fbo = fig["flowbatch_c1"], fig["flowbatch_c64"], fig["flowbatch_overload"]
    target = fbo.get("latency_target_ms")
    checks = {
        "c64_ratio_met": fb64["ratio"] >= TARGET_RATIO,
        "c1_met": fb1["over_batch1_ms"] <= 1.0,
        "overload_goodput_met": fbo["ratio"] >= 0.9,
        "overload_p99_met": target is not None and fbo["p99_ms"] <= target,
    }
    return Section(
        title=f"serving all-MiniLM-L6-v2 with no limits given: c1, c64, {args.overload:g}x "
              "overload (ratios to the offline limit)",
        columns=["server", "c1 r/s", "c1 p50-b1 ms", "c64 r/s", "c64 x limit",
                 "overload goodput x limit", "overload p99 ms", "latency target ms",
                 "overload statuses"],
        rows=rows,
        figures={**{k: v for k, v in fig.items() if k != "runs"}, **checks},
        notes=[f"serving: {name} {'met' if ok else 'MISSED'}" for name, ok in checks.items()]
        + [f"serving: {' '.join(cmd[1:])}"],
    )


def add_serving_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("serving")
    g.add_argument("--overload", type=float, default=2.0, help="the open loop's multiple of the limit")
    g.add_argument("--serving-duration", type=float, default=15.0, help="seconds per phase")


# ====================================================================== main

SECTIONS: dict[str, Callable[[argparse.Namespace], Section]] = {
    "io": section_io,
    "replicas": section_replicas,
    "serving": section_serving,
}


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-io":
        serve_io(float(sys.argv[2]), int(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--section", choices=["all", *SECTIONS], default="all")
    add_io_args(p)
    add_replicas_args(p)
    add_serving_args(p)
    args = p.parse_args()
    names = list(SECTIONS) if args.section == "all" else [args.section]
    done = [SECTIONS[n](args) for n in names]
    first, *more = done
    report(
        "adaptive",
        first.title,
        first.columns,
        first.rows,
        {name: s.figures for name, s in zip(names, done, strict=True)},
        notes=[n for s in done for n in s.notes],
        tables=[(s.title, s.columns, s.rows) for s in more],
    )


if __name__ == "__main__":
    main()
