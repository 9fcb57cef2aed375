"""Tests for tokendb.ledger's incremental audit: ``audit_ledger(since_checkpoint=True)``.

tokendb runs as the DML-only application role here (``tokendb_app_role``), so
each of these also shows that role can run the audit and store checkpoints.
The books are broken around the Python layer (``tamper``, as the owner with
the triggers off): what the audit must find is what the backstops refuse.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

import tokendb
from tests.helpers import tamper
from tokendb import _ledger_sql


async def _checkpoints(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(f"SELECT * FROM {_ledger_sql.CHECKPOINTS} ORDER BY created_at")
    finally:
        await conn.close()


async def _mark(url: str, user: Any) -> asyncpg.Record | None:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchrow(f"SELECT * FROM {_ledger_sql.MARKS} WHERE user_id = $1", user.id)
    finally:
        await conn.close()


async def _newest(user: Any) -> tokendb.TokenTransaction:
    return (await tokendb.list_transactions(user=user, limit=1))[0]


_APPEND = """
INSERT INTO token_transactions (id, user_id, amount, type, balance_after, seq, created_at)
SELECT $2, $1, $3, 'topup', $4, max(seq) + $5, clock_timestamp()
FROM token_transactions WHERE user_id = $1
"""
"""A top-up row appended by hand: $3 amount, $4 balance_after, $5 how far past the newest seq."""

_SHIFT = "UPDATE users SET token_balance = token_balance + $2 WHERE id = $1"
_REMOVE = "DELETE FROM token_transactions WHERE id = $1"


async def test_a_clean_audit_stores_a_checkpoint_and_the_next_reads_only_what_came_after(
    tokendb_clean: str, make_user
) -> None:
    user, other = await make_user(), await make_user()
    await tokendb.top_up(user=user, amount=10)
    before = len(await _checkpoints(tokendb_clean))
    assert await tokendb.audit_ledger(since_checkpoint=True) == []
    checkpoints = await _checkpoints(tokendb_clean)
    assert len(checkpoints) == before + 1
    newest = await _newest(user)
    mark = await _mark(tokendb_clean, user)
    assert mark is not None
    assert (mark["seq"], mark["balance_after"], mark["transaction_id"]) == (2, 110, newest.id)
    assert mark["checkpoint_id"] == checkpoints[-1]["id"]
    assert checkpoints[-1]["users_advanced"] >= 2 and checkpoints[-1]["rows_audited"] >= 3

    # Rows the checkpoint covers are not read again: an old row changed by the
    # owner is the full audit's to find (it does).
    first = (await tokendb.list_transactions(user=user))[-1]
    await tokendb.charge(user=other, amount=1)
    try:
        await tamper(
            tokendb_clean, "UPDATE token_transactions SET amount = 99 WHERE id = $1", first.id
        )
        assert await tokendb.audit_ledger(since_checkpoint=True) == []
        [found] = await tokendb.audit_ledger()
        assert found.user_id == user.id and found.first_broken_transaction == first.id
    finally:
        await tamper(
            tokendb_clean, "UPDATE token_transactions SET amount = 100 WHERE id = $1", first.id
        )
    latest = await _checkpoints(tokendb_clean)
    assert latest[-1]["rows_audited"] == 1 and latest[-1]["users_advanced"] == 1
    other_mark = await _mark(tokendb_clean, other)
    assert other_mark is not None and other_mark["checkpoint_id"] == latest[-1]["id"]
    untouched = await _mark(tokendb_clean, user)
    assert untouched is not None and untouched["checkpoint_id"] == checkpoints[-1]["id"]


@pytest.mark.parametrize(
    ("balance_after", "past"),
    [
        (10, 1),  # the new row starts a chain of its own (as if it followed nothing)
        (120, 2),  # the new row's seq skips one (a row in between is gone)
    ],
    ids=["restarts-the-balance", "skips-a-seq"],
)
async def test_the_first_new_row_must_continue_the_checkpointed_row(
    tokendb_clean: str, make_user, balance_after: int, past: int
) -> None:
    """Each of these rows is fine on its own, only the checkpointed row shows it
    does not follow it; the balance agrees with the mark plus the new amount."""
    user = await make_user()
    await tokendb.top_up(user=user, amount=10)
    assert await tokendb.audit_ledger(since_checkpoint=True) == []
    mark = await _mark(tokendb_clean, user)
    count = len(await _checkpoints(tokendb_clean))
    row = uuid.uuid4()
    try:
        await tamper(tokendb_clean, _APPEND, user.id, row, 10, balance_after, past)
        await tamper(tokendb_clean, _SHIFT, user.id, 10)
        expected = tokendb.LedgerDiscrepancy(
            user_id=user.id,
            balance=120,
            ledger_sum=120,
            broken_links=1,
            first_broken_transaction=row,
        )
        assert await tokendb.audit_ledger(since_checkpoint=True) == [expected]
        assert await tokendb.audit_ledger() == [expected]  # the full audit agrees
        # Nothing stored: the next incremental audit reads these rows again.
        assert len(await _checkpoints(tokendb_clean)) == count
        assert await _mark(tokendb_clean, user) == mark
        assert await tokendb.audit_ledger(since_checkpoint=True) == [expected]
    finally:
        await tamper(tokendb_clean, _REMOVE, row)
        await tamper(tokendb_clean, _SHIFT, user.id, -10)
    assert await tokendb.audit_ledger(since_checkpoint=True) == []


async def test_the_checkpointed_row_itself_must_be_unchanged(tokendb_clean: str, make_user) -> None:
    user = await make_user()
    await tokendb.top_up(user=user, amount=10)
    assert await tokendb.audit_ledger(since_checkpoint=True) == []
    marked = await _newest(user)
    try:
        await tamper(
            tokendb_clean,
            "UPDATE token_transactions SET balance_after = 7 WHERE id = $1",
            marked.id,
        )
        [found] = await tokendb.audit_ledger(since_checkpoint=True)
        assert (found.user_id, found.broken_links, found.first_broken_transaction) == (
            user.id,
            1,
            marked.id,
        )
    finally:
        await tamper(
            tokendb_clean,
            "UPDATE token_transactions SET balance_after = 110 WHERE id = $1",
            marked.id,
        )
    # Gone, with the balance put back to what the rows before it sum to.
    restore = """
        INSERT INTO token_transactions
            (id, user_id, amount, type, description, balance_after, seq, created_at)
        VALUES ($1, $2, 10, 'topup', $3, 110, 2, $4)
    """
    try:
        await tamper(tokendb_clean, _REMOVE, marked.id)
        await tamper(tokendb_clean, _SHIFT, user.id, -10)
        [found] = await tokendb.audit_ledger(since_checkpoint=True)
        assert (found.broken_links, found.first_broken_transaction) == (1, marked.id)
        assert (found.balance, found.ledger_sum) == (100, 110)
    finally:
        await tamper(
            tokendb_clean, restore, marked.id, user.id, marked.description, marked.created_at
        )
        await tamper(tokendb_clean, _SHIFT, user.id, 10)
    assert await tokendb.audit_ledger(since_checkpoint=True) == []


async def test_a_row_committed_after_a_checkpoint_but_dated_before_it_is_audited(
    tokendb_clean: str, make_user
) -> None:
    """Concurrent transactions commit out of order: a ledger row written (and dated)
    before a checkpoint, by a transaction still open when the checkpoint is taken,
    commits after it. A checkpoint "since created_at" would never read it; the
    per-user marks do, because the row's seq is past its user's mark."""
    late_user, busy_user = await make_user(), await make_user()
    assert await tokendb.audit_ledger(since_checkpoint=True) == []
    late_row = uuid.uuid4()
    conn = await asyncpg.connect(tokendb_clean)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SET LOCAL session_replication_role = replica")
        # A broken row (its balance_after continues nothing), not yet committed.
        await conn.execute(_APPEND, late_user.id, late_row, 10, 999, 1)
        await conn.execute(_SHIFT, late_user.id, 10)
        await tokendb.top_up(user=busy_user, amount=5)  # committed meanwhile, dated later
        assert await tokendb.audit_ledger(since_checkpoint=True) == []
        await tx.commit()
    finally:
        await conn.close()
    try:
        checkpoint = (await _checkpoints(tokendb_clean))[-1]
        stored = await tokendb.list_transactions(user=late_user, limit=1)
        assert stored[0].id == late_row and stored[0].created_at < checkpoint["created_at"]
        [found] = await tokendb.audit_ledger(since_checkpoint=True)
        assert (found.user_id, found.first_broken_transaction) == (late_user.id, late_row)
    finally:
        await tamper(tokendb_clean, _REMOVE, late_row)
        await tamper(tokendb_clean, _SHIFT, late_user.id, -10)
    assert await tokendb.audit_ledger(since_checkpoint=True) == []


async def test_two_audits_at_once_leave_each_mark_at_the_furthest_row(
    tokendb_clean: str, make_user
) -> None:
    users = [await make_user() for _ in range(5)]
    for user in users:
        await tokendb.top_up(user=user, amount=1)
    results = await asyncio.gather(
        *(tokendb.audit_ledger(since_checkpoint=True) for _ in range(4)),
        *(tokendb.charge(user=user, amount=1) for user in users),
    )
    assert results[:4] == [[], [], [], []]
    assert await tokendb.audit_ledger(since_checkpoint=True) == []
    for user in users:
        mark = await _mark(tokendb_clean, user)
        assert mark is not None and mark["seq"] == 3
        assert mark["transaction_id"] == (await _newest(user)).id


async def test_an_incremental_audit_of_one_user_is_refused(make_user) -> None:
    user = await make_user()
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.audit_ledger(user=user, since_checkpoint=True)
    assert info.value.field == "since_checkpoint"
