"""Helpers shared by the test modules."""

from __future__ import annotations


async def table_counts() -> dict[str, int]:
    """Rows per tokendb table and summed counters: equal before and after = nothing written."""
    from tokendb import _db
    from tokendb.testing import TABLES

    counts = {}
    for table in TABLES:
        counts[table] = (await _db.read(f"SELECT count(*) AS n FROM {table}"))[0]["n"]
    counts["Σ balance"] = (
        await _db.read("SELECT coalesce(sum(token_balance), 0) AS n FROM users")
    )[0]["n"]
    counts["Σ tokens_used"] = (
        await _db.read("SELECT coalesce(sum(tokens_used), 0) AS n FROM chat_sessions")
    )[0]["n"]
    return counts
