"""Tests for tokendb.api_keys."""

from __future__ import annotations

import asyncio
import math
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from tortoise.exceptions import IntegrityError

import tokendb
from tests.helpers import statements_sent, table_counts
from tokendb import _db, _settings, keys


async def test_issue_returns_the_plaintext_once_and_stores_only_its_hash(
    tokendb_clean: str, make_user
) -> None:
    user = await make_user()
    api_key, secret = await tokendb.issue_api_key(user=user, name="laptop")
    assert keys.is_well_formed(secret)
    assert api_key.key_hash == keys.hash_key(secret)
    assert api_key.key_prefix == secret[:12]
    assert api_key.permissions == ["*"]
    assert api_key.is_active and api_key.last_used_at is None and api_key.expires_at is None
    rows = await _db.read("SELECT * FROM api_keys")
    assert all(secret not in str(value) for row in rows for value in row.values())
    assert secret not in repr(api_key) and secret not in str(api_key)
    assert api_key.key_hash not in repr(api_key)


async def test_verify_returns_the_key_with_its_user_loaded(tokendb_clean: str, make_user) -> None:
    user = await make_user()
    issued, secret = await tokendb.issue_api_key(user=user.id, name="k", permissions=["chat"])
    verified = await tokendb.verify_api_key(secret=secret, permission="chat")
    assert verified.id == issued.id
    assert verified.user.id == user.id  # loaded: no await, no query
    assert verified.user.email == user.email
    assert verified.last_used_at is not None


async def test_last_used_at_is_throttled_and_forward_only(tokendb_clean: str, make_api_key) -> None:
    with _settings.using(verify_cache=False):  # the lookup path
        api_key, secret = await make_api_key()
        first = (await tokendb.verify_api_key(secret=secret)).last_used_at
        second = (await tokendb.verify_api_key(secret=secret)).last_used_at
        assert first is not None and second == first  # within 60 s: no write

        # Make the stored value look old; the next verify moves it forward.
        await _db.write(
            "UPDATE api_keys SET last_used_at = last_used_at - interval '2 minutes' WHERE id = $1",
            api_key.id,
        )
        third = (await tokendb.verify_api_key(secret=secret)).last_used_at
        assert third is not None and third > first

        # With a zero interval every verify writes, and never backwards.
        stamps = [
            (await tokendb.verify_api_key(secret=secret, touch_interval=0)).last_used_at
            for _ in range(3)
        ]
        assert None not in stamps and third is not None
        assert stamps == sorted(stamps) and stamps[0] >= third  # type: ignore[type-var,operator]


async def test_concurrent_verifies_of_a_hot_key_write_once(
    tokendb_clean: str, make_api_key
) -> None:
    api_key, secret = await make_api_key()
    results = await asyncio.gather(*(tokendb.verify_api_key(secret=secret) for _ in range(50)))
    stored = (await _db.read("SELECT last_used_at FROM api_keys WHERE id = $1", api_key.id))[0]
    assert {r.last_used_at for r in results} == {stored["last_used_at"]}


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "garbage",
        "sk_live_" + "a" * 40,
        "sk_live_" + "a" * 20,
        "sk_live_'; DROP TABLE users; --",
    ],
)
async def test_unknown_or_malformed_keys_are_invalid(
    tokendb_clean: str, make_api_key, secret: str
) -> None:
    await make_api_key()
    with pytest.raises(tokendb.InvalidApiKey) as info:
        await tokendb.verify_api_key(secret=secret)
    assert type(info.value) is tokendb.InvalidApiKey


async def test_a_truncated_key_is_invalid(tokendb_clean: str, make_api_key) -> None:
    _, secret = await make_api_key()
    for cut in (secret[:-1], secret[:20], secret + "x"):
        with pytest.raises(tokendb.InvalidApiKey):
            await tokendb.verify_api_key(secret=cut)


async def test_revoked_key(tokendb_clean: str, make_api_key) -> None:
    api_key, secret = await make_api_key()
    revoked = await tokendb.revoke_api_key(api_key=api_key)
    assert revoked.is_active is False
    assert (await tokendb.revoke_api_key(api_key=api_key.id)).is_active is False  # idempotent
    with pytest.raises(tokendb.ApiKeyRevoked) as info:
        await tokendb.verify_api_key(secret=secret)
    assert info.value.key_prefix == api_key.key_prefix
    assert isinstance(info.value, tokendb.InvalidApiKey)
    last_used = (await _db.read("SELECT last_used_at FROM api_keys WHERE id = $1", api_key.id))[0]
    assert last_used["last_used_at"] is None  # a refused key is not touched


async def test_expired_key(tokendb_clean: str, make_api_key) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=5)
    api_key, secret = await make_api_key(expires_at=soon)
    await tokendb.verify_api_key(secret=secret)
    await _db.write(
        "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1", api_key.id
    )
    # A change by raw SQL reaches a cached verification through NOTIFY, within the
    # cache's bound (tests/test_verify_cache.py measures it); wait for it, no longer.
    deadline = asyncio.get_running_loop().time() + 1.0
    while True:
        try:
            await tokendb.verify_api_key(secret=secret)
        except tokendb.ApiKeyExpired as exc:
            info = exc
            break
        assert asyncio.get_running_loop().time() < deadline, "expiry not honoured within 1 s"
        await asyncio.sleep(0.005)
    assert info.expired_at < datetime.now(UTC)
    assert isinstance(info, tokendb.InvalidApiKey)


async def test_permissions(tokendb_clean: str, make_api_key) -> None:
    _, narrow = await make_api_key(permissions=["chat"])
    _, wide = await make_api_key()  # default ["*"]
    _, empty = await make_api_key(permissions=[])
    await tokendb.verify_api_key(secret=narrow, permission="chat")
    await tokendb.verify_api_key(secret=wide, permission="billing")
    await tokendb.verify_api_key(secret=empty)  # valid, just unprivileged
    for secret in (narrow, empty):
        with pytest.raises(tokendb.PermissionDenied) as info:
            await tokendb.verify_api_key(secret=secret, permission="billing")
        assert info.value.permission == "billing"


async def test_a_permission_refusal_writes_nothing(tokendb_clean: str, make_api_key) -> None:
    """The permission is decided before last_used_at is touched: a refused call
    leaves the key as it was."""
    api_key, secret = await make_api_key(permissions=["chat"])
    with pytest.raises(tokendb.PermissionDenied):
        await tokendb.verify_api_key(secret=secret, permission="billing")
    stored = await _db.read("SELECT last_used_at FROM api_keys WHERE id = $1", api_key.id)
    assert stored[0]["last_used_at"] is None


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "n" * 101}, "name"),
        ({"permissions": "chat"}, "permissions"),
        ({"permissions": ["CHAT"]}, "permissions"),
        ({"expires_at": datetime(2020, 1, 1, tzinfo=UTC)}, "expires_at"),
        ({"expires_at": datetime(2099, 1, 1)}, "expires_at"),
        ({"expires_at": "tomorrow"}, "expires_at"),
        ({"user": "nope"}, "user"),
    ],
)
async def test_issue_rejects_bad_input_before_writing(
    tokendb_clean: str, make_user, changes: dict[str, object], field: str
) -> None:
    user = await make_user()
    arguments: dict[str, object] = {"user": user, "name": "k"}
    arguments.update(changes)
    before = await table_counts()
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.issue_api_key(**arguments)  # type: ignore[arg-type]
    assert info.value.field == field
    assert await table_counts() == before


async def test_issue_for_unknown_user(tokendb_clean: str) -> None:
    with pytest.raises(tokendb.NotFound):
        await tokendb.issue_api_key(user=uuid.uuid4(), name="k")
    assert (await table_counts())["api_keys"] == 0


async def test_list_and_revoke_with_owner_check(tokendb_clean: str, make_user) -> None:
    alice, bob = await make_user(), await make_user()
    first, _ = await tokendb.issue_api_key(user=alice, name="one")
    second, _ = await tokendb.issue_api_key(user=alice, name="two")
    bobs, _ = await tokendb.issue_api_key(user=bob, name="bob's")
    assert [k.id for k in await tokendb.list_api_keys(user=alice)] == [first.id, second.id]
    with pytest.raises(tokendb.NotFound):
        await tokendb.revoke_api_key(api_key=bobs, user=alice)
    assert (await tokendb.list_api_keys(user=bob))[0].is_active  # untouched
    await tokendb.revoke_api_key(api_key=first, user=alice)
    active = await tokendb.list_api_keys(user=alice, include_revoked=False)
    assert [k.id for k in active] == [second.id]
    assert await tokendb.list_api_keys(user=await make_user()) == []
    with pytest.raises(tokendb.NotFound):
        await tokendb.list_api_keys(user=uuid.uuid4())
    with pytest.raises(tokendb.NotFound):
        await tokendb.revoke_api_key(api_key=uuid.uuid4())


# Regression tests from the independent review.


async def test_saving_a_stale_api_key_instance_does_not_unrevoke_it(
    tokendb_clean: str, make_api_key
) -> None:
    api_key, secret = await make_api_key()
    [stale] = await tokendb.list_api_keys(user=api_key.user_id)
    await tokendb.revoke_api_key(api_key=api_key)
    stale.name = "renamed in the dashboard"
    with pytest.raises(IntegrityError, match="revocation is final"):
        await stale.save()
    try:
        with pytest.raises(tokendb.ApiKeyRevoked):
            await tokendb.verify_api_key(secret=secret)  # revocation is documented as one-way
    finally:
        await tokendb.revoke_api_key(api_key=api_key)


@pytest.mark.parametrize("interval", [math.inf, math.nan, 1e20, timedelta.max])
async def test_touch_interval_out_of_range_is_a_validation_error(
    tokendb_clean: str, make_api_key, interval: object
) -> None:
    _, secret = await make_api_key()
    await tokendb.verify_api_key(secret=secret)  # last_used_at is now set
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.verify_api_key(secret=secret, touch_interval=interval)  # type: ignore[arg-type]
    assert info.value.field == "touch_interval"


async def test_concurrent_verifies_never_report_a_used_key_as_unused(
    tokendb_clean: str, make_api_key
) -> None:
    """Requests that lose the race to touch a fresh key report the value the
    winner wrote (re-read after the skipped UPDATE), never the snapshot's NULL."""
    for _ in range(10):
        _, secret = await make_api_key()
        results = await asyncio.gather(*(tokendb.verify_api_key(secret=secret) for _ in range(60)))
        assert all(key.last_used_at is not None for key in results)


async def test_a_hot_key_writes_its_row_once(tokendb_clean: str, make_api_key) -> None:
    """50 concurrent verifies within the throttle interval leave the row version alone."""
    api_key, secret = await make_api_key()
    await tokendb.verify_api_key(secret=secret)  # the one write: last_used_at was NULL
    version = "SELECT xmin::text AS version FROM api_keys WHERE id = $1"
    [before] = await _db.read(version, api_key.id)
    await asyncio.gather(*(tokendb.verify_api_key(secret=secret) for _ in range(50)))
    assert await _db.read(version, api_key.id) == [before]


async def test_a_verify_within_the_touch_interval_is_one_statement(
    tokendb_clean: str, make_api_key
) -> None:
    """verify_api_key's cost on the hot path: the lookup, and nothing else.

    The touch of ``last_used_at`` is a second statement, sent only when the
    lookup saw a stale value. (Its UPDATE is conditional too, so a touch sent
    for a fresh value writes nothing: counting the row's versions would not
    show the wasted round trip; counting statements does.)
    """
    with _settings.using(verify_cache=False):  # the lookup path
        _, secret = await make_api_key()
        with statements_sent() as sent:
            await tokendb.verify_api_key(secret=secret)  # last_used_at is NULL: looked up, touched
        assert len(sent) == 2, sent
        with statements_sent() as sent:
            for _ in range(5):
                await tokendb.verify_api_key(secret=secret)
        assert len(sent) == 5, sent
        assert not any(statement.lstrip().upper().startswith("UPDATE") for statement in sent)


@pytest.mark.parametrize(("age", "touched"), [(59.5, False), (60.5, True)])
async def test_last_used_at_is_written_again_after_60_seconds_by_default(
    tokendb_clean: str, make_api_key, age: float, touched: bool
) -> None:
    with _settings.using(verify_cache=False):  # the lookup path
        api_key, secret = await make_api_key()
        await tokendb.verify_api_key(secret=secret)
        await _db.write(
            "UPDATE api_keys SET last_used_at = now() - make_interval(secs => $2) WHERE id = $1",
            api_key.id,
            age,
        )
        with statements_sent() as sent:
            await tokendb.verify_api_key(secret=secret)
        assert len(sent) == (2 if touched else 1)


@pytest.mark.parametrize(
    ("interval", "valid"),
    [
        (timedelta(days=365), True),
        (365 * 86400, True),
        (0, True),
        (timedelta(days=365, seconds=1), False),
        (-0.5, False),
    ],
)
async def test_touch_interval_is_0_to_365_days(
    tokendb_clean: str, make_api_key, interval: object, valid: bool
) -> None:
    _, secret = await make_api_key()
    if valid:
        await tokendb.verify_api_key(secret=secret, touch_interval=interval)  # type: ignore[arg-type]
        return
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.verify_api_key(secret=secret, touch_interval=interval)  # type: ignore[arg-type]
    assert info.value.field == "touch_interval"


@pytest.mark.parametrize("interval", ["60", True, None, b"60"])
async def test_a_touch_interval_that_is_not_a_duration_says_what_it_must_be(
    tokendb_clean: str, make_api_key, interval: object
) -> None:
    """A string, a bool or None is not a number of seconds: the refusal names the types
    accepted (not "a whole number", which a bool or a numeric string would suggest)."""
    _, secret = await make_api_key()
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.verify_api_key(secret=secret, touch_interval=interval)  # type: ignore[arg-type]
    assert (info.value.field, info.value.reason) == (
        "touch_interval",
        "must be a timedelta or a number of seconds",
    )


async def test_list_api_keys_includes_revoked_keys_by_default(
    tokendb_clean: str, make_api_key
) -> None:
    api_key, _ = await make_api_key()
    await tokendb.revoke_api_key(api_key=api_key)
    [listed] = await tokendb.list_api_keys(user=api_key.user_id)
    assert listed.id == api_key.id and not listed.is_active


async def test_a_key_name_is_at_most_100_characters(tokendb_clean: str, make_user) -> None:
    api_key, _ = await tokendb.issue_api_key(user=await make_user(), name="k" * 100)
    assert api_key.name == "k" * 100


@pytest.mark.parametrize(
    "failure",
    [OSError("connection reset"), asyncpg.exceptions.QueryCanceledError("canceled")],
    ids=["os", "postgres"],
)
async def test_verify_translates_driver_errors_itself(
    tokendb_clean: str, make_api_key, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    """verify_api_key is not @translated (one frame fewer on the hot path): its own
    try/except keeps every driver error a TokenDBError."""
    _, secret = await make_api_key()

    async def broken(*args: object) -> list[object]:
        raise failure

    monkeypatch.setattr(_db, "read", broken)
    with _settings.using(verify_cache=False), pytest.raises(tokendb.TokenDBError) as info:
        await tokendb.verify_api_key(secret=secret)
    assert info.value.__cause__ is failure


async def test_verified_permissions_are_a_fresh_list_every_time(
    tokendb_clean: str, make_user
) -> None:
    """The decoded scopes are remembered by their JSON text (_rows._json); every key
    still gets a list of its own."""
    user = await make_user()
    secrets = [
        (await tokendb.issue_api_key(user=user, name=str(n), permissions=["chat", "embed"]))[1]
        for n in range(2)
    ]
    with _settings.using(verify_cache=False):
        first = await tokendb.verify_api_key(secret=secrets[0])
        first.permissions.append("admin")
        second = await tokendb.verify_api_key(secret=secrets[1])
        again = await tokendb.verify_api_key(secret=secrets[0])
    assert second.permissions == again.permissions == ["chat", "embed"]
    assert second.permissions is not again.permissions
