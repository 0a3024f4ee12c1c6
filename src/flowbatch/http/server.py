"""Run an app with uvicorn; SIGTERM (or Ctrl-C) drains and exits 0.

On the signal the service reports not ready at once, uvicorn stops
accepting connections and waits for the requests in flight, then the
lifespan finishes accepted jobs and drains every runner. A second Ctrl-C
forces the exit.

Usage::

    from flowbatch.http import create_app, run
    run(create_app(pipe), host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import copy
import signal
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from .config import DEFAULT_GRACEFUL_TIMEOUT

if TYPE_CHECKING:
    from .app import FlowbatchApp

__all__ = ["DEFAULT_GRACEFUL_TIMEOUT", "run"]



class _Server(uvicorn.Server):
    """uvicorn's server, told to drain the service on a signal and to exit 0.

    uvicorn itself re-raises a caught SIGTERM after its graceful shutdown, so
    the process would die by the signal (exit -15); a drained service has
    nothing left to do and ends normally instead.
    """

    def __init__(self, config: uvicorn.Config, app: FlowbatchApp) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._app.service.begin_drain()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


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
