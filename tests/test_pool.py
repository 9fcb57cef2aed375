"""tokendb._pool: no reset round trip after tokendb's own statements, the full reset otherwise."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

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


async def test_tokendb_inside_the_callers_transaction_leaves_it_the_full_reset(
    tokendb_db: str, resets: list[str]
) -> None:
    """The caller's connection is the caller's: tokendb's statements in it never mark it."""
    async with in_transaction() as client:
        await _db.read("SELECT 1")
        await _db.write("SELECT 1")
        await tokendb.list_users(limit=1)
        await _db.transaction(lambda conn: conn.fetch("SELECT 1"))
        await client.execute_query("SELECT 1")
    assert len(resets) == 1 and "RESET ALL" in resets[0], resets


_SESSION_STATE = re.compile(
    r"set_config\([^)]*,\s*false\)|(?:^|;)\s*SET\s+(?!LOCAL\b)"
    r"|\bLISTEN\s+\w|pg_advisory_lock\(|pg_try_advisory_lock\(|\bDECLARE\s+\w+\s+CURSOR"
    r"|\bCREATE\s+TEMP|\bPREPARE\s+TRANSACTION",
    re.IGNORECASE,
)
"""SQL that leaves session state on a connection (what asyncpg's reset query clears)."""


def _sql_texts(source: str) -> list[str]:
    """The string constants of a module but its docstrings (f-strings' literal parts too)."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_no_statement_tokendb_sends_on_the_pool_leaves_session_state() -> None:
    """The reset is skipped after tokendb's statements only because none leaves state:
    no string in a module that sends statements through the pool holds such SQL (the
    verify cache's LISTEN runs on its own connection, outside the pool)."""
    package = Path(tokendb.__file__).parent
    own_connection = {"_key_cache.py"}  # asyncpg.connect(): never a pooled connection
    found = {
        (path.name, match.group(0))
        for path in sorted(package.glob("*.py"))
        if path.name not in own_connection and "_db." in path.read_text()
        for text in _sql_texts(path.read_text())
        for match in _SESSION_STATE.finditer(text)
    }
    # migrate()'s lock: on a connection of its own Tortoise context, never through _db
    # (that pool's connections get asyncpg's full reset).
    assert found == {("connection.py", "pg_advisory_lock(")}
    # The pattern does find what it is for.
    for leaves_state in (
        "SELECT set_config('jit', 'off', false)",
        "SET statement_timeout = 0",
        "SET SESSION lock_timeout TO 0",
        "LISTEN tokendb",
        "SELECT pg_advisory_lock(1)",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "CREATE TEMP TABLE t (x int)",
        "SET ROLE app",
        "SELECT 1; SET search_path = x",
    ):
        assert _SESSION_STATE.search(leaves_state), leaves_state
    assert not _SESSION_STATE.search("SELECT set_config('lock_timeout', $8, true)")
    assert not _SESSION_STATE.search("UPDATE users SET token_balance = token_balance + 1")
    assert not _SESSION_STATE.search("SET LOCAL lock_timeout = '1s'")


def test_marking_another_kind_of_connection_is_a_no_op() -> None:
    """A connection of a pool tokendb did not configure (or a proxy already released,
    whose attributes are gone) has no skip_next_reset: marking it never raises, and
    asyncpg's full reset stays."""

    class Detached:
        def __getattr__(self, name: str) -> object:
            raise AttributeError(name)  # as asyncpg's proxy once released

    _pool.release_unchanged(object())
    _pool.release_unchanged(Detached())
