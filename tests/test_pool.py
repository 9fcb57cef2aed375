"""tokendb._pool: no reset round trip after tokendb's own statements, the full reset otherwise."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tortoise.transactions import in_transaction

import tokendb
from tokendb import _db, _pool, _tortoise
from tokendb.config import tortoise_config
from tokendb.models import User


@pytest.fixture
def resets(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The reset queries the pool's releases ask for, in order."""
    asked: list[str] = []
    original = _pool.Connection.get_reset_query

    def recorded(self: _pool.Connection) -> str:
        query: str = original(self)
        asked.append(query)
        return query

    monkeypatch.setattr(_pool.Connection, "get_reset_query", recorded)
    yield asked


def test_tokendb_configs_pool_its_connection_class() -> None:
    config = tortoise_config("postgres://app@db.example/tokens")
    assert config["connections"]["default"]["credentials"]["connection_class"] is _pool.Connection


async def test_the_pool_holds_that_class(tokendb_db: str) -> None:
    pool = await _tortoise.pool(_tortoise.models_client())
    proxy = await pool.acquire()
    try:
        assert isinstance(proxy._con, _pool.Connection)  # type: ignore[attr-defined]
    finally:
        await pool.release(proxy)


async def test_tokendb_statements_release_without_the_reset_query(
    tokendb_db: str, resets: list[str]
) -> None:
    await _db.read("SELECT 1")
    await tokendb.list_users(limit=1)
    await _db.transaction(lambda conn: conn.fetch("SELECT 1"))
    assert resets == ["", "", ""]


async def test_the_applications_own_use_gets_the_full_reset(
    tokendb_db: str, resets: list[str]
) -> None:
    await User.all().count()  # the ORM, through the same pool
    async with in_transaction() as client:
        await client.execute_query("SELECT 1")
    assert len(resets) == 2
    assert all("RESET ALL" in query for query in resets)


async def test_session_state_left_by_the_application_never_reaches_tokendb(
    tokendb_db: str,
) -> None:
    """Through Tortoise the application SETs a session setting on every pooled
    connection; tokendb's statements afterwards (on any of them) see the default."""
    pool = await _tortoise.pool(_tortoise.models_client())
    client = _tortoise.models_client()
    for _ in range(pool.get_max_size() * 2):
        await client.execute_query("SET application_name = 'leaked'")
    for _ in range(pool.get_max_size() * 2):
        rows = await _db.read("SELECT current_setting('application_name') AS name")
        assert rows[0]["name"] != "leaked"
        # and tokendb's releases, skipping the reset, leave it so for the application
        _, found = await client.execute_query("SELECT current_setting('application_name') AS name")
        assert found[0]["name"] != "leaked"
