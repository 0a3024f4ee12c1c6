"""One Ray for the whole folder (a two-node cluster on this machine) and a
Dask LocalCluster of two worker processes; both stopped at the end.

Ray starts once (about ten seconds here): every Ray test shares it, and
each leaves no actor behind (a runner's close kills its actors). Both
clusters stop after this folder's last test, not at the end of the session.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import scaleoutstages

_HERE = Path(__file__).parent
_STOPS: list[Callable[[], None]] = []


def _running(stop: Callable[[], None], value: Any) -> Iterator[Any]:
    """Yield ``value``; ``stop`` runs once: after this folder's last test
    (so that no cluster idles through the rest of the suite) or at the end."""
    done = False

    def once() -> None:
        nonlocal done
        if not done:
            done = True
            stop()

    _STOPS.append(once)
    try:
        yield value
    finally:
        once()


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if nextitem is None or Path(str(nextitem.path)).parent != _HERE:
        while _STOPS:
            _STOPS.pop()()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A head node with 2 CPUs; tests may add and remove nodes."""
    ray = pytest.importorskip("ray")
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    cloudpickle.register_pickle_by_value(scaleoutstages)
    # Other Ray instances on this machine rewrite the shared token file
    # (~/.ray/auth_token); this cluster and the drivers it starts use none.
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_AUTH_MODE", "disabled")
    sigterm = signal.getsignal(signal.SIGTERM)  # ray.init replaces it for good
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "include_dashboard": False,
            "_system_config": {
                # A removed node is noticed in a second or two, not 30 s.
                "health_check_initial_delay_ms": 0,
                "health_check_period_ms": 300,
                "health_check_failure_threshold": 3,
            },
        },
    )
    ray.init(address=cluster.address, log_to_driver=False)

    def stop() -> None:
        ray.shutdown()
        cluster.shutdown()
        patch.undo()
        signal.signal(signal.SIGTERM, sigterm)

    yield from _running(stop, cluster)


@pytest.fixture(scope="session")
def dask_cluster() -> Iterator[Any]:
    """A LocalCluster of 2 worker processes with 1 thread each."""
    distributed = pytest.importorskip("distributed")
    from dask.base import normalize_token  # noqa: F401 - loads dask before the cluster

    cloudpickle = pytest.importorskip("cloudpickle")
    cloudpickle.register_pickle_by_value(scaleoutstages)
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    yield from _running(cluster.close, cluster)
