"""Tests for tokendb._translate: what a driver error becomes on the way out of tokendb."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from tortoise.exceptions import ConfigurationError as TortoiseConfigurationError
from tortoise.exceptions import IntegrityError, OperationalError

import tokendb
from tests.helpers import refusing_ledger_rows
from tokendb._translate import is_connection_loss, translate, translated


def refused(message: str, constraint: str | None = None) -> asyncpg.PostgresError:
    exc = asyncpg.exceptions.CheckViolationError(message)
    exc.constraint_name = constraint
    return exc


# driver/ORM error, outcome_unknown -> (leaf, sqlstate, outcome_unknown, words of the message)
TRANSLATIONS: list[tuple[BaseException, bool, type[tokendb.TokenDBError], Any, bool, str]] = [
    (
        asyncpg.exceptions.QueryCanceledError("x"),
        False,
        tokendb.DatabaseTimeout,
        "57014",
        False,
        "statement_timeout",
    ),
    (
        asyncpg.exceptions.LockNotAvailableError("x"),
        False,
        tokendb.DatabaseTimeout,
        "55P03",
        False,
        "lock_timeout",
    ),
    (TimeoutError(), False, tokendb.DatabaseTimeout, None, False, "timed out waiting"),
    (TimeoutError(), True, tokendb.DatabaseTimeout, None, True, "outcome of the write is unknown"),
    (ConnectionResetError("reset"), False, tokendb.DatabaseUnavailable, None, False, "unavailable"),
    (
        ConnectionResetError("reset"),
        True,
        tokendb.DatabaseUnavailable,
        None,
        True,
        "outcome is unknown",
    ),
    (
        asyncpg.exceptions.AdminShutdownError("x"),
        True,
        tokendb.DatabaseUnavailable,
        "57P01",
        True,
        "after the write was sent",
    ),
    (
        asyncpg.InterfaceError("connection is closed"),
        False,
        tokendb.DatabaseUnavailable,
        None,
        False,
        "unavailable",
    ),
    (
        asyncpg.exceptions.InternalClientError("cannot switch to state 15"),
        False,
        tokendb.DatabaseUnavailable,
        None,
        False,
        "unavailable",
    ),
    (
        asyncpg.exceptions.DeadlockDetectedError("x"),
        False,
        tokendb.DatabaseUnavailable,
        "40P01",
        False,
        "safe to retry",
    ),
    (
        asyncpg.exceptions.UndefinedTableError("x"),
        False,
        tokendb.ConfigurationError,
        None,
        False,
        "tokendb migrate",
    ),
    (
        asyncpg.exceptions.UndefinedColumnError("x"),
        False,
        tokendb.ConfigurationError,
        None,
        False,
        "migrate",
    ),
    (
        TortoiseConfigurationError("x"),
        False,
        tokendb.ConfigurationError,
        None,
        False,
        "tokendb.init()",
    ),
    (
        refused("account closed", "mine"),
        False,
        tokendb.DatabaseError,
        "23514",
        False,
        "rejected the statement: account closed",
    ),
    (asyncpg.InterfaceError("other"), False, tokendb.DatabaseError, None, False, "database error"),
    (
        asyncpg.exceptions.OutdatedSchemaCacheError("x"),
        False,
        tokendb.DatabaseError,
        None,
        False,
        "database error",
    ),
    (OperationalError("x"), False, tokendb.DatabaseError, None, False, "database error"),
    (ValueError("x"), False, tokendb.DatabaseError, None, False, "unexpected error"),
]


@pytest.mark.parametrize(
    ("exc", "outcome_unknown", "leaf", "sqlstate", "unknown", "words"),
    TRANSLATIONS,
    ids=[f"{type(row[0]).__name__}-{row[1]}" for row in TRANSLATIONS],
)
def test_each_driver_error_becomes_the_leaf_that_says_what_happened(
    exc: BaseException,
    outcome_unknown: bool,
    leaf: type[tokendb.TokenDBError],
    sqlstate: str | None,
    unknown: bool,
    words: str,
) -> None:
    translated_error = translate(exc, outcome_unknown=outcome_unknown)
    assert type(translated_error) is leaf
    assert getattr(translated_error, "sqlstate", None) == sqlstate
    assert getattr(translated_error, "outcome_unknown", False) is unknown
    assert words in str(translated_error)


def test_a_refusal_names_its_constraint_and_a_tokendb_error_passes_through() -> None:
    assert translate(refused("no", "users_role_valid")).constraint == "users_role_valid"  # type: ignore[attr-defined]
    already = tokendb.NotFound("user", "x")
    assert translate(already) is already


@pytest.mark.parametrize("wrapped", [False, True], ids=["asyncpg", "tortoise"])
def test_a_refusal_says_what_was_refused_not_the_row(wrapped: bool) -> None:
    """PostgreSQL's DETAIL quotes the refused row (a password hash, its argon2
    salt); a translated error keeps the server's primary message only, whether
    asyncpg raised it or Tortoise wrapped it."""
    exc = refused('new row violates check constraint "users_role_valid"', "users_role_valid")
    exc.detail = "Failing row contains ($argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA)."
    assert "c2FsdA" in str(exc)
    error = translate(IntegrityError(exc) if wrapped else exc)
    assert 'violates check constraint "users_role_valid"' in str(error)
    assert "c2FsdA" not in str(error) and "DETAIL" not in str(error)


@pytest.mark.parametrize(
    ("exc", "lost"),
    [
        (asyncpg.exceptions.QueryCanceledError("x"), False),  # an OperatorInterventionError
        (TimeoutError(), False),  # an OSError
        (ConnectionRefusedError(), True),
        (asyncpg.InterfaceError("connection is closed"), True),
        (asyncpg.InterfaceError("another operation is in progress"), False),
        (refused("the account is closed"), False),
        (asyncpg.exceptions.OutdatedSchemaCacheError("x"), False),
    ],
)
def test_connection_loss_is_told_from_a_bound_or_a_refusal(exc: BaseException, lost: bool) -> None:
    assert is_connection_loss(exc) is lost


async def test_translated_keeps_the_function_and_turns_driver_errors_into_tokendb_errors() -> None:
    async def operation(*, fail: bool) -> str:
        """What it does."""
        if fail:
            raise asyncpg.exceptions.DeadlockDetectedError("x")
        return "done"

    wrapped = translated(operation)
    assert (wrapped.__name__, wrapped.__doc__) == ("operation", "What it does.")
    assert wrapped.__tokendb_translated__ is True  # type: ignore[attr-defined]
    assert await wrapped(fail=False) == "done"
    with pytest.raises(tokendb.DatabaseUnavailable) as info:
        await wrapped(fail=True)
    assert isinstance(info.value.__cause__, asyncpg.exceptions.DeadlockDetectedError)


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
