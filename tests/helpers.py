"""Helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg

from tokendb import _db, _settings
from tokendb.testing import TABLES

# Per table: its row count, and a digest of every row, so an UPDATE that
# keeps the count shows as well as an INSERT or a DELETE.
STATE_SQL = "SELECT " + ", ".join(
    f"(SELECT count(*) FROM {table}) AS {table}, "
    f"(SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {table} t)"
    f" AS {table}_digest"
    for table in TABLES
)


async def table_counts(conn: asyncpg.Connection | None = None) -> dict[str, Any]:
    """Row counts and row digests of tokendb's tables: equal before and after = nothing written.

    Read through tokendb's pool, or on ``conn`` (an observer outside it).
    """
    row = await conn.fetchrow(STATE_SQL) if conn is not None else (await _db.read(STATE_SQL))[0]
    return dict(row)


async def tamper(sql: str, *args: object) -> None:
    """Change committed rows around the Python layer, triggers off (superuser test server).

    For tests that prove a check finds what the database's own backstops
    would have refused.
    """

    async def body(conn: _db.Connection) -> None:
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(sql, *args)

    await _db.transaction(body)


@contextlib.asynccontextmanager
async def holding_row_lock(url: str, user_id: uuid.UUID) -> AsyncIterator[asyncpg.Connection]:
    """Lock ``user_id``'s row from outside tokendb until the block ends (then roll back)."""
    conn = await asyncpg.connect(url)
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id)
        yield conn
    finally:
        await tx.rollback()
        await conn.close()


async def blocked_backends(conn: asyncpg.Connection, like: str = "%") -> list[int]:
    """Backends of this database waiting for a lock, running a statement like ``like``.

    Waits (up to 5 s) until there is one, so a race test knows its second
    statement is really queued behind the first before it lets the first go.
    """
    for _ in range(500):
        # Inside a transaction pg_stat_activity is read once and cached: clear it.
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        pids = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND state = 'active' AND query LIKE $1",
            like,
        )
        if pids:
            return [row["pid"] for row in pids]
        await asyncio.sleep(0.01)
    raise AssertionError("no statement started waiting for the lock")


@contextlib.contextmanager
def db_settings(**changes: Any) -> Iterator[None]:
    """The seam's settings (:class:`tokendb._settings.Settings`) changed for the block only."""
    with _settings.using(**changes):
        yield


@contextlib.asynccontextmanager
async def asgi_client(app: Any, base_url: str = "http://test") -> AsyncIterator[Any]:
    """An httpx client talking to ``app`` in-process, with its lifespan run around it."""
    import httpx
    from asgi_lifespan import LifespanManager

    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as http:
            yield http


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_module(name: str, path: Path) -> ModuleType:
    """Import the Python file ``path`` as module ``name`` (an example, a README block)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
