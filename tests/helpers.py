"""Helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import shutil
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg

import tokendb
from tokendb import _db, _key_cache, _settings
from tokendb.connection import migrations_location
from tokendb.ids import new_id
from tokendb.testing import TABLES

# Per table: its row count, and a digest of every row, so an UPDATE that
# keeps the count shows as well as an INSERT or a DELETE.
CHILD_PYTEST_ADDOPTS = "-p no:schemathesis -p no:hypothesispytest"
"""``PYTEST_ADDOPTS`` for the downstream suites the tests run in child pytest processes.

The test extra installs schemathesis and hypothesis, whose pytest plugins every pytest
process imports (schemathesis alone ~1 s of CPU): a dozen child suites (and each
pytest-xdist worker) paid it for plugins they never use."""

STATE_SQL = "SELECT " + ", ".join(
    f"(SELECT count(*) FROM {table}) AS {table}, "
    f"(SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {table} t)"
    f" AS {table}_digest"
    for table in TABLES
)


async def table_counts(conn: asyncpg.Connection | None = None) -> dict[str, Any]:
    """Row counts and row digests of tokendb's tables: equal before and after = nothing written.

    Read through tokendb's pool, or on ``conn`` (an observer outside it).
    """
    rows = await conn.fetch(STATE_SQL) if conn is not None else await _db.read(STATE_SQL)
    return dict(rows[0])


async def audit_books() -> dict[str, list[Any]]:
    """What every audit tokendb has finds, by name (all empty when the books balance):
    the suite checks it after each test, the workloads after each run."""
    return {
        "audit_ledger": await tokendb.audit_ledger(),
        "audit_chats": await tokendb.audit_chats(),
        "audit_holds": await tokendb.audit_holds(),
        "audit_usage": await tokendb.audit_usage(),
    }


async def tamper(url: str, sql: str, *args: object) -> None:
    """Change committed rows around the Python layer, triggers off, as the superuser of ``url``.

    For tests that prove a check finds what the database's own backstops
    would have refused (no application role can switch them off).
    """
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(sql, *args)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def holding_row_lock(url: str, *user_ids: uuid.UUID) -> AsyncIterator[asyncpg.Connection]:
    """Lock the rows of ``user_ids`` from outside tokendb until the block ends (then roll back)."""
    conn = await asyncpg.connect(url)
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute(
            "SELECT 1 FROM users WHERE id = ANY($1::uuid[]) FOR UPDATE", list(user_ids)
        )
        yield conn
    finally:
        await tx.rollback()
        await conn.close()


async def blocked_backends(conn: asyncpg.Connection, like: str = "%", count: int = 1) -> list[int]:
    """Backends of this database waiting for a lock, running a statement like ``like``.

    Waits (up to 5 s) until there are ``count`` of them, so a race test knows
    its statements are really queued before it lets the lock go.
    """
    for _ in range(500):
        # Inside a transaction pg_stat_activity is read once and cached: clear it.
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        pids = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND state = 'active' AND query LIKE $1",
            like,
        )
        if len(pids) >= count:
            return [row["pid"] for row in pids]
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {count} statements started waiting for the lock")


async def blocked(observer: asyncpg.Connection, pid: int) -> None:
    """Wait (up to 5 s) until backend ``pid`` waits for a lock another backend holds."""
    for _ in range(500):
        if await observer.fetchval("SELECT cardinality(pg_blocking_pids($1)) > 0", pid):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"backend {pid} did not start waiting for a lock")


class _ExecuteHook:
    """asyncpg's ``Connection._execute``: where every extended-protocol statement goes
    (``fetch``, ``fetchrow``, ``fetchval``, ``execute`` with arguments), on any
    connection, pooled ones included (their proxies call the class's method)."""

    def get(self) -> Any:
        return getattr(asyncpg.Connection, "_execute")  # noqa: B009 - private to asyncpg

    @contextlib.contextmanager
    def replaced(self, method: Any) -> Iterator[None]:
        original = self.get()
        setattr(asyncpg.Connection, "_execute", method)  # noqa: B010 - private to asyncpg
        try:
            yield
        finally:
            setattr(asyncpg.Connection, "_execute", original)  # noqa: B010


_EXECUTE = _ExecuteHook()


@contextlib.contextmanager
def statements_sent() -> Iterator[list[str]]:
    """The text of every statement sent in the block, in order, for tests of what a call costs.

    Counted where asyncpg sends a statement with the extended protocol (every
    ``fetch``/``fetchrow``/``fetchval``/``execute`` with arguments, which is
    how tokendb sends its reads and writes), on any connection of this
    process: transaction control (``BEGIN``/``COMMIT``) and the pool's reset
    are not statements of the call, nor the verify cache listener's heartbeat.
    Keep other connections quiet in the block.
    """
    sent: list[str] = []
    original = asyncpg.Connection._execute  # type: ignore[attr-defined]

    async def recording(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> Any:
        if query != _key_cache.HEARTBEAT_SQL:
            sent.append(query)
        return await original(self, query, *args, **kwargs)

    asyncpg.Connection._execute = recording  # type: ignore[attr-defined]
    try:
        yield sent
    finally:
        asyncpg.Connection._execute = original  # type: ignore[attr-defined]


@contextlib.contextmanager
def after_statement(sql: str, probe: Callable[[], Awaitable[None]]) -> Iterator[None]:
    """Run ``await probe()`` right after each statement whose text is ``sql`` returns.

    The call that sent it waits meanwhile, with its transaction open: a probe
    on another connection sees the locks that statement took.
    """
    original = _EXECUTE.get()

    async def probing(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> Any:
        result = await original(self, query, *args, **kwargs)
        if query == sql:
            await probe()
        return result

    with _EXECUTE.replaced(probing):
        yield


async def row_is_locked(conn: asyncpg.Connection, table: str, row_id: uuid.UUID) -> bool:
    """Whether another transaction holds a lock on the row (asked with NOWAIT, from ``conn``)."""
    try:
        async with conn.transaction():
            await conn.execute(f"SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE NOWAIT", row_id)
    except asyncpg.LockNotAvailableError:
        return True
    return False


def charge_batch(charges: Sequence[tuple[uuid.UUID, int]]) -> tuple[str, tuple[list[Any], ...]]:
    """The coalescer's batch statement and its arguments for ``(user_id, amount)`` charges.

    The one place the tests name that statement: where it moves, change this.
    """
    from tokendb._ledger_sql import BATCH

    return BATCH, (
        [user_id for user_id, _ in charges],
        [amount for _, amount in charges],
        [new_id() for _ in charges],
        [None for _ in charges],
        [None for _ in charges],
        [None for _ in charges],
        [None for _ in charges],
    )


@contextlib.asynccontextmanager
async def refusing_ledger_rows(
    url: str, description: str, *, sqlstate: str = "check_violation"
) -> AsyncIterator[asyncpg.Connection]:
    """A test-only trigger refuses every ledger row described as ``description``.

    It raises ``sqlstate`` (a condition name or a code) and counts its
    refusals in the sequence ``test_refusals`` (sequences ignore rollbacks):
    ``await conn.fetchval("SELECT last_value FROM test_refusals")`` on the
    yielded connection, once it refused at least once.
    """
    conn = await asyncpg.connect(url)
    await conn.execute(
        f"""
        CREATE SEQUENCE test_refusals;
        GRANT USAGE ON SEQUENCE test_refusals TO PUBLIC;  -- tokendb's role counts there too
        CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM nextval('test_refusals');
            RAISE EXCEPTION 'refused by a test trigger' USING ERRCODE = '{sqlstate}';
        END $$;
        CREATE TRIGGER test_refuse BEFORE INSERT ON token_transactions FOR EACH ROW
            WHEN (NEW.description = '{description}') EXECUTE FUNCTION test_refuse();
        """
    )
    try:
        yield conn
    finally:
        await conn.execute(
            "DROP TRIGGER test_refuse ON token_transactions; DROP FUNCTION test_refuse(); "
            "DROP SEQUENCE test_refusals"
        )
        await conn.close()


@contextlib.contextmanager
def db_settings(**changes: Any) -> Iterator[None]:
    """The seam's settings (:class:`tokendb._settings.Settings`) changed for the block only."""
    with _settings.using(**changes):
        yield


@contextlib.asynccontextmanager
async def asgi_client(app: Any, base_url: str = "http://test") -> AsyncIterator[Any]:
    """An httpx client talking to ``app`` in-process, with its lifespan run around it."""
    import httpx
    from asgi_lifespan import LifespanManager

    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as http:
            yield http


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_module(name: str, path: Path) -> ModuleType:
    """Import the Python file ``path`` as module ``name`` (an example, a README block)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def migrations_copy(tmp_path: Path, *, upto: int | None = None) -> Path:
    """A copy of tokendb's migrations folder, optionally only up to number ``upto``."""
    source = migrations_location() / "tokendb"
    target = tmp_path / "migrations" / "tokendb"
    target.mkdir(parents=True)
    for path in sorted(source.glob("*.py")):
        if upto is None or int(path.name.split("_", 1)[0]) <= upto:
            shutil.copy(path, target / path.name)
    return target.parent
