"""Connecting tokendb to PostgreSQL and migrating its schema.

``init()``/``close()`` for applications with a lifespan, ``connect()`` as an
async context manager for scripts, ``migrate()`` to apply the committed Aerich
migrations from code (the same as ``aerich upgrade``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypedDict, TypeVar, Unpack

from tortoise import Tortoise

from tokendb import _db, _key_cache, _settings, _tortoise, schema
from tokendb._translate import translated
from tokendb.config import (
    APP_LABEL,
    ResolvedDatabase,
    config_for,
    direct_url_from_env,
    listen_connect_args,
    listen_url_from_env,
    resolve_database,
    resolve_database_async,
    verify_cache_from_env,
)
from tokendb.errors import ConfigurationError, ConfigurationWarning, TokenDBError
from tokendb.schema import migrations_location as migrations_location

__all__ = [
    "InitOptions",
    "check_connection",
    "close",
    "connect",
    "init",
    "init_config",
    "is_initialised",
    "migrate",
    "migrations_location",
    "run_aerich",
    "tortoise_orm",
]

T = TypeVar("T")

_MIGRATION_LOCK = 0x746F6B656E6462  # "tokendb": the advisory lock key migrations hold

DEFAULT_ACQUIRE_TIMEOUT = 10.0
DEFAULT_STATEMENT_TIMEOUT = 30.0
DEFAULT_LOCK_TIMEOUT = 10.0
DEFAULT_VERIFY_CACHE_SIZE = 10_000

_COMMAND_TIMEOUT_MARGIN = 5.0
"""Seconds the client waits beyond ``statement_timeout`` before giving up on a statement."""


Apps = Mapping[str, Mapping[str, Any]]
"""The host's own Tortoise apps, as in ``TORTOISE_ORM["apps"]``, e.g.
``{"shop": {"models": ["shop.models"]}}``."""

_initialised: ResolvedDatabase | None = None
"""The database :func:`init` (or :func:`tortoise_orm`) configured (:func:`migrate`'s default)."""

_server_defaults: dict[str, int] = {}
"""Through PgBouncer: the timeouts (ms) :func:`init` asked for, which the server's defaults for
the role or database must provide (:func:`check_connection` checks them)."""

_SERVER_DEFAULTS = (
    "SELECT name, setting::bigint AS ms FROM pg_settings WHERE name = ANY($1::text[])"
)


@translated
async def init(
    database_url: str | None = None,
    *,
    apps: Apps | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT,
    statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT,
    lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
    coalesce_charges: bool = True,
    verify_cache: bool | None = None,
    verify_cache_size: int = DEFAULT_VERIFY_CACHE_SIZE,
    listen_url: str | None = None,
) -> None:
    """Initialise Tortoise with tokendb's models (and ``apps``) and open the connection pool.

    ``database_url`` defaults to ``DATABASE_URL`` (read from the environment
    or ``.env``), else to tokendb's embedded server (``tokendb[embedded]``),
    which is started if need be and migrated here. URL parameters pass
    through to Tortoise, so ``?minsize=16&maxsize=16`` sizes the pool;
    ``min_size``/``max_size`` win over the URL.

    ``apps`` adds the application's own Tortoise apps on the same connection
    (``{"shop": {"models": ["shop.models"]}}``; their models may have foreign
    keys to ``tokendb.User``), so one ``init`` serves the whole application
    and its ORM code shares tokendb's pool and transactions.

    Every wait is bounded: ``acquire_timeout`` seconds for a pooled
    connection, and the server cancels a statement after
    ``statement_timeout`` seconds or a row-lock wait after ``lock_timeout``
    seconds (``None`` disables either), raising
    :class:`~tokendb.errors.DatabaseTimeout`. The client gives up on its own
    a few seconds after ``statement_timeout`` (a server that stopped
    answering), and on opening a connection after ``acquire_timeout``.
    ``in_transaction()`` on this connection is guarded against the
    connection leak of Tortoise's pooled transactions (see
    :func:`tokendb._tortoise.guard_transactions`).

    ``coalesce_charges`` lets concurrent :func:`~tokendb.charge` calls share
    statements, group-commit style (:mod:`tokendb.ledger`); turn it off to
    give every call a statement of its own.

    ``verify_cache`` keeps verified API keys in memory, at most
    ``verify_cache_size`` of them (:func:`tokendb.verify_api_key` says what a
    hit returns and how fresh it is); ``None`` means on unless
    ``TOKENDB_VERIFY_CACHE=off``. It listens for changes on a direct
    connection of its own: ``listen_url``, else ``TOKENDB_LISTEN_URL``, else
    ``TOKENDB_DIRECT_URL``, else the database URL itself unless that goes
    through PgBouncer (then the cache stays off, with a
    :class:`~tokendb.ConfigurationWarning`).

    Through PgBouncer in transaction pooling mode, say so in the URL
    (``?pgbouncer=true``): no named prepared statements are used, and
    ``statement_timeout``/``lock_timeout`` are not sent at connect (PgBouncer
    refuses them) but must be the server's defaults for the role or database
    (``ALTER ROLE app SET statement_timeout = '30s'``); a
    :class:`~tokendb.ConfigurationWarning` names any that is off or looser
    than asked (docs/pgbouncer.md).

    The pool is opened and the schema checked before returning, so a wrong
    URL or an unmigrated database fails here, not on the first request: in
    one catalog query, Aerich must have recorded tokendb's newest migration
    and every backstop (constraint, trigger) must be there
    (:func:`tokendb.schema.check`). Tortoise's context is made visible to
    every task of the process (its global fallback), so request handlers
    running in tasks of their own see it. An explicit ``database_url`` is the
    whole configuration: nothing is read from the environment for it.

    Raises:
        ConfigurationError: a missing or malformed URL or apps, bad pool sizes or timeouts,
            a schema that ``tokendb migrate`` did not make.
        DatabaseUnavailable: the server cannot be reached.
    """
    config = await init_config(
        database_url,
        apps=apps,
        min_size=min_size,
        max_size=max_size,
        acquire_timeout=acquire_timeout,
        statement_timeout=statement_timeout,
        lock_timeout=lock_timeout,
        coalesce_charges=coalesce_charges,
        verify_cache=verify_cache,
        verify_cache_size=verify_cache_size,
        listen_url=listen_url,
    )
    await _key_cache.stop()  # the previous configuration's listener, if any
    if is_initialised():
        # Not close(): that forgets the URL just configured, which migrate() defaults to.
        await _close_connections()
    try:
        await Tortoise.init(config=config, _enable_global_fallback=True)
    except BaseException:
        await Tortoise.close_connections()  # never leave a half-initialised context behind
        raise
    await check_connection()


class InitOptions(TypedDict, total=False):
    """The keyword arguments of :func:`init` besides the URL."""

    apps: Apps | None
    min_size: int | None
    max_size: int | None
    acquire_timeout: float
    statement_timeout: float | None
    lock_timeout: float | None
    coalesce_charges: bool
    verify_cache: bool | None
    verify_cache_size: int
    listen_url: str | None


async def init_config(
    database_url: str | None = None, **options: Unpack[InitOptions]
) -> dict[str, Any]:
    """The first half of :func:`init`, for integrations that call ``Tortoise.init`` themselves.

    Resolves the database (migrating the embedded server), fixes the storage
    seam's settings and returns the Tortoise config to initialise with; call
    :func:`check_connection` after ``Tortoise.init``. Same arguments as :func:`init`.

    Raises:
        ConfigurationError: a missing or malformed URL, bad pool sizes or timeouts.
        DatabaseUnavailable: the embedded server could not be started or migrated.
    """
    _check_options(options)
    database = await resolve_database_async(database_url)
    if database.embedded:
        await migrate(database.url)
    return _configure(database, options)


def tortoise_orm(database_url: str | None = None, **options: Unpack[InitOptions]) -> dict[str, Any]:
    """The ``TORTOISE_ORM`` dict for an application that registers Tortoise itself.

    For frameworks whose own hook initialises Tortoise (aiohttp's, Sanic's
    ``register_tortoise``) and for the host's Aerich config::

        TORTOISE_ORM = tokendb.tortoise_orm(apps={"shop": {"models": ["shop.models"]}})
        register_tortoise(app, config=TORTOISE_ORM)

    Takes the arguments of :func:`init` and carries the same settings: the
    pool size and, in the connection's credentials, tokendb's
    ``statement_timeout``/``lock_timeout`` and client-side bounds. The
    transaction guard is applied on tokendb's first statement. The host's
    apps come first in ``apps``, so a plain ``aerich`` command picks the
    host's app, not ``tokendb``. Synchronous: it starts (and migrates) the
    embedded server when no URL is configured.

    Raises:
        ConfigurationError: a missing or malformed URL or apps, bad pool sizes or timeouts.
        DatabaseUnavailable: the embedded server could not be started or migrated.
    """
    _check_options(options)
    database = resolve_database(database_url)
    if database.embedded:
        _run_in_a_thread(migrate(database.url))
    return _configure(database, options)


def _run_in_a_thread(coroutine: Awaitable[T]) -> T:
    """Run ``coroutine`` to completion on an event loop of its own (callers may be in a loop)."""

    async def run() -> T:
        return await coroutine

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


def _check_options(options: InitOptions) -> None:
    for name in ("acquire_timeout", "statement_timeout", "lock_timeout"):
        if name in options:
            _check_timeout(name, options[name], optional=name != "acquire_timeout")
    size = options.get("verify_cache_size", DEFAULT_VERIFY_CACHE_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= 10_000_000:
        raise ConfigurationError(
            f"verify_cache_size must be a whole number from 0 to 10000000, got {size!r}"
        )
    if options.get("verify_cache") not in (None, True, False):
        raise ConfigurationError(
            f"verify_cache must be True, False or None, got {options.get('verify_cache')!r}"
        )


def _configure_verify_cache(database: ResolvedDatabase, options: InitOptions) -> bool:
    """The verify cache's size and direct connection (:mod:`tokendb._key_cache`); True if on.

    The listener's URL: ``listen_url``, else ``TOKENDB_LISTEN_URL``, else
    ``TOKENDB_DIRECT_URL`` (neither read for an explicit database URL), else
    the database URL unless it goes through PgBouncer: then the cache stays
    off, with a :class:`ConfigurationWarning`.
    """
    enabled = options.get("verify_cache")
    if enabled is None:
        enabled = (None if database.explicit else verify_cache_from_env()) is not False
    listen_url, variable = options.get("listen_url"), "listen_url"
    if listen_url is None and not database.explicit:
        listen_url, variable = listen_url_from_env(), "TOKENDB_LISTEN_URL"
        if listen_url is None:
            listen_url, variable = direct_url_from_env(), "TOKENDB_DIRECT_URL"
    if listen_url is None and not database.pgbouncer:
        listen_url, variable = database.url, database.variable
    if enabled and listen_url is None:
        warnings.warn(
            f"{database.variable} goes through PgBouncer and no direct URL is set for the verify "
            "cache's listener (init(listen_url=...), TOKENDB_LISTEN_URL or TOKENDB_DIRECT_URL): "
            "the verify cache is off, every verify_api_key looks the key up",
            ConfigurationWarning,
            stacklevel=5,
        )
    connect = listen_connect_args(listen_url, variable=variable) if enabled and listen_url else None
    _key_cache.configure(
        maxsize=options.get("verify_cache_size", DEFAULT_VERIFY_CACHE_SIZE), connect=connect
    )
    return connect is not None


def _configure(database: ResolvedDatabase, options: InitOptions) -> dict[str, Any]:
    """The Tortoise config for ``database`` with tokendb's bounds; sets the seam's settings."""
    global _initialised, _server_defaults
    statement_timeout = options.get("statement_timeout", DEFAULT_STATEMENT_TIMEOUT)
    lock_timeout = options.get("lock_timeout", DEFAULT_LOCK_TIMEOUT)
    acquire_timeout = options.get("acquire_timeout", DEFAULT_ACQUIRE_TIMEOUT)
    config = config_for(
        database,
        min_size=options.get("min_size"),
        max_size=options.get("max_size"),
        apps=options.get("apps"),
    )
    credentials = config["connections"]["default"]["credentials"]
    server_settings: dict[str, str] = dict(credentials.get("server_settings") or {})
    timeouts = {
        name: round(seconds * 1000)
        for name, seconds in (
            ("statement_timeout", statement_timeout),
            ("lock_timeout", lock_timeout),
        )
        if seconds is not None
    }
    if database.pgbouncer:
        # PgBouncer refuses a connection that sends these as startup
        # parameters, and SET LOCAL would cost every statement a round trip:
        # the server's defaults for the role or database provide them
        # (ALTER ROLE ... SET), which check_connection() checks.
        _server_defaults = timeouts
    else:
        _server_defaults = {}
        for name, ms in timeouts.items():
            server_settings.setdefault(name, f"{ms}ms")
    credentials["server_settings"] = server_settings
    # Client-side bounds too, for a server that stops answering without
    # closing the socket (the server-side timeouts need a live server):
    # opening a connection, and any statement (a little after the server
    # would have cancelled it itself).
    credentials.setdefault("timeout", acquire_timeout)
    if statement_timeout is not None:
        credentials.setdefault("command_timeout", statement_timeout + _COMMAND_TIMEOUT_MARGIN)
    verify_cache = _configure_verify_cache(database, options)
    _settings.initialise(
        _settings.Settings(
            acquire_timeout=acquire_timeout,
            coalesce_charges=options.get("coalesce_charges", True),
            verify_cache=verify_cache,
            server_settings=tuple(
                name for name in ("statement_timeout", "lock_timeout") if name in server_settings
            ),
        )
    )
    _initialised = database
    return config


def _check_timeout(name: str, seconds: object, *, optional: bool) -> None:
    if seconds is None and optional:
        return
    # At least 1 ms: PostgreSQL reads a timeout of 0 as "no timeout at all".
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not 0.001 <= seconds <= 86_400
    ):
        raise ConfigurationError(
            f"{name} must be a number of seconds from 0.001 to 86400"
            + (" or None" if optional else "")
            + f", got {seconds!r}"
        )


@translated
async def check_connection() -> None:
    """Guard Tortoise's transactions, open the pool and check the schema (one query).

    On failure the connections are closed and the error raised.

    Raises:
        ConfigurationError: Tortoise is not initialised with tokendb's models, or the schema
            is not the one ``tokendb migrate`` makes (:func:`tokendb.schema.check`).
        DatabaseUnavailable: the server cannot be reached.
    """
    _tortoise.guard_transactions()
    try:
        await schema.check()
        if _server_defaults:
            await _check_server_defaults(_server_defaults)
    except TokenDBError:
        await Tortoise.close_connections()
        raise


async def _check_server_defaults(expected: Mapping[str, int]) -> None:
    """Through PgBouncer: warn when the server's default for a timeout init asked for is off
    or looser (the connection could not set it itself)."""
    rows = await _db.read(_SERVER_DEFAULTS, list(expected))
    found = {row["name"]: row["ms"] for row in rows}
    loose = [
        f"{name} is {found.get(name, 0)} ms (asked for {ms} ms)"
        for name, ms in expected.items()
        if not 0 < found.get(name, 0) <= ms
    ]
    if loose:
        fixes = "; ".join(
            f"ALTER ROLE <role> SET {name} = '{ms}ms'" for name, ms in expected.items()
        )
        warnings.warn(
            f"through PgBouncer tokendb cannot set its timeouts on the connection, and the "
            f"server's defaults do not provide them: {', '.join(loose)}. Set them for the "
            f"application role (or database): {fixes}",
            ConfigurationWarning,
            stacklevel=4,
        )


def is_initialised() -> bool:
    """True when tokendb's models are bound to a connection in the current Tortoise context.

    Raises nothing: a missing context is False.
    """
    from tortoise.exceptions import ConfigurationError as TortoiseConfigurationError

    from tokendb.models import User

    try:
        User._meta.db  # noqa: B018 - resolving the connection is the check
    except (TortoiseConfigurationError, RuntimeError):  # RuntimeError: no Tortoise context here
        return False
    return True


@translated
async def close() -> None:
    """Close the connection pool opened by :func:`init` (a no-op when not initialised).

    Called in another event loop than the pool's, after that loop closed,
    it shuts the pool's connections down instead of closing them politely.

    Raises:
        DatabaseError: closing the pool failed.
    """
    global _initialised
    _initialised = None
    await _key_cache.stop()
    await _close_connections()


async def _close_connections() -> None:
    """Close Tortoise's connections; a pool of a closed event loop is shut down instead."""
    if not Tortoise.is_inited():
        return
    from tortoise.context import get_current_context

    context = get_current_context()
    if context is not None and context.inited:
        # The storage, not connections.all(): that would replace a client of a
        # closed loop by a new one (Tortoise's loop switch), leaking the old pool.
        for client in list(context.connections._get_storage().values()):
            _tortoise.abandon_if_orphaned(client)
    await Tortoise.close_connections()


@asynccontextmanager
async def connect(database_url: str | None = None, **options: Any) -> AsyncIterator[None]:
    """``async with tokendb.connect(url): ...`` runs the block with tokendb initialised.

    Takes the same arguments as :func:`init`; closes the pool on the way out.

    Raises:
        ConfigurationError: as :func:`init`.
        DatabaseUnavailable: as :func:`init`.
    """
    await init(database_url, **options)
    try:
        yield
    finally:
        await close()


@translated
async def migrate(database_url: str | None = None) -> list[str]:
    """Apply tokendb's pending Aerich migrations (``aerich upgrade``); return the files applied.

    ``database_url`` defaults to the database tokendb was initialised on
    (:func:`init`, :func:`tortoise_orm`), else is resolved as by :func:`init`
    (``DATABASE_URL``, else the embedded server). Migrations hold a
    session-level advisory lock, which PgBouncer's transaction pooling
    breaks: for a URL that goes through PgBouncer (``?pgbouncer=true``)
    they run on ``TOKENDB_DIRECT_URL`` when the URL came from the
    environment, and are refused otherwise.

    Each migration runs in its own transaction, so a failing one leaves the
    schema as it was. Runs on a connection of its own: the pool opened by
    :func:`init` (if any) is left untouched.

    Raises:
        ConfigurationError: a missing or malformed URL, missing migrations, or a URL
            through PgBouncer without a direct one.
        DatabaseUnavailable: the server cannot be reached.
        DatabaseError: a migration failed (the schema is left as it was).
    """
    return await _upgrade(database_url, migrations_location())


@translated
async def _upgrade(database_url: str | None, location: Path) -> list[str]:
    """``aerich upgrade`` of the migrations under ``location`` (tests point it elsewhere)."""

    async def upgrade(command: Any) -> list[str]:
        applied: list[str] = await command.upgrade(run_in_transaction=True)
        return applied

    return await run_aerich(database_url, upgrade, location=location)


async def run_aerich(
    database_url: str | None,
    action: Callable[[Any], Awaitable[T]],
    *,
    location: Path | None = None,
    app: str = APP_LABEL,
    apps: Apps | None = None,
) -> T:
    """Run ``action(command)`` with an initialised ``aerich.Command`` for ``app``.

    ``app`` defaults to tokendb's, ``location`` to :func:`migrations_location`;
    ``apps`` are the host's apps (for a host app's own migrations).
    ``database_url`` defaults to :func:`init`'s database; one through
    PgBouncer is replaced by ``TOKENDB_DIRECT_URL`` or refused, as in
    :func:`migrate` (raises :class:`ConfigurationError` then). A fresh
    Tortoise context in a child task: Aerich closes the connections of
    whatever context it runs in, and must not close the application's.
    """
    from aerich import Command
    from tortoise.context import TortoiseContext, _current_context

    config = config_for(await _migration_database(database_url), apps=apps)
    credentials = config["connections"]["default"]["credentials"]
    # One connection holds the migration lock, one runs the migrations.
    credentials["minsize"], credentials["maxsize"] = 1, 2
    folder = str(location if location is not None else migrations_location())

    async def isolated() -> T:
        _current_context.set(None)
        with TortoiseContext() as context:
            await context.init(config=config)
            try:
                client = context.connections.get("default")
                async with client.acquire_connection() as lock:
                    # Processes sharing a database (several app workers, or the
                    # embedded server) migrate one at a time; the next one
                    # then finds nothing left to apply.
                    await lock.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
                    try:
                        command = Command(tortoise_config=config, app=app, location=folder)
                        await command.init()
                        return await action(command)
                    finally:
                        await lock.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
            finally:
                await context.close_connections()

    return await asyncio.create_task(isolated())


async def _migration_database(database_url: str | None) -> ResolvedDatabase:
    """Where migrations run: ``database_url``, else :func:`init`'s database, else the
    configured one; a direct URL instead of one through PgBouncer."""
    if database_url is None and _initialised is not None:
        database = _initialised
    else:
        database = await resolve_database_async(database_url)
    if not database.pgbouncer:
        return database
    direct = None if database.explicit else direct_url_from_env()
    if direct is None:
        raise ConfigurationError(
            f"{database.variable} goes through PgBouncer (pgbouncer=true), whose transaction "
            "pooling breaks the session-level lock migrations hold: migrate with a direct URL "
            "to PostgreSQL (tokendb migrate --database-url postgres://…:5432/…, or set "
            "TOKENDB_DIRECT_URL next to DATABASE_URL)",
            variable=database.variable,
        )
    return ResolvedDatabase(direct, "TOKENDB_DIRECT_URL", embedded=False)
