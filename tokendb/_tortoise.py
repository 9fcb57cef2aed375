"""Where tokendb reaches into Tortoise ORM: its connection, its pool, and one workaround.

Everything here (and in :mod:`tokendb._rows`, which writes model instances'
private attributes) depends on Tortoise internals that are not public API,
which is why ``pyproject.toml`` pins ``tortoise-orm`` to the minor version
:data:`TESTED_MINOR` and ``tests/test_tortoise.py`` fails on any other:

* :func:`models_client`: the connection of tokendb's models, resolved per
  call so the caller's transaction (a ``TransactionWrapper`` in Tortoise's
  context) is honoured;
* :func:`pool`: the client's lazily created asyncpg pool (``_pool``,
  ``_pool_init_lock``), shared with the application's ORM code;
* :func:`guard_transactions`: the workaround below;
* :func:`table_sql`: the schema generator's ``CREATE TABLE`` for one model;
* event loops: Tortoise binds a client's pool to the loop that opened it and,
  in another loop, silently replaces the client by a new one, leaving the old
  pool's connections open until garbage collection. tokendb adopts each new
  client (:func:`_adopt`: guarded, its settings checked) and shuts down the
  connections of a pool whose loop is closed (:func:`abandon_if_orphaned`);
  :func:`close_pool` closes a pool but keeps its client for the next loop.

The upstream bug
================

In tortoise-orm 1.1.9, ``TransactionContextPooled.__aenter__``
(``tortoise/backends/base/client.py``, what ``in_transaction()`` returns on
an asyncpg pool) acquires a pooled connection, publishes the transaction in
the task's context (``get_connections().set``) and then awaits
``self.client.begin()`` outside any ``try``. When ``BEGIN`` fails (the
connection died while idle: a killed backend, a restarted server),
``__aenter__`` raises, so ``__aexit__`` never runs: the connection is never
released to the pool and the context variable is never reset. Each such
failure keeps one pool slot for good; enough of them drain the pool shared
with tokendb until every caller waits. No upstream report names this exact
path (searched the tracker); tortoise/tortoise-orm#1438 ("Database connection
was not released causing a new request to be pending") reports the symptom.
:class:`_GuardedTransactionContext` bounds the acquire by
``acquire_timeout`` and undoes both when ``BEGIN`` fails.
"""

from __future__ import annotations

import asyncio
import socket
import warnings
from contextlib import suppress
from typing import Any

import asyncpg
from tortoise.backends.asyncpg.client import AsyncpgDBClient, TransactionWrapper
from tortoise.backends.base.client import (
    BaseDBAsyncClient,
    PoolConnectionWrapper,
    TransactionalDBClient,
    TransactionContextPooled,
)
from tortoise.connection import get_connections
from tortoise.exceptions import BaseORMException
from tortoise.exceptions import ConfigurationError as TortoiseConfigurationError
from tortoise.models import Model

from tokendb import _settings, _waits
from tokendb._translate import is_connection_loss, message_of, translate
from tokendb.errors import ConfigurationError, ConfigurationWarning, DatabaseUnavailable
from tokendb.models import User

__all__ = [
    "TESTED_MINOR",
    "TransactionalDBClient",
    "abandon_if_orphaned",
    "close_pool",
    "guard_transactions",
    "models_client",
    "pool",
    "stale_attempts",
    "table_sql",
]

TESTED_MINOR = (1, 1)
"""The ``tortoise-orm`` minor version whose internals this module and :mod:`tokendb._rows`
were written against (``pyproject.toml`` pins it)."""

_META = User._meta


_adopted: BaseDBAsyncClient | None = None
"""The client tokendb last adopted (:func:`_adopt`): compared by identity on every call."""

_NO_CONTEXT_HINT = (
    "tokendb is not initialised in this task: Tortoise's context is not visible here "
    "(a new event loop after tokendb.close(), or Tortoise initialised by a framework hook "
    "in a task of its own, as Quart's register_tortoise does). Call `await tokendb.init()` "
    "(with apps=... for your own models) in this event loop, or in the framework's startup "
    "hook instead of register_tortoise: tokendb makes its context visible to every task"
)


def models_client() -> BaseDBAsyncClient:
    """The connection of tokendb's models: the caller's transaction's, else the pooled client.

    Raises :class:`ConfigurationError` when tokendb is not initialised, or not
    in a Tortoise context this task can see.
    """
    try:
        client: BaseDBAsyncClient = _META.db
    except TortoiseConfigurationError as exc:
        raise ConfigurationError(
            "tokendb is not initialised: call `await tokendb.init()` "
            "(or use `async with tokendb.connect():`) first"
        ) from exc
    except RuntimeError as exc:  # tortoise.context.require_context(): no context in this task
        raise ConfigurationError(_NO_CONTEXT_HINT) from exc
    if client is not _adopted and not isinstance(client, TransactionalDBClient):
        _adopt(client)
    return client


def _adopt(client: BaseDBAsyncClient) -> None:
    """A client used by tokendb for the first time: guard it, check it, retire the last one.

    A client tokendb did not open itself (a framework's ``register_tortoise``),
    or one Tortoise made because the event loop changed, gets the same
    transaction guard as :func:`tokendb.init`'s. A warning names settings that
    are missing (tokendb's timeouts are then off). A predecessor whose event
    loop is closed cannot close its pool; its connections are shut down, so
    the server does not keep their backends until garbage collection.
    """
    global _adopted
    previous, _adopted = _adopted, client
    guard_transactions(client)
    _warn_if_unconfigured(client)
    if previous is not None and previous is not client:
        abandon_if_orphaned(previous)


def _warn_if_unconfigured(client: BaseDBAsyncClient) -> None:
    expected = _settings.current().server_settings
    if expected is None:
        missing = "tokendb's timeouts and transaction guard were never configured"
    else:
        present = getattr(client, "server_settings", None) or {}
        absent = [name for name in expected if name not in present]
        if not absent:
            return
        missing = f"the connection lacks {', '.join(absent)}"
    warnings.warn(
        f"{missing}: statements and lock waits are unbounded. Build the Tortoise config "
        "with tokendb.tortoise_orm(apps=...) or initialise with tokendb.init(apps=...)",
        ConfigurationWarning,
        stacklevel=5,
    )


def _pool_loop(client: BaseDBAsyncClient) -> asyncio.AbstractEventLoop | None:
    created: asyncpg.Pool | None = getattr(client, "_pool", None)
    return getattr(created, "_loop", None) if created is not None else None


def abandon_if_orphaned(client: BaseDBAsyncClient) -> bool:
    """Shut down the connections of ``client``'s pool if its event loop is closed; True if so.

    Such a pool can no longer be closed (closing needs its loop); shutting
    its sockets down makes the server end their backends now. The client
    opens a new pool in the next loop that uses it.
    """
    loop = _pool_loop(client)
    if loop is None or not loop.is_closed():
        return False
    orphan: Any = getattr(client, "_pool")  # noqa: B009 - not in the base type
    for holder in getattr(orphan, "_holders", ()):  # asyncpg's pool keeps a holder per slot
        conn = getattr(holder, "_con", None)
        transport = getattr(conn, "_transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
    _forget_pool(client)
    return True


def _forget_pool(client: BaseDBAsyncClient) -> None:
    """Let ``client`` open a new pool in the next event loop that uses it (no loop switch)."""
    client._pool = None
    client._bound_loop = None
    # Tortoise's pool lock binds to the loop that first waits on it.
    client._pool_init_lock = asyncio.Lock()  # type: ignore[attr-defined]


async def close_pool(client: BaseDBAsyncClient) -> None:
    """Close ``client``'s pool, keeping the client (and its guard) for the next event loop.

    A pool of a closed event loop is abandoned (:func:`abandon_if_orphaned`).
    Raises :class:`ConfigurationError` for a pool of another loop that is still open.
    """
    if abandon_if_orphaned(client):
        return
    loop = _pool_loop(client)
    if loop is not None and loop is not asyncio.get_running_loop():
        raise ConfigurationError(
            "tokendb's connection pool belongs to another event loop that is still open; "
            "close it from that loop"
        )
    await client.close()
    _forget_pool(client)


async def pool(client: BaseDBAsyncClient) -> asyncpg.Pool:
    """``client``'s asyncpg pool, created on first use (as Tortoise itself does)."""
    ready: asyncpg.Pool | None = getattr(client, "_pool", None)
    if ready is not None:
        return ready  # the common case, without the wait_for task below
    # Tortoise creates its pool lazily on first use; reuse its own guarded
    # initialisation so tokendb and the ORM share one pool.
    lock: asyncio.Lock = getattr(client, "_pool_init_lock")  # noqa: B009 - not in the base type
    wrapper: PoolConnectionWrapper[Any] = PoolConnectionWrapper(client, lock)
    try:
        await asyncio.wait_for(wrapper.ensure_connection(), _settings.current().acquire_timeout)
    except BaseORMException as exc:
        raise DatabaseUnavailable(f"the database is unavailable: {message_of(exc)}") from exc
    except Exception as exc:
        if isinstance(exc, TimeoutError) or is_connection_loss(exc):
            raise translate(exc) from exc
        raise
    created: asyncpg.Pool = getattr(client, "_pool")  # noqa: B009 - not in the base type
    return created


def stale_attempts(client: BaseDBAsyncClient) -> int:
    """Pooled connections one call tries when they turn out dead before anything was sent.

    One more than the pool holds: after a server restart every idle
    connection may be dead, and finding one dead costs no round trip.
    """
    created: asyncpg.Pool | None = getattr(client, "_pool", None)
    return (created.get_max_size() if created is not None else 0) + 1


def table_sql(model: type[Model], *, m2m: bool = True) -> tuple[str, str, set[str]]:
    """``(table, CREATE TABLE statements, tables referred to)`` for ``model``, as Tortoise
    and Aerich write them (its indexes and column comments included; its many-to-many
    tables too unless ``m2m`` is false)."""
    client: BaseDBAsyncClient = model._meta.db
    generator = client.schema_generator(client)
    table: dict[str, Any] = generator._get_table_sql(model, safe=False)
    sql = "\n".join([table["table_creation_string"], *(table["m2m_tables"] if m2m else [])])
    return table["table"], sql, set(table["references"])


class _GuardedTransactionContext(TransactionContextPooled):
    """Tortoise's pooled ``in_transaction()``, without its connection leak (see the module)."""

    async def __aenter__(self) -> TransactionalDBClient:
        await self.ensure_connection()
        client: Any = self.client
        parent_pool: asyncpg.Pool = client._parent._pool
        timeout = _settings.current().acquire_timeout
        client._connection = await _waits.acquire(parent_pool, timeout)
        self.token = get_connections().set(self.connection_name, self.client)
        try:
            await client.begin()
        except BaseException:
            get_connections().reset(self.token)
            _waits.discard(client._connection)
            await _waits.release(parent_pool, client._connection, timeout)
            raise
        return self.client


def guard_transactions(client: BaseDBAsyncClient | None = None) -> None:
    """Make ``tortoise.transactions.in_transaction()`` on tokendb's connection leak-free.

    Applied to every client tokendb uses (:func:`_adopt`), whoever opened it.
    Only that client is changed (an instance attribute, not a patch of
    Tortoise's class), so other Tortoise connections of the application keep
    Tortoise's behaviour.
    """
    client = client if client is not None else models_client()
    if not isinstance(client, AsyncpgDBClient) or isinstance(client, TransactionalDBClient):
        return

    def guarded() -> _GuardedTransactionContext:
        # The lock is looked up per transaction: a new event loop gets a new one.
        return _GuardedTransactionContext(TransactionWrapper(client), client._pool_init_lock)

    client._in_transaction = guarded  # type: ignore[method-assign]
