"""Helpers for the scale-out tests (run in the test process, not on workers)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import flowbatch as fb


def through_a_broker_worker(pipe: fb.Pipeline, payloads: Iterable[Any]) -> list[Any]:
    """Submit ``payloads`` to a memory broker, serve them with one broker worker
    running ``pipe`` until the queue is empty, and return the results in order."""
    from flowbatch.brokers import Client, MemoryBroker, Worker, WorkerConfig

    async def main() -> list[Any]:
        broker = MemoryBroker("q")
        async with Client(broker) as client:
            ids = await client.submit_many(list(payloads))
            worker = Worker(pipe, broker, WorkerConfig(prefetch=64, poll=0.02, stop_timeout=30))
            async with asyncio.TaskGroup() as tg:
                tg.create_task(worker.run())
                await worker.wait_started()
                await broker.join()
                worker.stop()
            return [await client.result(job_id, timeout=10) for job_id in ids]

    return asyncio.run(main())
