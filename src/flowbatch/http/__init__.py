"""Serve flowbatch pipelines over HTTP (``pip install 'flowbatch[http]'``).

Usage::

    from flowbatch.http import ServeConfig, create_app, run

    app = create_app(pipe, config=ServeConfig(api_key="s3cret"))   # any ASGI server
    run(app, host="127.0.0.1", port=8000)   # uvicorn; SIGTERM drains, exits 0

or from the shell: ``flowbatch serve module:pipeline --port 8000``.

Names load on first use, so ``flowbatch.http.cli`` (the ``serve`` command)
imports without Starlette or uvicorn until the command runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import FlowbatchApp, create_app
    from .config import ServeConfig
    from .oip import Signature, TensorSpec
    from .server import run
    from .stores import Job, JobStore, MemoryJobStore, SQLiteJobStore

__all__ = [
    "FlowbatchApp",
    "Job",
    "JobStore",
    "MemoryJobStore",
    "SQLiteJobStore",
    "ServeConfig",
    "Signature",
    "TensorSpec",
    "create_app",
    "run",
]

_WHERE = {
    "FlowbatchApp": "app", "create_app": "app", "ServeConfig": "config",
    "Signature": "oip", "TensorSpec": "oip", "run": "server", "Job": "stores",
    "JobStore": "stores", "MemoryJobStore": "stores", "SQLiteJobStore": "stores",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'flowbatch.http' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
