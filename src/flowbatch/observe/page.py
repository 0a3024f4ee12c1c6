"""Self-contained HTML pages: the bench report and the live dashboard.

Both inline the same stylesheet and the same chart script
(``charts.js``, beside this module), so a report opened from disk fetches
nothing and the dashboard fetches only its own JSON.
"""

from __future__ import annotations

import html
import json
import math
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["charts_js", "finite", "live_page", "report_page"]

CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       margin: 24px; color: #111827; background: #f8fafc; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 24px 0 2px; }
.sub, #fb-status { color: #6b7280; margin: 0 0 12px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 10px 0; }
.card { background: #fff; border: 1px solid #e5e7eb; border-radius: 8px; padding: 8px 14px;
        min-width: 110px; }
.card .v { font-size: 20px; font-weight: 600; }
.card .k { color: #6b7280; font-size: 12px; }
.advice { background: #fff7ed; border: 1px solid #fed7aa; border-radius: 8px;
          padding: 10px 10px 10px 30px; margin: 10px 0; }
.advice li { margin: 2px 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 12px; }
.cell { background: #fff; border: 1px solid #e5e7eb; border-radius: 8px; padding: 6px; }
svg.chart { width: 100%; height: auto; display: block; }
svg .title { font-size: 13px; font-weight: 600; fill: #111827; }
svg .tick, svg .legend { font-size: 10px; fill: #6b7280; }
svg .label { font-size: 12px; fill: #111827; }
svg .grid { stroke: #e5e7eb; }
svg .track { fill: #f1f5f9; }
table.stages { border-collapse: collapse; margin: 12px 0; background: #fff; }
table.stages th, table.stages td { border: 1px solid #e5e7eb; padding: 4px 10px; text-align: right; }
table.stages th:first-child, table.stages td:first-child { text-align: left; }
table.stages tr.neck td { color: #b91c1c; font-weight: 600; background: #fef2f2; }
"""


@cache
def charts_js() -> str:
    """The chart script shared by the report and the dashboard."""
    return resources.files(__package__).joinpath("charts.js").read_text(encoding="utf-8")


def finite(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite(v) for v in data]
    return data


def _script_json(data: Any) -> str:
    """JSON safe inside a ``<script>`` element."""
    text = json.dumps(finite(data), separators=(",", ":"), allow_nan=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _page(title: str, body: str, script: str) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
        f"<body>{body}<script>{charts_js()}</script><script>{script}</script></body></html>\n"
    )


def report_page(report: dict[str, Any], heading: str) -> str:
    """A static page drawing ``report`` (see ``FB.renderReport`` in charts.js)."""
    body = f"<h1>{html.escape(heading)}</h1><div id=\"fb-report\"></div>"
    script = (
        f"var REPORT = {_script_json(report)};\n"
        "FB.renderReport(document.getElementById('fb-report'), REPORT);"
    )
    return _page(heading, body, script)


def live_page(stats_url: str, interval_ms: int, heading: str = "flowbatch dashboard") -> str:
    """A page that polls ``stats_url`` and redraws every ``interval_ms``."""
    body = (
        f"<h1>{html.escape(heading)}</h1><p id=\"fb-status\">loading...</p>"
        "<div id=\"fb-live\"></div>"
    )
    script = (
        f"FB.live(document.getElementById('fb-live'), {_script_json(stats_url)}, "
        f"{int(interval_ms)});"
    )
    return _page(heading, body, script)
