"""Run an app with uvicorn; SIGTERM (or Ctrl-C) drains and exits 0.

On SIGTERM the service reports not ready at once (``/readyz`` 503) and goes
on accepting and serving for ``ServeConfig.shutdown_grace`` seconds, so a
load balancer sees it leave before its listener closes; then uvicorn stops
accepting connections and waits for the requests in flight, and the
lifespan finishes accepted jobs and drains every runner. Ctrl-C (SIGINT),
or a second SIGTERM, skips what is left of the grace period; a second
Ctrl-C forces the exit.

Usage::

    from flowbatch.http import create_app, run
    run(create_app(pipe), host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import copy
import logging
import signal
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from .config import DEFAULT_GRACEFUL_TIMEOUT

if TYPE_CHECKING:
    from .app import FlowbatchApp

__all__ = ["DEFAULT_GRACEFUL_TIMEOUT", "run"]

log = logging.getLogger("flowbatch.http")


class _Server(uvicorn.Server):
    """uvicorn's server, told to drain the service on a signal and to exit 0.

    uvicorn itself re-raises a caught SIGTERM after its graceful shutdown, so
    the process would die by the signal (exit -15); a drained service has
    nothing left to do and ends normally instead.
    """

    def __init__(self, config: uvicorn.Config, app: FlowbatchApp) -> None:
        super().__init__(config)
        self._app = app
        self._grace = app.service.config.shutdown_grace
        #: monotonic time the grace period ends, while in it (None: not in it)
        self._grace_ends: float | None = None
        self._grace_began = self._grace_told = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: no logging here (it may interrupt a log call).
        service = self._app.service
        first = not self.should_exit and not self._grace_began
        if first and sig == signal.SIGTERM and self._grace > 0:
            service.begin_grace()
            self._grace_ends = time.monotonic() + self._grace
            self._grace_began = True
            return
        self._grace_ends = None
        service.begin_drain()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        # uvicorn calls this every 0.1 s: the grace period ends here.
        if self._grace_began and not self._grace_told:
            self._grace_told = True
            log.info("SIGTERM: not ready; still serving for %g s (shutdown_grace), "
                     "then closing", self._grace)
        ends = self._grace_ends
        if ends is not None and time.monotonic() >= ends:
            self._grace_ends = None
            self._app.service.begin_drain()
            self.should_exit = True
        return await super().on_tick(counter)


def run(
    app: FlowbatchApp,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    access_log: bool = False,
    graceful_timeout: int = DEFAULT_GRACEFUL_TIMEOUT,
    **uvicorn_options: Any,
) -> None:
    """Serve ``app`` until SIGTERM or SIGINT; returns once everything is drained.

    ``uvicorn_options`` go to :class:`uvicorn.Config` (``fd``, ``uds``,
    ``ssl_certfile``, ``limit_concurrency``, ...).
    """
    # flowbatch's own messages (pipelines opened, draining) go where uvicorn's go.
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["flowbatch"] = {
        "handlers": ["default"], "level": log_level.upper(), "propagate": False,
    }
    uvicorn_options.setdefault("log_config", log_config)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        timeout_graceful_shutdown=graceful_timeout,
        **uvicorn_options,
    )
    # A failing start (a stage's setup raised) exits with uvicorn's status 3.
    _Server(config, app).run()
