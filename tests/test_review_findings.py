"""Reviewer's findings: each test shows a defect and fails until it is fixed.

Every test leaves the books balanced (the module-level audit in conftest.py
still runs), whatever its outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from datetime import timedelta

import asyncpg
import pytest

import tokendb
from tokendb import _db, passwords

PASSWORD = "correct horse battery"


# --- 1. Stale ORM instances silently undo ledger movements and revocations ------------


async def test_saving_a_user_instance_does_not_undo_a_charge(tokendb_clean: str, make_user) -> None:
    """tokendb hands out Tortoise models; Model.save() writes every column back.

    The instance returned by create_user() still says token_balance=100, so a
    profile update after a charge reverts the balance: the charge is lost and
    balance != Σ ledger. Nothing in the database refuses it.
    """
    user = await make_user()
    await tokendb.charge(user=user, amount=40)
    try:
        user.name = "Renamed"
        # Refusing the save is an acceptable fix; silently reverting the charge is not.
        with contextlib.suppress(Exception):
            await user.save()
        assert await tokendb.get_balance(user=user) == 60
        assert await tokendb.audit_ledger(user=user) == []
    finally:
        await _db.write(
            "UPDATE users SET token_balance = (SELECT sum(amount) FROM token_transactions "
            "WHERE user_id = $1) WHERE id = $1",
            user.id,
        )


async def test_saving_a_stale_api_key_instance_does_not_unrevoke_it(
    tokendb_clean: str, make_api_key
) -> None:
    api_key, secret = await make_api_key()
    [stale] = await tokendb.list_api_keys(user=api_key.user_id)
    await tokendb.revoke_api_key(api_key=api_key)
    stale.name = "renamed in the dashboard"
    with contextlib.suppress(Exception):
        await stale.save()
    try:
        with pytest.raises(tokendb.ApiKeyRevoked):
            await tokendb.verify_api_key(secret=secret)  # revocation is documented as one-way
    finally:
        await tokendb.revoke_api_key(api_key=api_key)


# --- 2. The refund backstop trigger does not hold under concurrency -------------------


async def test_refund_trigger_backstop_holds_for_concurrent_raw_refunds(
    tokendb_clean: str, funded_user
) -> None:
    """Two transactions each refund the whole charge around the Python layer.

    tokendb_refund_within_charge sums committed refunds without taking a lock,
    so the second insert passes while the first is uncommitted: refunds can
    reach 2x the charge.
    """
    user = await funded_user(balance=500)
    charge = await tokendb.charge(user=user, amount=100)
    first = await asyncpg.connect(tokendb_clean)
    second = await asyncpg.connect(tokendb_clean)
    try:
        tx1, tx2 = first.transaction(), second.transaction()
        await tx1.start()
        await tx2.start()
        # First refund, done properly (balance and row), left uncommitted.
        balance = await first.fetchval(
            "UPDATE users SET token_balance = token_balance + 100 WHERE id = $1 "
            "RETURNING token_balance",
            user.id,
        )
        await first.execute(
            "INSERT INTO token_transactions (user_id, amount, type, reference_id, "
            "balance_after, created_at) VALUES ($1, 100, 'refund', $2, $3, clock_timestamp())",
            user.id,
            charge.id,
            balance,
        )
        # Second full refund of the same charge, concurrently.
        racing = asyncio.ensure_future(
            second.execute(
                "INSERT INTO token_transactions (user_id, amount, type, reference_id, "
                "balance_after) VALUES ($1, 100, 'refund', $2, 600)",
                user.id,
                charge.id,
            )
        )
        await asyncio.sleep(0.5)
        await tx1.commit()
        with pytest.raises(asyncpg.CheckViolationError) as info:
            await asyncio.wait_for(racing, 10)
        assert info.value.constraint_name == "token_transactions_refund_within_charge"
    finally:
        await second.close()  # rolls the second refund back
        await first.close()


# --- 3. Secrets: a malformed DATABASE_URL echoes the password ------------------------


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("postgres://app:s3cr/et@db.internal:5432/tokendb", "s3cr"),
        ("postgres://app:pa#ss@db.internal:5432/tokendb", "pa#ss"),
        ("postgres://app:pa?ss@db.internal:5432/tokendb", "pa?ss"),
    ],
)
async def test_a_malformed_url_error_never_shows_the_password(url: str, secret: str) -> None:
    """Unencoded '/', '#', '?' in a password: urlsplit finds no password, so
    mask_url masks nothing and the error (→ logs) carries the secret."""
    with pytest.raises(tokendb.ConfigurationError) as info:
        await tokendb.init(url)
    assert secret not in str(info.value)


# --- 4. Errors that escape the TokenDBError tree ---------------------------------------


@pytest.mark.parametrize("known_email", [True, False])
async def test_authenticate_with_a_lone_surrogate_is_invalid_credentials(
    tokendb_clean: str, make_user, known_email: bool
) -> None:
    """json.loads('"\\ud800"') yields this string: an attacker-controlled login
    body turns into a UnicodeEncodeError (a 500) instead of InvalidCredentials."""
    user = await make_user(password=PASSWORD)
    email = user.email if known_email else "nobody@example.com"
    with pytest.raises(tokendb.InvalidCredentials):
        await tokendb.authenticate(email=email, password="\ud800" + PASSWORD)


@pytest.mark.parametrize("current", [12345678, "\ud800 12345678"])
async def test_change_password_with_a_malformed_current_password(
    tokendb_clean: str, make_user, current: object
) -> None:
    user = await make_user(password=PASSWORD)
    with pytest.raises((tokendb.InvalidCredentials, tokendb.ValidationError)):
        await tokendb.change_password(
            user=user,
            new_password="new password 1",
            current_password=current,  # type: ignore[arg-type]
        )
    await tokendb.authenticate(email=user.email, password=PASSWORD)  # unchanged


@pytest.mark.parametrize("interval", [math.inf, math.nan, 1e20, timedelta.max])
async def test_touch_interval_out_of_range_is_a_validation_error(
    tokendb_clean: str, make_api_key, interval: object
) -> None:
    _, secret = await make_api_key()
    await tokendb.verify_api_key(secret=secret)  # last_used_at is now set
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.verify_api_key(secret=secret, touch_interval=interval)  # type: ignore[arg-type]
    assert info.value.field == "touch_interval"


@pytest.mark.parametrize(
    "sizes", [{"min_size": 5, "max_size": 2}, {"max_size": 0}, {"min_size": 30}]
)
async def test_init_with_bad_pool_sizes_is_a_configuration_error(
    tokendb_db: str, make_user, sizes: dict[str, int]
) -> None:
    """init() writes min_size/max_size into the config after tortoise_config()
    validated it; asyncpg's ValueError escapes, and Tortoise stays initialised
    with the broken config, so every later operation raises a raw ValueError."""
    user = await make_user()
    try:
        with pytest.raises(tokendb.ConfigurationError):
            await tokendb.init(tokendb_db, **sizes)
        # Unusable afterwards is acceptable; a raw ValueError is not.
        with contextlib.suppress(tokendb.TokenDBError):
            await tokendb.get_balance(user=user)
    finally:
        await tokendb.init(tokendb_db, min_size=1, max_size=20)


# --- 5. change_password checks the current password, then writes unconditionally -------


async def test_change_password_does_not_overwrite_a_concurrent_change(
    tokendb_clean: str, make_user
) -> None:
    """Victim changes the password (old → new) while an attacker who knows the
    old one calls change_password(current_password=old). The attacker's check
    reads the old hash, its UPDATE waits for the victim's row lock, then
    overwrites the victim's new password. authenticate()'s rehash already
    guards with `AND password_hash = $old`; change_password does not."""
    user = await make_user(password=PASSWORD)
    victims_hash = await passwords.hash_password("victim's new password")
    victim = await asyncpg.connect(tokendb_clean)
    try:
        tx = victim.transaction()
        await tx.start()
        await victim.execute(
            "UPDATE users SET password_hash = $2 WHERE id = $1", user.id, victims_hash
        )
        attacker = asyncio.ensure_future(
            tokendb.change_password(
                user=user, new_password="attacker's password", current_password=PASSWORD
            )
        )
        await asyncio.sleep(0.5)  # the attacker has verified the old hash and waits on the lock
        await tx.commit()
        with pytest.raises(tokendb.InvalidCredentials):
            await asyncio.wait_for(attacker, 10)
        await tokendb.authenticate(email=user.email, password="victim's new password")
    finally:
        await victim.close()


# --- 6. verify_api_key returns last_used_at=None after a touch it lost -----------------


async def test_concurrent_verifies_never_report_a_used_key_as_unused(
    tokendb_clean: str, make_api_key
) -> None:
    """Requests that lose the touch race return the statement snapshot's NULL.
    This is also why test_api_keys.py::test_concurrent_verifies_of_a_hot_key_write_once
    is flaky (failed 1 run in 6 here)."""
    for _ in range(10):
        _, secret = await make_api_key()
        results = await asyncio.gather(*(tokendb.verify_api_key(secret=secret) for _ in range(60)))
        assert all(key.last_used_at is not None for key in results)


# --- 7. Keyset cursors from another user are accepted ---------------------------------


async def test_a_cursor_from_another_users_ledger_is_not_found(
    tokendb_clean: str, make_user
) -> None:
    """list_messages refuses a cursor of another session; list_transactions and
    list_chats take any row's id, so a tenant can probe ids of other tenants."""
    alice, bob = await make_user(), await make_user()
    alices = await tokendb.top_up(user=alice, amount=5)
    with pytest.raises(tokendb.NotFound):
        await tokendb.list_transactions(user=bob, before=alices.id)


async def test_a_cursor_from_another_users_chats_is_not_found(
    tokendb_clean: str, make_api_key, make_user
) -> None:
    alices_key, _ = await make_api_key()
    alices_session = await tokendb.start_chat(api_key=alices_key, model="m")
    bob = await make_user()
    with pytest.raises(tokendb.NotFound):
        await tokendb.list_chats(user=bob, before=alices_session.id)
