"""Error translation: driver and ORM errors become :class:`~tokendb.errors.TokenDBError` leaves.

The seam (:mod:`tokendb._db`) and the bounded waits (:mod:`tokendb._waits`)
classify what went wrong with a connection here (:func:`is_connection_loss`,
:data:`RETRYABLE`), and every public coroutine is wrapped in :func:`translated`
so no asyncpg, Tortoise or OS error escapes it.

Integrity errors (``asyncpg.UniqueViolationError`` …) pass through the seam
untranslated: the domain module that sent the statement knows what a
violated constraint means (an email taken, a reference reused) and
translates it itself; :func:`translated` turns whatever is left into a
:class:`~tokendb.errors.DatabaseError` naming the constraint.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import asyncpg
from tortoise.exceptions import BaseORMException
from tortoise.exceptions import ConfigurationError as TortoiseConfigurationError

from tokendb.errors import (
    ConfigurationError,
    DatabaseError,
    DatabaseTimeout,
    DatabaseUnavailable,
    TokenDBError,
)

__all__ = [
    "CONNECTION_LOST",
    "RETRYABLE",
    "TIMED_OUT",
    "TRANSLATED",
    "is_connection_loss",
    "message_of",
    "translate",
    "translated",
    "translates_itself",
]

T = TypeVar("T")
P = ParamSpec("P")
F = TypeVar("F", bound=Callable[..., Any])

# Errors that mean "the connection (or server) is gone": nothing about the
# statement itself was wrong.
CONNECTION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, crash, terminate_backend
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
    ConnectionError,
    OSError,
)
RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
"""The transaction was rolled back by a concurrency conflict: running it again is safe."""
TIMED_OUT = (
    asyncpg.exceptions.QueryCanceledError,  # statement_timeout
    asyncpg.exceptions.LockNotAvailableError,  # lock_timeout
)
"""A server-side bound ran out: the statement was cancelled and rolled back."""


def is_connection_loss(exc: BaseException) -> bool:
    """True when ``exc`` means the connection (or the server) is gone, not that the statement
    was wrong."""
    if isinstance(exc, (asyncpg.exceptions.QueryCanceledError, TimeoutError)):
        # 57014 is an OperatorInterventionError and TimeoutError an OSError,
        # but both mean a bound ran out on a connection that may be fine.
        return False
    if isinstance(exc, CONNECTION_LOST):
        return True
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        # The server's FATAL message (pg_terminate_backend, shutdown) arrived
        # but the socket is not closed yet: asyncpg refuses the next statement
        # with "cannot switch to state …; another operation is in progress".
        # Only a stale prepared-statement cache is not about the connection.
        return not isinstance(exc, asyncpg.exceptions.OutdatedSchemaCacheError)
    # asyncpg raises InterfaceError("connection is closed") for a connection
    # that died while idle in the pool or was closed under us.
    return isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc)


def message_of(exc: BaseException) -> str:
    """What ``exc`` says, without what PostgreSQL adds about the row at fault.

    ``str()`` of an asyncpg error appends the server's DETAIL and HINT, and a
    DETAIL quotes the failing row or key: a password or key hash, an argon2
    salt. Only the primary message reaches a :class:`TokenDBError` (the
    original stays its ``__cause__``). Tortoise wraps asyncpg errors in its own.
    """
    inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
    if isinstance(inner, asyncpg.PostgresError):
        return str(inner.args[0]) if inner.args else type(inner).__name__
    return str(exc)


def translate(exc: BaseException, *, outcome_unknown: bool = False) -> TokenDBError:
    """The :class:`TokenDBError` that stands for a driver/ORM error ``exc``.

    ``outcome_unknown`` marks connection loss after a write was sent.
    """
    if isinstance(exc, TokenDBError):
        return exc
    sqlstate = getattr(exc, "sqlstate", None)
    if _behind_a_pooler(exc):
        return ConfigurationError(
            f"{message_of(exc)}: the URL goes through a pooler in transaction mode (PgBouncer?); "
            "add ?pgbouncer=true to it (docs/pgbouncer.md)"
        )
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError):
        return DatabaseTimeout(
            "the statement was cancelled (statement_timeout); nothing was written",
            sqlstate=sqlstate,
        )
    if isinstance(exc, asyncpg.exceptions.LockNotAvailableError):
        return DatabaseTimeout(
            "a row lock was not granted within lock_timeout (a hot row?); nothing was written",
            sqlstate=sqlstate,
        )
    if isinstance(exc, TimeoutError):
        return DatabaseTimeout(
            "timed out waiting for the database"
            + ("; the outcome of the write is unknown" if outcome_unknown else ""),
            outcome_unknown=outcome_unknown,
        )
    if is_connection_loss(exc):
        if outcome_unknown:
            message = (
                f"lost the database connection after the write was sent ({message_of(exc)}); "
                "the outcome is unknown: retry with the same reference_id to be safe"
            )
        else:
            message = f"the database is unavailable: {message_of(exc)}"
        return DatabaseUnavailable(message, outcome_unknown=outcome_unknown, sqlstate=sqlstate)
    if isinstance(exc, RETRYABLE):
        return DatabaseUnavailable(
            f"transaction rolled back by a concurrency conflict ({message_of(exc)}); "
            "it is safe to retry",
            sqlstate=sqlstate,
        )
    if isinstance(
        exc,
        (
            asyncpg.exceptions.UndefinedTableError,
            asyncpg.exceptions.UndefinedColumnError,
            asyncpg.exceptions.UndefinedObjectError,
        ),
    ):
        return ConfigurationError(
            f"the database schema is missing or outdated ({message_of(exc)}); "
            "run `tokendb migrate` (or `await tokendb.migrate()`)"
        )
    if isinstance(exc, TortoiseConfigurationError):
        return ConfigurationError(
            f"tokendb is not initialised ({message_of(exc)}); call `await tokendb.init()` first"
        )
    if isinstance(exc, asyncpg.PostgresError):
        return DatabaseError(
            f"the database rejected the statement: {message_of(exc)}",
            sqlstate=sqlstate,
            constraint=getattr(exc, "constraint_name", None),
        )
    if isinstance(
        exc, (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError, BaseORMException)
    ):
        return DatabaseError(f"database error: {message_of(exc)}")
    return DatabaseError(
        f"unexpected error talking to the database: {type(exc).__name__}: {message_of(exc)}"
    )


def _behind_a_pooler(exc: BaseException) -> bool:
    """True for what PgBouncer in transaction pooling does to a URL without ``?pgbouncer=true``:
    asyncpg's named statements lost between transactions, timeouts refused at connect."""
    message = message_of(exc)
    if isinstance(
        exc,
        (
            asyncpg.exceptions.InvalidSQLStatementNameError,
            asyncpg.exceptions.DuplicatePreparedStatementError,
        ),
    ):
        return "__asyncpg_" in message
    return (
        isinstance(exc, asyncpg.exceptions.ProtocolViolationError)
        and "unsupported startup parameter" in message
    )


_TRANSLATED: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    BaseORMException,
    OSError,  # TimeoutError (asyncio's too, since 3.11) is an OSError
)


def translated(func: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Decorate a public coroutine so that no driver/ORM error escapes it.

    The result is still a coroutine function (typed as one), so callers can
    hand its calls to ``asyncio.run`` or ``create_task``.
    """

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await func(*args, **kwargs)
        except _TRANSLATED as exc:
            raise translate(exc) from exc

    wrapper.__tokendb_translated__ = True  # type: ignore[attr-defined]
    return wrapper


TRANSLATED = _TRANSLATED
"""What :func:`translated` catches (for :func:`translates_itself`)."""


def translates_itself(func: F) -> F:
    """Mark a public coroutine whose whole body is ``try: … except TRANSLATED as exc:
    raise translate(exc) from exc``: what :func:`translated` does, without its frame,
    which every resumption of the call passes through (``verify_api_key``, on every
    request's path). ``tests/test_public_api.py`` checks the marker."""
    func.__tokendb_translated__ = True  # type: ignore[attr-defined]
    return func
