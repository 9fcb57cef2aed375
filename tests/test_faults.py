"""Faults one at a time: connection loss and its outcome, timeouts, Tortoise's leak, migrations.

Each test gets a database of its own (``faults_db``) so it can kill that
database's backends and install test-only triggers without touching the
session database or anyone else's.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from tortoise.transactions import in_transaction

import tokendb
from tests.helpers import holding_row_lock, migrations_copy
from tests.pgcluster import SESSION_POOL, database_name, isolated_tokendb, kill_backends
from tokendb import _db
from tokendb.connection import _upgrade, migrations_location
from tokendb.testing import test_server_url as server_url
from tokendb.testing import throwaway_database

BOUND = 20.0  # seconds: any call that takes longer counts as a hang


@pytest_asyncio.fixture(loop_scope="session")
async def faults_db(request: pytest.FixtureRequest, tokendb_app_url: str) -> AsyncIterator[str]:
    """tokendb on a database of the test's own, on a pool of 4 connections."""
    async with isolated_tokendb(
        server_url(request.config),
        tokendb_app_url,
        min_size=1,
        max_size=4,
        lock_timeout=None,
        statement_timeout=60,
    ) as url:
        yield url


@pytest_asyncio.fixture(loop_scope="session")
async def admin(faults_db: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(faults_db)
    try:
        yield conn
    finally:
        await conn.close()


async def backend_where(admin: asyncpg.Connection, condition: str) -> int:
    """The pid of the test database's backend matching ``condition``, once there is one."""
    for _ in range(int(BOUND / 0.02)):
        pid = await admin.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            f"AND pid <> pg_backend_pid() AND {condition} LIMIT 1"
        )
        if pid is not None:
            return int(pid)
        await asyncio.sleep(0.02)
    raise AssertionError(f"no backend with {condition}")


async def terminate_while(admin: asyncpg.Connection, condition: str, call: Any) -> BaseException:
    """Start ``call``, kill its backend once ``condition`` holds, return what ``call`` raised."""
    task = asyncio.ensure_future(call)
    pid = await backend_where(admin, condition)
    await admin.execute("SELECT pg_terminate_backend($1)", pid)
    with pytest.raises(tokendb.TokenDBError) as caught:
        await asyncio.wait_for(task, BOUND)
    return caught.value


@pytest_asyncio.fixture(loop_scope="session")
async def locked_user(faults_db: str, make_user: Any) -> AsyncIterator[tokendb.User]:
    """A user whose row a raw connection keeps locked (FOR UPDATE) during the test."""
    user = await make_user()
    async with holding_row_lock(faults_db, user.id):
        yield user


def assert_driver_cause(exc: BaseException) -> None:
    assert exc.__cause__ is not None
    assert not isinstance(exc.__cause__, tokendb.TokenDBError)


async def ledger_rows(admin: asyncpg.Connection, user: tokendb.User) -> int:
    count: int = await admin.fetchval(
        "SELECT count(*) FROM token_transactions WHERE user_id = $1", user.id
    )
    return count


# -- connection loss ---------------------------------------------------------


async def test_loss_after_a_write_was_sent_is_unavailable_outcome_unknown(
    admin: asyncpg.Connection, locked_user: tokendb.User
) -> None:
    reference = uuid.uuid4()
    exc = await terminate_while(
        admin,
        "wait_event_type = 'Lock'",
        tokendb.charge(user=locked_user, amount=10, reference_id=reference),
    )
    assert type(exc) is tokendb.DatabaseUnavailable
    assert exc.outcome_unknown is True
    assert "outcome is unknown" in str(exc)
    assert_driver_cause(exc)
    assert await ledger_rows(admin, locked_user) == 1  # just the signup bonus


async def test_retry_with_the_reference_after_an_unknown_outcome_charges_once(
    faults_db: str, admin: asyncpg.Connection, make_user: Any
) -> None:
    user = await make_user()
    async with holding_row_lock(faults_db, user.id):
        reference = uuid.uuid4()
        exc = await terminate_while(
            admin,
            "wait_event_type = 'Lock'",
            tokendb.charge(user=user, amount=10, reference_id=reference),
        )
        assert isinstance(exc, tokendb.DatabaseUnavailable) and exc.outcome_unknown
    first = await tokendb.charge(user=user, amount=10, reference_id=reference)
    again = await tokendb.charge(user=user, amount=10, reference_id=reference)
    assert again.id == first.id
    assert await tokendb.get_balance(user=user) == 90


async def test_loss_before_commit_of_a_transaction_is_unavailable_nothing_written(
    admin: asyncpg.Connection, make_user: Any, faults_db: str
) -> None:
    user = await make_user()
    usage = await tokendb.charge(user=user, amount=30)
    async with holding_row_lock(faults_db, user.id):
        exc = await terminate_while(
            admin, "wait_event_type = 'Lock'", tokendb.refund(transaction=usage, amount=5)
        )
    assert type(exc) is tokendb.DatabaseUnavailable
    assert exc.outcome_unknown is False
    assert_driver_cause(exc)
    assert await ledger_rows(admin, user) == 2
    assert await tokendb.get_balance(user=user) == 70


SLOW_COMMIT = """
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.description = 'slow commit' THEN PERFORM pg_sleep(30); END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON token_transactions
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
"""


async def test_loss_during_commit_is_outcome_unknown(
    admin: asyncpg.Connection, make_user: Any
) -> None:
    """A deferred trigger holds COMMIT open; the backend dies inside it."""
    await admin.execute(SLOW_COMMIT)
    user = await make_user()
    usage = await tokendb.charge(user=user, amount=30)

    in_commit = "wait_event = 'PgSleep' AND query ILIKE 'commit%'"
    exc = await terminate_while(
        admin, in_commit, tokendb.refund(transaction=usage, amount=5, description="slow commit")
    )
    assert type(exc) is tokendb.DatabaseUnavailable
    assert exc.outcome_unknown is True
    assert_driver_cause(exc)

    # The single-statement path: its implicit COMMIT runs the deferred trigger.
    reference = uuid.uuid4()
    exc = await terminate_while(
        admin,
        "wait_event = 'PgSleep'",
        tokendb.charge(user=user, amount=7, description="slow commit", reference_id=reference),
    )
    assert isinstance(exc, tokendb.DatabaseUnavailable) and exc.outcome_unknown is True
    # Killed before COMMIT finished: neither was written; the books balance.
    assert await ledger_rows(admin, user) == 2
    assert await tokendb.audit_ledger(user=user) == []


async def test_dead_pooled_connections_are_replaced_for_reads_and_transactions(
    faults_db: str, admin: asyncpg.Connection, make_user: Any
) -> None:
    user = await make_user()
    usage = await tokendb.charge(user=user, amount=40)
    for _ in range(5):
        # Every connection of the pool open and idle, then all of them killed.
        await asyncio.gather(*(tokendb.get_balance(user=user) for _ in range(8)))
        assert await kill_backends(admin, database_name(faults_db)) > 0
        balances = await asyncio.wait_for(
            asyncio.gather(*(tokendb.get_balance(user=user) for _ in range(4))), BOUND
        )
        assert balances == [60] * 4
        await kill_backends(admin, database_name(faults_db))
        refund = await asyncio.wait_for(tokendb.refund(transaction=usage, amount=1), BOUND)
        assert refund.amount == 1
        await tokendb.charge(user=user, amount=1)


async def test_killed_backends_do_not_drain_the_pool_through_in_transaction(
    faults_db: str, admin: asyncpg.Connection, make_user: Any
) -> None:
    """Tortoise 1.1.9 leaks a pooled connection when BEGIN fails; tokendb.init guards it."""
    user = await make_user()
    failures: list[BaseException] = []

    async def in_callers_transaction() -> None:
        try:
            async with in_transaction():
                await tokendb.charge(user=user, amount=1)
        except Exception as exc:  # whatever BEGIN on a dead connection raises
            failures.append(exc)

    for _ in range(8):
        await asyncio.gather(*(tokendb.get_balance(user=user) for _ in range(8)))
        await kill_backends(admin, database_name(faults_db))
        await asyncio.wait_for(
            asyncio.gather(*(asyncio.create_task(in_callers_transaction()) for _ in range(4))),
            BOUND,
        )
    assert failures, "no BEGIN failed: the test did not exercise the leak"
    assert not any(isinstance(exc, tokendb.DatabaseTimeout) for exc in failures)

    failures.clear()
    await asyncio.sleep(0.2)
    # Twice the pool, concurrently: a leaked slot would make these wait for ever.
    await asyncio.wait_for(
        asyncio.gather(*(asyncio.create_task(in_callers_transaction()) for _ in range(8))), BOUND
    )
    assert failures == []
    assert await tokendb.audit_ledger() == []


async def test_loss_inside_the_callers_transaction_is_unavailable(
    admin: asyncpg.Connection, make_user: Any
) -> None:
    user = await make_user()
    with pytest.raises(Exception):  # noqa: B017 - the caller's ORM error, not ours
        async with in_transaction() as client:
            pid = await client.execute_query_dict("SELECT pg_backend_pid() AS pid")
            await admin.execute("SELECT pg_terminate_backend($1)", pid[0]["pid"])
            with pytest.raises(tokendb.DatabaseUnavailable) as caught:
                await asyncio.wait_for(tokendb.charge(user=user, amount=5), BOUND)
            assert_driver_cause(caught.value)
            raise caught.value
    assert await tokendb.get_balance(user=user) == 100


async def test_a_deadlock_is_retried_inside_tokendb(faults_db: str, make_user: Any) -> None:
    """Two transactions lock two users crosswise: PostgreSQL aborts one, tokendb re-runs it."""
    first, second = await make_user(), await make_user()
    both_hold_one = asyncio.Barrier(2)
    runs: Counter[str] = Counter()

    def crosswise(name: str, mine: uuid.UUID, theirs: uuid.UUID) -> Any:
        async def body(conn: asyncpg.Connection) -> str:
            runs[name] += 1
            await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", mine)
            if runs[name] == 1:
                await asyncio.wait_for(both_hold_one.wait(), BOUND)
            await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", theirs)
            return name

        return body

    done = await asyncio.wait_for(
        asyncio.gather(
            _db.transaction(crosswise("a", first.id, second.id)),
            _db.transaction(crosswise("b", second.id, first.id)),
        ),
        BOUND,
    )
    assert sorted(done) == ["a", "b"]
    assert sorted(runs.values()) == [1, 2]  # the deadlock victim ran twice


async def test_callers_that_give_up_mid_call_leak_no_connection(
    faults_db: str, admin: asyncpg.Connection, make_user: Any
) -> None:
    """A caller's own timeout cancels tokendb mid-statement: the pool and the books survive.

    A caller that gives up after its coalesced charge was sent only stops
    waiting: the charge still commits, later (the documented "Cancellation" of
    tokendb._group_commit; retry with the same reference_id to learn the outcome).
    So the balance may still move after the loop, until the next charge: it is
    sent after the batch in flight, and once it returns every charge has landed.
    A refund or charge whose connection was dropped on the way out (its reset
    timed out) is still running on the server, and commits on its own: the
    reads wait until no statement of this database runs any more.
    """
    user = await make_user()
    await tokendb.top_up(user=user, amount=10_000)
    usage = await tokendb.charge(user=user, amount=5_000)
    gave_up = 0
    for index in range(200):
        calls = [
            lambda: tokendb.charge(user=user, amount=1),
            lambda: tokendb.refund(transaction=usage, amount=1),
            lambda: tokendb.get_balance(user=user),
        ]
        try:
            await asyncio.wait_for(calls[index % 3](), timeout=index % 7 * 0.0005)
        except TimeoutError:
            gave_up += 1
    assert gave_up > 0
    await asyncio.wait_for(tokendb.charge(user=user, amount=1), BOUND)
    await asyncio.wait_for(_statements_finished(admin), BOUND)
    # Twice the pool's size at once: a leaked connection would make these wait.
    balances = await asyncio.wait_for(
        asyncio.gather(*(tokendb.get_balance(user=user) for _ in range(8))), BOUND
    )
    assert len(set(balances)) == 1
    assert await tokendb.audit_ledger(user=user) == []


async def _statements_finished(observer: asyncpg.Connection) -> None:
    """Return once no other backend of ``observer``'s database is running a statement."""
    while await observer.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND state <> 'idle'"
    ):
        await observer.execute("SELECT pg_stat_clear_snapshot()")
        await asyncio.sleep(0.01)


async def test_init_against_a_server_that_is_down_is_unavailable(tokendb_app_url: str) -> None:
    """The pool is opened (Tortoise's lazy ensure_connection) and checked inside init."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        with pytest.raises(tokendb.DatabaseUnavailable) as caught:
            await asyncio.wait_for(
                tokendb.init(f"postgres://postgres@127.0.0.1:{port}/nowhere", acquire_timeout=2),
                BOUND,
            )
        assert not isinstance(caught.value, tokendb.DatabaseTimeout)
        assert_driver_cause(caught.value)
        with pytest.raises(tokendb.ConfigurationError):
            await tokendb.get_balance(user=uuid.uuid4())  # not left half-initialised
    finally:
        await tokendb.init(tokendb_app_url, **SESSION_POOL)


# -- timeouts ----------------------------------------------------------------


async def test_lock_timeout_on_a_hot_user_is_database_timeout(
    request: pytest.FixtureRequest, tokendb_app_url: str, make_user: Any
) -> None:
    async with isolated_tokendb(
        server_url(request.config), tokendb_app_url, lock_timeout=0.3, statement_timeout=30
    ) as url:
        user = await make_user()
        usage = await tokendb.charge(user=user, amount=10)
        key, _ = await tokendb.issue_api_key(user=user, name="hot")
        session = await tokendb.start_chat(api_key=key, model="m")
        async with holding_row_lock(url, user.id):
            calls = [
                tokendb.charge(user=user, amount=1),
                tokendb.top_up(user=user, amount=1),
                tokendb.refund(transaction=usage),
                tokendb.add_message(session=session, role="user", content="x", tokens=3),
            ]
            for call in calls:
                with pytest.raises(tokendb.DatabaseTimeout) as caught:
                    await asyncio.wait_for(call, BOUND)
                assert caught.value.sqlstate == "55P03"
                assert caught.value.outcome_unknown is False
                assert "lock_timeout" in str(caught.value)
            # A coalesced batch that times out fails each of its callers, with an
            # error of its own, and writes nothing.
            batch = await asyncio.wait_for(
                asyncio.gather(
                    *(tokendb.charge(user=user, amount=1) for _ in range(3)),
                    return_exceptions=True,
                ),
                BOUND,
            )
            assert all(type(exc) is tokendb.DatabaseTimeout for exc in batch), batch
            assert len({id(exc) for exc in batch}) == 3
        assert await tokendb.get_balance(user=user) == 90
        assert len(await tokendb.list_transactions(user=user)) == 2
        assert (await tokendb.get_chat(session=session)).tokens_used == 0


async def test_statement_timeout_is_database_timeout(
    request: pytest.FixtureRequest, tokendb_app_url: str, make_user: Any
) -> None:
    async with isolated_tokendb(
        server_url(request.config), tokendb_app_url, lock_timeout=None, statement_timeout=0.3
    ) as url:
        user = await make_user()
        async with holding_row_lock(url, user.id):
            with pytest.raises(tokendb.DatabaseTimeout) as caught:
                await asyncio.wait_for(tokendb.charge(user=user, amount=1), BOUND)
        assert caught.value.sqlstate == "57014"
        assert await tokendb.get_balance(user=user) == 100


async def test_an_exhausted_pool_is_database_timeout(
    request: pytest.FixtureRequest, tokendb_app_url: str, make_user: Any
) -> None:
    async with isolated_tokendb(
        server_url(request.config), tokendb_app_url, min_size=1, max_size=1, acquire_timeout=0.3
    ):
        user = await make_user()
        async with _db.connection():  # the only connection, held
            with pytest.raises(tokendb.DatabaseTimeout) as caught:
                await asyncio.wait_for(tokendb.charge(user=user, amount=1), BOUND)
        assert "no pooled connection" in str(caught.value)
        assert await tokendb.get_balance(user=user) == 100


# -- migrations --------------------------------------------------------------


SCHEMA = """
SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type
    || coalesce(' default ' || column_default, '') AS item
FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL SELECT 'index ' || indexname || ': ' || indexdef FROM pg_indexes
    WHERE schemaname = 'public'
UNION ALL SELECT 'constraint ' || conname || ': ' || pg_get_constraintdef(oid)
    FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL SELECT 'trigger ' || tgname FROM pg_trigger WHERE NOT tgisinternal
UNION ALL SELECT 'migration ' || version FROM aerich
ORDER BY 1
"""

DATA = """
SELECT 'users', count(*), coalesce(sum(token_balance), 0) FROM users
UNION ALL SELECT 'token_transactions', count(*), coalesce(sum(amount), 0) FROM token_transactions
UNION ALL SELECT 'api_keys', count(*), 0 FROM api_keys
UNION ALL SELECT 'chat_sessions', count(*), coalesce(sum(tokens_used), 0) FROM chat_sessions
UNION ALL SELECT 'chat_messages', count(*), coalesce(sum(tokens), 0) FROM chat_messages
"""

SEED = """
INSERT INTO users (id, email, password_hash, name, role, token_balance, created_at, updated_at)
VALUES ('00000000-0000-7000-8000-000000000001', 'old@example.com', 'x', 'Old', 'user', 70,
        now(), now());
INSERT INTO token_transactions (id, user_id, amount, type, description, reference_id,
                                balance_after, created_at)
VALUES ('00000000-0000-7000-8000-000000000002', '00000000-0000-7000-8000-000000000001',
        100, 'bonus', 'signup bonus', NULL, 100, now() - interval '1 minute'),
       ('00000000-0000-7000-8000-000000000003', '00000000-0000-7000-8000-000000000001',
        -30, 'usage', 'chat message (m)', '00000000-0000-7000-8000-000000000006', 70, now());
INSERT INTO api_keys (id, user_id, key_hash, key_prefix, name, permissions, is_active,
                      last_used_at, expires_at, created_at)
VALUES ('00000000-0000-7000-8000-000000000004', '00000000-0000-7000-8000-000000000001',
        'hash', 'sk_live_abcd', 'old key', '["*"]', true, NULL, NULL, now());
INSERT INTO chat_sessions (id, user_id, api_key_id, tokens_used, model, created_at, ended_at)
VALUES ('00000000-0000-7000-8000-000000000005', '00000000-0000-7000-8000-000000000001',
        '00000000-0000-7000-8000-000000000004', 30, 'm', now(), NULL);
INSERT INTO chat_messages (id, session_id, role, content, tokens, created_at)
VALUES ('00000000-0000-7000-8000-000000000006', '00000000-0000-7000-8000-000000000005',
        'user', 'hello', 30, now());
"""
# The same rows on the current schema, where a message carries its session's running total.
SEED_CURRENT = SEED.replace(
    "tokens, created_at)", "tokens, tokens_used_after, created_at)"
).replace("'hello', 30, now()", "'hello', 30, 30, now()")
LEDGER_COLUMNS = "id, user_id, amount, type, description, reference_id, balance_after, created_at"


async def test_upgrade_of_a_database_holding_data_keeps_it(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    async with throwaway_database(server_url(request.config), prefix="tokendb_migr") as url:
        assert await _upgrade(url, migrations_copy(tmp_path, upto=0)) == [
            path.name for path in sorted((migrations_location() / "tokendb").glob("0_*.py"))
        ]
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(SEED)
            before = await conn.fetch(DATA)
            ledger = f"SELECT {LEDGER_COLUMNS} FROM token_transactions ORDER BY id"
            rows_before = await conn.fetch(ledger)

            applied = await tokendb.migrate(url)

            assert applied and all(not name.startswith("0_") for name in applied)
            assert await conn.fetch(DATA) == before
            assert await conn.fetch(ledger) == rows_before
            # The chain positions and running totals the new columns hold were
            # filled in from the rows' order.
            assert [
                tuple(row)
                for row in await conn.fetch(
                    "SELECT seq, balance_after FROM token_transactions ORDER BY created_at, id"
                )
            ] == [(1, 100), (2, 70)]
            (message,) = await conn.fetch("SELECT seq, tokens_used_after FROM chat_messages")
            assert tuple(message) == (1, 30)
            # The upgrade's constraints now guard the old data too.
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute("UPDATE users SET token_balance = -1")
        finally:
            await conn.close()


BROKEN_MIGRATION = '''
from tortoise import BaseDBAsyncClient

RUN_IN_TRANSACTION = True


async def upgrade(db: BaseDBAsyncClient) -> str:
    # Run through Aerich's connection first: only Aerich's transaction can undo it.
    await db.execute_script('ALTER TABLE "users" ADD COLUMN "nickname" VARCHAR(50)')
    return """
CREATE INDEX "users_nickname_idx" ON "users" ("nickname");
ALTER TABLE "token_transactions" DROP CONSTRAINT "token_transactions_amount_sign";
UPDATE "users" SET "token_balance" = "token_balance" - 1000;  -- violates a CHECK: fails
"""


async def downgrade(db: BaseDBAsyncClient) -> str:
    return ""
'''


async def test_a_failing_migration_leaves_the_schema_as_it_was(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    location = migrations_copy(tmp_path)
    async with throwaway_database(server_url(request.config), prefix="tokendb_migr") as url:
        await _upgrade(url, location)
        (location / "tokendb" / "9_20991231000000_broken.py").write_text(BROKEN_MIGRATION)
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(SEED_CURRENT)
            schema, data = await conn.fetch(SCHEMA), await conn.fetch(DATA)

            with pytest.raises(tokendb.TokenDBError) as caught:
                await _upgrade(url, location)

            assert "token_balance_nonnegative" in str(caught.value)
            assert await conn.fetch(SCHEMA) == schema
            assert await conn.fetch(DATA) == data
            # Fixed, it applies: nothing of the failed attempt was recorded as done.
            (location / "tokendb" / "9_20991231000000_broken.py").write_text(
                BROKEN_MIGRATION.replace(" - 1000;  -- violates a CHECK: fails", ";")
            )
            assert await _upgrade(url, location) == ["9_20991231000000_broken.py"]
            assert (
                await conn.fetchval(
                    "SELECT count(*) FROM information_schema.columns WHERE column_name = 'nickname'"
                )
                == 1
            )
        finally:
            await conn.close()
