"""Tests for the verify cache (tokendb._key_cache and verify_api_key's hit path).

Changes are made around tokendb, by raw SQL on a connection of its own and
committed, as another process would make them; the cache must honour each
within its bound (``MAX_LAG``: these tests wait 0.2 s where they must not
depend on the notification, and poll where they test that it arrives).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import tokendb
from tests.helpers import statements_sent
from tokendb import _db, _key_cache, api_keys, keys

pytestmark = pytest.mark.usefixtures("tokendb_clean")

BOUND = _key_cache.MAX_LAG + 0.14  # the staleness bound, with room for a slow CI machine


@pytest_asyncio.fixture(loop_scope="session")
async def other(tokendb_db: str) -> AsyncIterator[asyncpg.Connection]:
    """Another client: raw SQL, each statement committed."""
    conn = await asyncpg.connect(tokendb_db)
    try:
        yield conn
    finally:
        await conn.close()


async def synchronised() -> None:
    """Wait until the cache answers (its listener started by the first verify)."""
    deadline = time.monotonic() + 10
    while _key_cache.for_lookup() is None:
        assert time.monotonic() < deadline, tokendb.verify_cache_stats()
        await asyncio.sleep(0.01)


async def cached(secret: str, **options: Any) -> tokendb.ApiKey:
    """Verify ``secret`` once through the database, then check the next call is a hit."""
    await synchronised()
    await tokendb.verify_api_key(secret=secret, **options)
    hits = tokendb.verify_cache_stats().hits
    with statements_sent() as sent:
        key = await tokendb.verify_api_key(secret=secret, **options)
    assert sent == [] and tokendb.verify_cache_stats().hits == hits + 1, sent
    return key


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)


async def refused(secret: str, error: type[Exception], **options: Any) -> bool:
    try:
        await tokendb.verify_api_key(secret=secret, **options)
    except error:
        return True
    return False


async def test_a_hot_key_is_answered_from_memory(make_api_key) -> None:
    key, secret = await make_api_key(permissions=["chat"])
    verified = await cached(secret, permission="chat")
    assert verified.id == key.id and verified.user.id == key.user_id
    assert verified.last_used_at is not None
    with pytest.raises(tokendb.PermissionDenied):
        await tokendb.verify_api_key(secret=secret, permission="billing")  # decided on the hit


async def test_each_call_gets_instances_of_its_own(make_api_key) -> None:
    _, secret = await make_api_key(permissions=["chat"])
    first = await cached(secret)
    first.permissions.append("billing")
    first.name = "changed"
    second = await tokendb.verify_api_key(secret=secret, permission="chat")
    assert second.permissions == ["chat"] and second.name == "test key"
    with pytest.raises(tokendb.PermissionDenied):
        await tokendb.verify_api_key(secret=secret, permission="billing")


async def test_the_instances_of_the_lookup_that_fills_the_cache_are_the_callers_own(
    make_api_key,
) -> None:
    """The first verify (a miss, which caches the key) hands out copies too: changing
    what it returned changes nothing the next verify (a hit) answers."""
    _, secret = await make_api_key(permissions=["chat"])
    await synchronised()
    misses = tokendb.verify_cache_stats().misses
    first = await tokendb.verify_api_key(secret=secret)
    assert tokendb.verify_cache_stats().misses == misses + 1  # looked up, then cached
    first.permissions.append("billing")
    first.name = "changed"
    first.user.email = "someone.else@example.com"
    second = await cached(secret)
    assert second.permissions == ["chat"] and second.name == "test key"
    assert second.user.email != "someone.else@example.com"
    with pytest.raises(tokendb.PermissionDenied):
        await tokendb.verify_api_key(secret=secret, permission="billing")


@pytest.mark.parametrize("hit", [False, True])
async def test_the_user_never_carries_a_balance(funded_user, hit: bool) -> None:
    """Hit or lookup alike: a cached balance would be stale, so there is none."""
    user = await funded_user(balance=500)
    _, secret = await tokendb.issue_api_key(user=user, name="k")
    verified = await (cached(secret) if hit else tokendb.verify_api_key(secret=secret))
    assert verified.user.email == user.email
    with pytest.raises(AttributeError):
        verified.user.token_balance  # noqa: B018
    with pytest.raises(AttributeError):
        verified.user.held_tokens  # noqa: B018
    with pytest.raises(Exception, match="partial"):
        await verified.user.save()


@pytest.mark.parametrize(
    ("change", "error", "options"),
    [
        ("is_active = false", tokendb.ApiKeyRevoked, {}),
        ("expires_at = now()", tokendb.ApiKeyExpired, {}),
        ("""permissions = '["billing"]'""", tokendb.PermissionDenied, {"permission": "chat"}),
    ],
)
async def test_another_clients_change_reaches_the_cache(
    make_api_key, other: asyncpg.Connection, change: str, error: type[Exception], options: Any
) -> None:
    key, secret = await make_api_key(permissions=["chat"])
    await cached(secret, **options)
    invalidations = tokendb.verify_cache_stats().invalidations
    await other.execute(f"UPDATE api_keys SET {change} WHERE id = $1", key.id)
    await eventually(lambda: refused(secret, error, **options))
    assert tokendb.verify_cache_stats().invalidations > invalidations  # told, not timed out


async def test_a_user_change_reaches_the_cache(make_api_key, other: asyncpg.Connection) -> None:
    key, secret = await make_api_key()
    assert (await cached(secret)).user.role == "user"
    await other.execute("UPDATE users SET role = 'admin' WHERE id = $1", key.user_id)

    async def admin() -> bool:
        return (await tokendb.verify_api_key(secret=secret)).user.role == "admin"

    await eventually(admin)


async def test_the_touch_and_balance_changes_notify_nothing(
    funded_user, other: asyncpg.Connection
) -> None:
    """last_used_at (the throttled touch) and balances change all the time: no invalidation."""
    user = await funded_user(balance=100)
    key, secret = await tokendb.issue_api_key(user=user, name="k")
    await cached(secret)
    await asyncio.sleep(0.1)  # the issue's notification has arrived
    before = tokendb.verify_cache_stats().invalidations
    await other.execute("UPDATE api_keys SET last_used_at = now() WHERE id = $1", key.id)
    await tokendb.charge(user=user, amount=10)
    hold = await tokendb.hold(user=user, amount=5, ttl=60)
    await tokendb.release(hold=hold)
    await asyncio.sleep(0.2)
    assert tokendb.verify_cache_stats().invalidations == before
    await cached(secret)


async def test_expiry_is_checked_against_the_clock_on_a_hit(make_api_key) -> None:
    expires_at = datetime.now(UTC) + timedelta(seconds=1)
    _, secret = await make_api_key(expires_at=expires_at)
    await cached(secret)
    await asyncio.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()) + 0.01)
    hits = tokendb.verify_cache_stats().hits
    with statements_sent() as sent, pytest.raises(tokendb.ApiKeyExpired):
        await tokendb.verify_api_key(secret=secret)
    assert sent == [] and tokendb.verify_cache_stats().hits == hits + 1  # refused by the hit


async def test_a_hit_touches_last_used_at_when_due(make_api_key) -> None:
    key, secret = await make_api_key()
    first = (await cached(secret, touch_interval=0.3)).last_used_at
    await asyncio.sleep(0.35)
    with statements_sent() as sent:
        touched = await tokendb.verify_api_key(secret=secret, touch_interval=0.3)
    assert [statement.split()[0] for statement in sent] == ["UPDATE"]
    assert first is not None and touched.last_used_at is not None
    assert touched.last_used_at > first
    [row] = await tokendb.list_api_keys(user=key.user_id)
    assert row.last_used_at == touched.last_used_at


async def test_a_lookup_that_raced_an_invalidation_is_not_cached(
    make_api_key, other: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row read before a revocation whose notification is handled before the row
    reaches the cache must not be cached: the generation changed meanwhile."""
    key, secret = await make_api_key()
    await synchronised()
    read = _db.read

    async def read_then_revoke(sql: str, *args: Any) -> list[Any]:
        rows = await read(sql, *args)
        await other.execute("UPDATE api_keys SET is_active = false WHERE id = $1", key.id)
        await asyncio.sleep(0.2)  # the notification is handled before the row is cached
        return rows

    monkeypatch.setattr(_db, "read", read_then_revoke)
    await tokendb.verify_api_key(secret=secret)  # its snapshot predates the revocation
    monkeypatch.setattr(_db, "read", read)
    with pytest.raises(tokendb.ApiKeyRevoked):
        await tokendb.verify_api_key(secret=secret)


def _listener() -> _key_cache.Listener:
    listener = _key_cache._listener
    assert listener is not None
    return listener


@pytest.mark.parametrize("failure", ["killed", "stalled"])
async def test_a_listener_down_or_late_bypasses_the_cache(
    make_api_key, other: asyncpg.Connection, failure: str
) -> None:
    """No notification can arrive (the listener's backend killed, or its socket not read):
    the revocation is honoured all the same once the bound has passed."""
    key, secret = await make_api_key()
    await cached(secret)
    listener = _listener()
    conn = listener._conn
    assert conn is not None
    if failure == "killed":
        await other.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            _key_cache.APPLICATION_NAME,
        )
    else:
        conn._transport.pause_reading()  # type: ignore[attr-defined]
    try:
        await other.execute("UPDATE api_keys SET is_active = false WHERE id = $1", key.id)
        await asyncio.sleep(BOUND)
        with pytest.raises(tokendb.ApiKeyRevoked):
            await tokendb.verify_api_key(secret=secret)
    finally:
        if failure == "stalled" and not conn.is_closed():
            conn._transport.resume_reading()  # type: ignore[attr-defined]
    await synchronised()  # and it comes back


async def test_a_reconnected_listener_starts_empty(make_api_key, other: asyncpg.Connection) -> None:
    _, secret = await make_api_key()
    await cached(secret)
    reconnects = tokendb.verify_cache_stats().reconnects
    await other.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        _key_cache.APPLICATION_NAME,
    )
    await eventually(lambda: _true(tokendb.verify_cache_stats().reconnects > reconnects))
    await synchronised()
    assert tokendb.verify_cache_stats().size == 0


async def _true(value: bool) -> bool:
    return value


async def test_truncate_empties_the_cache(make_api_key, tokendb_db: str) -> None:
    _, secret = await make_api_key()
    await cached(secret)
    conn = await asyncpg.connect(tokendb_db)  # the owner: only it may TRUNCATE
    try:
        await conn.execute("TRUNCATE users, api_keys CASCADE")  # every table that refers to them
    finally:
        await conn.close()
    await eventually(lambda: refused(secret, tokendb.InvalidApiKey))


async def test_a_revocation_in_this_process_is_honoured_at_once(make_api_key) -> None:
    key, secret = await make_api_key()
    await cached(secret)
    await tokendb.revoke_api_key(api_key=key)
    with pytest.raises(tokendb.ApiKeyRevoked):
        await tokendb.verify_api_key(secret=secret)


def test_the_cache_is_bounded_and_counts() -> None:
    cache = _key_cache.KeyCache(2)
    for name in "abc":
        assert cache.put(name, "owner", name, generation=cache.generation)
    assert len(cache) == 2 and cache.evictions == 1
    assert cache.get("a") is None and cache.get("b") == "b" and cache.get("c") == "c"
    assert (cache.hits, cache.misses) == (2, 1)
    generation = cache.generation
    cache.invalidate("u:someone-else")
    cache.invalidate("x")
    assert cache.put("d", "owner", "d", generation=generation)  # others' invalidations
    generation = cache.generation
    cache.invalidate("e")
    assert not cache.put("e", "owner", "e", generation=generation)  # raced its invalidation
    cache.invalidate("u:owner")
    assert not cache.put("f", "owner", "f", generation=generation)  # raced its user's
    assert len(cache) == 0  # b, c and d were the owner's
    cache.clear()
    assert not cache.put("g", "other", "g", generation=generation)  # raced a reconnect


def test_the_least_recently_used_key_is_evicted_first() -> None:
    cache = _key_cache.KeyCache(2)
    for name in "ab":
        cache.put(name, "owner", name, generation=cache.generation)
    assert cache.get("a") == "a"  # now the most recently used
    cache.put("c", "owner", "c", generation=cache.generation)
    assert cache.get("b") is None and (cache.get("a"), cache.get("c")) == ("a", "c")


@pytest.mark.parametrize(
    ("others", "expected"), [(_key_cache._LOG_SIZE, True), (_key_cache._LOG_SIZE + 1, False)]
)
def test_a_lookup_older_than_the_invalidation_log_is_not_cached(
    others: int, expected: bool
) -> None:
    """Other keys' invalidations do not matter, as long as the log still reaches back to
    the lookup's start; beyond that it cannot tell, and refuses."""
    cache = _key_cache.KeyCache(2)
    generation = cache.generation
    for number in range(others):
        cache.invalidate(f"other-{number}")
    assert cache.put("a", "owner", "a", generation=generation) is expected


async def test_the_cache_can_be_turned_off(tokendb_db: str, tokendb_app_url: str) -> None:
    from tokendb import _settings

    _, secret = await tokendb.issue_api_key(
        user=await tokendb.create_user(email="off@example.com", password="x" * 12, name="O"),
        name="k",
    )
    with _settings.using(verify_cache=False):
        for _ in range(2):
            with statements_sent() as sent:
                await tokendb.verify_api_key(secret=secret)
            assert sent and sent[0] == api_keys._LOOKUP


def test_the_secret_is_never_kept() -> None:
    """The cache is keyed by the hash, as the table is."""
    secret = keys.generate_key()
    cache = _key_cache.KeyCache(1)
    cache.put(keys.hash_key(secret), "o", "v", generation=cache.generation)
    assert secret not in repr(cache._entries)
