"""Per-key token limits (issue 14): decided under the key's row lock, on the window's
usage read after it (tokendb._limits_sql), for charges, chat messages and holds.

Time is under the test's control: a key's ledger rows are moved back in time
as the owner, rollup and all (:func:`tests.test_usage.shift_history`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator

import pytest

import tokendb
from tests.helpers import (
    blocked_backends,
    db_settings,
    holding_row_lock,
    statements_sent,
    table_counts,
)
from tests.test_usage import shift_history
from tokendb import _limits_sql
from tokendb.http import status_code_for
from tokendb.models import LimitPeriod, MessageRole

UTC = dt.UTC


def midnight() -> dt.datetime:
    """Today, 00:00 UTC."""
    return dt.datetime.combine(dt.datetime.now(UTC).date(), dt.time(0), UTC)


@pytest.fixture(params=[True, False], ids=["coalesced", "one-statement-per-call"])
async def lanes(tokendb_clean: str, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    with db_settings(coalesce_charges=request.param):
        yield tokendb_clean


async def limited_key(
    make_api_key, limit: int, period: str = "day", *, balance: int = 10_000
) -> tokendb.ApiKey:
    key, _ = await make_api_key(token_limit=limit, limit_period=period)
    await tokendb.top_up(user=key.user_id, amount=balance)
    return key


async def charge(key: tokendb.ApiKey, amount: int) -> tokendb.TokenTransaction:
    return await tokendb.charge(user=key.user_id, amount=amount, api_key=key, model="m")


# --- the race ---------------------------------------------------------------------------


async def test_fifty_concurrent_charges_of_five_against_a_limit_of_100_give_twenty(
    lanes: str, make_api_key
) -> None:
    key = await limited_key(make_api_key, 100)
    _limits_sql.remember(key.id, limited=False)  # the route unknown: the batch finds the limit
    balance = await tokendb.get_balance(user=key.user_id)
    results = await asyncio.gather(*(charge(key, 5) for _ in range(50)), return_exceptions=True)
    moved = [r for r in results if isinstance(r, tokendb.TokenTransaction)]
    refused = [r for r in results if isinstance(r, tokendb.KeyLimitExceeded)]
    assert (len(moved), len(refused)) == (20, 30), results
    assert {(e.limit, e.used, e.requested, e.period) for e in refused} == {
        (100, 100, 5, LimitPeriod.DAY)
    }
    assert await tokendb.get_balance(user=key.user_id) == balance - 100


async def test_concurrent_messages_through_a_limited_key_stop_at_the_limit(
    tokendb_clean: str, make_api_key
) -> None:
    key = await limited_key(make_api_key, 10)
    session = await tokendb.start_chat(api_key=key, model="m")
    results = await asyncio.gather(
        *(
            tokendb.add_message(session=session, role=MessageRole.USER, content="x", tokens=1)
            for _ in range(25)
        ),
        return_exceptions=True,
    )
    assert sum(isinstance(r, tokendb.ChatMessage) for r in results) == 10, results
    assert sum(isinstance(r, tokendb.KeyLimitExceeded) for r in results) == 15
    assert (await tokendb.get_chat(session=session)).tokens_used == 10


# --- the decision -----------------------------------------------------------------------


async def test_a_refused_charge_carries_the_facts_and_writes_nothing(
    lanes: str, make_api_key
) -> None:
    key = await limited_key(make_api_key, 100, "month")
    await charge(key, 60)
    before = await table_counts()
    with pytest.raises(tokendb.KeyLimitExceeded) as info:
        await charge(key, 41)
    assert (info.value.limit, info.value.used, info.value.requested) == (100, 60, 41)
    assert info.value.period is LimitPeriod.MONTH and info.value.api_key_id == key.id
    assert status_code_for(info.value) == 429
    assert await table_counts() == before
    await charge(key, 40)  # exactly to the limit
    with pytest.raises(tokendb.KeyLimitExceeded):
        await charge(key, 1)
    # Keyless charges and other keys of the user are not this key's.
    await tokendb.charge(user=key.user_id, amount=500)
    other, _ = await tokendb.issue_api_key(user=key.user_id, name="other")
    await tokendb.charge(user=key.user_id, amount=500, api_key=other)


async def test_a_repeated_reference_is_a_repeat_not_a_refusal(lanes: str, make_api_key) -> None:
    key = await limited_key(make_api_key, 10)
    reference = uuid.uuid4()
    first = await tokendb.charge(user=key.user_id, amount=10, api_key=key, reference_id=reference)
    again = await tokendb.charge(user=key.user_id, amount=10, api_key=key, reference_id=reference)
    assert again.id == first.id


async def test_a_refund_gives_the_window_its_tokens_back(lanes: str, make_api_key) -> None:
    key = await limited_key(make_api_key, 100)
    tx = await charge(key, 100)
    with pytest.raises(tokendb.KeyLimitExceeded) as info:
        await charge(key, 1)
    assert info.value.used == 100
    await tokendb.refund(transaction=tx, amount=30)
    await charge(key, 30)
    with pytest.raises(tokendb.KeyLimitExceeded) as info:
        await charge(key, 1)
    assert info.value.used == 100


async def test_a_short_balance_is_insufficient_tokens_within_the_limit(
    lanes: str, make_api_key
) -> None:
    key = await limited_key(make_api_key, 10**9, balance=20)
    balance = await tokendb.get_balance(user=key.user_id)
    with pytest.raises(tokendb.InsufficientTokens) as info:
        await charge(key, balance + 1)
    assert (info.value.balance, info.value.requested) == (balance, balance + 1)


async def test_a_limited_key_of_another_user_is_not_found(
    lanes: str, make_api_key, make_user
) -> None:
    key = await limited_key(make_api_key, 100)
    other = await make_user()
    await tokendb.top_up(user=other, amount=100)
    before = await table_counts()
    for known in (False, True):
        _limits_sql.remember(key.id, limited=known)  # either route
        with pytest.raises(tokendb.NotFound) as info:
            await tokendb.charge(user=other, amount=5, api_key=key)
        assert (info.value.entity, info.value.key) == ("API key", key.id)
    assert await table_counts() == before


async def test_charge_many_decides_a_limited_items_alone(tokendb_clean: str, make_api_key) -> None:
    key = await limited_key(make_api_key, 12)
    _limits_sql.remember(key.id, limited=False)
    results = await tokendb.charge_many(
        items=[{"user": key.user_id, "amount": 5, "api_key": key} for _ in range(3)]
        + [{"user": key.user_id, "amount": 7}]
    )
    assert [type(r).__name__ for r in results] == [
        "TokenTransaction",
        "TokenTransaction",
        "KeyLimitExceeded",
        "TokenTransaction",
    ]


# --- windows ----------------------------------------------------------------------------


async def test_a_day_window_starts_at_midnight_utc(lanes: str, make_api_key) -> None:
    key = await limited_key(make_api_key, 100)
    await charge(key, 80)
    await shift_history(lanes, key.user_id, to=midnight())  # today's first microsecond
    with pytest.raises(tokendb.KeyLimitExceeded) as info:
        await charge(key, 21)
    assert info.value.used == 80
    await shift_history(lanes, key.user_id, to=midnight() - dt.timedelta(microseconds=1))
    await charge(key, 100)  # yesterday's 80 are yesterday's


async def test_a_month_window_starts_on_the_first_utc(lanes: str, make_api_key) -> None:
    key = await limited_key(make_api_key, 100, "month")
    await charge(key, 80)
    first = midnight().replace(day=1)
    await shift_history(lanes, key.user_id, to=first)
    with pytest.raises(tokendb.KeyLimitExceeded) as info:
        await charge(key, 21)
    assert info.value.used == 80
    await shift_history(lanes, key.user_id, to=first - dt.timedelta(microseconds=1))
    await charge(key, 100)


async def test_a_total_window_never_ends(lanes: str, make_api_key) -> None:
    key = await limited_key(make_api_key, 100, "total")
    await charge(key, 80)
    await shift_history(lanes, key.user_id, days=400)
    with pytest.raises(tokendb.KeyLimitExceeded) as info:
        await charge(key, 21)
    assert (info.value.used, info.value.period) == (80, LimitPeriod.TOTAL)


# --- messages ---------------------------------------------------------------------------


async def test_a_message_past_its_keys_limit_is_refused_and_nothing_is_stored(
    tokendb_clean: str, make_api_key
) -> None:
    key = await limited_key(make_api_key, 10)
    session = await tokendb.start_chat(api_key=key, model="m")
    await tokendb.add_message(session=session, role=MessageRole.USER, content="a", tokens=7)
    before = await table_counts()
    with pytest.raises(tokendb.KeyLimitExceeded) as info:
        await tokendb.add_message(session=session, role=MessageRole.USER, content="b", tokens=4)
    assert (info.value.used, info.value.requested, info.value.limit) == (7, 4, 10)
    assert await table_counts() == before
    await tokendb.add_message(session=session, role=MessageRole.USER, content="c", tokens=3)
    await tokendb.add_message(session=session, role=MessageRole.USER, content="d", tokens=0)
    await tokendb.end_chat(session=session)
    with pytest.raises(tokendb.ChatSessionEnded):
        await tokendb.add_message(session=session, role=MessageRole.USER, content="e", tokens=1)


# --- setting limits ---------------------------------------------------------------------


async def test_set_api_key_limit_takes_effect(lanes: str, make_api_key) -> None:
    key, _ = await make_api_key()
    assert (key.token_limit, key.limit_period) == (None, None)
    await tokendb.top_up(user=key.user_id, amount=1000)
    await charge(key, 50)
    changed = await tokendb.set_api_key_limit(api_key=key, token_limit=60, limit_period="day")
    assert (changed.token_limit, changed.limit_period) == (60, LimitPeriod.DAY)
    with pytest.raises(tokendb.KeyLimitExceeded) as info:
        await charge(key, 20)
    assert info.value.used == 50
    await tokendb.set_api_key_limit(api_key=key, token_limit=70, limit_period=LimitPeriod.DAY)
    await charge(key, 20)
    removed = await tokendb.set_api_key_limit(api_key=key, token_limit=None, limit_period=None)
    assert (removed.token_limit, removed.limit_period) == (None, None)  # type: ignore[comparison-overlap]
    await charge(key, 500)


async def test_a_limit_set_or_removed_here_routes_the_next_charge_without_a_wasted_statement(
    tokendb_clean: str, make_api_key
) -> None:
    """set_api_key_limit tells this process which path the key's movements take:
    the next charge does not first send the unlimited statement only to be refused
    (a limit just set), nor take the key's lock for nothing (a limit just removed)."""
    key, _ = await make_api_key()
    await tokendb.top_up(user=key.user_id, amount=1000)
    with db_settings(coalesce_charges=False):
        await tokendb.set_api_key_limit(api_key=key, token_limit=500, limit_period="day")
        with statements_sent() as first:
            await charge(key, 1)
        with statements_sent() as known:
            await charge(key, 1)  # decided under the key's lock: the process knows by now
        assert len(first) == len(known) > 1, (first, known)
        await tokendb.set_api_key_limit(api_key=key, token_limit=None, limit_period=None)
        with statements_sent() as sent:
            await charge(key, 1)
        assert len(sent) == 1, sent


async def test_another_process_setting_a_limit_is_honoured(
    tokendb_clean: str, make_api_key
) -> None:
    """This process believes the key unlimited; the database knows better."""
    key, _ = await make_api_key()
    await tokendb.top_up(user=key.user_id, amount=1000)
    await tokendb.set_api_key_limit(api_key=key, token_limit=10, limit_period="total")
    _limits_sql.remember(key.id, limited=False)
    with pytest.raises(tokendb.KeyLimitExceeded):
        await charge(key, 11)
    session = await tokendb.start_chat(api_key=key, model="m")
    with pytest.raises(tokendb.KeyLimitExceeded):
        await tokendb.add_message(session=session, role=MessageRole.USER, content="x", tokens=11)


@pytest.mark.parametrize(
    ("limit", "period", "field"),
    [
        (10, None, "limit_period"),
        (None, "day", "token_limit"),
        (0, "day", "token_limit"),
        (-5, "day", "token_limit"),
        (2**63, "day", "token_limit"),
        (True, "day", "token_limit"),
        (1.5, "day", "token_limit"),
        (10, "week", "limit_period"),
        (10, 3, "limit_period"),
    ],
)
async def test_bad_limits_are_refused(
    tokendb_clean: str, make_api_key, limit: object, period: object, field: str
) -> None:
    key, _ = await make_api_key()
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.set_api_key_limit(api_key=key, token_limit=limit, limit_period=period)  # type: ignore[arg-type]
    assert info.value.field == field
    with pytest.raises(tokendb.ValidationError) as info:
        await make_api_key(token_limit=limit, limit_period=period)
    assert info.value.field == field


async def test_the_largest_limit_fits_and_an_unknown_key_is_not_found(
    tokendb_clean: str, make_api_key
) -> None:
    key, _ = await make_api_key(token_limit=2**63 - 1, limit_period="total")
    assert key.token_limit == 2**63 - 1
    await tokendb.top_up(user=key.user_id, amount=10)
    await charge(key, 10)
    unknown = uuid.uuid4()
    with pytest.raises(tokendb.NotFound):
        await tokendb.set_api_key_limit(api_key=unknown, token_limit=1, limit_period="day")


# --- holds ------------------------------------------------------------------------------


async def test_a_keys_active_holds_count_against_its_limit(lanes: str, make_api_key) -> None:
    key = await limited_key(make_api_key, 100)
    held = await tokendb.hold(user=key.user_id, amount=60, ttl=60, api_key=key, model="m")
    assert (held.api_key_id, held.model) == (key.id, "m")
    before = await table_counts()
    with pytest.raises(tokendb.KeyLimitExceeded) as info:
        await charge(key, 41)
    assert (info.value.used, info.value.requested) == (60, 41)
    with pytest.raises(tokendb.KeyLimitExceeded):
        await tokendb.hold(user=key.user_id, amount=41, ttl=60, api_key=key)
    assert await table_counts() == before
    await charge(key, 40)
    await tokendb.release(hold=held)
    await charge(key, 60)
    with pytest.raises(tokendb.KeyLimitExceeded):
        await tokendb.hold(user=key.user_id, amount=1, ttl=60, api_key=key)


async def test_an_expired_hold_no_longer_counts(tokendb_clean: str, make_api_key) -> None:
    from tests.test_holds import expire_now

    key = await limited_key(make_api_key, 100)
    held = await tokendb.hold(user=key.user_id, amount=100, ttl=60, api_key=key)
    with pytest.raises(tokendb.KeyLimitExceeded):
        await charge(key, 1)
    await expire_now(tokendb_clean, held)
    await charge(key, 100)


async def test_a_capture_bills_the_holds_key_and_is_never_refused_by_its_limit(
    tokendb_clean: str, make_api_key
) -> None:
    key = await limited_key(make_api_key, 100)
    held = await tokendb.hold(user=key.user_id, amount=80, ttl=60, api_key=key, model="m")
    await tokendb.set_api_key_limit(api_key=key, token_limit=10, limit_period="day")
    tx = await tokendb.capture(hold=held, amount=70)
    assert (tx.api_key_id, tx.model, tx.amount) == (key.id, "m", -70)
    report = await tokendb.usage_report(
        user=key.user_id, since=midnight(), until=midnight() + dt.timedelta(days=1)
    )
    assert [(r.api_key_id, r.model, r.tokens) for r in report] == [(key.id, "m", 70)]
    with pytest.raises(tokendb.KeyLimitExceeded) as info:
        await charge(key, 1)
    assert info.value.used == 70


async def test_concurrent_holds_through_a_limited_key_stop_at_the_limit(
    tokendb_clean: str, make_api_key
) -> None:
    key = await limited_key(make_api_key, 100)
    _limits_sql.remember(key.id, limited=False)
    results = await asyncio.gather(
        *(tokendb.hold(user=key.user_id, amount=5, ttl=60, api_key=key) for _ in range(30)),
        *(charge(key, 5) for _ in range(10)),
        return_exceptions=True,
    )
    passed = [r for r in results if isinstance(r, (tokendb.TokenHold, tokendb.TokenTransaction))]
    assert len(passed) == 20, results
    assert all(isinstance(r, tokendb.KeyLimitExceeded) for r in results if r not in passed)


async def test_a_hold_through_another_users_key_is_not_found(
    tokendb_clean: str, make_api_key, make_user
) -> None:
    key = await limited_key(make_api_key, 100)
    plain, _ = await make_api_key()
    other = await make_user()
    before = await table_counts()
    for api_key in (key, plain):
        with pytest.raises(tokendb.NotFound) as info:
            await tokendb.hold(user=other, amount=5, ttl=60, api_key=api_key)
        assert (info.value.entity, info.value.key) == ("API key", api_key.id)
    assert await table_counts() == before


async def test_the_database_refuses_a_hold_on_another_users_key(
    app_raw, make_api_key, make_user
) -> None:
    """Going around tokendb as the application role: a hold cannot count against a
    key of another user (token_holds_api_key_owner)."""
    import asyncpg

    key, _ = await make_api_key()
    other = await make_user()
    with pytest.raises(asyncpg.ForeignKeyViolationError) as info:
        await app_raw.execute(
            "WITH r AS (UPDATE users SET held_tokens = held_tokens + 5 WHERE id = $1) "
            "INSERT INTO token_holds (id, user_id, amount, status, expires_at, created_at, "
            "api_key_id) VALUES ($2, $1, 5, 'active', now() + interval '1 minute', now(), $3)",
            other.id,
            uuid.uuid4(),
            key.id,
        )
    assert info.value.constraint_name == "token_holds_api_key_owner"


async def test_a_message_through_a_limited_key_captures_only_a_hold_made_through_that_key(
    tokendb_clean: str, make_api_key
) -> None:
    """A hold made without the key was never counted against its limit, so capturing it
    through a limited key's session would spend past the limit: refused, nothing written.
    A hold made through the key (counted when it was made) is captured as usual."""
    key = await limited_key(make_api_key, 10)
    session = await tokendb.start_chat(api_key=key, model="m")
    keyless = await tokendb.hold(user=key.user_id, amount=50, ttl=60)
    before = await table_counts()
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.add_message(
            session=session, role=MessageRole.ASSISTANT, content="x", tokens=50, hold=keyless
        )
    assert info.value.field == "hold"
    assert await table_counts() == before
    await tokendb.release(hold=keyless)
    held = await tokendb.hold(user=key.user_id, amount=10, ttl=60, api_key=key, model="m")
    message = await tokendb.add_message(
        session=session, role=MessageRole.ASSISTANT, content="y", tokens=10, hold=held
    )
    assert message.tokens == 10
    with pytest.raises(tokendb.KeyLimitExceeded):
        await charge(key, 1)


async def test_a_limited_charge_holding_its_key_lets_a_foreign_key_check_of_it_through(
    tokendb_clean: str, make_api_key
) -> None:
    """A limited charge locks its key, then waits for its user's row; the transaction
    holding that row (a chat message billed through the key, say) then writes a ledger
    row naming the key, whose foreign key check locks the key FOR KEY SHARE. With the
    key locked FOR UPDATE that was a deadlock (tests/test_stress.py, hot users)."""
    key = await limited_key(make_api_key, 1_000)
    async with holding_row_lock(tokendb_clean, key.user_id) as other:
        charging = asyncio.ensure_future(charge(key, 5))
        await blocked_backends(other, like="%FROM users WHERE id = $1 FOR UPDATE%")
        # The lock a foreign key check of a ledger row naming the key takes: granted
        # at once (NOWAIT: no waiting until deadlock detection picks a victim).
        await other.execute("SELECT 1 FROM api_keys WHERE id = $1 FOR KEY SHARE NOWAIT", key.id)
    assert (await charging).amount == -5
