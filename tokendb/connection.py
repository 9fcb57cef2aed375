"""Connecting tokendb to PostgreSQL and migrating its schema.

``init()``/``close()`` for applications with a lifespan, ``connect()`` as an
async context manager for scripts, ``migrate()`` to apply the committed Aerich
migrations from code (the same as ``aerich upgrade``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from tortoise import Tortoise

from tokendb import _db
from tokendb.config import APP_LABEL, config_from_env
from tokendb.errors import ConfigurationError, TokenDBError

__all__ = ["close", "connect", "init", "migrate", "migrations_location"]

_COMMAND_TIMEOUT_MARGIN = 5.0
"""Seconds the client waits beyond ``statement_timeout`` before giving up on a statement."""


def migrations_location() -> Path:
    """The folder holding tokendb's Aerich migrations (``<location>/tokendb/*.py``).

    An installed wheel carries them as ``tokendb/_migrations``; a source
    checkout (or an editable install) has them in ``migrations/`` beside the
    package.
    """
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "_migrations", package_dir.parent / "migrations"):
        if (candidate / APP_LABEL).is_dir():
            return candidate
    raise ConfigurationError(
        f"tokendb's migrations are missing (looked in {package_dir / '_migrations'} "
        f"and {package_dir.parent / 'migrations'}); reinstall tokendb"
    )


@_db.translated
async def init(
    database_url: str | None = None,
    *,
    min_size: int | None = None,
    max_size: int | None = None,
    acquire_timeout: float = 10.0,
    statement_timeout: float | None = 30.0,
    lock_timeout: float | None = 10.0,
) -> None:
    """Initialise Tortoise with tokendb's models and open the connection pool.

    ``database_url`` defaults to ``DATABASE_URL`` (read from the environment
    or ``.env``). URL parameters pass through to Tortoise, so
    ``?minsize=16&maxsize=16`` sizes the pool; ``min_size``/``max_size`` win
    over the URL. Every wait is bounded: ``acquire_timeout`` seconds for a
    pooled connection, and the server cancels a statement after
    ``statement_timeout`` seconds or a row-lock wait after ``lock_timeout``
    seconds (``None`` disables either), raising
    :class:`~tokendb.errors.DatabaseTimeout`. The client gives up on its own
    a few seconds after ``statement_timeout`` (a server that stopped
    answering), and on opening a connection after ``acquire_timeout``.
    ``in_transaction()`` on this connection is guarded against the
    connection leak of Tortoise's pooled transactions (see
    :func:`tokendb._db.guard_transactions`).

    The pool is opened and checked before returning, so a wrong URL fails
    here, not on the first request.

    Raises :class:`ConfigurationError` for a missing or malformed URL and
    :class:`DatabaseUnavailable` when the server cannot be reached.
    """
    config = config_from_env(database_url)
    credentials = config["connections"]["default"]["credentials"]
    if min_size is not None:
        credentials["minsize"] = min_size
    if max_size is not None:
        credentials["maxsize"] = max_size
    server_settings: dict[str, str] = dict(credentials.get("server_settings") or {})
    if statement_timeout is not None:
        server_settings.setdefault("statement_timeout", f"{int(statement_timeout * 1000)}ms")
    if lock_timeout is not None:
        server_settings.setdefault("lock_timeout", f"{int(lock_timeout * 1000)}ms")
    credentials["server_settings"] = server_settings
    # Client-side bounds too, for a server that stops answering without
    # closing the socket (the server-side timeouts need a live server):
    # opening a connection, and any statement (a little after the server
    # would have cancelled it itself).
    credentials.setdefault("timeout", acquire_timeout)
    if statement_timeout is not None:
        credentials.setdefault("command_timeout", statement_timeout + _COMMAND_TIMEOUT_MARGIN)

    _db.configure(_db.Settings(acquire_timeout=acquire_timeout))
    if Tortoise.is_inited():
        await Tortoise.close_connections()
    await Tortoise.init(config=config, _enable_global_fallback=True)
    _db.guard_transactions()
    try:
        await _db.read("SELECT 1")
    except TokenDBError:
        await Tortoise.close_connections()
        raise


@_db.translated
async def close() -> None:
    """Close the connection pool opened by :func:`init` (a no-op when not initialised)."""
    if Tortoise.is_inited():
        await Tortoise.close_connections()


@asynccontextmanager
async def connect(database_url: str | None = None, **options: Any) -> AsyncIterator[None]:
    """``async with tokendb.connect(url): ...`` runs the block with tokendb initialised.

    Takes the same arguments as :func:`init`; closes the pool on the way out.
    """
    await init(database_url, **options)
    try:
        yield
    finally:
        await close()


@_db.translated
async def migrate(database_url: str | None = None) -> list[str]:
    """Apply tokendb's pending Aerich migrations (``aerich upgrade``); return the files applied.

    Each migration runs in its own transaction, so a failing one leaves the
    schema as it was. Runs on a connection of its own: the pool opened by
    :func:`init` (if any) is left untouched.
    """
    return await _upgrade(database_url, migrations_location())


@_db.translated
async def _upgrade(database_url: str | None, location: Path) -> list[str]:
    """``aerich upgrade`` of the migrations under ``location`` (tests point it elsewhere)."""
    from aerich import Command
    from tortoise.context import TortoiseContext, _current_context

    config = config_from_env(database_url)
    credentials = config["connections"]["default"]["credentials"]
    credentials["minsize"], credentials["maxsize"] = 1, 1

    async def upgrade() -> list[str]:
        # A fresh Tortoise context in a child task: Aerich closes the
        # connections of whatever context it runs in, and must not close the
        # application's.
        _current_context.set(None)
        with TortoiseContext() as context:
            await context.init(config=config)
            try:
                command = Command(tortoise_config=config, app=APP_LABEL, location=str(location))
                await command.init()
                applied: list[str] = await command.upgrade(run_in_transaction=True)
                return applied
            finally:
                await context.close_connections()

    return await asyncio.create_task(upgrade())
