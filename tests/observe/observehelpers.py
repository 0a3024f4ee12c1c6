"""Helpers for the observability tests: tools on PATH, the live server, a browser.

(Not in conftest.py: several test folders have one, and ``from conftest
import`` would pick whichever was loaded last.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable


def env_with_helpers() -> dict[str, str]:
    """The environment for a child process that imports ``observepipes``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@contextlib.contextmanager
def live_server(*args: str) -> Iterator[int]:
    """The helper server of observepipes.py under load; yields its port."""
    proc = subprocess.Popen(
        [PYTHON, str(HERE / "observepipes.py"), "--clients", "16", *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env_with_helpers(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        yield int(line.split()[1])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def wait_for_screen(session: str, want: list[str], timeout: float = 60.0) -> str:
    """Poll the tmux pane until every string of ``want`` is on screen."""
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", session],
            capture_output=True, text=True, check=True,
        ).stdout
        if all(w in screen for w in want):
            return screen
        time.sleep(0.2)  # polling the condition, not standing in for it
    raise AssertionError(f"never saw {want} on screen:\n{screen}")


def dump_dom(browser: str, url: str, budget_ms: int) -> str:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={profile}",
             f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
            capture_output=True, text=True, timeout=90, check=True,
        ).stdout
