"""Pick a Broker backend from a URL; each backend's client library is imported on use.

Usage::

    broker = make_broker("redis://127.0.0.1:6379/0", "embed")
"""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from .base import Broker

__all__ = ["BACKENDS", "DEFAULT_BROKER_URL", "DEFAULT_QUEUE", "make_broker"]

#: The embedded default: a SQLite file in the current directory, no server.
DEFAULT_BROKER_URL = "sqlite:///flowbatch-queue.db"
DEFAULT_QUEUE = "default"

#: URL scheme -> (module, class, the pip package it needs)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "memory": ("flowbatch.brokers.memory", "MemoryBroker", ""),
    "sqlite": ("flowbatch.brokers.sqlite", "SQLiteBroker", ""),
    "redis": ("flowbatch.brokers.redis", "RedisBroker", "redis"),
    "rediss": ("flowbatch.brokers.redis", "RedisBroker", "redis"),
    "amqp": ("flowbatch.brokers.amqp", "AMQPBroker", "aio-pika"),
    "amqps": ("flowbatch.brokers.amqp", "AMQPBroker", "aio-pika"),
    "nats": ("flowbatch.brokers.nats", "NATSBroker", "nats-py"),
    "kafka": ("flowbatch.brokers.kafka", "KafkaBroker", "aiokafka"),
}


def make_broker(url: str, queue: str = DEFAULT_QUEUE) -> Broker:
    """A (not yet opened) broker for ``queue`` at ``url``; see ``BACKENDS`` for schemes."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in BACKENDS:
        known = ", ".join(sorted(f"{s}://" for s in BACKENDS))
        raise ValueError(f"unknown broker URL {url!r}: the scheme must be one of {known}")
    module_name, cls_name, package = BACKENDS[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"the {scheme}:// broker needs the {package!r} package "
            f"({exc.name} is missing): pip install 'flowbatch[brokers]'"
        ) from exc
    cls: type[Broker] = getattr(module, cls_name)
    if scheme == "memory":
        return cls(queue)  # type: ignore[call-arg]
    return cls(url, queue)
