"""Tests for tokendb.ledger."""

from __future__ import annotations

import tokendb


async def test_charge_debits_and_records_usage_row(tokendb_clean: str, make_user) -> None:
    user = await make_user()
    tx = await tokendb.charge(user=user, amount=40, description="completion")
    assert tx.amount == -40
    assert tx.type is tokendb.TransactionType.USAGE
    assert tx.balance_after == 60
    assert await tokendb.get_balance(user=user) == 60
