"""Tests for tokendb.ledger: movements, idempotency, refunds, pagination, audit."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import asyncpg
import pytest
from tortoise.exceptions import IntegrityError

import tokendb
from tests.helpers import (
    after_statement,
    blocked_backends,
    db_settings,
    holding_row_lock,
    row_is_locked,
    statements_sent,
    table_counts,
    tamper,
)
from tokendb import _db, _ledger_sql
from tokendb.models import TransactionType

INT4_MAX = 2**31 - 1


async def test_charge_debits_and_records_a_usage_row(tokendb_clean: str, make_user) -> None:
    user = await make_user()
    tx = await tokendb.charge(user=user, amount=40, description="completion")
    assert (tx.type, tx.amount, tx.balance_after) == (TransactionType.USAGE, -40, 60)
    assert tx.description == "completion" and tx.user_id == user.id
    assert await tokendb.get_balance(user=user) == 60
    stored = await tokendb.get_user(user_id=user.id)
    assert stored.updated_at > user.updated_at  # set by hand: QuerySet.update skips auto_now


@pytest.mark.parametrize(
    ("operation", "kind", "sign"),
    [
        (tokendb.top_up, TransactionType.TOPUP, 1),
        (tokendb.grant_bonus, TransactionType.BONUS, 1),
        (tokendb.charge, TransactionType.USAGE, -1),
    ],
)
async def test_each_movement_type(tokendb_clean: str, make_user, operation, kind, sign) -> None:
    user = await make_user()
    tx = await operation(user=user.id, amount=25)
    assert (tx.type, tx.amount, tx.balance_after) == (kind, sign * 25, 100 + sign * 25)
    assert await tokendb.get_balance(user=str(user.id)) == 100 + sign * 25


async def test_insufficient_tokens_writes_nothing(tokendb_clean: str, make_user) -> None:
    user = await make_user()
    before = await table_counts()
    with pytest.raises(tokendb.InsufficientTokens) as info:
        await tokendb.charge(user=user, amount=101)
    assert (info.value.user_id, info.value.balance, info.value.requested) == (user.id, 100, 101)
    assert await table_counts() == before
    await tokendb.charge(user=user, amount=100)  # exactly the balance is fine
    assert await tokendb.get_balance(user=user) == 0


@pytest.mark.parametrize(
    "amount", [0, -1, -100, 1.5, 2.0, True, False, "10", None, INT4_MAX + 1, 10**30]
)
@pytest.mark.parametrize("operation", [tokendb.charge, tokendb.top_up, tokendb.grant_bonus])
async def test_bad_amounts_are_rejected_before_writing(
    tokendb_clean: str, make_user, operation, amount: object
) -> None:
    user = await make_user()
    before = await table_counts()
    with pytest.raises(tokendb.ValidationError) as info:
        await operation(user=user, amount=amount)
    assert info.value.field == "amount"
    assert await table_counts() == before


async def test_a_credit_that_would_overflow_the_balance_is_rejected(
    tokendb_clean: str, make_user
) -> None:
    user = await make_user()
    await tokendb.top_up(user=user, amount=INT4_MAX - 100)
    before = await table_counts()
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.top_up(user=user, amount=1)
    assert info.value.field == "amount"
    assert await table_counts() == before


async def test_unknown_user(tokendb_clean: str) -> None:
    missing = uuid.uuid4()
    for operation in (tokendb.charge, tokendb.top_up, tokendb.grant_bonus):
        with pytest.raises(tokendb.NotFound) as info:
            await operation(user=missing, amount=1)
        assert info.value.key == missing
    with pytest.raises(tokendb.NotFound):
        await tokendb.get_balance(user=missing)
    with pytest.raises(tokendb.NotFound):
        await tokendb.list_transactions(user=missing)
    assert (await table_counts())["token_transactions"] == 0


@pytest.mark.parametrize("operation", [tokendb.charge, tokendb.top_up, tokendb.grant_bonus])
async def test_a_repeat_with_the_same_reference_moves_once(
    tokendb_clean: str, make_user, operation
) -> None:
    user = await make_user()
    reference = uuid.uuid4()
    first = await operation(user=user, amount=10, reference_id=reference)
    again = await operation(user=user, amount=10, reference_id=str(reference))
    assert again.id == first.id and again.reference_id == reference
    assert len(await tokendb.list_transactions(user=user)) == 2  # signup bonus + one movement
    before = await table_counts()
    with pytest.raises(tokendb.ReferenceConflict) as info:
        await operation(user=user, amount=11, reference_id=reference)
    assert (info.value.reference_id, info.value.existing_amount, info.value.requested_amount) == (
        reference,
        10,
        11,
    )
    assert await table_counts() == before


async def test_a_repeat_returns_the_original_even_when_the_balance_is_now_short(
    tokendb_clean: str, make_user
) -> None:
    user = await make_user()
    reference = uuid.uuid4()
    first = await tokendb.charge(user=user, amount=100, reference_id=reference)
    assert (await tokendb.charge(user=user, amount=100, reference_id=reference)).id == first.id


async def test_references_are_scoped_by_user_and_type(tokendb_clean: str, make_user) -> None:
    alice, bob = await make_user(), await make_user()
    reference = uuid.uuid4()
    a = await tokendb.charge(user=alice, amount=5, reference_id=reference)
    b = await tokendb.charge(user=bob, amount=5, reference_id=reference)
    c = await tokendb.top_up(user=alice, amount=5, reference_id=reference)
    assert len({a.id, b.id, c.id}) == 3


async def test_refund_full_partial_and_never_more_than_charged(
    tokendb_clean: str, make_user
) -> None:
    user = await make_user()
    charge = await tokendb.charge(user=user, amount=30)
    part = await tokendb.refund(transaction=charge, amount=10)
    assert (part.type, part.amount, part.reference_id) == (TransactionType.REFUND, 10, charge.id)
    assert part.balance_after == 80
    before = await table_counts()
    with pytest.raises(tokendb.RefundExceedsCharge) as info:
        await tokendb.refund(transaction=charge.id, amount=21)
    assert (info.value.transaction_id, info.value.refundable, info.value.requested) == (
        charge.id,
        20,
        21,
    )
    assert await table_counts() == before
    assert part.description == f"refund of {charge.id}"
    rest = await tokendb.refund(transaction=str(charge.id), description="goodwill")
    assert rest.amount == 20 and rest.balance_after == 100
    assert rest.description == "goodwill"
    with pytest.raises(tokendb.RefundExceedsCharge) as nothing_left:
        await tokendb.refund(transaction=charge)
    assert nothing_left.value.refundable == 0
    assert str(nothing_left.value) == f"transaction {charge.id} is already fully refunded"


async def test_only_usage_rows_are_refundable(tokendb_clean: str, make_user) -> None:
    user = await make_user()
    topup = await tokendb.top_up(user=user, amount=5)
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.refund(transaction=topup)
    assert info.value.field == "transaction"
    charge = await tokendb.charge(user=user, amount=5)
    refund = await tokendb.refund(transaction=charge)
    with pytest.raises(tokendb.ValidationError):
        await tokendb.refund(transaction=refund)
    with pytest.raises(tokendb.NotFound):
        await tokendb.refund(transaction=uuid.uuid4())
    for amount in (0, -3, 2.5, True):
        with pytest.raises(tokendb.ValidationError):
            await tokendb.refund(transaction=charge, amount=amount)  # type: ignore[arg-type]


async def test_a_refund_cannot_target_another_users_charge(tokendb_clean: str, make_user) -> None:
    alice, bob = await make_user(), await make_user()
    charge = await tokendb.charge(user=alice, amount=10)
    before = await table_counts()
    with pytest.raises(tokendb.NotFound):
        await tokendb.refund(transaction=charge, user=bob)
    assert await table_counts() == before
    refund = await tokendb.refund(transaction=charge, user=alice)
    assert refund.user_id == alice.id


async def test_list_transactions_is_newest_first_with_keyset_pages(
    tokendb_clean: str, make_user
) -> None:
    user = await make_user()
    for amount in range(1, 8):
        await tokendb.top_up(user=user, amount=amount)
    everything = await tokendb.list_transactions(user=user, limit=100)
    assert [tx.amount for tx in everything] == [7, 6, 5, 4, 3, 2, 1, 100]
    pages, before = [], None
    while page := await tokendb.list_transactions(user=user, limit=3, before=before):
        pages.append([tx.id for tx in page])
        before = page[-1] if len(pages) % 2 else page[-1].id  # instance or id both work
    assert [len(p) for p in pages] == [3, 3, 2]
    assert [tx_id for page in pages for tx_id in page] == [tx.id for tx in everything]
    with pytest.raises(tokendb.NotFound):
        await tokendb.list_transactions(user=user, before=uuid.uuid4())
    for limit in (0, 1001, "5"):
        with pytest.raises(tokendb.ValidationError):
            await tokendb.list_transactions(user=user, limit=limit)  # type: ignore[arg-type]


async def test_rows_follow_the_balance_after_chain(tokendb_clean: str, make_user) -> None:
    user = await make_user()
    await tokendb.top_up(user=user, amount=50)
    charge = await tokendb.charge(user=user, amount=70)
    await tokendb.refund(transaction=charge, amount=20)
    chain = list(reversed(await tokendb.list_transactions(user=user)))
    balance = 0
    for tx in chain:
        balance += tx.amount
        assert tx.balance_after == balance
    assert balance == await tokendb.get_balance(user=user) == 100


async def test_audit_finds_broken_books(tokendb_clean: str, make_user) -> None:
    user, bystander = await make_user(), await make_user()
    topup = await tokendb.top_up(user=user, amount=10)
    assert await tokendb.audit_ledger() == []
    try:
        await tamper(tokendb_clean, "UPDATE users SET token_balance = 115 WHERE id = $1", user.id)
        await tamper(
            tokendb_clean,
            "UPDATE token_transactions SET balance_after = 999 WHERE id = $1",
            topup.id,
        )
        expected = tokendb.LedgerDiscrepancy(
            user_id=user.id,
            balance=115,
            ledger_sum=110,
            broken_links=1,
            first_broken_transaction=topup.id,
        )
        assert await tokendb.audit_ledger() == [expected]
        assert await tokendb.audit_ledger(user=user) == [expected]
        assert await tokendb.audit_ledger(user=bystander) == []
    finally:
        await tamper(tokendb_clean, "UPDATE users SET token_balance = 110 WHERE id = $1", user.id)
        await tamper(
            tokendb_clean,
            "UPDATE token_transactions SET balance_after = 110 WHERE id = $1",
            topup.id,
        )
    assert await tokendb.audit_ledger() == []


async def test_audit_finds_a_broken_chain_whose_sums_still_agree(
    tokendb_clean: str, make_user
) -> None:
    """A row's balance_after rewritten, its amount and the user's balance left alone:
    balance = Σ amounts still holds, only the chain shows the damage (this row does
    not continue its predecessor, and the next row does not continue it)."""
    user = await make_user()
    topup = await tokendb.top_up(user=user, amount=10)
    await tokendb.charge(user=user, amount=5)
    try:
        await tamper(
            tokendb_clean,
            "UPDATE token_transactions SET balance_after = 999 WHERE id = $1",
            topup.id,
        )
        assert await tokendb.audit_ledger() == [
            tokendb.LedgerDiscrepancy(
                user_id=user.id,
                balance=105,
                ledger_sum=105,
                broken_links=2,
                first_broken_transaction=topup.id,
            )
        ]
    finally:
        await tamper(
            tokendb_clean,
            "UPDATE token_transactions SET balance_after = 110 WHERE id = $1",
            topup.id,
        )
    assert await tokendb.audit_ledger() == []


@pytest.mark.parametrize(
    ("column", "change"),
    [
        # A row's position skips one: as if the row before it had been removed,
        # with the balances rewritten around the gap.
        ("seq", "seq = seq + 1"),
        # A row dated before its predecessor: its chain's order and the order
        # list_transactions pages in disagree.
        ("created_at", "created_at = created_at - interval '1 hour'"),
    ],
)
async def test_audit_finds_a_row_out_of_its_chain_whose_balances_agree(
    tokendb_clean: str, make_user, column: str, change: str
) -> None:
    """Every balance_after continues its predecessor and balance = Σ amounts, yet
    the newest row does not follow the one before it in the chain's order."""
    user = await make_user()
    await tokendb.top_up(user=user, amount=10)
    newest = await tokendb.charge(user=user, amount=5)
    undo = {"seq": "seq = seq - 1", "created_at": "created_at = created_at + interval '1 hour'"}
    try:
        await tamper(
            tokendb_clean, f"UPDATE token_transactions SET {change} WHERE id = $1", newest.id
        )
        expected = tokendb.LedgerDiscrepancy(
            user_id=user.id,
            balance=105,
            ledger_sum=105,
            broken_links=1,
            first_broken_transaction=newest.id,
        )
        assert await tokendb.audit_ledger() == [expected]
        assert await tokendb.audit_ledger(user=user) == [expected]
    finally:
        await tamper(
            tokendb_clean, f"UPDATE token_transactions SET {undo[column]} WHERE id = $1", newest.id
        )
    assert await tokendb.audit_ledger() == []


async def test_one_users_audit_reads_only_that_users_rows_whatever_the_plan(
    tokendb_clean: str, make_user
) -> None:
    """The per-user audit is its own statement: even the generic plan PostgreSQL
    switches a prepared statement to after five runs finds the user's rows through
    the (user_id, seq) index instead of windowing the whole ledger."""
    user = await make_user()
    conn = await asyncpg.connect(tokendb_clean)
    try:
        # A table this small is cheaper to scan whole: ask for an index, and see
        # whether the user's id can bound it.
        await conn.execute("SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off")
        await conn.execute(f"PREPARE audit_user(uuid) AS {_ledger_sql.AUDIT_USER}")
        plan = "\n".join(
            row[0] for row in await conn.fetch(f"EXPLAIN EXECUTE audit_user('{user.id}')")
        )
    finally:
        await conn.close()
    assert "token_transactions_user_seq_key" in plan, plan
    assert "Index Cond: (user_id = $1)" in plan, plan


async def test_audit_flags_a_balance_without_ledger_rows(tokendb_clean: str, make_user) -> None:
    user = await make_user()
    try:
        await tamper(tokendb_clean, "DELETE FROM token_transactions WHERE user_id = $1", user.id)
        [found] = await tokendb.audit_ledger()
        assert (found.balance, found.ledger_sum, found.broken_links) == (100, 0, 0)
    finally:
        await tamper(tokendb_clean, "UPDATE users SET token_balance = 0 WHERE id = $1", user.id)
    assert await tokendb.audit_ledger() == []


# Regression tests from the independent review.


async def test_saving_a_user_instance_does_not_undo_a_charge(tokendb_clean: str, make_user) -> None:
    """tokendb hands out Tortoise models; Model.save() writes every column back.

    The instance returned by create_user() still says token_balance=100, so a
    profile update after a charge would put 100 back: users_balance_follows_ledger
    refuses that save at commit.
    """
    user = await make_user()
    await tokendb.charge(user=user, amount=40)
    try:
        user.name = "Renamed"
        with pytest.raises(IntegrityError, match="balances change only through the ledger"):
            await user.save()
        assert await tokendb.get_balance(user=user) == 60
        assert await tokendb.audit_ledger(user=user) == []
    finally:
        await _db.write(
            "UPDATE users SET token_balance = (SELECT sum(amount) FROM token_transactions "
            "WHERE user_id = $1) WHERE id = $1",
            user.id,
        )


async def test_refund_trigger_backstop_holds_for_concurrent_raw_refunds(
    tokendb_clean: str, funded_user
) -> None:
    """Two transactions each refund the whole charge around the Python layer.

    tokendb_refund_within_charge locks the charge row before it sums the
    refunds, so the second insert waits for the first and is then refused.
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
        # Second full refund of the same charge, concurrently, continuing the
        # chain as the second transaction sees it (so the chain check passes).
        racing = asyncio.ensure_future(
            second.execute(
                "INSERT INTO token_transactions (user_id, amount, type, reference_id, "
                "balance_after) VALUES ($1, 100, 'refund', $2, 500)",
                user.id,
                charge.id,
            )
        )
        await blocked_backends(first, like="%'refund'%")  # queued behind the first refund
        await tx1.commit()
        with pytest.raises(asyncpg.CheckViolationError) as info:
            await asyncio.wait_for(racing, 10)
        assert info.value.constraint_name == "token_transactions_refund_within_charge"
    finally:
        await second.close()  # rolls the second refund back
        await first.close()


async def test_a_cursor_from_another_users_ledger_is_not_found(
    tokendb_clean: str, make_user
) -> None:
    """A keyset cursor must be the listed user's own row (tokendb._keyset), so
    paging cannot probe other tenants' ids."""
    alice, bob = await make_user(), await make_user()
    alices = await tokendb.top_up(user=alice, amount=5)
    with pytest.raises(tokendb.NotFound):
        await tokendb.list_transactions(user=bob, before=alices.id)


@pytest.mark.parametrize("page", ["first", "before"])
async def test_list_transactions_pages_walk_the_user_created_index(raw, page: str) -> None:
    """The plan of both page statements is an index scan in order, no sort: page 1,000
    of a 1M-row history costs what page 1 costs (the benchmark times the first page at
    10k and 1M rows)."""
    users = [uuid.uuid4() for _ in range(20)]
    await raw.execute(
        "INSERT INTO users (id, email, password_hash, name, role, token_balance, created_at, "
        "updated_at) SELECT id, id::text || '@example.com', 'x', 'n', 'user', 500, now(), now() "
        "FROM unnest($1::uuid[]) AS id",
        users,
    )
    await raw.execute(  # 500 rows each; the books do not matter (rolled back)
        "INSERT INTO token_transactions (id, user_id, amount, type, balance_after, created_at) "
        "SELECT gen_random_uuid(), u, 1, 'topup', g, now() - (501 - g) * interval '1 ms' "
        "FROM unnest($1::uuid[]) AS u, generate_series(1, 500) AS g ORDER BY u, g",
        users,
    )
    await raw.execute("ANALYZE token_transactions")
    if page == "first":
        sql, args = _ledger_sql.PAGES[0], (users[3], 50)  # type: tuple[str, tuple[object, ...]]
    else:
        cursor = await raw.fetchrow(
            "SELECT created_at, id FROM token_transactions WHERE user_id = $1 "
            "ORDER BY created_at DESC, id DESC OFFSET 250 LIMIT 1",
            users[3],
        )
        sql, args = _ledger_sql.PAGES[1], (users[3], 50, cursor["created_at"], cursor["id"])
    plan = "\n".join(row[0] for row in await raw.fetch(f"EXPLAIN {sql}", *args))
    assert "Index Scan using token_transactions_user_created_idx" in plan, plan
    assert "Sort" not in plan, plan


async def test_a_refund_past_the_integer_column_is_a_validation_error(
    tokendb_clean: str, make_user
) -> None:
    user = await make_user()
    charge = await tokendb.charge(user=user, amount=10)
    await tokendb.top_up(user=user, amount=INT4_MAX - 95)  # balance: INT4_MAX - 5
    before = await table_counts()
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.refund(transaction=charge)
    assert info.value.field == "amount"
    assert await table_counts() == before


@pytest.mark.parametrize("credit", [50, 20])  # 20: the balance covers the charge exactly
async def test_a_refusal_that_a_late_credit_covers_is_decided_under_the_lock(
    tokendb_clean: str, make_user, monkeypatch: pytest.MonkeyPatch, credit: int
) -> None:
    """A top-up lands between the refused statement and the read that explains it.

    Refusing then would report a balance that covers the charge; the call is
    decided again with the row locked, and succeeds.
    """
    user = await make_user()
    real = _ledger_sql.spendable_or_none

    async def credit_lands_first(user_id: uuid.UUID) -> tuple[int, bool] | None:
        await tokendb.top_up(user=user, amount=credit)
        return await real(user_id)

    monkeypatch.setattr(_ledger_sql, "spendable_or_none", credit_lands_first)
    tx = await tokendb.charge(user=user, amount=120)
    assert (tx.amount, tx.balance_after) == (-120, credit - 20)
    monkeypatch.undo()
    assert await tokendb.get_balance(user=user) == credit - 20


async def test_the_locked_decision_reports_the_balance_it_refused_on(
    tokendb_clean: str, make_user, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = await make_user()

    async def says_it_covers(user_id: uuid.UUID) -> tuple[int, bool] | None:
        return 10**6, False  # stale: sends the call to the locked decision

    monkeypatch.setattr(_ledger_sql, "spendable_or_none", says_it_covers)
    before = await table_counts()
    with pytest.raises(tokendb.InsufficientTokens) as info:
        await tokendb.charge(user=user, amount=101)
    assert (info.value.balance, info.value.requested) == (100, 101)
    assert await table_counts() == before


async def test_a_description_is_at_most_1000_characters(tokendb_clean: str, make_user) -> None:
    user = await make_user()
    kept = await tokendb.top_up(user=user, amount=1, description="d" * 1000)
    assert kept.description == "d" * 1000
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.top_up(user=user, amount=1, description="d" * 1001)
    assert info.value.field == "description"


async def test_list_transactions_pages_50_rows_by_default(tokendb_clean: str, make_user) -> None:
    user = await make_user()
    await tokendb.charge_many(items=[{"user": user, "amount": 1}] * 60)
    assert len(await tokendb.list_transactions(user=user)) == 50


@pytest.mark.parametrize(("balance", "amount"), [(100, 101), (0, 1), (5, 100)])
async def test_a_refused_charge_costs_two_statements(
    tokendb_clean: str, make_user, balance: int, amount: int
) -> None:
    """The refusal and the balance read that explains it; no locked second attempt
    (that is for a refusal a credit landed after)."""
    user = await make_user(signup_bonus=balance)
    with statements_sent() as sent, pytest.raises(tokendb.InsufficientTokens):
        await tokendb.charge(user=user, amount=amount)
    assert len(sent) == 2, sent


async def test_a_repeat_that_lands_while_a_refusal_is_decided_is_returned(
    tokendb_clean: str, make_user, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry's refusal is being explained when its first attempt (same reference,
    same amount) commits: decided again with the row locked, the call is a repeat of
    that row, not an InsufficientTokens."""
    user = await make_user()
    reference = uuid.uuid4()
    first: list[tokendb.TokenTransaction] = []

    async def first_attempt_lands(user_id: uuid.UUID) -> tuple[int, bool] | None:
        await tokendb.top_up(user=user, amount=100)
        first.append(await tokendb.charge(user=user, amount=150, reference_id=reference))
        return 10**6, False  # stale: sends the call to the locked decision

    monkeypatch.setattr(_ledger_sql, "spendable_or_none", first_attempt_lands)
    with db_settings(coalesce_charges=False):  # the first attempt is sent from inside the retry
        retry = await tokendb.charge(user=user, amount=150, reference_id=reference)
    assert retry.id == first[0].id
    monkeypatch.undo()
    assert await tokendb.get_balance(user=user) == 50


def test_a_discrepancy_is_an_immutable_value() -> None:
    found = tokendb.LedgerDiscrepancy(
        user_id=uuid.uuid4(), balance=1, ledger_sum=0, broken_links=0, first_broken_transaction=None
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        found.balance = 0  # type: ignore[misc]


async def test_the_locked_decision_holds_the_users_row_while_it_decides(
    tokendb_clean: str, make_user, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decided again under the lock, a refusal reports the balance nobody can change
    until the decision is made: the user's row is locked from the first statement."""
    user = await make_user()
    seen: list[bool] = []
    observer = await asyncpg.connect(tokendb_clean)

    async def probe() -> None:
        seen.append(await row_is_locked(observer, "users", user.id))

    async def says_it_covers(user_id: uuid.UUID) -> tuple[int, bool] | None:
        return 10**6, False  # stale: sends the call to the locked decision

    monkeypatch.setattr(_ledger_sql, "spendable_or_none", says_it_covers)
    try:
        with (
            after_statement(_ledger_sql.LOCK_USER, probe),
            pytest.raises(tokendb.InsufficientTokens),
        ):
            await tokendb.charge(user=user, amount=101)
    finally:
        await observer.close()
    assert seen == [True]


async def test_a_repeat_answers_while_the_users_row_is_locked(
    tokendb_clean: str, make_user
) -> None:
    """A retried call whose reference already moved returns the original row at once:
    it takes no row lock, so it does not queue behind a busy user."""
    user = await make_user()
    reference = uuid.uuid4()
    first = await tokendb.charge(user=user, amount=5, reference_id=reference)
    async with holding_row_lock(tokendb_clean, user.id):
        again = await asyncio.wait_for(
            tokendb.charge(user=user, amount=5, reference_id=reference), 5
        )
    assert again.id == first.id


async def test_refunds_of_one_charge_leave_other_charges_refundable(
    tokendb_clean: str, make_user
) -> None:
    user = await make_user()
    first = await tokendb.charge(user=user, amount=30)
    second = await tokendb.charge(user=user, amount=10)
    await tokendb.refund(transaction=first)
    assert (await tokendb.refund(transaction=second)).amount == 10


async def test_a_user_without_ledger_rows_has_an_empty_history(tokendb_clean: str) -> None:
    """No signup bonus, no row: an empty first page, not NotFound (the user exists)."""
    user = await tokendb.create_user(
        email="empty@example.com", password="correct horse battery", name="E", signup_bonus=0
    )
    assert await tokendb.list_transactions(user=user) == []


async def test_a_charges_model_name_is_at_most_50_characters(
    tokendb_clean: str, funded_user
) -> None:
    """The model a charge is billed to (usage per model) is 1-50 characters: 50
    are recorded as given; 51 are a ValidationError, and nothing moves."""
    user = await funded_user(balance=100)
    charged = await tokendb.charge(user=user, amount=1, model="m" * 50)
    assert charged.model == "m" * 50
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.charge(user=user, amount=1, model="m" * 51)
    assert info.value.field == "model"
    assert await tokendb.get_balance(user=user) == 99
