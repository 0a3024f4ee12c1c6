"""How well the autoscaling signals predict a broker worker's drain time.

A ``flowbatch worker`` (SQLite queue, a batched stage of up to 8 items taking
50 ms: about 160 items/s) is given N messages; its ``/metrics`` is scraped
every ``--every`` seconds until the queue is empty. At each scrape the drain
estimate of docs/autoscaling.md, (lag + in flight) / capacity, is set against
the time the queue actually took to drain from there (known to within one
scrape interval). Prints a table, then one JSON line: the worst and median
error, and the capacity read against the stage's ceiling.

Usage::

    python benchmarks/drain_estimate.py --messages 1600 --every 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import flowbatch as fb

HERE = Path(__file__).resolve().parent
BATCH, CALL_S = 8, 0.05


async def crawl_batch(items: list[Any]) -> list[Any]:
    await asyncio.sleep(CALL_S)  # stands in for model work
    return items


def crawl() -> fb.Pipeline:
    """The worker's target: batches of up to 8, 50 ms each."""
    return fb.Pipeline([fb.stage(crawl_batch, batch=fb.Batch(max_size=BATCH))], name="crawl")


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        s.name: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name.startswith(("flowbatch_broker_", "flowbatch_pipeline_"))
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=1600)
    p.add_argument("--every", type=float, default=0.5, help="seconds between scrapes")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/queue.db"

        async def publish() -> None:
            async with fb.Client(url, "drain") as client:
                await client.submit_many([{"n": i} for i in range(args.messages)])

        asyncio.run(publish())
        log = Path(tmp) / "worker.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            x for x in (str(HERE), os.environ.get("PYTHONPATH", "")) if x))
        with log.open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flowbatch.brokers", "worker", "drain_estimate:crawl",
                 "--broker", url, "--queue", "drain", "--concurrency", "64",
                 "--metrics-port", "0", "--lag-interval", str(args.every / 2)],
                stdout=subprocess.DEVNULL, stderr=err, env=env,
            )
        try:
            deadline = time.monotonic() + 60
            while (m := re.search(r"metrics: (http://\S+)", log.read_text())) is None:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"the worker did not start; see:\n{log.read_text()}")
                time.sleep(0.05)
            rows: list[tuple[float, dict[str, float]]] = []
            while True:
                g = scrape(m.group(1))
                rows.append((time.monotonic(), g))
                if g.get("flowbatch_broker_lag_messages") == 0 and not g.get(
                        "flowbatch_pipeline_in_flight") and len(rows) > 2:
                    break
                time.sleep(args.every)
        finally:
            proc.terminate()
            proc.wait(60)
    end = rows[-1][0]
    errors: list[float] = []
    caps: list[float] = []
    print(f"{'left (s)':>9} {'lag':>6} {'in flight':>9} {'capacity/s':>10} {'estimate (s)':>12}")
    for t, g in rows[:-1]:
        lag, cap = g.get("flowbatch_broker_lag_messages"), g.get(
            "flowbatch_pipeline_capacity_items_per_second")
        held = g.get("flowbatch_pipeline_in_flight", 0.0)
        if lag is None or cap is None:
            continue
        estimate = (lag + held) / cap
        errors.append(abs(estimate - (end - t)))
        caps.append(cap)
        print(f"{end - t:9.1f} {lag:6.0f} {held:9.0f} {cap:10.1f} {estimate:12.1f}")
    if not errors:
        raise SystemExit("no scrape had a capacity: too few messages for --every")
    ceiling = BATCH / CALL_S
    result = {
        "messages": args.messages,
        "scrape_every_s": args.every,
        "max_error_s": round(max(errors), 3),
        "median_error_s": round(statistics.median(errors), 3),
        "capacity_vs_ceiling": round(statistics.median(caps) / ceiling, 3),
    }
    print(f"estimate error: max {result['max_error_s']} s, median {result['median_error_s']} s "
          f"(true drain time known to within {args.every} s); capacity "
          f"{result['capacity_vs_ceiling']:.0%} of the stage's ceiling ({ceiling:.0f}/s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
