"""Tests for tokendb._translate: what a driver error becomes on the way out of tokendb."""

from __future__ import annotations

import asyncio

import pytest

import tokendb
from tests.helpers import refusing_ledger_rows


@pytest.mark.parametrize("sqlstate", ["40P01", "40001"])  # deadlock, serialization failure
async def test_a_conflict_that_outlives_the_retries_is_database_unavailable(
    tokendb_clean: str, funded_user, sqlstate: str
) -> None:
    """Deadlocks and serialization failures are retried inside tokendb. One that is
    still there after the last attempt leaves every kind of call (one statement, a
    transaction, a coalesced batch) as DatabaseUnavailable with its sqlstate: safe
    to retry, nothing written. Never a driver error, nor a plain DatabaseError."""
    user = await funded_user(balance=100)
    usage = await tokendb.charge(user=user, amount=10)
    async with refusing_ledger_rows(tokendb_clean, "conflict", sqlstate=sqlstate) as trigger:
        calls = [
            tokendb.top_up(user=user, amount=1, description="conflict"),
            tokendb.refund(transaction=usage, amount=1, description="conflict"),
            tokendb.charge(user=user, amount=1, description="conflict"),
        ]
        outcomes = [await asyncio.gather(call, return_exceptions=True) for call in calls]
        outcomes.append(  # several callers: one statement for all of them
            await asyncio.gather(
                *(tokendb.charge(user=user, amount=1, description="conflict") for _ in range(3)),
                return_exceptions=True,
            )
        )
        refusals = await trigger.fetchval("SELECT last_value FROM test_refusals")
    failures = [failure for batch in outcomes for failure in batch]
    assert len(failures) == 6
    for failure in failures:
        assert type(failure) is tokendb.DatabaseUnavailable, failure
        assert failure.sqlstate == sqlstate
        assert failure.outcome_unknown is False
        assert "safe to retry" in str(failure)
    assert refusals > len(calls) + 1  # the statements were retried before giving up
    assert await tokendb.get_balance(user=user) == 90
