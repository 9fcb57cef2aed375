"""tokendb's own suite dogfoods its pytest plugin (tokendb.testing, loaded via pytest11).

Every module runs against the throw-away database ``tokendb_db`` creates and
migrates through Aerich, so a constraint missing from the migrations fails
here. After each test that uses it, the books must balance.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from tests.helpers import audit_books
from tokendb import embedded, ledger
from tokendb.schema import AUDIT_TABLES, TABLES

pytest_plugins = ["pytester"]  # tests/test_testing.py runs downstream suites


@pytest.fixture(scope="module")
def embedded_data_dir() -> Iterator[Path]:
    """A data dir for the module's embedded server, outside pytest's temp root.

    Every pytest session (a concurrent one, a pytester child) resets
    /tmp/pytest-of-<user> to mode 0700, which locks the server's system user
    out of a cluster below it when running as root.
    """
    path = Path(tempfile.mkdtemp(prefix="tokendb-embedded-"))
    try:
        yield path / "data"
    finally:
        if embedded.is_available():
            embedded.stop_server(path / "data")
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_user_marked_locked() -> Iterator[None]:
    """Each test starts with no user marked locked by an earlier test's batch (the mark
    is process-wide and lasts seconds: it would change which path a call takes)."""
    ledger._locked_users.clear()
    yield
    ledger._locked_users.clear()


@pytest_asyncio.fixture(autouse=True, loop_scope="session")
async def books_balance_after_each_test(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """After every test on the shared database: the ledger, the chats, the holds and the
    usage rollup audit clean.

    Per test, not per module: ``tokendb_clean`` empties the tables before the
    next test, so a later check would never see what this one broke.
    """
    yield
    if "tokendb_db" in request.fixturenames:
        found = await audit_books()
        assert not any(found.values()), found


@pytest_asyncio.fixture(loop_scope="session")
async def raw(tokendb_db: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection to the test database, around the Python layer.

    Whatever it does happens inside a transaction that is rolled back, so
    backstop tests cannot leave broken books behind.
    """
    async with _rolled_back(tokendb_db) as conn:
        yield conn


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def app_role(tokendb_db: str, tokendb_app_url: str) -> AsyncIterator[str]:
    """The URL of the application role tokendb runs as, with all the threat model allows it.

    ``tokendb grant`` gives it SELECT, INSERT, UPDATE and DELETE; the threat
    model (README, "Guarantees") lets it TRUNCATE too, so the tests do.
    """
    role = await asyncpg.connect(tokendb_app_url)
    try:
        name = await role.fetchval("SELECT current_user")
        superuser = await role.fetchval(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        )
        owns = await role.fetchval(
            "SELECT pg_has_role(current_user, relowner, 'MEMBER') FROM pg_class "
            "WHERE oid = 'token_transactions'::regclass"
        )
    finally:
        await role.close()
    assert not superuser and not owns, "tokendb_app_role = true runs tokendb as a DML-only role"
    owner = await asyncpg.connect(tokendb_db)
    # The audit's tables too: a TRUNCATE users CASCADE reaches tokendb_audit_marks,
    # and PostgreSQL checks the privilege on every table before any trigger runs.
    tables = ", ".join((*TABLES, *AUDIT_TABLES))
    try:
        await owner.execute(f'GRANT TRUNCATE ON {tables} TO "{name}"')
        yield tokendb_app_url
    finally:
        await owner.execute(f'REVOKE TRUNCATE ON {tables} FROM "{name}"')
        await owner.close()


@pytest_asyncio.fixture(loop_scope="session")
async def app_raw(app_role: str) -> AsyncIterator[asyncpg.Connection]:
    """Like ``raw``, as the application role tokendb runs as: DML only, not the owner."""
    async with _rolled_back(app_role) as conn:
        yield conn


@pytest_asyncio.fixture(loop_scope="session")
async def app(app_role: str, tokendb_clean: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection as the application role, outside any transaction: what it sends commits."""
    conn = await asyncpg.connect(app_role)
    try:
        yield conn
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def _rolled_back(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to ``url`` inside a transaction that is rolled back on the way out."""
    conn = await asyncpg.connect(url)
    tx = conn.transaction()
    await tx.start()
    try:
        yield conn
    finally:
        await tx.rollback()
        await conn.close()
