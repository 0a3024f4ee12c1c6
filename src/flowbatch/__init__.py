"""flowbatch: overlap I/O, CPU work and batched model inference in one asyncio pipeline.

Usage::

    import flowbatch as fb

    @fb.stage(concurrency=32)
    async def fetch(url): ...

    @fb.stage(batch=fb.Batch(max_size=64))
    def embed(texts): ...

    pipe = fb.Pipeline([fetch, embed], name="embed")
    async with pipe.open() as runner:
        vector = await runner.submit(url, timeout=5)
"""


from .adaptive import Adaptive
from .batching import Batch
from .devices import Devices
from .errors import (
    Backpressure,
    BatchContractError,
    DeadlineExceeded,
    FlowbatchError,
    ItemFailed,
    Overloaded,
    PipelineClosed,
    PipelineError,
    WorkerCrashed,
)
from .executors import Executor
from .limits import CapacityLimiter, LimiterStats
from .metrics import PipelineStats, StageStats, Summary
from .pipeline import Pipeline
from .replicas import ReplicaRule
from .retry import Retry
from .runner import Runner
from .stage import Stage, stage

__version__ = "0.1.0"

# Front-end names load on first use, so `import flowbatch` stays the engine alone.
_LAZY = {
    "Client": "flowbatch.brokers.client",
    "JobFailed": "flowbatch.brokers.base",
}


# Optional executors, imported on first use (`fb.ray.actors(...)`): they need
# their extra (`flowbatch[ray]`, `flowbatch[dask]`).
_SUBMODULES = ("ray", "dask")


def __getattr__(name: str) -> object:
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"flowbatch.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flowbatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

__all__ = [
    "Adaptive",
    "Backpressure",
    "Batch",
    "BatchContractError",
    "CapacityLimiter",
    "Client",
    "DeadlineExceeded",
    "Devices",
    "Executor",
    "FlowbatchError",
    "ItemFailed",
    "JobFailed",
    "LimiterStats",
    "Overloaded",
    "Pipeline",
    "PipelineClosed",
    "PipelineError",
    "PipelineStats",
    "ReplicaRule",
    "Retry",
    "Runner",
    "Stage",
    "StageStats",
    "Summary",
    "WorkerCrashed",
    "__version__",
    "stage",
]
