"""The storage seam: every statement tokendb sends goes through here.

Domain modules write SQL and hand it to :func:`read`, :func:`write` or
:func:`transaction`; this module owns the rest:

* **Which connection.** Tortoise's own pool for the models' connection, so
  tokendb shares the pool (and the transaction, when the caller is inside
  ``tortoise.transactions.in_transaction()``) with the application's ORM code.
  Statements go to the asyncpg connection directly: the same wire cost as
  hand-written asyncpg, with asyncpg's prepared-statement cache.
* **Bounded waits.** Acquiring a pooled connection and releasing it are
  bounded by ``acquire_timeout``; server-side ``statement_timeout`` and
  ``lock_timeout`` are set on the pool's connections by :func:`tokendb.init`,
  with client-side bounds behind them (asyncpg's connect timeout and
  ``command_timeout``) for a server that stops answering altogether.
  Transactions are opened with asyncpg's own ``Connection.transaction()``,
  not Tortoise's pooled transaction context, which leaks its connection when
  ``BEGIN`` fails on a dead connection (tortoise-orm 1.1.9): enough killed
  backends and every later caller would hang on an empty pool.
  :func:`guard_transactions` gives the application's own
  ``in_transaction()`` the same protection on tokendb's connection.
* **Retries.** A deadlock or serialization failure rolls the whole
  transaction back, so when tokendb owns the transaction it simply runs it
  again (bounded, with jittered backoff). A pooled connection that turns out
  dead (a killed backend, a restarted server) *before anything that could
  write was sent* — a read, or ``BEGIN`` — is replaced and the call run
  again on a fresh one, so a pool recovers without callers seeing stale
  connections. Inside the caller's transaction neither is possible, and the
  error is raised instead.
* **Translation.** Driver and ORM errors become :class:`~tokendb.errors.TokenDBError`
  leaves (:func:`translate`); connection loss says whether the outcome of a
  write is unknown.

Integrity errors (``asyncpg.UniqueViolationError`` …) are *not* translated on
the way out of :func:`read`/:func:`write`/:func:`transaction`: the domain
module that sent the statement knows what a violated constraint means (an
email taken, a reference reused) and translates it itself. The public
functions are wrapped in :func:`translated`, which turns whatever is left
into a ``TokenDBError``.
"""

from __future__ import annotations

import asyncio
import functools
import random
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, TypeVar, cast

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

from tokendb import _rows
from tokendb.errors import (
    ConfigurationError,
    DatabaseError,
    DatabaseTimeout,
    DatabaseUnavailable,
    TokenDBError,
)

__all__ = [
    "Settings",
    "configure",
    "guard_transactions",
    "read",
    "settings",
    "transaction",
    "translate",
    "translated",
    "write",
]

T = TypeVar("T")
P = ParamSpec("P")
Record = asyncpg.Record
# Pooled connections are handed out as proxies that forward every Connection
# method; they are typed as Connection (see _acquire).
Connection = asyncpg.Connection


@dataclass(frozen=True)
class Settings:
    """Runtime knobs of the seam, set by :func:`tokendb.init`."""

    acquire_timeout: float = 10.0
    """Seconds to wait for a free pooled connection (and for its release)."""
    max_attempts: int = 8
    """Attempts of a transaction that hit a deadlock or serialization failure."""
    coalesce_charges: bool = True
    """Coalesce concurrent ``charge()`` calls into shared statements (:mod:`tokendb.coalescing`)."""


_settings = Settings()


def settings() -> Settings:
    return _settings


def configure(new: Settings) -> None:
    global _settings
    _settings = new


# Errors that mean "the connection (or server) is gone": nothing about the
# statement itself was wrong.
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, crash, terminate_backend
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
    ConnectionError,
    OSError,
)
_RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)


def _is_connection_loss(exc: BaseException) -> bool:
    if isinstance(exc, (asyncpg.exceptions.QueryCanceledError, TimeoutError)):
        # 57014 is an OperatorInterventionError and TimeoutError an OSError,
        # but both mean a bound ran out on a connection that may be fine.
        return False
    if isinstance(exc, _CONNECTION_LOST):
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


def translate(exc: BaseException, *, outcome_unknown: bool = False) -> TokenDBError:
    """The :class:`TokenDBError` that stands for a driver/ORM error ``exc``.

    ``outcome_unknown`` marks connection loss after a write was sent.
    """
    if isinstance(exc, TokenDBError):
        return exc
    sqlstate = getattr(exc, "sqlstate", None)
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
    if _is_connection_loss(exc):
        if outcome_unknown:
            message = (
                f"lost the database connection after the write was sent ({exc}); "
                "the outcome is unknown: retry with the same reference_id to be safe"
            )
        else:
            message = f"the database is unavailable: {exc}"
        return DatabaseUnavailable(message, outcome_unknown=outcome_unknown, sqlstate=sqlstate)
    if isinstance(exc, _RETRYABLE):
        return DatabaseUnavailable(
            f"transaction rolled back by a concurrency conflict ({exc}); it is safe to retry",
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
            f"the database schema is missing or outdated ({exc}); "
            "run `aerich upgrade` or `await tokendb.migrate()`"
        )
    if isinstance(exc, TortoiseConfigurationError):
        return ConfigurationError(
            f"tokendb is not initialised ({exc}); call `await tokendb.init()` first"
        )
    if isinstance(exc, asyncpg.PostgresError):
        return DatabaseError(
            f"the database rejected the statement: {exc}",
            sqlstate=sqlstate,
            constraint=getattr(exc, "constraint_name", None),
        )
    if isinstance(
        exc, (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError, BaseORMException)
    ):
        return DatabaseError(f"database error: {exc}")
    return DatabaseError(f"unexpected error talking to the database: {exc!r}")


_TRANSLATED: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    BaseORMException,
    OSError,  # TimeoutError (asyncio's too, since 3.11) is an OSError
)


def translated(func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Decorate a public coroutine so that no driver/ORM error escapes it."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await func(*args, **kwargs)
        except _TRANSLATED as exc:
            raise translate(exc) from exc

    wrapper.__tokendb_translated__ = True  # type: ignore[attr-defined]
    return wrapper


_meta: Any = None


def _client() -> BaseDBAsyncClient:
    # The models' connection is resolved per call so the caller's transaction
    # (a TransactionWrapper in Tortoise's context) is honoured.
    global _meta
    if _meta is None:
        from tokendb.models import User  # imported late: models imports nothing from here

        _meta = User._meta
    try:
        return _meta.db  # type: ignore[no-any-return]
    except TortoiseConfigurationError as exc:
        raise ConfigurationError(
            "tokendb is not initialised: call `await tokendb.init()` "
            "(or use `async with tokendb.connect():`) first"
        ) from exc


class _StaleConnection(Exception):
    """A pooled connection was found dead before anything that could write was sent.

    Raised inside this module only; :func:`_with_retries` tries a fresh
    connection, or translates ``cause`` when it may not.
    """

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


# The two ``with`` blocks below are on every statement's path: classes, not
# @contextmanager generators, which cost several times as much.


class _StaleOnLoss:
    """``with``: connection loss leaves as :class:`_StaleConnection`."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: object, exc: BaseException | None, traceback: object
    ) -> Literal[False]:
        if exc is not None and _is_connection_loss(exc):
            raise _StaleConnection(exc) from exc
        return False


class _UnavailableOnLoss:
    """``with``: connection loss and timeouts leave as DatabaseUnavailable/DatabaseTimeout."""

    __slots__ = ("outcome_unknown",)

    def __init__(self, *, outcome_unknown: bool) -> None:
        self.outcome_unknown = outcome_unknown

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: object, exc: BaseException | None, traceback: object
    ) -> Literal[False]:
        if exc is None or isinstance(exc, TokenDBError):
            return False
        if isinstance(exc, TimeoutError) or _is_connection_loss(exc):
            raise translate(exc, outcome_unknown=self.outcome_unknown) from exc
        return False


_STALE_ON_LOSS = _StaleOnLoss()
_LOST_BEFORE_WRITE = _UnavailableOnLoss(outcome_unknown=False)
_LOST_AFTER_WRITE = _UnavailableOnLoss(outcome_unknown=True)


def _is_open(conn: Connection) -> bool:
    # When a connection closes under us the pool takes it back and detaches
    # our proxy, whose every method then raises InterfaceError ("connection
    # has been released back to the pool"): that too means "not open".
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


def _discard(conn: Connection) -> None:
    """Close ``conn`` without a round trip; the pool replaces it on the next acquire.

    Never raises: it runs while another error is propagating, and a
    connection the pool already took back (see :func:`_is_open`) needs nothing.
    """
    with suppress(asyncpg.InterfaceError):
        conn.terminate()


async def _release(pool: asyncpg.Pool, conn: Connection) -> None:
    # Releasing resets the connection (a round trip): bounded, and a
    # connection that cannot be reset is dropped rather than allowed to
    # replace the error that is propagating.
    try:
        with _Deadline(_settings.acquire_timeout):
            await pool.release(cast(Any, conn))
    except (Exception, asyncio.CancelledError):
        _discard(conn)


@asynccontextmanager
async def connection() -> AsyncIterator[Connection]:
    """A connection for the current call: the caller's transaction's, or one from the pool.

    Waiting for the pool is bounded by ``acquire_timeout``
    (:class:`DatabaseTimeout`); an unreachable server is :class:`DatabaseUnavailable`.
    """
    client = _client()
    if isinstance(client, TransactionalDBClient):
        async with client.acquire_connection() as conn:
            yield conn
        return
    pool = await _pool(client)
    conn = await _acquire(pool)
    try:
        yield conn
    finally:
        await _release(pool, conn)


async def _acquire(pool: asyncpg.Pool) -> Connection:
    timeout = _settings.acquire_timeout
    with _LOST_BEFORE_WRITE:
        try:
            with _Deadline(timeout):
                proxy = await pool.acquire()
        except TimeoutError as exc:
            raise DatabaseTimeout(
                f"no pooled connection became free within {timeout:g} s "
                "(pool too small for the load, or the database is stuck)"
            ) from exc
    # The pool's proxy forwards every Connection method; the domain modules
    # are typed against Connection.
    return cast(Connection, proxy)


class _Deadline:
    """``with _Deadline(seconds):`` bounds the awaits in the block, like ``asyncio.timeout()``.

    ``asyncio.timeout()`` (and asyncpg's ``timeout=``) schedule a timer per
    wait and cancel it afterwards: on every statement's path, for acquiring
    and for releasing, that is ~12 µs of CPU per call under load (measured by
    ``python -m bench``), most of what the seam costs over raw asyncpg. The
    seam's bounds are seconds long, so one timer per event loop checks them
    all every :data:`_TICK` seconds while any is running (:class:`_Watchdog`):
    an overdue block is cancelled at most ``_TICK`` late, and the
    ``CancelledError`` leaves the block as ``TimeoutError`` when it was the
    deadline's, not the caller's own cancellation (the rule of ``asyncio.timeout``).
    """

    __slots__ = ("_cancelling", "_seconds", "_task", "_watchdog", "expired")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def __enter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("_Deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self.expired = False
        self._watchdog = _Watchdog.of(task.get_loop())
        self._watchdog.watch(self, self._seconds)

    def __exit__(
        self, kind: object, exc: BaseException | None, traceback: object
    ) -> Literal[False]:
        self._watchdog.deadlines.pop(self, None)
        if (
            self.expired
            and isinstance(exc, asyncio.CancelledError)
            and self._task.uncancel() <= self._cancelling
        ):
            raise TimeoutError from exc
        return False

    def expire(self) -> None:
        self.expired = True
        self._task.cancel()


_TICK = 0.1
"""Seconds between two checks of the running deadlines of an event loop."""


class _Watchdog:
    """The running deadlines of one event loop, and the one timer that enforces them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.deadlines: dict[_Deadline, float] = {}
        self.timer: asyncio.TimerHandle | None = None

    @staticmethod
    def of(loop: asyncio.AbstractEventLoop) -> _Watchdog:
        global _last
        if _last is not None and _last.loop is loop:
            return _last  # almost always: one event loop per process
        watchdog = _watchdogs.get(loop)
        if watchdog is None:
            watchdog = _watchdogs[loop] = _Watchdog(loop)
        _last = watchdog
        return watchdog

    def watch(self, deadline: _Deadline, seconds: float) -> None:
        self.deadlines[deadline] = self.loop.time() + seconds
        if self.timer is None:
            self.timer = self.loop.call_later(_TICK, self._check)

    def _check(self) -> None:
        now = self.loop.time()
        overdue = [deadline for deadline, at in self.deadlines.items() if at <= now]
        for deadline in overdue:
            del self.deadlines[deadline]
            deadline.expire()
        self.timer = self.loop.call_later(_TICK, self._check) if self.deadlines else None


_watchdogs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watchdog] = (
    weakref.WeakKeyDictionary()
)
_last: _Watchdog | None = None


async def _pool(client: BaseDBAsyncClient) -> asyncpg.Pool:
    ready: asyncpg.Pool | None = getattr(client, "_pool", None)
    if ready is not None:
        return ready  # the common case, without the wait_for task below
    # Tortoise creates its pool lazily on first use; reuse its own guarded
    # initialisation so tokendb and the ORM share one pool.
    lock: asyncio.Lock = getattr(client, "_pool_init_lock")  # noqa: B009 - not in the base type
    wrapper: PoolConnectionWrapper[Any] = PoolConnectionWrapper(client, lock)
    with _LOST_BEFORE_WRITE:
        try:
            await asyncio.wait_for(wrapper.ensure_connection(), _settings.acquire_timeout)
        except BaseORMException as exc:
            raise DatabaseUnavailable(f"the database is unavailable: {exc}") from exc
    pool: asyncpg.Pool = getattr(client, "_pool")  # noqa: B009 - not in the base type
    return pool


async def read(sql: str, *args: Any) -> list[Record]:
    """Run a read-only statement and return its rows.

    A pooled connection found dead is replaced and the read run again
    (nothing was written); connection loss otherwise is :class:`DatabaseUnavailable`.
    """
    return await _fetch(sql, args, writing=False)


async def write(sql: str, *args: Any) -> list[Record]:
    """Run one writing statement (its own transaction unless the caller has one); return its rows.

    A deadlock or serialization failure is retried when tokendb owns the
    transaction. Connection loss after the statement was sent raises
    :class:`DatabaseUnavailable` with ``outcome_unknown=True``.
    """
    return await _fetch(sql, args, writing=True)


async def _fetch(sql: str, args: tuple[Any, ...], *, writing: bool) -> list[Record]:
    client = _client()  # once per call: resolving Tortoise's connection is not free
    rows: list[Record]
    if isinstance(client, TransactionalDBClient):
        async with client.acquire_connection() as conn:
            if writing:
                # A savepoint, so a refused statement (a constraint that
                # fired) does not abort the caller's whole transaction.
                async with conn.transaction():
                    rows = await conn.fetch(sql, *args)
            else:
                with _LOST_BEFORE_WRITE:
                    rows = await conn.fetch(sql, *args)
            return rows
    pool = await _pool(client)
    # A dead connection is replaced and a read run again; a write is not: the
    # statement may have reached the server before the connection died, and
    # it commits on its own.
    on_loss = _LOST_AFTER_WRITE if writing else _STALE_ON_LOSS
    return await _with_retries(
        lambda: _fetch_pooled(pool, on_loss, sql, args), retries_allowed=True, client=client
    )


async def _fetch_pooled(
    pool: asyncpg.Pool, on_loss: _StaleOnLoss | _UnavailableOnLoss, sql: str, args: tuple[Any, ...]
) -> list[Record]:
    """``sql`` on a pooled connection; not through :func:`connection`, whose
    generator-based context manager costs more on every statement than the rest."""
    conn = await _acquire(pool)
    try:
        with on_loss:
            return await conn.fetch(sql, *args)
    finally:
        await _release(pool, conn)


M = TypeVar("M", bound=Model)


def to_model(model: type[M], record: Record | dict[str, Any], prefix: str = "") -> M:
    """A model instance from a row holding all of the model's columns (``prefix + column``)."""
    return _rows.to_model(model, record, prefix)


async def transaction(body: Callable[[Connection], Awaitable[T]]) -> T:
    """Run ``body(conn)`` in a transaction (a savepoint inside the caller's) and return its result.

    ``body`` may be run more than once: after a deadlock or serialization
    failure the transaction is rolled back and run again, so it must not have
    side effects outside the database. Raising from ``body`` rolls back.
    Connection loss before COMMIT is :class:`DatabaseUnavailable` (nothing was
    written); during COMMIT it is ``outcome_unknown=True``.
    """
    client = _client()
    owned = not isinstance(client, TransactionalDBClient)
    return await _with_retries(
        lambda: _transaction_once(body, owned=owned), retries_allowed=owned, client=client
    )


async def _transaction_once(body: Callable[[Connection], Awaitable[T]], *, owned: bool) -> T:
    """One attempt; ``owned`` is False inside the caller's transaction (a savepoint)."""
    async with connection() as conn:
        tx = conn.transaction()
        with _STALE_ON_LOSS:
            await tx.start()
        try:
            with _LOST_BEFORE_WRITE:
                result = await body(conn)
        except BaseException:
            if _is_open(conn):
                try:
                    await tx.rollback()
                except Exception:  # the original error is what matters
                    _discard(conn)
            raise
        # Loss during our COMMIT leaves the outcome unknown; releasing a
        # savepoint commits nothing yet.
        with _LOST_AFTER_WRITE if owned else _LOST_BEFORE_WRITE:
            await tx.commit()
        return result


def _stale_attempts(client: BaseDBAsyncClient) -> int:
    """Pooled connections one call tries when they turn out dead before anything was sent.

    One more than the pool holds: after a server restart every idle
    connection may be dead, and finding one dead costs no round trip.
    """
    pool: asyncpg.Pool | None = getattr(client, "_pool", None)
    return (pool.get_max_size() if pool is not None else 0) + 1


async def _with_retries(
    attempt: Callable[[], Awaitable[T]], *, retries_allowed: bool, client: BaseDBAsyncClient
) -> T:
    conflicts = stale = 0
    while True:
        try:
            return await attempt()
        except _RETRYABLE:
            conflicts += 1
            if not retries_allowed or conflicts >= _settings.max_attempts:
                raise
            # Jittered exponential backoff: colliding transactions rarely collide again.
            await asyncio.sleep(random.uniform(0, 0.002 * 2**conflicts))
        except _StaleConnection as exc:
            # Killed backends leave dead connections in the pool; the pool
            # reconnects the holder on its next acquire. A server that is
            # really down fails that acquire itself, so this stays bounded.
            stale += 1
            if not retries_allowed or stale >= _stale_attempts(client):
                raise translate(exc.cause) from exc.cause


class _GuardedTransactionContext(TransactionContextPooled):
    """Tortoise's pooled ``in_transaction()``, without its connection leak.

    tortoise-orm 1.1.9 acquires a pooled connection, publishes the
    transaction in the task's context and sends ``BEGIN``; when ``BEGIN``
    fails (the connection died: a killed backend, a restarted server) it
    neither releases the connection nor resets the context. Each such failure
    keeps one pool slot forever, so enough of them drain the pool shared with
    tokendb until every caller waits. This version bounds the acquire by
    ``acquire_timeout`` and undoes both when ``BEGIN`` fails.
    """

    async def __aenter__(self) -> TransactionalDBClient:
        await self.ensure_connection()
        client: Any = self.client
        pool: asyncpg.Pool = client._parent._pool
        client._connection = await _acquire(pool)
        self.token = get_connections().set(self.connection_name, self.client)
        try:
            await client.begin()
        except BaseException:
            get_connections().reset(self.token)
            _discard(client._connection)
            await _release(pool, client._connection)
            raise
        return self.client


def guard_transactions() -> None:
    """Make ``tortoise.transactions.in_transaction()`` on tokendb's connection leak-free.

    Called by :func:`tokendb.init`. Only the client tokendb configured is
    changed (an instance attribute, not a patch of Tortoise's class), so other
    Tortoise connections of the application keep Tortoise's behaviour.
    """
    client = _client()
    if not isinstance(client, AsyncpgDBClient) or isinstance(client, TransactionalDBClient):
        return
    lock: asyncio.Lock = client._pool_init_lock

    def guarded() -> _GuardedTransactionContext:
        return _GuardedTransactionContext(TransactionWrapper(client), lock)

    client._in_transaction = guarded  # type: ignore[method-assign]
