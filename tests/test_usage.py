"""Tests for usage per key and model (issue 14): what ledger rows record, the daily rollup,
usage_report and audit_usage, and the rollup's backstops against a DML-only client."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

import tokendb
from tests.helpers import table_counts, tamper
from tokendb import _ledger_sql
from tokendb.models import MessageRole, TransactionType

UTC = dt.UTC


def today() -> dt.date:
    return dt.datetime.now(UTC).date()


def tomorrow() -> dt.date:
    return today() + dt.timedelta(days=1)


@contextlib.contextmanager
def refused(constraint: str) -> Iterator[None]:
    with pytest.raises(asyncpg.PostgresError) as info:
        yield
    assert getattr(info.value, "constraint_name", None) == constraint, repr(info.value)


async def rollup(url: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT user_id, api_key_id, model, day, tokens, requests FROM usage_daily "
            "ORDER BY user_id, day, api_key_id NULLS FIRST, model NULLS FIRST"
        )
    finally:
        await conn.close()
    return [tuple(row) for row in rows]


# --- what a usage row records -----------------------------------------------------------


async def test_a_charge_records_its_key_and_model(tokendb_clean: str, make_api_key) -> None:
    key, _ = await make_api_key()
    tx = await tokendb.charge(user=key.user_id, amount=30, api_key=key, model="gpt-x")
    assert (tx.api_key_id, tx.model) == (key.id, "gpt-x")
    plain = await tokendb.charge(user=key.user_id, amount=5)
    assert (plain.api_key_id, plain.model) == (None, None)
    assert await rollup(tokendb_clean) == [
        (key.user_id, None, None, today(), 5, 1),
        (key.user_id, key.id, "gpt-x", today(), 30, 1),
    ]


async def test_a_key_of_another_user_is_not_found_and_nothing_is_written(
    tokendb_clean: str, make_api_key, make_user
) -> None:
    key, _ = await make_api_key()
    other = await make_user()
    before = await table_counts()
    with pytest.raises(tokendb.NotFound) as info:
        await tokendb.charge(user=other, amount=5, api_key=key, model="m")
    assert (info.value.entity, info.value.key) == ("API key", key.id)
    unknown = uuid.uuid4()
    with pytest.raises(tokendb.NotFound):
        await tokendb.charge(user=other, amount=5, api_key=unknown)
    results = await tokendb.charge_many(
        items=[
            {"user": other, "amount": 5, "api_key": key},
            {"user": other, "amount": 6, "api_key": unknown},
        ]
    )
    assert [type(result) for result in results] == [tokendb.NotFound, tokendb.NotFound]
    assert await table_counts() == before
    with pytest.raises(tokendb.NotFound):
        await tokendb.usage_report(user=other, since=today(), until=tomorrow(), api_key=key)


async def test_coalesced_charges_record_their_keys(tokendb_clean: str, make_api_key) -> None:
    key, _ = await make_api_key()
    other, _ = await make_api_key()
    stranger = other  # a key of another user, in the same batch
    await tokendb.top_up(user=key.user_id, amount=1000)
    results = await asyncio.gather(
        *(
            tokendb.charge(user=key.user_id, amount=i + 1, api_key=key, model=f"m{i % 2}")
            for i in range(10)
        ),
        tokendb.charge(user=key.user_id, amount=1, api_key=stranger),
        return_exceptions=True,
    )
    assert isinstance(results[-1], tokendb.NotFound)
    assert all(row.api_key_id == key.id for row in results[:-1])  # type: ignore[union-attr]
    report = await tokendb.usage_report(
        user=key.user_id, since=today(), until=tomorrow(), group_by=("model",)
    )
    assert [(r.model, r.tokens, r.requests) for r in report] == [("m0", 25, 5), ("m1", 30, 5)]


async def test_a_chat_message_records_its_sessions_key_and_model(
    tokendb_clean: str, make_api_key
) -> None:
    key, _ = await make_api_key()
    session = await tokendb.start_chat(api_key=key, model="claude-x")
    await tokendb.add_message(session=session, role=MessageRole.USER, content="hi", tokens=7)
    await tokendb.add_message(session=session, role=MessageRole.ASSISTANT, content="yo", tokens=0)
    rows = await tokendb.list_transactions(user=key.user_id)
    usage = [row for row in rows if row.type is TransactionType.USAGE]
    assert [(row.api_key_id, row.model, row.amount) for row in usage] == [(key.id, "claude-x", -7)]
    report = await tokendb.usage_report(user=key.user_id, since=today(), until=tomorrow())
    assert report == [tokendb.UsageRow(today(), key.id, "claude-x", 7, 1)]


async def test_a_refund_gives_its_charges_group_and_day_the_tokens_back(
    tokendb_clean: str, make_api_key
) -> None:
    key, _ = await make_api_key()
    tx = await tokendb.charge(user=key.user_id, amount=40, api_key=key, model="m")
    # The charge is dated yesterday (moved as the owner, rollup and all).
    yesterday = today() - dt.timedelta(days=1)
    await shift_history(tokendb_clean, key.user_id, days=1)
    back = await tokendb.refund(transaction=tx, amount=15)
    assert (back.api_key_id, back.model) == (key.id, "m")
    report = await tokendb.usage_report(
        user=key.user_id, since=yesterday, until=tomorrow(), group_by=("day",)
    )
    assert [(r.day, r.tokens, r.requests) for r in report] == [(yesterday, 25, 1)]


# --- the report ---------------------------------------------------------------------------


async def test_the_report_groups_filters_and_bounds(tokendb_clean: str, make_api_key) -> None:
    key, _ = await make_api_key()
    user = key.user_id
    await tokendb.top_up(user=user, amount=1000)
    for amount, api_key, model in [
        (10, key, "a"),
        (20, key, "b"),
        (30, None, "a"),
        (40, None, None),
    ]:
        await tokendb.charge(user=user, amount=amount, api_key=api_key, model=model)
    span = {"user": user, "since": today(), "until": tomorrow()}
    assert await tokendb.usage_report(**span, group_by=()) == [
        tokendb.UsageRow(None, None, None, 100, 4)
    ]
    by_key = await tokendb.usage_report(**span, group_by=("api_key",))
    assert [(r.api_key_id, r.tokens) for r in by_key] == [(None, 70), (key.id, 30)]
    assert [(r.model, r.tokens) for r in await tokendb.usage_report(**span, model="a")] == [
        ("a", 30),
        ("a", 10),
    ]
    only_key = await tokendb.usage_report(**span, api_key=key, group_by=("model", "day"))
    assert [(r.day, r.model, r.tokens) for r in only_key] == [
        (today(), "a", 10),
        (today(), "b", 20),
    ]
    midnight = dt.datetime.combine(today(), dt.time(0), UTC)
    assert await tokendb.usage_report(user=user, since=midnight, until=midnight) == []
    assert await tokendb.usage_report(user=user, since=tomorrow(), until=tomorrow()) == []


@pytest.mark.parametrize(
    ("since", "until", "group_by", "field"),
    [
        (dt.datetime(2026, 1, 1, 12, tzinfo=UTC), dt.date(2026, 2, 1), ("day",), "since"),
        (dt.date(2026, 1, 1), dt.datetime(2026, 2, 1), ("day",), "until"),  # naive
        (dt.date(2026, 2, 1), dt.date(2026, 1, 1), ("day",), "since"),
        (dt.date(2026, 1, 1), dt.date(2026, 2, 1), "day", "group_by"),
        (dt.date(2026, 1, 1), dt.date(2026, 2, 1), ("day", "day"), "group_by"),
        (dt.date(2026, 1, 1), dt.date(2026, 2, 1), ("user",), "group_by"),
        ("2026-01-01", dt.date(2026, 2, 1), ("day",), "since"),
    ],
)
async def test_the_report_refuses_bounds_inside_a_day_and_bad_groupings(
    tokendb_clean: str, make_user, since, until, group_by, field
) -> None:
    user = await make_user()
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.usage_report(user=user, since=since, until=until, group_by=group_by)
    assert info.value.field == field


async def test_the_report_of_an_unknown_user_is_not_found(tokendb_clean: str) -> None:
    with pytest.raises(tokendb.NotFound):
        await tokendb.usage_report(user=uuid.uuid4(), since=today(), until=tomorrow())


# --- the rollup follows the ledger, whoever writes it -------------------------------------


async def test_the_application_role_cannot_write_the_rollup(
    app: asyncpg.Connection, make_user
) -> None:
    user = await make_user()
    await tokendb.charge(user=user, amount=5)
    for sql in (
        "UPDATE usage_daily SET tokens = 0",
        "DELETE FROM usage_daily",
        f"INSERT INTO usage_daily VALUES ('{user.id}', NULL, NULL, current_date, 1, 1)",
        "TRUNCATE usage_daily",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.execute(sql)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await app.execute("SELECT tokendb_usage_rollup()")
    assert await tokendb.audit_usage() == []


async def test_raw_usage_rows_of_the_application_role_are_rolled_up(
    app: asyncpg.Connection, make_api_key
) -> None:
    key, _ = await make_api_key()
    await app.execute(
        """
        WITH debit AS (
            UPDATE users SET token_balance = token_balance - 12 WHERE id = $1
            RETURNING token_balance
        )
        INSERT INTO token_transactions (user_id, amount, type, balance_after, api_key_id, model)
        SELECT $1, -12, 'usage', token_balance, $2, 'raw' FROM debit
        """,
        key.user_id,
        key.id,
    )
    report = await tokendb.usage_report(user=key.user_id, since=today(), until=tomorrow())
    assert report == [tokendb.UsageRow(today(), key.id, "raw", 12, 1)]


async def test_a_raw_usage_row_with_another_users_key_is_refused(
    app: asyncpg.Connection, make_api_key, make_user
) -> None:
    key, _ = await make_api_key()
    other = await make_user()
    with refused("token_transactions_api_key_owner"):
        await app.execute(
            """
            WITH debit AS (
                UPDATE users SET token_balance = token_balance - 1 WHERE id = $1
                RETURNING token_balance
            )
            INSERT INTO token_transactions (user_id, amount, type, balance_after, api_key_id)
            SELECT $1, -1, 'usage', token_balance, $2 FROM debit
            """,
            other.id,
            key.id,
        )


async def test_a_raw_refund_must_carry_its_charges_key_and_model(
    app: asyncpg.Connection, make_api_key
) -> None:
    key, _ = await make_api_key()
    tx = await tokendb.charge(user=key.user_id, amount=10, api_key=key, model="m")
    for api_key_id, model in [(None, "m"), (key.id, None), (key.id, "other")]:
        with refused("token_transactions_refund_attribution"):
            await app.execute(
                """
                WITH credit AS (
                    UPDATE users SET token_balance = token_balance + 4 WHERE id = $1
                    RETURNING token_balance
                )
                INSERT INTO token_transactions
                    (user_id, amount, type, reference_id, balance_after, api_key_id, model)
                SELECT $1, 4, 'refund', $2, token_balance, $3, $4 FROM credit
                """,
                key.user_id,
                tx.id,
                api_key_id,
                model,
            )


async def test_a_top_up_records_no_key_and_no_model(app: asyncpg.Connection, make_api_key) -> None:
    key, _ = await make_api_key()
    with refused("token_transactions_attribution"):
        await app.execute(
            """
            WITH credit AS (
                UPDATE users SET token_balance = token_balance + 4 WHERE id = $1
                RETURNING token_balance
            )
            INSERT INTO token_transactions (user_id, amount, type, balance_after, api_key_id)
            SELECT $1, 4, 'topup', token_balance, $2 FROM credit
            """,
            key.user_id,
            key.id,
        )


async def test_audit_usage_finds_a_rollup_that_left_the_ledger(
    tokendb_clean: str, make_api_key
) -> None:
    key, _ = await make_api_key()
    await tokendb.charge(user=key.user_id, amount=9, api_key=key, model="m")
    assert await tokendb.audit_usage() == []
    await tamper(tokendb_clean, "UPDATE usage_daily SET tokens = tokens + 1, requests = 3")
    found = await tokendb.audit_usage(user=key.user_id)
    assert found == [tokendb.UsageDiscrepancy(key.user_id, key.id, "m", today(), 10, 3, 9, 1)]
    await tamper(tokendb_clean, "DELETE FROM usage_daily")
    assert [(d.tokens, d.ledger_tokens) for d in await tokendb.audit_usage()] == [(0, 9)]
    await rebuild_rollup(tokendb_clean)
    assert await tokendb.audit_usage() == []


async def test_one_users_usage_audit_reads_only_that_users_rows_whatever_the_plan(
    tokendb_clean: str, make_api_key
) -> None:
    """As audit_ledger's: the per-user usage audit is its own statement, so even the
    generic plan of a prepared statement finds the user's ledger rows and rollup rows
    through their indexes instead of reading everyone's."""
    key, _ = await make_api_key()
    conn = await asyncpg.connect(tokendb_clean)
    try:
        await conn.execute("SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off")
        await conn.execute(f"PREPARE audit_usage_user(uuid) AS {_ledger_sql.AUDIT_USAGE_USER}")
        plan = "\n".join(
            row[0] for row in await conn.fetch(f"EXPLAIN EXECUTE audit_usage_user('{key.user_id}')")
        )
    finally:
        await conn.close()
    assert "token_transactions_user_seq_key" in plan, plan
    assert "usage_daily_group_key" in plan, plan
    assert plan.count("Index Cond: (user_id = $1)") == 2, plan


# --- helpers: time under the test's control ----------------------------------------------

REBUILD = """
DELETE FROM usage_daily;
INSERT INTO usage_daily (user_id, api_key_id, model, day, tokens, requests)
SELECT t.user_id,
       CASE t.type WHEN 'refund' THEN c.api_key_id ELSE t.api_key_id END,
       CASE t.type WHEN 'refund' THEN c.model ELSE t.model END,
       (CASE t.type WHEN 'refund' THEN c.created_at ELSE t.created_at END AT TIME ZONE 'UTC')::date,
       -sum(t.amount), count(*) FILTER (WHERE t.type = 'usage')
FROM token_transactions t
LEFT JOIN token_transactions c ON t.type = 'refund' AND c.id = t.reference_id
WHERE t.type IN ('usage', 'refund')
GROUP BY 1, 2, 3, 4
"""


async def rebuild_rollup(url: str) -> None:
    """The rollup recomputed from the ledger, as the owner."""
    await tamper(url, REBUILD)


async def shift_history(
    url: str, user_id: uuid.UUID, *, days: int = 0, to: dt.datetime | None = None
) -> None:
    """Move all of ``user_id``'s ledger rows back in time, as the owner: by ``days``,
    or so that the newest lands at ``to``; their order is kept and the rollup follows."""
    conn = await asyncpg.connect(url)
    try:
        newest = await conn.fetchval(
            "SELECT max(created_at) FROM token_transactions WHERE user_id = $1", user_id
        )
    finally:
        await conn.close()
    delta = dt.timedelta(days=days) if to is None else newest - to
    await tamper(
        url,
        "UPDATE token_transactions SET created_at = created_at - $2::interval WHERE user_id = $1",
        user_id,
        delta,
    )
    await rebuild_rollup(url)


# --- the report against a Python model ----------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_CHARGES = st.lists(
    st.tuples(
        st.sampled_from([None, 0, 1]),  # which key
        st.sampled_from([None, "a", "b"]),  # which model
        st.integers(1, 50),  # tokens
        st.integers(0, 50),  # refunded of them (0: none)
        st.booleans(),  # charged on the earlier day
    ),
    max_size=12,
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(charges=_CHARGES, data=st.data())
async def test_the_report_is_what_a_python_model_of_the_ledger_says(
    tokendb_clean: str, make_api_key, charges, data: st.DataObject
) -> None:
    first, _ = await make_api_key()
    user = first.user_id
    second, _ = await tokendb.issue_api_key(user=user, name="second")
    keys = [first.id, second.id]
    await tokendb.top_up(user=user, amount=10_000)
    earlier = sorted(charges, key=lambda c: not c[4])  # the earlier day's first
    expected: dict[tuple[dt.date, uuid.UUID | None, str | None], list[int]] = {}
    shifted = False
    for key, model, tokens, refunded, early in earlier:
        if not early and not shifted:
            await shift_history(tokendb_clean, user, days=2)  # what came before: 2 days ago
            shifted = True
        key_id = None if key is None else keys[key]
        tx = await tokendb.charge(user=user, amount=tokens, api_key=key_id, model=model)
        if 0 < refunded <= tokens:
            await tokendb.refund(transaction=tx, amount=refunded)
        day = today() - dt.timedelta(days=2 if early else 0)
        group = expected.setdefault((day, key_id, model), [0, 0])
        group[0] += tokens - (refunded if 0 < refunded <= tokens else 0)
        group[1] += 1
    if not shifted and any(c[4] for c in charges):
        await shift_history(tokendb_clean, user, days=2)
    group_by = tuple(data.draw(st.sets(st.sampled_from(tokendb.usage.GROUPINGS)), label="by"))
    only_key = data.draw(st.sampled_from([None, *keys]), label="api_key")
    only_model = data.draw(st.sampled_from([None, "a", "b"]), label="model")
    since = today() - dt.timedelta(days=data.draw(st.integers(0, 3), label="since"))
    model_rows: dict[tuple[object, ...], list[int]] = {}
    for (day, key_id, model), (tokens, requests) in expected.items():
        if not since <= day < tomorrow():
            continue
        if (only_key is not None and key_id != only_key) or (
            only_model is not None and model != only_model
        ):
            continue
        shown = (
            day if "day" in group_by else None,
            key_id if "api_key" in group_by else None,
            model if "model" in group_by else None,
        )
        row = model_rows.setdefault(shown, [0, 0])
        row[0] += tokens
        row[1] += requests
    report = await tokendb.usage_report(
        user=user,
        since=since,
        until=tomorrow(),
        group_by=group_by,
        api_key=only_key,
        model=only_model,
    )
    assert {(r.day, r.api_key_id, r.model): [r.tokens, r.requests] for r in report} == model_rows
    assert len(report) == len(model_rows)
