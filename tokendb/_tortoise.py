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
* :func:`guard_transactions`: the workaround below.

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

from tokendb import _settings, _waits
from tokendb._translate import is_connection_loss, translate
from tokendb.errors import ConfigurationError, DatabaseUnavailable
from tokendb.models import User

__all__ = [
    "TESTED_MINOR",
    "TransactionalDBClient",
    "guard_transactions",
    "models_client",
    "pool",
    "stale_attempts",
]

TESTED_MINOR = (1, 1)
"""The ``tortoise-orm`` minor version whose internals this module and :mod:`tokendb._rows`
were written against (``pyproject.toml`` pins it)."""

_META = User._meta


def models_client() -> BaseDBAsyncClient:
    """The connection of tokendb's models: the caller's transaction's, else the pooled client.

    Raises :class:`ConfigurationError` when tokendb is not initialised.
    """
    try:
        return _META.db
    except TortoiseConfigurationError as exc:
        raise ConfigurationError(
            "tokendb is not initialised: call `await tokendb.init()` "
            "(or use `async with tokendb.connect():`) first"
        ) from exc


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
        raise DatabaseUnavailable(f"the database is unavailable: {exc}") from exc
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


def guard_transactions() -> None:
    """Make ``tortoise.transactions.in_transaction()`` on tokendb's connection leak-free.

    Called by :func:`tokendb.init`. Only the client tokendb configured is
    changed (an instance attribute, not a patch of Tortoise's class), so other
    Tortoise connections of the application keep Tortoise's behaviour.
    """
    client = models_client()
    if not isinstance(client, AsyncpgDBClient) or isinstance(client, TransactionalDBClient):
        return
    lock: asyncio.Lock = client._pool_init_lock

    def guarded() -> _GuardedTransactionContext:
        return _GuardedTransactionContext(TransactionWrapper(client), lock)

    client._in_transaction = guarded  # type: ignore[method-assign]
