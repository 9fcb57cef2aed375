"""pytest plugin: a throw-away, migrated tokendb database for async test suites.

Installed with tokendb and registered under the ``pytest11`` entry point, so
its fixtures are available in any suite; it defines **no autouse fixture**, so
installing tokendb changes nothing in suites that do not ask for them.

Fixtures:

``tokendb_db`` (session)
    Creates a database with a unique name on the server named by
    ``--tokendb-url`` or ``TOKENDB_TEST_DATABASE_URL`` (default
    ``postgres://postgres@127.0.0.1:5432/postgres``), applies tokendb's
    migrations through Aerich, initialises tokendb on it and yields its URL.
    The database is dropped at the end of the session, also on failure. For
    the session, argon2 runs with cheap parameters (tests only!).
``tokendb_clean``
    Truncates tokendb's tables (not Aerich's) before the test.
``make_user``, ``make_api_key``, ``funded_user``
    Factories going through the public operations.

The session-scoped fixture lives on the session event loop, so the suite must
run its tests there too (pytest-asyncio ≥ 1.0)::

    [tool.pytest.ini_options]
    asyncio_default_fixture_loop_scope = "session"
    asyncio_default_test_loop_scope = "session"
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio

import tokendb
from tokendb import passwords

if TYPE_CHECKING:
    from tokendb.models import ApiKey, User

__all__ = [
    "DEFAULT_TEST_DATABASE_URL",
    "TABLES",
    "funded_user",
    "make_api_key",
    "make_user",
    "test_server_url",
    "throwaway_database",
    "tokendb_clean",
    "tokendb_db",
    "truncate_all",
]

DEFAULT_TEST_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/postgres"
TABLES = ("chat_messages", "chat_sessions", "token_transactions", "api_keys", "users")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tokendb")
    group.addoption(
        "--tokendb-url",
        default=None,
        help="PostgreSQL server URL on which tokendb_db creates its throw-away database "
        "(default: $TOKENDB_TEST_DATABASE_URL, else " + DEFAULT_TEST_DATABASE_URL + ")",
    )


def test_server_url(config: pytest.Config | None = None) -> str:
    """The admin URL of the server that throw-away test databases are created on."""
    option = config.getoption("--tokendb-url", default=None) if config is not None else None
    return str(option or os.environ.get("TOKENDB_TEST_DATABASE_URL") or DEFAULT_TEST_DATABASE_URL)


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def _asyncpg_dsn(url: str) -> str:
    # asyncpg speaks postgresql:// and postgres:// but not Tortoise's asyncpg://.
    return url.replace("asyncpg://", "postgres://", 1)


@asynccontextmanager
async def throwaway_database(
    server_url: str, *, prefix: str = "tokendb_test"
) -> AsyncIterator[str]:
    """Create an empty database on ``server_url``, yield its URL, drop it afterwards.

    The drop uses ``WITH (FORCE)``, so connections left open by a failing
    test do not keep the database alive.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(_asyncpg_dsn(server_url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield _with_database(server_url, name)
    finally:
        admin = await asyncpg.connect(_asyncpg_dsn(server_url))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def truncate_all() -> None:
    """Empty tokendb's tables (keeping Aerich's migration history)."""
    from tokendb import _db

    await _db.write(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def tokendb_db(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A migrated throw-away database with tokendb initialised on it; yields its URL."""
    # Cheap argon2 parameters for the session: production-strength hashing
    # costs ~100 ms a user and would dominate any suite that creates users.
    passwords.configure(time_cost=1, memory_cost=1024, parallelism=1)
    async with throwaway_database(test_server_url(request.config)) as url:
        await tokendb.migrate(url)
        await tokendb.init(url, min_size=1, max_size=20)
        try:
            yield url
        finally:
            await tokendb.close()
            passwords.configure()


@pytest_asyncio.fixture(loop_scope="session")
async def tokendb_clean(tokendb_db: str) -> AsyncIterator[str]:
    """``tokendb_db``, emptied before the test."""
    await truncate_all()
    yield tokendb_db


@pytest.fixture
def make_user(tokendb_db: str) -> Any:
    """``await make_user(email=None, password=..., name=..., role=...)`` creates a user.

    Unique emails are generated when none is given.
    """

    async def factory(
        *,
        email: str | None = None,
        password: str = "correct horse battery",
        name: str = "Test User",
        **options: Any,
    ) -> User:
        email = email or f"user-{uuid.uuid4().hex[:10]}@example.com"
        return await tokendb.create_user(email=email, password=password, name=name, **options)

    return factory


@pytest.fixture
def make_api_key(make_user: Any) -> Any:
    """``await make_api_key(user=None, name="test key", **options)``: ``(ApiKey, secret)``."""

    async def factory(
        *, user: User | uuid.UUID | None = None, name: str = "test key", **options: Any
    ) -> tuple[ApiKey, str]:
        owner = user if user is not None else await make_user()
        return await tokendb.issue_api_key(user=owner, name=name, **options)

    return factory


@pytest.fixture
def funded_user(make_user: Any) -> Any:
    """``await funded_user(balance=1000)`` creates a user whose balance is exactly ``balance``.

    Goes through the ledger (a top-up or a charge after the signup bonus), so
    the books balance.
    """

    async def factory(*, balance: int = 1000, **options: Any) -> User:
        user = await make_user(**options)
        difference = balance - user.token_balance
        if difference > 0:
            await tokendb.top_up(user=user, amount=difference, description="test funding")
        elif difference < 0:
            await tokendb.charge(user=user, amount=-difference, description="test funding")
        return await tokendb.get_user(user_id=user.id)

    return factory
