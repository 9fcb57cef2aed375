"""The baseline: the same work written by hand against a plain asyncpg pool.

Where tokendb's work is one statement, the baseline sends that very statement
(imported, not copied), so the ratio measures what tokendb adds around it:
argument checks, the storage seam, error translation, model instances.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import asyncpg

from tokendb import _holds_sql, _ledger_sql, _limits_sql, api_keys, keys, usage
from tokendb.connection import init_config
from tokendb.ids import new_id

# What tokendb.init() hands asyncpg besides the address and the pool size
# (through PgBouncer: no server settings, no statement cache).
_POOL_SETTINGS = ("server_settings", "command_timeout", "timeout", "statement_cache_size")


async def create_pool(url: str, *, size: int) -> asyncpg.Pool:
    """A pool configured like tokendb's: the same size, and the same server settings
    (statement and lock timeouts) and client-side bounds that ``tokendb.init()`` asks for."""
    config = await init_config(url, min_size=size, max_size=size, verify_cache=False)
    credentials = config["connections"]["default"]["credentials"]
    options = {key: credentials[key] for key in _POOL_SETTINGS if key in credentials}
    dsn = urlunsplit(urlsplit(url)._replace(query=""))  # asyncpg would send ?pgbouncer=true
    pool = await asyncpg.create_pool(dsn, min_size=size, max_size=size, **options)
    assert pool is not None
    return pool


async def move(pool: asyncpg.Pool, user_id: UUID, delta: int, kind: str) -> asyncpg.Record:
    """One charge (``delta`` < 0) or top-up: :data:`tokendb._ledger_sql.MOVE`."""
    row = await pool.fetchrow(
        _ledger_sql.MOVE, user_id, delta, kind, new_id(), None, None, None, None
    )
    if row is None:
        raise RuntimeError(f"refused: {user_id} {delta}")
    return row


async def charge_limited(
    pool: asyncpg.Pool, user_id: UUID, key_id: UUID, amount: int
) -> asyncpg.Record:
    """A charge through a key with a limit, as tokendb sends it: one transaction that
    locks the key (:data:`tokendb._limits_sql.LOCK_KEY`), reads its window
    (:data:`~tokendb._limits_sql.WINDOW`), locks the user
    (:data:`tokendb._ledger_sql.LOCK_USER`) and debits
    (:data:`~tokendb._ledger_sql.MOVE_DECIDED`)."""
    async with pool.acquire() as conn, conn.transaction():
        key = await conn.fetchrow(_limits_sql.LOCK_KEY, key_id)
        assert key is not None
        used = await conn.fetchval(_limits_sql.WINDOW, key_id, key["limit_period"])
        if used + amount > key["token_limit"]:
            raise RuntimeError(f"limit: {key_id}")
        await conn.fetchrow(_ledger_sql.LOCK_USER, user_id)
        row = await conn.fetchrow(
            _ledger_sql.MOVE_DECIDED, user_id, -amount, "usage", new_id(), None, None, key_id, None
        )
    if row is None:
        raise RuntimeError(f"refused: {user_id} {amount}")
    return row


async def usage_report(
    pool: asyncpg.Pool, user_id: UUID, since: Any, until: Any
) -> list[asyncpg.Record]:
    """:func:`tokendb.usage_report`'s statement, grouped by day, model and key."""
    return await pool.fetch(usage._statement(usage.GROUPINGS), user_id, since, until, None, None)


async def charge_batch(pool: asyncpg.Pool, user_ids: list[UUID], amount: int) -> list[Any]:
    """Many charges in one statement: :data:`tokendb._ledger_sql.BATCH`."""
    count = len(user_ids)
    rows = await pool.fetch(
        _ledger_sql.BATCH,
        user_ids,
        [amount] * count,
        [new_id() for _ in user_ids],
        [None] * count,
        [None] * count,
        [None] * count,
        [None] * count,
    )
    if len(rows) != count or any(row["outcome"] != "moved" for row in rows):
        raise RuntimeError("a batched charge was refused")
    return rows


async def verify(pool: asyncpg.Pool, secret: str) -> asyncpg.Record:
    """Look an API key up by its hash with its user (:data:`tokendb.api_keys._LOOKUP`);
    refuse revoked and expired keys. No ``last_used_at`` bookkeeping."""
    row = await pool.fetchrow(api_keys._LOOKUP, keys.hash_key(secret))
    if row is None or not row["is_active"]:
        raise RuntimeError("invalid key")
    if row["expires_at"] is not None and row["expires_at"] <= row["checked_at"]:
        raise RuntimeError("expired key")
    return row


async def add_message(pool: asyncpg.Pool, session_id: UUID, content: str, tokens: int) -> Any:
    """Message + session total + debit: :data:`tokendb._ledger_sql.ADD_MESSAGE`."""
    row = await pool.fetchrow(
        _ledger_sql.ADD_MESSAGE,
        new_id(),
        session_id,
        "user",
        content,
        tokens,
        new_id(),
        None,
        False,  # the key's limit not decided here: nothing moves through a limited key
    )
    if row is None:
        raise RuntimeError("session ended")
    return row


async def first_page(pool: asyncpg.Pool, user_id: UUID, limit: int) -> list[asyncpg.Record]:
    """The newest ``limit`` ledger rows of a user (:data:`tokendb._ledger_sql.PAGES`)."""
    return await pool.fetch(_ledger_sql.PAGES[0], user_id, limit)


async def hold_and_capture(
    pool: asyncpg.Pool, user_id: UUID, held: int, used: int, ttl: timedelta
) -> asyncpg.Record:
    """One completion: :data:`tokendb._holds_sql.HOLD` then :data:`~tokendb._holds_sql.CAPTURE`."""
    hold = await pool.fetchrow(
        _holds_sql.HOLD, user_id, held, new_id(), None, None, ttl, None, None
    )
    if hold is None:
        raise RuntimeError(f"hold refused: {user_id} {held}")
    row = await pool.fetchrow(_holds_sql.CAPTURE, hold["id"], used, new_id(), None)
    if row is None:
        raise RuntimeError(f"capture refused: {hold['id']}")
    return row
