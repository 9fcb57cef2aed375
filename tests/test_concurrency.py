"""The invariants under concurrency: asyncio.gather over a pool of ≥ 16 connections.

Every test runs twice: with charges coalesced (the default) and with one
statement per call, whose race handling (the conditional UPDATE, a refusal
decided again under the row lock) the coalescer would otherwise hide.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any

import pytest

import tokendb
from tests.helpers import db_settings, table_counts
from tokendb import _tortoise


@pytest.fixture(autouse=True, params=[True, False], ids=["coalesced", "one-statement-per-call"])
async def wide_pool(tokendb_clean: str, request: pytest.FixtureRequest) -> AsyncIterator[None]:
    pool = await _tortoise.pool(_tortoise.models_client())
    assert pool.get_max_size() >= 16, "concurrency tests need a pool of at least 16 connections"
    with db_settings(coalesce_charges=request.param):
        yield


async def settle(calls: Iterable[Awaitable[Any]]) -> list[Any]:
    return await asyncio.gather(*calls, return_exceptions=True)


def successes(results: list[Any], kind: type) -> list[Any]:
    unexpected = [
        r
        for r in results
        if isinstance(r, BaseException) and not isinstance(r, tokendb.InsufficientTokens)
    ]
    assert unexpected == [], unexpected[:3]
    return [r for r in results if isinstance(r, kind)]


async def test_200_one_token_charges_on_150_tokens(funded_user) -> None:
    user = await funded_user(balance=150)
    results = await settle(tokendb.charge(user=user, amount=1) for _ in range(200))
    charged = successes(results, tokendb.TokenTransaction)
    refused = [r for r in results if isinstance(r, tokendb.InsufficientTokens)]
    assert len(charged) == 150 and len(refused) == 50
    assert all(r.balance == 0 and r.requested == 1 for r in refused)
    assert await tokendb.get_balance(user=user) == 0
    assert sorted(tx.balance_after for tx in charged) == list(range(150))
    assert await tokendb.audit_ledger() == []


async def test_200_charges_of_3_from_1000(funded_user) -> None:
    user = await funded_user(balance=1000)
    results = await settle(tokendb.charge(user=user, amount=3) for _ in range(200))
    assert len(successes(results, tokendb.TokenTransaction)) == 200
    assert await tokendb.get_balance(user=user) == 400
    assert await tokendb.audit_ledger() == []


async def test_mixed_credits_and_debits_keep_the_chain_in_order(funded_user) -> None:
    user = await funded_user(balance=50)
    rng = random.Random(7)
    calls = [
        tokendb.charge(user=user, amount=rng.randint(1, 20))
        if rng.random() < 0.6
        else tokendb.top_up(user=user, amount=rng.randint(1, 20))
        for _ in range(300)
    ]
    results = await settle(calls)
    moved = successes(results, tokendb.TokenTransaction)
    balance = await tokendb.get_balance(user=user)
    assert balance == 50 + sum(tx.amount for tx in moved)
    assert balance >= 0
    assert await tokendb.audit_ledger() == []  # includes the balance_after chain order


async def test_concurrent_repeats_of_one_reference_move_once(funded_user) -> None:
    user = await funded_user(balance=1000)
    reference = uuid.uuid4()
    for operation in (tokendb.charge, tokendb.top_up):
        results = await settle(
            operation(user=user, amount=7, reference_id=reference) for _ in range(50)
        )
        assert all(isinstance(r, tokendb.TokenTransaction) for r in results), results[:3]
        assert len({r.id for r in results}) == 1
    assert await tokendb.get_balance(user=user) == 1000
    assert (await table_counts())["token_transactions"] == 4  # bonus, funding, charge, top-up


async def test_concurrent_refunds_never_exceed_the_charge(funded_user) -> None:
    user = await funded_user(balance=500)
    charge = await tokendb.charge(user=user, amount=100)
    results = await settle(tokendb.refund(transaction=charge, amount=3) for _ in range(60))
    refunds = [r for r in results if isinstance(r, tokendb.TokenTransaction)]
    refused = [r for r in results if isinstance(r, tokendb.RefundExceedsCharge)]
    assert len(refunds) == 33 and len(refused) == 27
    assert all(r.refundable == 1 for r in refused)
    rest = await settle(tokendb.refund(transaction=charge) for _ in range(10))
    assert sum(isinstance(r, tokendb.TokenTransaction) for r in rest) == 1
    assert await tokendb.get_balance(user=user) == 500
    assert await tokendb.audit_ledger() == []


async def test_concurrent_messages_on_one_session(make_api_key, funded_user) -> None:
    user = await funded_user(balance=1000)
    api_key, _ = await make_api_key(user=user)
    session = await tokendb.start_chat(api_key=api_key, model="m")
    results = await settle(
        tokendb.add_message(session=session, role="user", content=str(i), tokens=i % 7)
        for i in range(150)
    )
    assert not [r for r in results if isinstance(r, BaseException)]
    expected = sum(i % 7 for i in range(150))
    assert (await tokendb.get_chat(session=session)).tokens_used == expected
    assert await tokendb.get_balance(user=user) == 1000 - expected
    assert await tokendb.audit_chats() == [] and await tokendb.audit_ledger() == []


async def test_messages_racing_a_short_balance_and_end_chat(make_api_key, funded_user) -> None:
    user = await funded_user(balance=100)
    api_key, _ = await make_api_key(user=user)
    session = await tokendb.start_chat(api_key=api_key, model="m")
    calls: list[Awaitable[object]] = [
        tokendb.add_message(session=session, role="assistant", content="x", tokens=3)
        for _ in range(60)
    ]
    calls.insert(40, tokendb.end_chat(session=session))
    results = await settle(calls)
    unexpected = [
        r
        for r in results
        if isinstance(r, BaseException)
        and not isinstance(r, (tokendb.InsufficientTokens, tokendb.ChatSessionEnded))
    ]
    assert unexpected == []
    stored = len(await tokendb.list_messages(session=session, limit=1000))
    assert stored == sum(isinstance(r, tokendb.ChatMessage) for r in results)
    assert (await tokendb.get_chat(session=session)).tokens_used == 3 * stored
    assert await tokendb.get_balance(user=user) == 100 - 3 * stored
    assert await tokendb.audit_chats() == [] and await tokendb.audit_ledger() == []


async def test_many_users_charged_and_chatting_at_once(make_api_key, funded_user) -> None:
    users = [await funded_user(balance=60) for _ in range(10)]
    sessions = []
    for user in users:
        api_key, _ = await make_api_key(user=user)
        sessions.append(await tokendb.start_chat(api_key=api_key, model="m"))
    rng = random.Random(11)
    calls: list[Awaitable[object]] = []
    for _ in range(400):
        index = rng.randrange(10)
        if rng.random() < 0.5:
            calls.append(tokendb.charge(user=users[index], amount=rng.randint(1, 5)))
        else:
            calls.append(
                tokendb.add_message(
                    session=sessions[index], role="user", content="x", tokens=rng.randint(0, 5)
                )
            )
    results = await settle(calls)
    unexpected = [
        r
        for r in results
        if isinstance(r, BaseException) and not isinstance(r, tokendb.InsufficientTokens)
    ]
    assert unexpected == []
    for user in users:
        assert await tokendb.get_balance(user=user) >= 0
    assert await tokendb.audit_ledger() == [] and await tokendb.audit_chats() == []
