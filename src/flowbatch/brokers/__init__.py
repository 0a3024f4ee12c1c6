"""Broker workers: consume jobs from a message broker into a pipeline.

Usage::

    # producer
    async with fb.Client("redis://127.0.0.1:6379/0", queue="embed") as client:
        job_id = await client.submit({"text": "hello"})
        vector = await client.result(job_id, timeout=30)

    # worker (or: python -m flowbatch.brokers worker mymod:pipe --broker ... --queue embed)
    worker = Worker(pipe, make_broker("redis://127.0.0.1:6379/0", "embed"))
    await worker.run()

Importing this package imports no broker client library; each backend
module imports its own (redis, aio-pika, nats-py, aiokafka) when chosen.
"""

from __future__ import annotations

from .base import (
    Broker,
    BrokerError,
    BrokerRefused,
    BrokerUnreachable,
    BrokerUnsupported,
    DeadLetter,
    Delivery,
    JobFailed,
    Outcome,
    QueueStats,
    ResultRecord,
    ResultTimeout,
)
from .client import Client
from .config import DEFAULT_WORKER_CONFIG, WorkerConfig
from .memory import MemoryBroker
from .metrics import WorkerCollector
from .registry import BACKENDS, DEFAULT_BROKER_URL, DEFAULT_QUEUE, make_broker
from .worker import Worker, WorkerStats

__all__ = [
    "BACKENDS",
    "DEFAULT_BROKER_URL",
    "DEFAULT_QUEUE",
    "DEFAULT_WORKER_CONFIG",
    "Broker",
    "BrokerError",
    "BrokerRefused",
    "BrokerUnreachable",
    "BrokerUnsupported",
    "Client",
    "DeadLetter",
    "Delivery",
    "JobFailed",
    "MemoryBroker",
    "Outcome",
    "QueueStats",
    "ResultRecord",
    "ResultTimeout",
    "Worker",
    "WorkerCollector",
    "WorkerConfig",
    "WorkerStats",
    "make_broker",
]
