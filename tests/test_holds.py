"""Token holds: reserve, capture, release, expire; races; the database's backstops.

Expiry is put under the test's control by moving a hold's ``expires_at``
into the past as the owner with triggers off (:func:`expire_now`), or by a
tiny ``ttl`` and a short sleep: nothing sweeps in between.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Coroutine
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

import tokendb
from tests.helpers import db_settings, holding_row_lock, statements_sent, table_counts, tamper
from tokendb import _holds_sql, _ledger_sql, _tortoise
from tokendb.models import HoldStatus


async def expire_now(url: str, *holds: tokendb.TokenHold) -> None:
    """Move ``holds``' expiry 1 s into the past, as if their ttl had run out."""
    await tamper(
        url,
        "UPDATE token_holds SET expires_at = clock_timestamp() - interval '1 second', "
        "created_at = clock_timestamp() - interval '2 seconds' WHERE id = ANY($1::uuid[])",
        [h.id for h in holds],
    )


@pytest.fixture(params=[True, False], ids=["coalesced", "one-statement-per-call"])
async def lanes(tokendb_clean: str, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    with db_settings(coalesce_charges=request.param):
        yield tokendb_clean


# --- the basics ------------------------------------------------------------------------


async def test_a_hold_reserves_tokens_that_a_charge_cannot_spend(lanes: str, funded_user) -> None:
    user = await funded_user(balance=100)
    held = await tokendb.hold(user=user, amount=70, ttl=60)
    assert (held.status, held.amount, held.user_id) == (HoldStatus.ACTIVE, 70, user.id)
    assert held.expires_at - held.created_at == pytest.approx(
        timedelta(seconds=60), abs=timedelta(seconds=1)
    )
    assert await tokendb.get_balance(user=user) == 100
    assert await tokendb.get_available_balance(user=user) == 30
    before = await table_counts()
    with pytest.raises(tokendb.InsufficientTokens) as info:
        await tokendb.charge(user=user, amount=31)
    assert (info.value.balance, info.value.requested) == (30, 31)
    assert await table_counts() == before
    await tokendb.charge(user=user, amount=30)
    with pytest.raises(tokendb.InsufficientTokens):
        await tokendb.hold(user=user, amount=1, ttl=60)
    released = await tokendb.release(hold=held)
    assert released.status is HoldStatus.RELEASED and released.resolved_at is not None
    assert await tokendb.get_available_balance(user=user) == 70
    assert (await tokendb.charge(user=user, amount=70)).balance_after == 0


async def test_capture_writes_one_usage_row_and_releases_the_rest(
    tokendb_clean: str, funded_user
) -> None:
    user = await funded_user(balance=100)
    held = await tokendb.hold(user=user, amount=60, ttl=timedelta(minutes=5), description="gpt")
    row = await tokendb.capture(hold=held, amount=45)
    assert (row.type, row.amount, row.balance_after) == ("usage", -45, 55)
    assert (row.reference_id, row.description) == (held.id, "gpt")
    assert await tokendb.get_available_balance(user=user) == 55
    (captured,) = await tokendb.list_holds(user=user)
    assert captured.status is HoldStatus.CAPTURED
    assert (captured.captured_amount, captured.captured_transaction_id) == (45, row.id)
    assert (await tokendb.get_user(user_id=user.id)).held_tokens == 0


async def test_a_capture_may_take_the_whole_hold_and_the_whole_balance(
    tokendb_clean: str, funded_user
) -> None:
    user = await funded_user(balance=100)
    held = await tokendb.hold(user=user, amount=100, ttl=60)
    row = await tokendb.capture(hold=held.id, amount=100, description="all of it")
    assert (row.balance_after, row.description) == (0, "all of it")


async def test_a_repeated_capture_returns_the_same_row(tokendb_clean: str, funded_user) -> None:
    user = await funded_user(balance=100)
    held = await tokendb.hold(user=user, amount=50, ttl=60)
    first = await tokendb.capture(hold=held, amount=20)
    before = await table_counts()
    again = await tokendb.capture(hold=str(held.id), amount=20)
    assert again.id == first.id
    with pytest.raises(tokendb.HoldNotActive) as info:
        await tokendb.capture(hold=held, amount=21)
    assert (info.value.status, info.value.hold_id) == ("captured", held.id)
    with pytest.raises(tokendb.HoldNotActive) as released:
        await tokendb.release(hold=held)
    assert released.value.status == "captured"
    assert await table_counts() == before


async def test_a_released_hold_cannot_be_captured_and_releases_once(
    tokendb_clean: str, funded_user
) -> None:
    user = await funded_user(balance=100)
    held = await tokendb.hold(user=user, amount=50, ttl=60)
    first = await tokendb.release(hold=held)
    before = await table_counts()
    again = await tokendb.release(hold=held)
    assert (again.status, again.resolved_at) == (HoldStatus.RELEASED, first.resolved_at)
    with pytest.raises(tokendb.HoldNotActive) as info:
        await tokendb.capture(hold=held, amount=1)
    assert info.value.status == "released"
    assert not isinstance(info.value, tokendb.HoldExpired)
    assert await table_counts() == before
    assert await tokendb.get_available_balance(user=user) == 100


async def test_capturing_more_than_the_hold_writes_nothing(tokendb_clean: str, funded_user) -> None:
    user = await funded_user(balance=100)
    held = await tokendb.hold(user=user, amount=50, ttl=60)
    before = await table_counts()
    for target in (held, held.id):  # the instance is checked in Python, the id by the database
        with pytest.raises(tokendb.CaptureExceedsHold) as info:
            await tokendb.capture(hold=target, amount=51)
        assert (info.value.held, info.value.requested, info.value.field) == (50, 51, "amount")
    assert await table_counts() == before
    assert (await tokendb.capture(hold=held, amount=50)).amount == -50


async def test_unknown_holds_and_users_are_not_found(tokendb_clean: str) -> None:
    missing = uuid.uuid4()
    for call in (
        tokendb.capture(hold=missing, amount=1),
        tokendb.release(hold=missing),
        tokendb.hold(user=missing, amount=1, ttl=1),
        tokendb.get_available_balance(user=missing),
        tokendb.list_holds(user=missing),
    ):
        with pytest.raises(tokendb.NotFound):
            await call


BAD_TTLS = [0, -1, 0.0, -0.5, 1e-9, True, False, math.nan, math.inf, -math.inf, "60", None,
            24 * 3600 + 1, 24 * 3600 + 0.5, timedelta(0), timedelta(seconds=-1),
            timedelta(hours=24, microseconds=1), [60]]  # fmt: skip


@pytest.mark.parametrize("ttl", BAD_TTLS, ids=repr)
async def test_a_bad_ttl_writes_nothing(tokendb_clean: str, funded_user, ttl: Any) -> None:
    user = await funded_user(balance=100)
    before = await table_counts()
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.hold(user=user, amount=1, ttl=ttl)
    assert info.value.field == "ttl"
    assert await table_counts() == before


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"amount": 0}, "amount"),
        ({"amount": -5}, "amount"),
        ({"amount": 1.5}, "amount"),
        ({"amount": 2**31}, "amount"),
        ({"reference_id": "nope"}, "reference_id"),
        ({"description": "x" * 1001}, "description"),
        ({"description": "a\x00b"}, "description"),
    ],
)
async def test_bad_hold_arguments_write_nothing(
    tokendb_clean: str, funded_user, arguments: dict[str, Any], field: str
) -> None:
    user = await funded_user(balance=100)
    before = await table_counts()
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.hold(**{"user": user, "amount": 1, "ttl": 60, **arguments})
    assert info.value.field == field
    assert await table_counts() == before


async def test_the_longest_ttl_is_accepted(tokendb_clean: str, funded_user) -> None:
    user = await funded_user(balance=100)
    for ttl in (tokendb.holds.MAX_HOLD_TTL, 24 * 3600, 86400.0, 0.001, timedelta(microseconds=1)):
        await tokendb.release(hold=await tokendb.hold(user=user, amount=1, ttl=ttl))


async def test_more_than_the_available_balance_is_refused(tokendb_clean: str, funded_user) -> None:
    user = await funded_user(balance=100)
    before = await table_counts()
    with pytest.raises(tokendb.InsufficientTokens) as info:
        await tokendb.hold(user=user, amount=101, ttl=60)
    assert (info.value.balance, info.value.requested) == (100, 101)
    await tokendb.hold(user=user, amount=40, ttl=60)
    with pytest.raises(tokendb.InsufficientTokens) as second:
        await tokendb.hold(user=user, amount=61, ttl=60)
    assert second.value.balance == 60
    assert (await table_counts())["token_holds"] == before["token_holds"] + 1


# --- idempotency --------------------------------------------------------------------------


async def test_a_repeated_reference_returns_the_same_hold(tokendb_clean: str, funded_user) -> None:
    user = await funded_user(balance=100)
    reference = uuid.uuid4()
    first = await tokendb.hold(user=user, amount=30, ttl=60, reference_id=reference)
    before = await table_counts()
    again = await tokendb.hold(user=user, amount=30, ttl=120, reference_id=str(reference))
    assert again.id == first.id
    with pytest.raises(tokendb.ReferenceConflict) as info:
        await tokendb.hold(user=user, amount=31, ttl=60, reference_id=reference)
    assert (info.value.existing_amount, info.value.requested_amount) == (30, 31)
    await tokendb.capture(hold=first, amount=10)
    assert (await tokendb.hold(user=user, amount=30, ttl=60, reference_id=reference)).id == first.id
    assert (await table_counts())["token_holds"] == before["token_holds"]
    # Another user's reference is another hold.
    other = await funded_user(balance=100)
    assert (
        await tokendb.hold(user=other, amount=30, ttl=60, reference_id=reference)
    ).id != first.id


async def test_a_repeat_that_the_balance_no_longer_covers_is_still_the_same_hold(
    tokendb_clean: str, funded_user
) -> None:
    user = await funded_user(balance=100)
    reference = uuid.uuid4()
    first = await tokendb.hold(user=user, amount=100, ttl=60, reference_id=reference)
    assert (
        await tokendb.hold(user=user, amount=100, ttl=60, reference_id=reference)
    ).id == first.id


async def test_concurrent_repeats_return_one_hold(tokendb_clean: str, funded_user) -> None:
    user = await funded_user(balance=100)
    reference = uuid.uuid4()
    holds = await asyncio.gather(
        *(tokendb.hold(user=user, amount=10, ttl=60, reference_id=reference) for _ in range(20))
    )
    assert len({h.id for h in holds}) == 1
    assert await tokendb.get_available_balance(user=user) == 90


# --- concurrency --------------------------------------------------------------------------


async def test_fifty_concurrent_holds_of_ten_on_a_hundred_give_exactly_ten(
    tokendb_clean: str, funded_user
) -> None:
    pool = await _tortoise.pool(_tortoise.models_client())
    assert pool.get_max_size() >= 16
    user = await funded_user(balance=100)
    results = await asyncio.gather(
        *(tokendb.hold(user=user, amount=10, ttl=60) for _ in range(50)), return_exceptions=True
    )
    held = [r for r in results if isinstance(r, tokendb.TokenHold)]
    refused = [r for r in results if isinstance(r, tokendb.InsufficientTokens)]
    assert (len(held), len(refused)) == (10, 40), results
    assert all(r.balance == 0 for r in refused)
    assert await tokendb.get_available_balance(user=user) == 0
    assert (await tokendb.get_user(user_id=user.id)).held_tokens == 100


async def test_holds_and_charges_race_without_overcommitting(lanes: str, funded_user) -> None:
    user = await funded_user(balance=100)
    calls: list[Coroutine[Any, Any, object]] = [
        tokendb.hold(user=user, amount=10, ttl=60) for _ in range(25)
    ]
    calls += [tokendb.charge(user=user, amount=10) for _ in range(25)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    won = [r for r in results if not isinstance(r, BaseException)]
    assert all(isinstance(r, tokendb.InsufficientTokens) for r in results if r not in won)
    assert len(won) == 10
    holds = sum(isinstance(r, tokendb.TokenHold) for r in won)
    assert await tokendb.get_balance(user=user) == 100 - 10 * (10 - holds)
    assert await tokendb.get_available_balance(user=user) == 0


@pytest.mark.parametrize("rounds", [12])
async def test_capture_release_and_charge_race_on_one_hold(
    lanes: str, funded_user, rounds: int
) -> None:
    """Capture and release of one hold, and charges: exactly one of capture/release wins,
    no charge spends held tokens, and the books and holds add up after each round."""
    for _ in range(rounds):
        user = await funded_user(balance=100)
        held = await tokendb.hold(user=user, amount=60, ttl=60)
        capture, release, *charges = await asyncio.gather(
            tokendb.capture(hold=held, amount=50),
            tokendb.release(hold=held),
            tokendb.charge(user=user, amount=40),
            tokendb.charge(user=user, amount=41),
            tokendb.charge(user=user, amount=19),
            return_exceptions=True,
        )
        charged = [c for c in charges if isinstance(c, tokendb.TokenTransaction)]
        assert all(isinstance(c, tokendb.InsufficientTokens) for c in charges if c not in charged)
        spent = -sum(c.amount for c in charged)
        if isinstance(capture, tokendb.TokenTransaction):
            assert isinstance(release, tokendb.HoldNotActive) and release.status == "captured"
            assert spent <= 50
            assert await tokendb.get_balance(user=user) == 50 - spent
        else:
            assert isinstance(capture, tokendb.HoldNotActive) and capture.status == "released"
            assert release.status is HoldStatus.RELEASED
            assert await tokendb.get_balance(user=user) == 100 - spent
        assert await tokendb.get_available_balance(user=user) == await tokendb.get_balance(
            user=user
        )
        assert await tokendb.audit_holds() == []


async def test_concurrent_captures_of_one_hold_write_one_row(
    tokendb_clean: str, funded_user
) -> None:
    user = await funded_user(balance=100)
    held = await tokendb.hold(user=user, amount=60, ttl=60)
    results = await asyncio.gather(
        *(tokendb.capture(hold=held, amount=30) for _ in range(8)),
        *(tokendb.capture(hold=held, amount=31) for _ in range(8)),
        return_exceptions=True,
    )
    rows = {r.id for r in results if isinstance(r, tokendb.TokenTransaction)}
    assert len(rows) == 1
    losers = [r for r in results if not isinstance(r, tokendb.TokenTransaction)]
    assert all(isinstance(r, tokendb.HoldNotActive) for r in losers)
    assert len(losers) == 8
    assert await tokendb.get_balance(user=user) in (70, 69)


# --- expiry -------------------------------------------------------------------------------


async def test_an_expired_hold_frees_its_tokens_without_a_sweeper(lanes: str, funded_user) -> None:
    user = await funded_user(balance=100)
    held = await tokendb.hold(user=user, amount=100, ttl=60)
    with pytest.raises(tokendb.InsufficientTokens):
        await tokendb.charge(user=user, amount=1)
    await expire_now(lanes, held)
    assert await tokendb.get_available_balance(user=user) == 100
    (still,) = await tokendb.list_holds(user=user)
    assert still.status is HoldStatus.ACTIVE  # nothing marked it yet
    assert (await tokendb.charge(user=user, amount=100)).balance_after == 0
    (marked,) = await tokendb.list_holds(user=user)
    assert marked.status is HoldStatus.EXPIRED and marked.resolved_at is not None
    with pytest.raises(tokendb.HoldExpired) as info:
        await tokendb.capture(hold=held, amount=1)
    assert (info.value.status, info.value.expired_at) == ("expired", marked.expires_at)


async def test_a_list_of_charges_spends_what_an_expired_hold_freed(
    tokendb_clean: str, funded_user
) -> None:
    """charge_many's batch statement counts held tokens until a hold is marked; the
    items it refused while their user had holds get the second look a lone charge
    has (expiry takes effect under the lock), so each item has its real outcome."""
    user, other = await funded_user(balance=100), await funded_user(balance=100)
    held = await tokendb.hold(user=user, amount=100, ttl=60)
    await expire_now(tokendb_clean, held)
    results = await tokendb.charge_many(
        items=[
            {"user": user, "amount": 60},
            {"user": other, "amount": 5},
            {"user": user, "amount": 50},
        ]
    )
    assert isinstance(results[0], tokendb.TokenTransaction) and results[0].balance_after == 40
    assert isinstance(results[1], tokendb.TokenTransaction) and results[1].balance_after == 95
    assert isinstance(results[2], tokendb.InsufficientTokens) and results[2].balance == 40
    assert [h.status for h in await tokendb.list_holds(user=user)] == [HoldStatus.EXPIRED]


async def test_an_expired_hold_of_a_single_token_frees_it_too(lanes: str, funded_user) -> None:
    """Any held token, down to one, sends a refused debit to the second look
    under the lock, where an expired hold stops counting."""
    user = await funded_user(balance=100)
    held = await tokendb.hold(user=user, amount=1, ttl=60)
    await expire_now(lanes, held)
    assert (await tokendb.charge(user=user, amount=100)).balance_after == 0


async def test_a_hold_with_a_tiny_ttl_expires_by_itself(tokendb_clean: str, funded_user) -> None:
    user = await funded_user(balance=100)
    held = await tokendb.hold(user=user, amount=100, ttl=0.05)
    await asyncio.sleep(0.2)
    assert await tokendb.get_available_balance(user=user) == 100
    before = await table_counts()
    with pytest.raises(tokendb.HoldExpired):
        await tokendb.capture(hold=held, amount=10)  # unmarked, but past its expiry
    assert await table_counts() == before
    again = await tokendb.hold(user=user, amount=100, ttl=60)  # the new hold marks the old one
    assert again.amount == 100
    assert [h.status for h in await tokendb.list_holds(user=user)] == [
        HoldStatus.ACTIVE,
        HoldStatus.EXPIRED,
    ]


async def test_expired_holds_free_tokens_for_add_message_and_charge_many(
    tokendb_clean: str, funded_user, make_api_key
) -> None:
    user = await funded_user(balance=100)
    key, _ = await make_api_key(user=user)
    session = await tokendb.start_chat(api_key=key, model="m")
    held = await tokendb.hold(user=user, amount=90, ttl=60)
    with pytest.raises(tokendb.InsufficientTokens) as info:
        await tokendb.add_message(session=session, role="user", content="hi", tokens=11)
    assert info.value.balance == 10
    (short,) = await tokendb.charge_many(items=[{"user": user, "amount": 11}])
    assert isinstance(short, tokendb.InsufficientTokens) and short.balance == 10
    await expire_now(tokendb_clean, held)
    await tokendb.add_message(session=session, role="user", content="hi", tokens=11)
    results = await tokendb.charge_many(items=[{"user": user, "amount": 80}] * 2)
    assert isinstance(results[0], tokendb.TokenTransaction)
    assert isinstance(results[1], tokendb.InsufficientTokens) and results[1].balance == 9


async def test_releasing_an_expired_hold_marks_it_expired(tokendb_clean: str, funded_user) -> None:
    user = await funded_user(balance=100)
    held = await tokendb.hold(user=user, amount=10, ttl=60)
    await expire_now(tokendb_clean, held)
    assert (await tokendb.release(hold=held)).status is HoldStatus.EXPIRED
    assert (await tokendb.get_user(user_id=user.id)).held_tokens == 0


async def test_expire_holds_marks_only_expired_holds(tokendb_clean: str, funded_user) -> None:
    users = [await funded_user(balance=100) for _ in range(3)]
    old = [await tokendb.hold(user=u, amount=10, ttl=60) for u in users for _ in range(2)]
    fresh = await tokendb.hold(user=users[0], amount=10, ttl=60)
    await expire_now(tokendb_clean, *old)
    assert await tokendb.expire_holds() == 6
    assert await tokendb.expire_holds() == 0
    assert [h.id for h in await tokendb.list_holds(user=users[0], status="active")] == [fresh.id]
    assert len(await tokendb.list_holds(user=users[0], status=HoldStatus.EXPIRED)) == 2
    assert [(await tokendb.get_user(user_id=u.id)).held_tokens for u in users] == [10, 0, 0]


async def test_a_killed_process_leaves_a_hold_that_expires(
    tokendb_clean: str, tokendb_app_url: str, funded_user
) -> None:
    """A gateway holds, then dies before capturing (SIGKILL): the tokens come back at expiry."""
    user = await funded_user(balance=100)
    script = textwrap.dedent(
        f"""
        import asyncio, os, sys, tokendb

        async def main():
            await tokendb.init({tokendb_app_url!r})
            held = await tokendb.hold(user={str(user.id)!r}, amount=100, ttl=1.0)
            print(held.id, flush=True)
            await asyncio.sleep(3600)  # streaming, until killed

        asyncio.run(main())
        """
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ),
    )
    try:
        assert child.stdout is not None and child.stderr is not None
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        assert line, await child.stderr.read()
        hold_id = uuid.UUID(line.decode().strip())
        os.kill(child.pid, signal.SIGKILL)
        assert await asyncio.wait_for(child.wait(), 30) == -signal.SIGKILL
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert await tokendb.get_available_balance(user=user) == 0
    with pytest.raises(tokendb.InsufficientTokens):
        await tokendb.charge(user=user, amount=1)
    await asyncio.sleep(1.2)
    assert await tokendb.get_available_balance(user=user) == 100
    assert (await tokendb.charge(user=user, amount=100)).balance_after == 0
    (gone,) = await tokendb.list_holds(user=user)
    assert (gone.id, gone.status) == (hold_id, HoldStatus.EXPIRED)


# --- listing ------------------------------------------------------------------------------


async def test_list_holds_pages_newest_first(tokendb_clean: str, funded_user) -> None:
    user = await funded_user(balance=100)
    made = [await tokendb.hold(user=user, amount=1, ttl=60) for _ in range(5)]
    await tokendb.release(hold=made[1])
    first = await tokendb.list_holds(user=user, limit=2)
    second = await tokendb.list_holds(user=user, limit=2, before=first[-1])
    third = await tokendb.list_holds(user=user, limit=2, before=second[-1].id)
    assert [h.id for h in first + second + third] == [h.id for h in reversed(made)]
    assert [h.id for h in await tokendb.list_holds(user=user, status="released")] == [made[1].id]
    other = await funded_user(balance=10)
    assert await tokendb.list_holds(user=other) == []
    with pytest.raises(tokendb.NotFound):
        await tokendb.list_holds(user=other, before=made[0])
    with pytest.raises(tokendb.ValidationError):
        await tokendb.list_holds(user=user, status="pending")


# --- backstops, as the application role ---------------------------------------------------


async def _hold_for(raw_url: str, funded_user: Any, amount: int = 30) -> tokendb.TokenHold:
    user = await funded_user(balance=100)
    return await tokendb.hold(user=user, amount=amount, ttl=60)


ATTACKS = [
    ("UPDATE users SET held_tokens = 0 WHERE id = $1", "users_held_tokens_follow_holds"),
    ("UPDATE users SET held_tokens = held_tokens + 5 WHERE id = $1",
     "users_held_tokens_follow_holds"),
    ("UPDATE users SET held_tokens = 101 WHERE id = $1", "users_held_tokens_within_balance"),
    ("UPDATE users SET held_tokens = -1 WHERE id = $1", "users_held_tokens_nonnegative"),
    ("UPDATE token_holds SET status = 'released' WHERE user_id = $1",
     "users_held_tokens_follow_holds"),
    ("UPDATE token_holds SET amount = 1 WHERE user_id = $1", "token_holds_immutable"),
    ("UPDATE token_holds SET expires_at = expires_at + interval '1 hour' WHERE user_id = $1",
     "token_holds_immutable"),
    ("UPDATE token_holds SET status = 'expired' WHERE user_id = $1", "token_holds_transition"),
    ("DELETE FROM token_holds WHERE user_id = $1", "token_holds_kept"),
    ("INSERT INTO token_holds (id, user_id, amount, expires_at) "
     "VALUES (gen_random_uuid(), $1, 5, now() + interval '1 minute')",
     "users_held_tokens_follow_holds"),
    ("INSERT INTO token_holds (id, user_id, amount, status, expires_at) "
     "VALUES (gen_random_uuid(), $1, 5, 'released', now() + interval '1 minute')",
     "token_holds_transition"),
    ("INSERT INTO token_holds (id, user_id, amount, expires_at) "
     "VALUES (gen_random_uuid(), $1, 0, now() + interval '1 minute')",
     "token_holds_amount_positive"),
    ("INSERT INTO token_holds (id, user_id, amount, expires_at) "
     "VALUES (gen_random_uuid(), $1, 5, now() + interval '2 days')", "token_holds_ttl"),
    ("UPDATE token_holds SET status = 'captured', captured_amount = 5, "
     "captured_transaction_id = (SELECT id FROM token_transactions WHERE user_id = $1 LIMIT 1) "
     "WHERE user_id = $1", "token_holds_books"),
    ("UPDATE token_holds SET status = 'captured', captured_amount = 31, "
     "captured_transaction_id = (SELECT id FROM token_transactions WHERE user_id = $1 LIMIT 1) "
     "WHERE user_id = $1", "token_holds_captured"),
    ("UPDATE token_holds SET status = 'released' WHERE user_id = $1;"
     "UPDATE users SET held_tokens = 0 WHERE id = $1;"
     "UPDATE token_holds SET status = 'active' WHERE user_id = $1", "token_holds_transition"),
]  # fmt: skip


@pytest.mark.parametrize(("sql", "constraint"), ATTACKS, ids=[c for _, c in ATTACKS])
async def test_the_application_role_cannot_fake_holds(
    tokendb_clean: str, app_role: str, funded_user, sql: str, constraint: str
) -> None:
    held = await _hold_for(tokendb_clean, funded_user)
    conn = await asyncpg.connect(app_role)
    try:
        with pytest.raises(asyncpg.PostgresError) as info:
            async with conn.transaction():
                for statement in sql.split(";"):
                    await conn.execute(statement, held.user_id)
        assert getattr(info.value, "constraint_name", None) == constraint, info.value
    finally:
        await conn.close()
    assert await tokendb.audit_holds() == []


async def test_the_application_role_may_write_a_consistent_hold(
    tokendb_clean: str, app_role: str, funded_user
) -> None:
    """What tokendb does by hand: a hold and its held tokens together commit (the
    database guarantees the books, not who wrote them)."""
    held = await _hold_for(tokendb_clean, funded_user)
    conn = await asyncpg.connect(app_role)
    try:
        async with conn.transaction():
            await conn.execute("UPDATE token_holds SET status = 'released' WHERE id = $1", held.id)
            await conn.execute(
                "UPDATE users SET held_tokens = held_tokens - 30 WHERE id = $1", held.user_id
            )
        resolved = await conn.fetchval("SELECT resolved_at FROM token_holds WHERE id = $1", held.id)
        assert resolved is not None  # dated by the database
    finally:
        await conn.close()
    assert await tokendb.get_available_balance(user=held.user_id) == 100


async def test_audit_holds_finds_what_the_backstops_would_refuse(
    tokendb_clean: str, funded_user
) -> None:
    held = await _hold_for(tokendb_clean, funded_user)
    await tamper(tokendb_clean, "UPDATE users SET held_tokens = 7 WHERE id = $1", held.user_id)
    (found,) = await tokendb.audit_holds()
    assert (found.user_id, found.held_tokens, found.active_holds) == (held.user_id, 7, 30)
    await tamper(tokendb_clean, "UPDATE users SET held_tokens = 30 WHERE id = $1", held.user_id)
    assert await tokendb.audit_holds() == []


# --- add_message(hold=…) --------------------------------------------------------------------


async def _chat(funded_user: Any, make_api_key: Any, balance: int = 100) -> Any:
    user = await funded_user(balance=balance)
    key, _ = await make_api_key(user=user)
    return user, await tokendb.start_chat(api_key=key, model="m")


async def test_add_message_captures_its_tokens_from_the_hold(
    tokendb_clean: str, funded_user, make_api_key
) -> None:
    user, session = await _chat(funded_user, make_api_key)
    held = await tokendb.hold(user=user, amount=80, ttl=60)
    message = await tokendb.add_message(
        session=session, role="assistant", content="streamed", tokens=70, hold=held
    )
    (usage, *_) = await tokendb.list_transactions(user=user)
    assert (usage.reference_id, usage.amount, usage.balance_after) == (message.id, -70, 30)
    (captured,) = await tokendb.list_holds(user=user)
    assert captured.status is HoldStatus.CAPTURED
    assert (captured.captured_amount, captured.captured_transaction_id) == (70, usage.id)
    assert (await tokendb.get_chat(session=session)).tokens_used == 70
    assert await tokendb.get_available_balance(user=user) == 30
    before = await table_counts()
    again = await tokendb.add_message(
        session=session, role="assistant", content="streamed", tokens=70, hold=held.id
    )
    assert again.id == message.id  # a retry after an unknown outcome
    with pytest.raises(tokendb.HoldNotActive) as info:
        await tokendb.add_message(
            session=session, role="assistant", content="x", tokens=5, hold=held
        )
    assert info.value.status == "captured"
    assert await table_counts() == before


async def test_add_message_may_capture_the_whole_hold(
    tokendb_clean: str, funded_user, make_api_key
) -> None:
    """A message of exactly the hold's amount, given the hold itself, is captured in full."""
    user, session = await _chat(funded_user, make_api_key)
    held = await tokendb.hold(user=user, amount=80, ttl=60)
    message = await tokendb.add_message(
        session=session, role="assistant", content="all of it", tokens=80, hold=held
    )
    (captured,) = await tokendb.list_holds(user=user)
    assert (captured.status, captured.captured_amount) == (HoldStatus.CAPTURED, 80)
    assert message.tokens == 80
    assert await tokendb.get_available_balance(user=user) == 20


async def test_add_message_with_zero_tokens_releases_the_hold(
    tokendb_clean: str, funded_user, make_api_key
) -> None:
    user, session = await _chat(funded_user, make_api_key)
    held = await tokendb.hold(user=user, amount=80, ttl=60)
    await tokendb.add_message(session=session, role="assistant", content="", tokens=0, hold=held)
    (released,) = await tokendb.list_holds(user=user)
    assert released.status is HoldStatus.RELEASED
    assert await tokendb.get_available_balance(user=user) == 100


@pytest.mark.parametrize("case", ["expired", "released", "too_many", "other_user", "ended"])
async def test_add_message_with_an_unusable_hold_stores_nothing(
    tokendb_clean: str, funded_user, make_api_key, case: str
) -> None:
    user, session = await _chat(funded_user, make_api_key)
    held = await tokendb.hold(user=user, amount=50, ttl=60)
    expected: type[Exception] = tokendb.HoldNotActive
    if case == "expired":
        await expire_now(tokendb_clean, held)
        expected = tokendb.HoldExpired
    elif case == "released":
        await tokendb.release(hold=held)
    elif case == "too_many":
        expected = tokendb.CaptureExceedsHold
    elif case == "other_user":
        other = await funded_user(balance=100)
        held = await tokendb.hold(user=other, amount=50, ttl=60)
        expected = tokendb.NotFound
    else:
        await tokendb.end_chat(session=session)
        expected = tokendb.ChatSessionEnded
    before = await table_counts()
    with pytest.raises(expected) as info:
        await tokendb.add_message(
            session=session, role="assistant", content="x", tokens=51 if case == "too_many" else 10,
            hold=held.id,
        )  # fmt: skip
    if case == "too_many":
        assert info.value.field == "tokens"  # type: ignore[attr-defined]
    assert await table_counts() == before


async def test_add_message_and_release_race_on_one_hold(
    tokendb_clean: str, funded_user, make_api_key
) -> None:
    for _ in range(8):
        user, session = await _chat(funded_user, make_api_key)
        held = await tokendb.hold(user=user, amount=60, ttl=60)
        added, released = await asyncio.gather(
            tokendb.add_message(
                session=session, role="assistant", content="x", tokens=50, hold=held
            ),
            tokendb.release(hold=held),
            return_exceptions=True,
        )
        if isinstance(added, tokendb.ChatMessage):
            assert isinstance(released, tokendb.HoldNotActive)
            assert await tokendb.get_balance(user=user) == 50
        else:
            assert isinstance(added, tokendb.HoldNotActive) and added.status == "released"
            assert await tokendb.get_balance(user=user) == 100
        assert await tokendb.get_available_balance(user=user) == await tokendb.get_balance(
            user=user
        )


async def test_the_readme_recipe_bills_a_stream_from_its_hold(
    tokendb_clean: str, funded_user, make_api_key
) -> None:
    from tests.test_docs import blocks

    (recipe,) = [b for b in blocks("The library", "python") if "async def bill_stream" in b]
    assert len(recipe.strip().splitlines()) <= 25
    namespace: dict[str, Any] = {"tokendb": tokendb}
    exec(compile(recipe, "README.md", "exec"), namespace)
    user, session = await _chat(funded_user, make_api_key)

    async def stream(*, max_tokens: int) -> tuple[str, int]:
        return "four words of reply", 4

    async def broken(*, max_tokens: int) -> tuple[str, int]:
        raise ConnectionError("the provider went away")

    message = await namespace["bill_stream"](session, 50, stream)
    assert (message.tokens, await tokendb.get_available_balance(user=user)) == (4, 96)
    with pytest.raises(ConnectionError):
        await namespace["bill_stream"](session, 50, broken)
    assert [h.status for h in await tokendb.list_holds(user=user)] == ["released", "captured"]
    assert await tokendb.get_available_balance(user=user) == 96


# --- adversarial review (issue 11) -----------------------------------------------------------


@pytest.mark.parametrize("via", ["capture", "add_message"])
async def test_a_hold_that_expires_while_its_capture_waits_for_the_lock_is_not_captured(
    tokendb_clean: str, funded_user, make_api_key, via: str
) -> None:
    """The capture is sent before ``expires_at`` but gets the user's lock after it."""
    user, session = await _chat(funded_user, make_api_key)
    held = await tokendb.hold(user=user, amount=50, ttl=0.6)
    before = await table_counts()
    async with holding_row_lock(tokendb_clean, user.id):
        call: asyncio.Future[object]
        if via == "capture":
            call = asyncio.ensure_future(tokendb.capture(hold=held, amount=40))
        else:
            call = asyncio.ensure_future(
                tokendb.add_message(
                    session=session, role="assistant", content="x", tokens=40, hold=held
                )
            )
        await asyncio.sleep(1.0)
        assert not call.done()
    with pytest.raises(tokendb.HoldExpired):
        await call
    assert await table_counts() == before
    assert await tokendb.get_balance(user=user) == 100
    assert await tokendb.get_available_balance(user=user) == 100
    assert await tokendb.audit_holds() == []


async def test_holds_charges_captures_releases_and_sweeps_race_on_one_user(
    lanes: str, funded_user
) -> None:
    """Everything at once on one user, many connections: nothing is spent twice, nothing
    overdraws, and the books add up to exactly what the winners report."""
    user = await funded_user(balance=1000)
    holds = [await tokendb.hold(user=user, amount=40, ttl=60) for _ in range(10)]
    short = [await tokendb.hold(user=user, amount=30, ttl=0.3) for _ in range(5)]
    await asyncio.sleep(0.4)  # the short holds have expired, nobody marked them
    calls: list[Coroutine[Any, Any, object]] = []
    for i, h in enumerate(holds):
        calls += [tokendb.capture(hold=h, amount=10 + i), tokendb.release(hold=h)]
        calls += [tokendb.capture(hold=h, amount=10 + i)]
    calls += [tokendb.capture(hold=h, amount=5) for h in short]
    calls += [tokendb.charge(user=user, amount=70) for _ in range(12)]
    calls += [tokendb.hold(user=user, amount=50, ttl=60) for _ in range(8)]
    calls += [tokendb.expire_holds() for _ in range(3)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    unexpected = [
        r
        for r in results
        if isinstance(r, BaseException)
        and not isinstance(
            r, (tokendb.InsufficientTokens, tokendb.HoldNotActive, tokendb.HoldExpired)
        )
    ]
    assert unexpected == []
    rows = {r.id: r.amount for r in results if isinstance(r, tokendb.TokenTransaction)}
    spent = -sum(rows.values())
    assert len(rows) <= 10 + 12
    assert await tokendb.get_balance(user=user) == 1000 - spent
    new_holds = [r for r in results if isinstance(r, tokendb.TokenHold) and r.amount == 50]
    assert await tokendb.get_available_balance(user=user) == 1000 - spent - 50 * len(new_holds)
    states = {h.id: h.status for h in await tokendb.list_holds(user=user, limit=100)}
    assert all(states[h.id] is HoldStatus.EXPIRED for h in short)
    final = {h.id: h for h in await tokendb.list_holds(user=user, limit=100)}
    for i, h in enumerate(holds):  # captured once, by the row its winners were told
        winners = {
            r.id for r in results[3 * i : 3 * i + 3] if isinstance(r, tokendb.TokenTransaction)
        }
        if final[h.id].status is HoldStatus.CAPTURED:
            assert winners == {final[h.id].captured_transaction_id}
            assert final[h.id].captured_amount == 10 + i
        else:
            assert final[h.id].status is HoldStatus.RELEASED and winners == set()
    assert await tokendb.audit_holds() == []
    assert await tokendb.audit_ledger() == []


@pytest.mark.parametrize("amount", [True, False, 0, -1, 2**31, 2**63, 1.0, "5", None])
async def test_a_bad_capture_amount_writes_nothing(
    tokendb_clean: str, funded_user, amount: Any
) -> None:
    user = await funded_user(balance=100)
    held = await tokendb.hold(user=user, amount=50, ttl=60)
    before = await table_counts()
    with pytest.raises(tokendb.ValidationError):
        await tokendb.capture(hold=held.id, amount=amount)
    assert await table_counts() == before
    assert (await tokendb.capture(hold=held, amount=50)).amount == -50


@pytest.mark.parametrize("amount", [True, False, 2**63, None])
async def test_a_bool_or_huge_hold_amount_writes_nothing(
    tokendb_clean: str, funded_user, amount: Any
) -> None:
    user = await funded_user(balance=100)
    before = await table_counts()
    with pytest.raises(tokendb.ValidationError):
        await tokendb.hold(user=user, amount=amount, ttl=60)
    assert await table_counts() == before


async def test_fifty_concurrent_repeats_of_a_reference_give_one_hold(
    lanes: str, funded_user
) -> None:
    user = await funded_user(balance=100)
    reference = uuid.uuid4()
    results = await asyncio.gather(
        *(tokendb.hold(user=user, amount=10, ttl=60, reference_id=reference) for _ in range(50)),
        *(tokendb.charge(user=user, amount=10) for _ in range(5)),
        return_exceptions=True,
    )
    holds = results[:50]
    assert all(isinstance(h, tokendb.TokenHold) for h in holds), holds
    assert len({h.id for h in holds if isinstance(h, tokendb.TokenHold)}) == 1
    assert (await tokendb.get_user(user_id=user.id)).held_tokens == 10
    assert len(await tokendb.list_holds(user=user)) == 1


async def test_the_application_role_cannot_capture_with_an_old_usage_row(
    tokendb_clean: str, app_role: str, funded_user
) -> None:
    """A capture is billed by a usage row written for it, not by an earlier charge of
    the same amount (which would free the held tokens without any new debit)."""
    user = await funded_user(balance=100)
    charged = await tokendb.charge(user=user, amount=5)
    held = await tokendb.hold(user=user, amount=30, ttl=60)
    conn = await asyncpg.connect(app_role)
    try:
        with pytest.raises(asyncpg.PostgresError) as info:
            async with conn.transaction():
                await conn.execute(
                    "UPDATE token_holds SET status = 'captured', captured_amount = 5, "
                    "captured_transaction_id = $2 WHERE id = $1",
                    held.id,
                    charged.id,
                )
                await conn.execute(
                    "UPDATE users SET held_tokens = held_tokens - 30 WHERE id = $1", user.id
                )
        assert getattr(info.value, "constraint_name", None) == "token_holds_books", info.value
    finally:
        await conn.close()
    assert await tokendb.get_balance(user=user) == 95
    assert await tokendb.get_available_balance(user=user) == 65


async def test_audit_holds_finds_a_capture_billed_by_an_older_usage_row(
    tokendb_clean: str, funded_user
) -> None:
    user = await funded_user(balance=100)
    charged = await tokendb.charge(user=user, amount=5)
    held = await tokendb.hold(user=user, amount=30, ttl=60)
    assert await tokendb.audit_holds() == []
    await tamper(
        tokendb_clean,
        "UPDATE token_holds SET status = 'captured', captured_amount = 5, resolved_at = now(),"
        " captured_transaction_id = $2 WHERE id = $1",
        held.id,
        charged.id,
    )
    await tamper(tokendb_clean, "UPDATE users SET held_tokens = 0 WHERE id = $1", user.id)
    (found,) = await tokendb.audit_holds()
    assert (found.user_id, found.broken_captures) == (user.id, 1)
    await tamper(
        tokendb_clean,
        "UPDATE token_holds SET status = 'active', captured_amount = NULL, resolved_at = NULL,"
        " captured_transaction_id = NULL WHERE id = $1",
        held.id,
    )
    await tamper(tokendb_clean, "UPDATE users SET held_tokens = 30 WHERE id = $1", user.id)
    assert await tokendb.audit_holds() == []


@pytest.mark.parametrize("change", ["api_key_id = NULL", "model = 'other'"])
async def test_the_application_role_cannot_move_a_hold_off_its_key_or_model(
    tokendb_clean: str, app_role: str, funded_user, make_api_key, change: str
) -> None:
    """A key's active holds count against its limit, and the capture bills the hold's key
    and model: neither may change once the hold is made."""
    user = await funded_user(balance=100)
    key, _ = await make_api_key(user=user)
    held = await tokendb.hold(user=user, amount=30, ttl=60, api_key=key, model="m")
    conn = await asyncpg.connect(app_role)
    try:
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.execute(f"UPDATE token_holds SET {change} WHERE id = $1", held.id)
        assert getattr(info.value, "constraint_name", None) == "token_holds_immutable", info.value
    finally:
        await conn.close()
    (after,) = await tokendb.list_holds(user=user)
    assert (after.api_key_id, after.model) == (key.id, "m")


async def test_a_second_message_on_a_captured_hold_is_not_taken_for_a_repeat(
    tokendb_clean: str, funded_user, make_api_key
) -> None:
    """A repeat is the same message again (a retry after an unknown outcome); another
    message with the same tokens on a used hold is refused, not answered with the first."""
    user, session = await _chat(funded_user, make_api_key)
    held = await tokendb.hold(user=user, amount=50, ttl=60)
    first = await tokendb.add_message(
        session=session, role="assistant", content="one", tokens=30, hold=held
    )
    again = await tokendb.add_message(
        session=session, role="assistant", content="one", tokens=30, hold=held
    )
    assert again.id == first.id
    before = await table_counts()
    with pytest.raises(tokendb.HoldNotActive):
        await tokendb.add_message(
            session=session, role="assistant", content="two", tokens=30, hold=held
        )
    assert await table_counts() == before


async def test_concurrent_charges_beside_a_hold_are_refused_with_what_is_available(
    lanes: str, funded_user
) -> None:
    user = await funded_user(balance=100)
    await tokendb.hold(user=user, amount=60, ttl=60)
    results = await asyncio.gather(
        *(tokendb.charge(user=user, amount=30) for _ in range(6)), return_exceptions=True
    )
    charged = [r for r in results if isinstance(r, tokendb.TokenTransaction)]
    refused = [r for r in results if isinstance(r, tokendb.InsufficientTokens)]
    assert (len(charged), len(refused)) == (1, 5), results
    assert all((r.balance, r.requested) == (10, 30) for r in refused), refused
    assert charged[0].balance_after == 70
    assert await tokendb.get_available_balance(user=user) == 10


async def test_each_hot_call_that_succeeds_sends_one_statement(
    tokendb_clean: str, funded_user, make_api_key
) -> None:
    """hold, capture and add_message (with and without a hold, through an unlimited
    key) are one statement each when they succeed: no read before, none after."""
    user, session = await _chat(funded_user, make_api_key)
    with statements_sent() as sent:
        held = await tokendb.hold(user=user, amount=10, ttl=60, api_key=session.api_key_id)
    assert sent == [_holds_sql.HOLD]
    with statements_sent() as sent:
        await tokendb.capture(hold=held, amount=4)
    assert sent == [_holds_sql.CAPTURE]
    with statements_sent() as sent:
        await tokendb.add_message(session=session, role="user", content="hi", tokens=3)
    assert sent == [_ledger_sql.ADD_MESSAGE]
    held = await tokendb.hold(user=user, amount=10, ttl=60)
    with statements_sent() as sent:
        await tokendb.add_message(
            session=session, role="assistant", content="yo", tokens=5, hold=held
        )
    assert sent == [_ledger_sql.ADD_MESSAGE_CAPTURE]


async def test_a_refused_hold_costs_two_statements(tokendb_clean: str, funded_user) -> None:
    """As a refused charge: the refusal and the balance read that explains it, no
    locked second attempt (the user has no holds that may have expired)."""
    user = await funded_user(balance=5)
    with statements_sent() as sent, pytest.raises(tokendb.InsufficientTokens) as refused:
        await tokendb.hold(user=user, amount=6, ttl=60)
    assert sent == [_holds_sql.HOLD, _ledger_sql.BALANCE]
    assert (refused.value.balance, refused.value.requested) == (5, 6)
