"""Suite-wide settings: tests that need a real server, model or subprocess farm are marked.

`make test-fast` runs ``pytest -m "not integration"`` (the engine's unit tests,
well under a minute here); `make test` runs everything. The marker is given by
folder so a new test file lands on the right side without anyone remembering.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent
# Folders and files whose tests talk to brokers, HTTP servers in subprocesses,
# terminals and browsers, or load the real model.
_INTEGRATION = (
    "brokers", "bulk", "http", "observe", "scaleout", "test_demo.py", "test_models.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        try:
            first = Path(str(item.path)).relative_to(_HERE).parts[0]
        except ValueError:
            continue
        if first in _INTEGRATION:
            item.add_marker(pytest.mark.integration)
