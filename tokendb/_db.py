"""The storage seam: every statement tokendb sends goes through here.

Domain modules write SQL and hand it to :func:`read`, :func:`write` or
:func:`transaction`; this module decides:

* **Which connection.** Tortoise's own pool for the models' connection
  (:mod:`tokendb._tortoise`), so tokendb shares the pool (and the
  transaction, when the caller is inside ``in_transaction()``) with the
  application's ORM code. Statements go to the asyncpg connection directly:
  the same wire cost as hand-written asyncpg, with asyncpg's
  prepared-statement cache. Transactions are opened with asyncpg's own
  ``Connection.transaction()``, not Tortoise's pooled transaction context
  (see :mod:`tokendb._tortoise` for why).
* **Retries.** A deadlock or serialization failure rolls the whole
  transaction back, so when tokendb owns the transaction it simply runs it
  again (bounded, with jittered backoff). A pooled connection that turns out
  dead (a killed backend, a restarted server) *before anything that could
  write was sent* — a read, or ``BEGIN`` — is replaced and the call run
  again on a fresh one, so a pool recovers without callers seeing stale
  connections. Inside the caller's transaction neither is possible, and the
  error is raised instead.
* **What a lost connection means.** Connection loss before anything was
  written is :class:`~tokendb.errors.DatabaseUnavailable`; after a write was
  sent (during its statement or its ``COMMIT``) it is the same with
  ``outcome_unknown=True``.

Waiting for and releasing a pooled connection are bounded by
:mod:`tokendb._waits`; errors are classified by :mod:`tokendb._translate`.
Integrity errors (``asyncpg.UniqueViolationError`` …) leave untranslated:
the domain module that sent the statement knows what they mean.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
from tortoise.backends.base.client import BaseDBAsyncClient, TransactionalDBClient

from tokendb import _pool, _settings, _tortoise, _waits
from tokendb._translate import RETRYABLE, is_connection_loss, translate
from tokendb.errors import TokenDBError

__all__ = [
    "Connection",
    "Record",
    "connection",
    "pooled_client",
    "read",
    "transaction",
    "write",
    "write_when_sent",
]

T = TypeVar("T")
Record = asyncpg.Record
# Pooled connections are handed out as proxies that forward every Connection
# method; they are typed as Connection (see _waits.acquire).
Connection = asyncpg.Connection


def read(sql: str, *args: Any) -> Coroutine[Any, Any, list[Record]]:
    """Run a read-only statement and return its rows.

    A pooled connection found dead is replaced and the read run again
    (nothing was written); connection loss otherwise is :class:`DatabaseUnavailable`.
    """
    return _fetch(sql, args, writing=False)


def write(sql: str, *args: Any) -> Coroutine[Any, Any, list[Record]]:
    """Run one writing statement (its own transaction unless the caller has one); return its rows.

    A deadlock or serialization failure is retried when tokendb owns the
    transaction. Connection loss after the statement was sent raises
    :class:`DatabaseUnavailable` with ``outcome_unknown=True``.
    """
    return _fetch(sql, args, writing=True)


def write_when_sent(
    sql: str, arguments: Callable[[], tuple[Any, ...] | None]
) -> Coroutine[Any, Any, list[Record]]:
    """:func:`write`, with ``arguments()`` called once the connection is held, right
    before the statement is sent (again for each retry); None sends nothing (``[]``).

    For a statement whose items may be withdrawn while it waits for a
    connection (callers of a coalesced batch who gave up).
    """
    return _fetch(sql, arguments, writing=True)


def pooled_client() -> BaseDBAsyncClient | None:
    """The models' pooled client, or None inside the caller's own transaction."""
    client = _tortoise.models_client()
    return None if isinstance(client, TransactionalDBClient) else client


async def _fetch(
    sql: str,
    arguments: tuple[Any, ...] | Callable[[], tuple[Any, ...] | None],
    *,
    writing: bool,
) -> list[Record]:
    client = _tortoise.models_client()  # once per call: resolving it is not free
    if isinstance(client, TransactionalDBClient):
        args = arguments() if callable(arguments) else arguments
        if args is None:
            return []
        return await _fetch_in_callers_transaction(client, sql, args, writing=writing)
    pool = await _tortoise.pool(client)
    timeout = _settings.current().acquire_timeout
    retry: _Retry | None = None
    while True:
        conn = await _waits.acquire(pool, timeout)
        try:
            args = arguments() if callable(arguments) else arguments
            if args is None:
                return []
            return await conn.fetch(sql, *args)
        except Exception as exc:
            failure = exc
        finally:
            _pool.release_unchanged(conn)  # only tokendb's statement ran on it
            await _waits.release(pool, conn, timeout)
        if writing:
            # The statement may have reached the server before the connection
            # died, and it commits on its own: it is never sent again.
            if (lost := _lost(failure, outcome_unknown=True)) is not None:
                raise lost from failure
        elif is_connection_loss(failure):
            failure = _StaleConnection(failure)
        retry = retry or _Retry(client, allowed=True)
        if not await retry.again(failure):
            raise failure


async def _fetch_in_callers_transaction(
    client: TransactionalDBClient, sql: str, args: tuple[Any, ...], *, writing: bool
) -> list[Record]:
    async with client.acquire_connection() as conn:
        if writing:
            # A savepoint, so a refused statement (a constraint that fired)
            # does not abort the caller's whole transaction.
            async with conn.transaction():
                rows: list[Record] = await conn.fetch(sql, *args)
                return rows
        try:
            rows = await conn.fetch(sql, *args)
        except Exception as exc:
            if (lost := _lost(exc, outcome_unknown=False)) is not None:
                raise lost from exc
            raise
        return rows


@asynccontextmanager
async def connection() -> AsyncIterator[Connection]:
    """A connection for the current call: the caller's transaction's, or one from the pool.

    Waiting for the pool is bounded by ``acquire_timeout``
    (:class:`DatabaseTimeout`); an unreachable server is :class:`DatabaseUnavailable`.
    """
    client = _tortoise.models_client()
    if isinstance(client, TransactionalDBClient):
        async with client.acquire_connection() as conn:
            yield conn
        return
    pool = await _tortoise.pool(client)
    timeout = _settings.current().acquire_timeout
    conn = await _waits.acquire(pool, timeout)
    try:
        yield conn
    finally:
        _pool.release_unchanged(conn)  # held by tokendb's code only (not exported)
        await _waits.release(pool, conn, timeout)


async def transaction(body: Callable[[Connection], Awaitable[T]]) -> T:
    """Run ``body(conn)`` in a transaction (a savepoint inside the caller's) and return its result.

    ``body`` may be run more than once: after a deadlock or serialization
    failure the transaction is rolled back and run again, so it must not have
    side effects outside the database. Raising from ``body`` rolls back.
    Connection loss before COMMIT is :class:`DatabaseUnavailable` (nothing was
    written); during COMMIT it is ``outcome_unknown=True``.
    """
    client = _tortoise.models_client()
    owned = not isinstance(client, TransactionalDBClient)
    retry = _Retry(client, allowed=owned)
    while True:
        try:
            return await _transaction_once(body, owned=owned)
        except Exception as exc:
            if not await retry.again(exc):
                raise


async def _transaction_once(body: Callable[[Connection], Awaitable[T]], *, owned: bool) -> T:
    """One attempt; ``owned`` is False inside the caller's transaction (a savepoint)."""
    async with connection() as conn:
        tx = conn.transaction()
        try:
            await tx.start()
        except Exception as exc:
            if is_connection_loss(exc):
                raise _StaleConnection(exc) from exc  # nothing was sent: try a fresh one
            raise
        try:
            result = await body(conn)
        except BaseException as exc:
            if _waits.is_open(conn):
                try:
                    await tx.rollback()
                except Exception:  # the original error is what matters
                    _waits.discard(conn)
            if (lost := _lost(exc, outcome_unknown=False)) is not None:
                raise lost from exc
            raise
        try:
            await tx.commit()
        except Exception as exc:
            # Loss during our COMMIT leaves the outcome unknown; releasing a
            # savepoint commits nothing yet.
            if (lost := _lost(exc, outcome_unknown=owned)) is not None:
                raise lost from exc
            raise
        return result


def _lost(exc: BaseException, *, outcome_unknown: bool) -> TokenDBError | None:
    """The error standing for ``exc`` when it means the connection is gone (or a client-side
    bound ran out), else None."""
    if isinstance(exc, TokenDBError) or not isinstance(exc, Exception):
        return None
    if isinstance(exc, TimeoutError) or is_connection_loss(exc):
        return translate(exc, outcome_unknown=outcome_unknown)
    return None


class _StaleConnection(Exception):
    """A pooled connection was found dead before anything that could write was sent.

    Raised inside this module only; :class:`_Retry` tries a fresh connection,
    or translates ``cause`` when it may not.
    """

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Retry:
    """The retry policy of one call: which failures run it again, and how often."""

    __slots__ = ("allowed", "client", "conflicts", "stale")

    def __init__(self, client: BaseDBAsyncClient, *, allowed: bool) -> None:
        self.client = client
        self.allowed = allowed
        self.conflicts = self.stale = 0

    async def again(self, exc: Exception) -> bool:
        """True (after a backoff) when the call may run again after ``exc``.

        False when ``exc`` is the caller's to see as it is; a dead connection
        that may not be replaced raises its translation instead.
        """
        if isinstance(exc, RETRYABLE):
            self.conflicts += 1
            if not self.allowed or self.conflicts >= _settings.current().max_attempts:
                return False
            # Jittered exponential backoff: colliding transactions rarely collide again.
            await asyncio.sleep(random.uniform(0, 0.002 * 2**self.conflicts))
            return True
        if isinstance(exc, _StaleConnection):
            # Killed backends leave dead connections in the pool; the pool
            # reconnects the holder on its next acquire. A server that is
            # really down fails that acquire itself, so this stays bounded.
            self.stale += 1
            if not self.allowed or self.stale >= _tortoise.stale_attempts(self.client):
                raise translate(exc.cause) from exc.cause
            return True
        return False
