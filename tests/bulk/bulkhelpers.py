"""Helpers of the bulk tests (a module of its own: `conftest` is not importable by name
when the whole suite runs)."""

from __future__ import annotations

import asyncio


def pg_run(dsn: str, sql: str, *args: object) -> list[dict[str, object]]:
    """Run SQL; a SELECT's rows as dicts."""
    import asyncpg

    async def go() -> list[dict[str, object]]:
        conn = await asyncpg.connect(dsn)
        try:
            if not sql.lstrip().upper().startswith("SELECT"):
                await conn.execute(sql, *args)  # may hold several statements
                return []
            return [dict(r.items()) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(go())
