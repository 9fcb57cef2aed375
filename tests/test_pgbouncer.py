"""tokendb through PgBouncer in transaction pooling mode (``?pgbouncer=true``).

A PgBouncer of the module's own (``tests/pgbouncer.py``, Debian's package,
run as ``postgres`` when the suite runs as root) forwards to the test server.
Each test runs tokendb on a migrated database of its own, through PgBouncer;
the tests' own connections go to the server directly. ``.ci/run`` also runs
the core and concurrency suites with tokendb through PgBouncer.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import tokendb
from tests import pgbouncer
from tests.pgcluster import SESSION_POOL
from tokendb import _key_cache, _tortoise
from tokendb.config import listen_connect_args
from tokendb.testing import _through_pooler, throwaway_database
from tokendb.testing import test_pooler_url as pooler_url
from tokendb.testing import test_server_url as server_url

pytestmark = pytest.mark.skipif(
    pgbouncer.binary() is None,
    reason="pgbouncer is not installed (apt-get install pgbouncer; .ci/run installs it)",
)


@pytest.fixture(scope="module")
def bouncer(request: pytest.FixtureRequest) -> Iterator[str]:
    """A PgBouncer (transaction pooling) in front of the test server; yields its server URL."""
    server = server_url(request.config)
    with pgbouncer.running(server) as port:
        yield pgbouncer.with_port(server, port, query="pgbouncer=true")


@pytest_asyncio.fixture(loop_scope="session")
async def database(request: pytest.FixtureRequest, tokendb_app_url: str) -> AsyncIterator[str]:
    """A migrated database of the test's own (its direct URL); tokendb's session URL after."""
    async with throwaway_database(server_url(request.config), prefix="tokendb_pgb") as url:
        await tokendb.migrate(url)
        try:
            yield url
        finally:
            await tokendb.close()
            pooler = pooler_url(request.config)
            listen = {"listen_url": tokendb_app_url} if pooler else {}
            await tokendb.init(_through_pooler(tokendb_app_url, pooler), **listen, **SESSION_POOL)


def through(url: str, bouncer: str) -> str:
    """The direct ``url``'s database through ``bouncer`` (``?pgbouncer=true``)."""
    return _through_pooler(url, bouncer)


async def set_defaults(url: str, **settings: str) -> None:
    """The database's defaults for every new session (what PgBouncer's server connections get)."""
    conn = await asyncpg.connect(url)
    try:
        name = await conn.fetchval("SELECT current_database()")
        for setting, value in settings.items():
            await conn.execute(f"ALTER DATABASE \"{name}\" SET {setting} = '{value}'")
    finally:
        await conn.close()


async def init_quietly(url: str, **options: Any) -> list[str]:
    """``tokendb.init`` and the ConfigurationWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await tokendb.init(url, **options)
    return [str(w.message) for w in caught if issubclass(w.category, tokendb.ConfigurationWarning)]


async def every_operation() -> None:
    """Users, keys (verified), lone and coalesced charges, refunds, holds, chats, lists, audits."""
    users = [
        await tokendb.create_user(email=f"u{i}@example.com", password="correct horse 1", name="N")
        for i in range(8)
    ]
    for user in users:
        await tokendb.top_up(user=user, amount=1_000)
    start = await tokendb.get_balance(user=users[0])  # 1,000 and any signup bonus
    key, secret = await tokendb.issue_api_key(user=users[0], name="gateway")
    assert (await tokendb.verify_api_key(secret=secret)).id == key.id
    charge = await tokendb.charge(user=users[0], amount=10, reference_id=uuid.uuid4())
    await tokendb.refund(transaction=charge, amount=4)
    # Concurrent charges share statements (the ledger's group commit) through PgBouncer.
    await asyncio.gather(
        *(tokendb.charge(user=user, amount=1) for _ in range(10) for user in users)
    )
    await tokendb.charge_many(items=[tokendb.ChargeItem(user=u.id, amount=2) for u in users])
    held = await tokendb.hold(user=users[1], amount=50, ttl=60)
    await tokendb.capture(hold=held, amount=20)
    chat = await tokendb.start_chat(api_key=key, model="gpt-test")
    await tokendb.add_message(session=chat, role="user", content="hello", tokens=7)
    assert len(await tokendb.list_messages(session=chat)) == 1
    assert await tokendb.get_balance(user=users[0]) == start - 10 + 4 - 10 - 2 - 7
    assert await tokendb.get_balance(user=users[1]) == start - 10 - 2 - 20
    moves = await tokendb.list_transactions(user=users[0], limit=100)
    assert len(moves) == (await tokendb.list_transactions(user=users[2], limit=100)).__len__() + 3
    assert await tokendb.audit_ledger() == []
    assert await tokendb.audit_chats() == []
    assert await tokendb.audit_holds() == []


async def test_every_operation_works_through_pgbouncer(database: str, bouncer: str) -> None:
    await set_defaults(database, statement_timeout="30s", lock_timeout="10s")
    assert await init_quietly(through(database, bouncer), listen_url=database) == []
    client: Any = _tortoise.models_client()
    assert client.extra["statement_cache_size"] == 0, "no named prepared statements"
    await every_operation()


async def test_without_the_flag_pgbouncer_breaks_prepared_statements(
    database: str, bouncer: str
) -> None:
    """The failure ?pgbouncer=true fixes (and proof that the tests above go through PgBouncer)."""
    unflagged = through(database, bouncer).replace("?pgbouncer=true", "")
    await set_defaults(database, statement_timeout="30s", lock_timeout="10s")

    async def without_the_flag() -> list[BaseException]:
        # Timeouts off: PgBouncer would refuse them as startup parameters first.
        await tokendb.init(
            unflagged,
            verify_cache=False,
            coalesce_charges=False,
            statement_timeout=None,
            lock_timeout=None,
        )
        user = await tokendb.create_user(
            email="x@example.com", password="correct horse 1", name="N"
        )
        await tokendb.top_up(user=user, amount=1_000)
        results = await asyncio.gather(
            *(tokendb.charge(user=user, amount=1) for _ in range(40)), return_exceptions=True
        )
        return [r for r in results if isinstance(r, BaseException)]

    try:
        failures = await without_the_flag()
    except tokendb.TokenDBError as exc:
        failures = [exc]
    assert failures, "named prepared statements must break under transaction pooling"
    assert any("prepared statement" in str(f) for f in failures), failures[:3]
    assert all(isinstance(f, tokendb.ConfigurationError) for f in failures), failures[:3]
    assert "add ?pgbouncer=true" in str(failures[0])


async def test_without_the_flag_the_timeouts_are_refused_with_a_hint(
    database: str, bouncer: str
) -> None:
    unflagged = through(database, bouncer).replace("?pgbouncer=true", "")
    with pytest.raises(
        tokendb.ConfigurationError, match=r"unsupported startup parameter.*\?pgbouncer=true"
    ):
        await tokendb.init(unflagged, verify_cache=False)


async def test_a_statement_timeout_applies_through_pgbouncer(
    database: str, bouncer: str, request: pytest.FixtureRequest
) -> None:
    """The server cancels the statement (outcome known), not the client's bound."""
    await set_defaults(database, statement_timeout="300ms")
    warned = await init_quietly(
        through(database, bouncer),
        listen_url=database,
        statement_timeout=0.3,
        lock_timeout=None,
        coalesce_charges=False,
    )
    assert warned == []
    user = await tokendb.create_user(email="t@example.com", password="correct horse 1", name="N")
    await tokendb.top_up(user=user, amount=100)
    before = await tokendb.get_balance(user=user)
    locker = await asyncpg.connect(database)
    try:
        async with locker.transaction():
            await locker.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user.id)
            started = time.monotonic()
            with pytest.raises(tokendb.DatabaseTimeout) as caught:
                await tokendb.charge(user=user, amount=1)
            waited = time.monotonic() - started
    finally:
        await locker.close()
    assert not caught.value.outcome_unknown, "the server cancelled it: nothing was charged"
    assert waited < 3, f"waited {waited:.1f} s: the client's bound, not statement_timeout"
    assert await tokendb.get_balance(user=user) == before


async def test_init_warns_when_the_server_defaults_lack_the_timeouts(
    database: str, bouncer: str
) -> None:
    await set_defaults(database, lock_timeout="1min")
    warned = await init_quietly(through(database, bouncer), listen_url=database)
    assert len(warned) == 1, warned
    assert "statement_timeout is 0 ms (asked for 30000 ms)" in warned[0]
    assert "lock_timeout is 60000 ms (asked for 10000 ms)" in warned[0]
    assert "ALTER ROLE <role> SET lock_timeout = '10000ms'" in warned[0]


async def test_migrate_refuses_a_url_through_pgbouncer(database: str, bouncer: str) -> None:
    with pytest.raises(tokendb.ConfigurationError, match=r"PgBouncer.*direct URL"):
        await tokendb.migrate(through(database, bouncer))


async def test_migrate_uses_the_direct_url_beside_a_pgbouncer_database_url(
    bouncer: str, request: pytest.FixtureRequest
) -> None:
    """``tokendb migrate`` with DATABASE_URL through PgBouncer runs on TOKENDB_DIRECT_URL."""

    def migrate(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tokendb", "migrate"],
            env={**os.environ, "TOKENDB_EMBEDDED": "off", **env},
            capture_output=True,
            text=True,
            timeout=120,
        )

    async with throwaway_database(server_url(request.config), prefix="tokendb_pgb") as url:
        env = {"DATABASE_URL": through(url, bouncer)}
        refused = await asyncio.to_thread(migrate, env)
        assert refused.returncode != 0
        assert "TOKENDB_DIRECT_URL" in refused.stdout + refused.stderr
        done = await asyncio.to_thread(migrate, {**env, "TOKENDB_DIRECT_URL": url})
        assert done.returncode == 0, done.stdout + done.stderr
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM aerich WHERE app = 'tokendb'") > 0
        finally:
            await conn.close()


async def test_the_verify_cache_never_listens_through_pgbouncer(
    database: str, bouncer: str
) -> None:
    warned = await init_quietly(through(database, bouncer))
    assert any("verify cache is off" in message for message in warned), warned
    assert not tokendb.verify_cache_stats().enabled
    with pytest.raises(tokendb.ConfigurationError, match="listener needs a direct connection"):
        listen_connect_args(through(database, bouncer), variable="listen_url")


async def test_the_verify_cache_listens_on_the_direct_url(database: str, bouncer: str) -> None:
    await init_quietly(through(database, bouncer), listen_url=database)
    user = await tokendb.create_user(email="k@example.com", password="correct horse 1", name="N")
    _, secret = await tokendb.issue_api_key(user=user, name="k")
    deadline = time.monotonic() + 10
    while _key_cache.for_lookup() is None:
        await tokendb.verify_api_key(secret=secret)
        assert time.monotonic() < deadline, tokendb.verify_cache_stats()
        await asyncio.sleep(0.01)
    await tokendb.verify_api_key(secret=secret)
    hits = tokendb.verify_cache_stats().hits
    await tokendb.verify_api_key(secret=secret)
    assert tokendb.verify_cache_stats().hits == hits + 1
    direct = await asyncpg.connect(database)
    try:
        listening = await direct.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
            "AND datname = current_database()",
            _key_cache.APPLICATION_NAME,
        )
        await direct.execute("UPDATE api_keys SET is_active = false")
    finally:
        await direct.close()
    assert listening == 1
    deadline = time.monotonic() + 5
    while True:
        try:
            await tokendb.verify_api_key(secret=secret)
        except tokendb.ApiKeyRevoked:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
