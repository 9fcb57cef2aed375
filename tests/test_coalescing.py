"""Tests for coalesced charges (tokendb._group_commit, tokendb._ledger_sql.BATCH) and charge_many.

Correctness only, never speed: outcomes equal to one call after another
(checked against a Python model), batches that really formed, cancellation,
and failures confined to the calls they concern.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import asyncpg
import pytest
from tortoise.transactions import in_transaction

import tokendb
from tests.helpers import (
    blocked,
    blocked_backends,
    charge_batch,
    db_settings,
    holding_row_lock,
    refusing_ledger_rows,
    statements_sent,
    table_counts,
)
from tokendb import _db, _ledger_sql, _settings, _waits, ledger
from tokendb.ids import new_id

UNKNOWN_USER = uuid.UUID("00000000-0000-7000-8000-000000000001")


@dataclasses.dataclass
class SequentialModel:
    """What one ``charge()`` after another does, in plain Python."""

    balances: dict[uuid.UUID, int]
    moved: dict[tuple[uuid.UUID, uuid.UUID], tuple[int, object]] = dataclasses.field(
        default_factory=dict
    )

    def charge(self, index: int, user: uuid.UUID, amount: int, ref: uuid.UUID | None) -> tuple:
        if user not in self.balances:
            return ("missing",)
        if ref is not None and (user, ref) in self.moved:
            first_amount, first = self.moved[user, ref]
            if first_amount != amount:
                return ("conflict", first_amount, amount)
            return ("repeat", first)
        if self.balances[user] < amount:
            return ("short", self.balances[user], amount)
        self.balances[user] -= amount
        if ref is not None:
            self.moved[user, ref] = (amount, index)
        return ("moved", -amount, self.balances[user])


def observed(results: list[Any], prior: dict[uuid.UUID, object]) -> list[tuple]:
    """``results`` in the model's terms; a repeat names the index (or prior row) it repeats."""
    first_seen: dict[uuid.UUID, object] = dict(prior)
    out: list[tuple] = []
    for index, result in enumerate(results):
        if isinstance(result, tokendb.TokenTransaction):
            if result.id in first_seen:
                out.append(("repeat", first_seen[result.id]))
            else:
                first_seen[result.id] = index
                out.append(("moved", result.amount, result.balance_after))
        elif isinstance(result, tokendb.InsufficientTokens):
            out.append(("short", result.balance, result.requested))
        elif isinstance(result, tokendb.ReferenceConflict):
            out.append(("conflict", result.existing_amount, result.requested_amount))
        elif isinstance(result, tokendb.NotFound):
            out.append(("missing",))
        else:
            out.append(("unexpected", repr(result)))
    return out


async def workload(funded_user, seed: int) -> tuple[list[tuple], SequentialModel, dict]:
    """Charges over a few users (one of them unknown) with references repeated, prior
    references, conflicting amounts and balances that run out half-way."""
    users = [(await funded_user(balance=balance)).id for balance in (10, 100, 0, 37)]
    prior_ref = uuid.uuid4()
    prior_row = await tokendb.charge(user=users[1], amount=7, reference_id=prior_ref)
    refs = [None, None, None, uuid.uuid4(), uuid.uuid4(), prior_ref]
    rng = random.Random(seed)
    items = [
        (rng.choice([*users, UNKNOWN_USER]), rng.randint(1, 8), rng.choice(refs))
        for _ in range(120)
    ]
    model = SequentialModel({user: await tokendb.get_balance(user=user) for user in users})
    model.moved[users[1], prior_ref] = (7, "prior")
    return items, model, {prior_row.id: "prior"}


@pytest.fixture
def coalescing_on() -> Any:
    assert _settings.current().coalesce_charges, "tokendb.init() coalesces charges by default"


def coalescing_off() -> contextlib.AbstractContextManager[None]:
    return db_settings(coalesce_charges=False)


@pytest.fixture
def patient_lane(monkeypatch: pytest.MonkeyPatch) -> None:
    """The coalesced lane waits (nearly) for ever for a call in flight, so a test can hold a
    lone call or a batch in flight with a row lock while others queue behind it."""
    monkeypatch.setattr(ledger._CHARGES, "patience", 60.0)


async def test_concurrent_charges_equal_the_sequential_model(
    tokendb_clean: str, funded_user, coalescing_on
) -> None:
    items, model, prior = await workload(funded_user, seed=1)
    results = await asyncio.gather(
        *(tokendb.charge(user=u, amount=a, reference_id=r) for u, a, r in items),
        return_exceptions=True,
    )
    # Calls queue in the order they were made: the model applies them in that order.
    expected = [model.charge(i, *item) for i, item in enumerate(items)]
    assert observed(results, prior) == expected
    for user, balance in model.balances.items():
        assert await tokendb.get_balance(user=user) == balance


async def test_charge_many_equals_the_sequential_model(tokendb_clean: str, funded_user) -> None:
    items, model, prior = await workload(funded_user, seed=2)
    results = await tokendb.charge_many(
        items=[tokendb.ChargeItem(user=u, amount=a, reference_id=r) for u, a, r in items]
    )
    assert observed(results, prior) == [model.charge(i, *item) for i, item in enumerate(items)]
    for user, balance in model.balances.items():
        assert await tokendb.get_balance(user=user) == balance


async def test_200_one_token_charges_on_150_tokens_share_statements(
    tokendb_clean: str, funded_user, coalescing_on
) -> None:
    user = await funded_user(balance=150)
    results = await asyncio.gather(
        *(tokendb.charge(user=user, amount=1) for _ in range(200)), return_exceptions=True
    )
    charged = [r for r in results if isinstance(r, tokendb.TokenTransaction)]
    refused = [r for r in results if isinstance(r, tokendb.InsufficientTokens)]
    assert (len(charged), len(refused)) == (150, 50)
    assert all((r.balance, r.requested) == (0, 1) for r in refused)
    assert await tokendb.get_balance(user=user) == 0
    # Rows of one statement share created_at: far fewer timestamps than rows.
    assert len({tx.created_at for tx in charged}) < 10
    # ... and their ids keep the chain in order (audit_ledger checks the rest).
    chain = sorted(charged, key=lambda tx: (tx.created_at, tx.id))
    assert [tx.balance_after for tx in chain] == list(range(149, -1, -1))


async def test_without_coalescing_every_call_is_its_own_statement(
    tokendb_clean: str, funded_user
) -> None:
    user = await funded_user(balance=100)
    with coalescing_off():
        charged = await asyncio.gather(*(tokendb.charge(user=user, amount=1) for _ in range(30)))
    assert len({tx.created_at for tx in charged}) == 30
    assert await tokendb.get_balance(user=user) == 70


async def test_repeats_of_one_reference_in_one_batch_move_once(
    tokendb_clean: str, funded_user, coalescing_on
) -> None:
    user, other = await funded_user(balance=100), await funded_user(balance=100)
    reference = uuid.uuid4()
    calls = [tokendb.charge(user=user, amount=9, reference_id=reference) for _ in range(20)]
    calls.append(tokendb.charge(user=other, amount=9, reference_id=reference))  # other user
    calls.append(tokendb.charge(user=user, amount=10, reference_id=reference))  # conflict
    results: list[Any] = await asyncio.gather(*calls, return_exceptions=True)
    assert len({r.id for r in results[:20]}) == 1
    assert results[20].id != results[0].id
    assert isinstance(results[21], tokendb.ReferenceConflict)
    assert (results[21].existing_amount, results[21].requested_amount) == (9, 10)
    assert await tokendb.get_balance(user=user) == 91
    assert await tokendb.get_balance(user=other) == 91


async def test_a_refused_first_attempt_leaves_the_reference_free(
    tokendb_clean: str, funded_user, coalescing_on
) -> None:
    user = await funded_user(balance=10)
    reference = uuid.uuid4()
    first: Any
    second: Any
    first, second = await asyncio.gather(
        tokendb.charge(user=user, amount=50, reference_id=reference),
        tokendb.charge(user=user, amount=5, reference_id=reference),
        return_exceptions=True,
    )
    assert isinstance(first, tokendb.InsufficientTokens) and first.balance == 10
    assert isinstance(second, tokendb.TokenTransaction) and second.balance_after == 5


async def test_an_unknown_user_fails_only_its_own_call(
    tokendb_clean: str, funded_user, coalescing_on
) -> None:
    user = await funded_user(balance=100)
    results: list[Any] = await asyncio.gather(
        tokendb.charge(user=user, amount=1),
        tokendb.charge(user=UNKNOWN_USER, amount=1),
        tokendb.charge(user=user, amount=2),
        return_exceptions=True,
    )
    assert isinstance(results[1], tokendb.NotFound) and results[1].key == UNKNOWN_USER
    assert [r.balance_after for r in (results[0], results[2])] == [99, 97]


async def test_mixed_users_in_one_batch(tokendb_clean: str, funded_user, coalescing_on) -> None:
    users = [await funded_user(balance=50) for _ in range(8)]
    rng = random.Random(3)
    picks = [rng.choice(users) for _ in range(150)]
    results = await asyncio.gather(
        *(tokendb.charge(user=user, amount=1) for user in picks), return_exceptions=True
    )
    for user in users:
        mine = [r for r, u in zip(results, picks, strict=True) if u is user]
        moved = [r for r in mine if isinstance(r, tokendb.TokenTransaction)]
        assert len(moved) == min(len(mine), 50)
        assert await tokendb.get_balance(user=user) == 50 - len(moved)


class RollBack(Exception):
    """Raised to leave an ``in_transaction()`` block: nothing else raises it."""


async def test_inside_the_callers_transaction_the_charge_is_part_of_it(
    tokendb_clean: str, funded_user, coalescing_on
) -> None:
    user = await funded_user(balance=100)
    with pytest.raises(RollBack):
        async with in_transaction():
            results = await asyncio.gather(*(tokendb.charge(user=user, amount=5) for _ in range(3)))
            assert [tx.balance_after for tx in results] == [95, 90, 85]
            raise RollBack
    assert await tokendb.get_balance(user=user) == 100


# --- cancellation and failures, with a batch held in flight by a row lock -----------


def started(call: Awaitable[Any]) -> asyncio.Task[Any]:
    return asyncio.ensure_future(call)


async def test_a_caller_cancelled_while_queued_is_not_charged(
    tokendb_clean: str, funded_user, coalescing_on, patient_lane
) -> None:
    held, other = await funded_user(balance=100), await funded_user(balance=100)
    async with holding_row_lock(tokendb_clean, held.id) as lock:
        in_flight = started(tokendb.charge(user=held, amount=1))
        await blocked_backends(lock)
        cancelled = started(tokendb.charge(user=other, amount=5, description="cancelled"))
        queued = started(tokendb.charge(user=other, amount=2))
        await asyncio.sleep(0)  # both are queued behind the batch in flight
        cancelled.cancel()
        await asyncio.sleep(0)
    assert (await in_flight).balance_after == 99
    assert (await queued).balance_after == 98
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert await tokendb.get_balance(user=other) == 98
    rows = await _db.read("SELECT 1 FROM token_transactions WHERE description = 'cancelled'")
    assert rows == []


async def test_a_caller_cancelled_in_flight_stops_waiting_but_its_charge_commits(
    tokendb_clean: str, funded_user, coalescing_on, patient_lane
) -> None:
    """Documented: a batch's statement is shared, so cancelling one caller does not
    cancel it; once sent, the outcome is what the database did."""
    first, held, other = [await funded_user(balance=100) for _ in range(3)]
    reference = uuid.uuid4()
    async with holding_row_lock(tokendb_clean, held.id) as lock:
        lone = started(tokendb.charge(user=first, amount=1))
        await asyncio.sleep(0)  # in flight alone: the next two form a batch
        calls = [
            started(tokendb.charge(user=held, amount=5, reference_id=reference)),
            started(tokendb.charge(user=other, amount=1)),
        ]
        await blocked_backends(lock, like="%WITH RECURSIVE items%")  # one batch of two
        calls[0].cancel()
        await asyncio.sleep(0)
    await lone
    with pytest.raises(asyncio.CancelledError):
        await calls[0]
    assert (await calls[1]).balance_after == 99  # the batch committed...
    assert await tokendb.get_balance(user=held) == 95  # ... with the cancelled caller's charge
    retry = await tokendb.charge(user=held, amount=5, reference_id=reference)
    assert retry.balance_after == 95 and await tokendb.get_balance(user=held) == 95


async def test_a_coalesced_charge_runs_with_its_own_callers_settings(
    tokendb_clean: str, funded_user, coalescing_on, patient_lane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings changed for a block (tokendb._settings.using) are the block's only: a charge
    queued behind the block's statement runs with its own caller's, not the block's."""
    held, other = await funded_user(balance=100), await funded_user(balance=100)
    waits: list[float] = []  # the acquire_timeout each statement's connection is waited for
    acquire = _waits.acquire

    async def recorded(pool: Any, seconds: float) -> Any:
        waits.append(seconds)
        return await acquire(pool, seconds)

    monkeypatch.setattr(_waits, "acquire", recorded)
    own = _settings.current().acquire_timeout
    async with holding_row_lock(tokendb_clean, held.id) as lock:
        with db_settings(acquire_timeout=own + 7):
            in_block = started(tokendb.charge(user=held, amount=1))
        await blocked_backends(lock)
        outside = started(tokendb.charge(user=other, amount=1))
        await asyncio.sleep(0)  # queued behind the block's statement
    await asyncio.gather(in_block, outside)
    assert waits == [own + 7, own]


async def test_coalesced_charges_share_statements_only_with_the_same_settings(
    tokendb_clean: str, funded_user, coalescing_on, patient_lane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two calls queued together, one inside a settings block and one outside, do not
    share a statement: neither runs under the other's settings."""
    held, first, second = [await funded_user(balance=100) for _ in range(3)]
    waits: list[float] = []
    acquire = _waits.acquire

    async def recorded(pool: Any, seconds: float) -> Any:
        waits.append(seconds)
        return await acquire(pool, seconds)

    monkeypatch.setattr(_waits, "acquire", recorded)
    own = _settings.current().acquire_timeout
    async with holding_row_lock(tokendb_clean, held.id) as lock:
        in_flight = started(tokendb.charge(user=held, amount=1))
        await blocked_backends(lock)
        with db_settings(acquire_timeout=own + 7):
            in_block = started(tokendb.charge(user=first, amount=1))
        outside = started(tokendb.charge(user=second, amount=1))
        await asyncio.sleep(0)  # both queued behind the statement in flight
    await asyncio.gather(in_flight, in_block, outside)
    assert waits == [own, own + 7, own]


async def test_a_lost_batch_fails_its_callers_only_and_the_next_batch_works(
    tokendb_clean: str, funded_user, coalescing_on, patient_lane
) -> None:
    first, held, other = [await funded_user(balance=100) for _ in range(3)]
    async with holding_row_lock(tokendb_clean, held.id) as lock:
        lone = started(tokendb.charge(user=first, amount=1))
        await asyncio.sleep(0)  # in flight alone: the next two form a batch
        batch = [
            started(tokendb.charge(user=held, amount=3)),
            started(tokendb.charge(user=other, amount=3)),
        ]
        (pid,) = await blocked_backends(lock, like="%WITH RECURSIVE items%")
        await lock.execute("SELECT pg_terminate_backend($1)", pid)
        failures = await asyncio.gather(*batch, return_exceptions=True)
    await lone
    for failure in failures:
        assert isinstance(failure, tokendb.DatabaseUnavailable) and failure.outcome_unknown
    assert failures[0] is not failures[1]  # each caller gets its own exception
    # Nothing of the lost batch was committed; the next batches work.
    assert [await tokendb.get_balance(user=u) for u in (held, other)] == [100, 100]
    after = await asyncio.gather(*(tokendb.charge(user=u, amount=3) for u in (held, other)))
    assert [tx.balance_after for tx in after] == [97, 97]


@pytest.fixture
async def poison_description(tokendb_clean: str) -> AsyncIterator[str]:
    """A trigger that refuses any ledger row described as the returned text."""
    async with refusing_ledger_rows(tokendb_clean, "poison"):
        yield "poison"


async def test_a_statement_refused_by_one_item_fails_that_item_only(
    funded_user, poison_description: str, coalescing_on
) -> None:
    users = [await funded_user(balance=100) for _ in range(3)]
    descriptions = ["fine", poison_description, "fine", "fine", poison_description, "fine"]
    results = await asyncio.gather(
        *(
            tokendb.charge(user=users[i % 3], amount=1, description=text)
            for i, text in enumerate(descriptions)
        ),
        return_exceptions=True,
    )
    poisoned = [r for r, text in zip(results, descriptions, strict=True) if text != "fine"]
    fine = [r for r, text in zip(results, descriptions, strict=True) if text == "fine"]
    assert all(isinstance(r, tokendb.DatabaseError) for r in poisoned)
    assert all(isinstance(r, tokendb.TokenTransaction) for r in fine)
    assert [await tokendb.get_balance(user=u) for u in users] == [98, 100, 98]


async def test_a_list_refused_by_one_item_is_sent_once_then_item_by_item(
    funded_user, poison_description: str
) -> None:
    """A statement refused as a whole wrote nothing, and sending it again would be
    refused again: one batch statement, then one statement per item."""
    user = await funded_user(balance=100)
    items = [{"user": user, "amount": 1, "description": text} for text in ("a", "poison", "b")]
    with statements_sent() as sent:
        results = await tokendb.charge_many(items=items)
    assert [type(r) for r in results] == [
        tokendb.TokenTransaction,
        tokendb.DatabaseError,
        tokendb.TokenTransaction,
    ]
    assert sent == [charge_batch([])[0], *[_ledger_sql.MOVE] * 3]
    assert await tokendb.get_balance(user=user) == 98


# --- charge_many ----------------------------------------------------------------------


async def test_charge_many_gives_one_result_per_item(tokendb_clean: str, funded_user) -> None:
    user = await funded_user(balance=20)
    reference = uuid.uuid4()
    results: list[Any] = await tokendb.charge_many(
        items=[
            tokendb.ChargeItem(user=user, amount=5, reference_id=reference),
            {"user": user.id, "amount": 5, "reference_id": str(reference)},  # a repeat
            {"user": user, "amount": 0},
            {"user": user, "amount": 1, "colour": "red"},
            "not an item",  # type: ignore[list-item]
            tokendb.ChargeItem(user=UNKNOWN_USER, amount=1),
            tokendb.ChargeItem(user=user, amount=100),
            tokendb.ChargeItem(user=user, amount=15, description="the rest"),
        ]
    )
    assert len(results) == 8
    assert results[0].balance_after == 15 and results[1].id == results[0].id
    assert [type(r) for r in results[2:7]] == [
        tokendb.ValidationError,
        tokendb.ValidationError,
        tokendb.ValidationError,
        tokendb.NotFound,
        tokendb.InsufficientTokens,
    ]
    assert (results[6].balance, results[6].requested) == (15, 100)
    assert results[7].balance_after == 0 and results[7].description == "the rest"
    assert await tokendb.get_balance(user=user) == 0


@pytest.mark.parametrize("item", [{"user": UNKNOWN_USER}, {"amount": 1}])
async def test_a_charge_many_item_needs_a_user_and_an_amount(
    tokendb_clean: str, item: dict[str, object]
) -> None:
    [result] = await tokendb.charge_many(items=[item])
    assert isinstance(result, tokendb.ValidationError) and result.field == "items"


def test_a_charge_item_is_an_immutable_value() -> None:
    item = tokendb.ChargeItem(user=UNKNOWN_USER, amount=5)
    assert item == tokendb.ChargeItem(user=UNKNOWN_USER, amount=5)
    assert len({item, tokendb.ChargeItem(user=UNKNOWN_USER, amount=5)}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        item.amount = 6  # type: ignore[misc]


@pytest.mark.parametrize(("items", "statements"), [(256, 1), (257, 2)])
async def test_charge_many_sends_one_statement_per_256_items(
    tokendb_clean: str, funded_user, items: int, statements: int
) -> None:
    """The documented batch size: beyond a few hundred a batch only holds its locks longer."""
    user = await funded_user(balance=1000)
    with statements_sent() as sent:
        results = await tokendb.charge_many(items=[{"user": user, "amount": 1}] * items)
    assert len(sent) == statements
    assert all(isinstance(r, tokendb.TokenTransaction) for r in results)
    assert await tokendb.get_balance(user=user) == 1000 - items


async def test_charge_many_of_nothing(tokendb_clean: str) -> None:
    before = await table_counts()
    assert await tokendb.charge_many(items=[]) == []
    assert await table_counts() == before


async def test_charge_many_splits_long_lists_and_keeps_their_order(
    tokendb_clean: str, funded_user, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger, "MAX_BATCH", 4)
    user = await funded_user(balance=10)
    results = await tokendb.charge_many(items=[{"user": user, "amount": 1} for _ in range(12)])
    moved = [r.balance_after for r in results if isinstance(r, tokendb.TokenTransaction)]
    assert moved == list(range(9, -1, -1))
    assert [type(r) for r in results[10:]] == [tokendb.InsufficientTokens] * 2


async def test_charge_many_inside_the_callers_transaction_rolls_back_with_it(
    tokendb_clean: str, funded_user
) -> None:
    user = await funded_user(balance=10)
    with pytest.raises(RollBack):
        async with in_transaction():
            results = await tokendb.charge_many(items=[{"user": user, "amount": 4}] * 3)
            assert isinstance(results[2], tokendb.InsufficientTokens)
            raise RollBack
    assert await tokendb.get_balance(user=user) == 10


async def test_a_reference_taken_while_the_batch_waited_is_a_repeat(
    tokendb_clean: str, funded_user
) -> None:
    """The batch's snapshot predates a row another process committed while the batch
    waited for the user's lock: the unique index refuses the duplicate, and the batch
    runs again, as one statement, on a new snapshot that sees it."""
    user = await funded_user(balance=100)
    reference = uuid.uuid4()
    async with holding_row_lock(tokendb_clean, user.id) as lock:
        batch = started(
            tokendb.charge_many(
                items=[
                    {"user": user, "amount": 4, "reference_id": reference},
                    {"user": user, "amount": 1},
                ]
            )
        )
        await blocked_backends(lock, like="%WITH RECURSIVE items%")
        theirs = new_id()
        with statements_sent() as sent:
            await lock.execute(
                _ledger_sql.MOVE, user.id, -4, "usage", theirs, reference, "x", None, None
            )
            await lock.execute("COMMIT")
            await lock.execute("BEGIN")  # for the rollback on the way out
            results = await batch
    # The refused statement runs again as a whole, not as one statement per item.
    assert [statement for statement in sent if "WITH RECURSIVE items" in statement] == [
        charge_batch([])[0]
    ]
    assert sent.count(_ledger_sql.MOVE) == 1  # theirs
    assert results[0].id == theirs and results[0].description == "x"
    assert results[1].balance_after == 95
    assert await tokendb.get_balance(user=user) == 95


async def test_a_list_repeating_references_is_charged_in_one_statement(
    tokendb_clean: str, funded_user
) -> None:
    """charge_many's cost: one statement per MAX_BATCH items, whatever the items are.

    Repeats of a reference, within the list or of a row already in the ledger,
    are decided inside that statement, not by statements sent again after the
    idempotency index refused one: the outcomes would be the same, at several
    times the cost.
    """
    user = await funded_user(balance=100)
    earlier = uuid.uuid4()
    prior = await tokendb.charge(user=user, amount=3, reference_id=earlier)
    reference = uuid.uuid4()
    items = [
        {"user": user, "amount": 5, "reference_id": reference},
        {"user": user, "amount": 5, "reference_id": reference},
        {"user": user, "amount": 3, "reference_id": earlier},
        {"user": user, "amount": 5, "reference_id": reference},
        {"user": user, "amount": 2},
    ]
    with statements_sent() as sent:
        results: list[Any] = await tokendb.charge_many(items=items)
    assert len(sent) == 1, sent
    assert [r.balance_after for r in results] == [92, 92, 97, 92, 90]
    assert len({results[0].id, results[1].id, results[3].id}) == 1
    assert results[2].id == prior.id
    assert await tokendb.get_balance(user=user) == 90


async def test_crossing_batches_lock_their_users_in_id_order_and_cannot_deadlock(
    tokendb_clean: str, funded_user
) -> None:
    """Two batches name the same two users in opposite arrival orders, each on a
    connection of its own (as two processes, or two event loops, would send them).

    Locked in arrival order, the batch naming ``low`` first would hold it while
    the other holds ``high``, and each would wait for the other's row: a
    deadlock (which the seam's retry would hide). Two transactions holding one
    row each release them one at a time, so that each batch gets its first row
    before the other's. Locked in id order, both batches want ``low`` first,
    the second waits without holding anything, and they run one after the other.
    """
    low, high = sorted([(await funded_user(balance=100)).id for _ in range(2)])
    first, second = await asyncpg.connect(tokendb_clean), await asyncpg.connect(tokendb_clean)
    try:
        async with holding_row_lock(tokendb_clean, high) as gate_high:
            async with holding_row_lock(tokendb_clean, low):
                sql, arguments = charge_batch([(low, 1), (high, 2)])
                ascending = started(first.fetch(sql, *arguments))
                await blocked(gate_high, first.get_server_pid())
                sql, arguments = charge_batch([(high, 3), (low, 4)])
                descending = started(second.fetch(sql, *arguments))
                await blocked(gate_high, second.get_server_pid())
            # ``low`` is free: the ascending batch takes it and waits for ``high``.
            await blocked(gate_high, first.get_server_pid())
        outcomes = await asyncio.wait_for(
            asyncio.gather(ascending, descending, return_exceptions=True), 30
        )
    finally:
        await first.close()
        await second.close()
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert failures == [], "crossing batches deadlocked"
    assert [await tokendb.get_balance(user=u) for u in (low, high)] == [95, 95]


async def test_a_lost_list_gives_each_item_its_unknown_outcome(
    tokendb_clean: str, funded_user
) -> None:
    """charge_many raises nothing for an item: a batch lost with its connection is
    DatabaseUnavailable(outcome_unknown=True) for each of its items, one object each."""
    held, other = await funded_user(balance=100), await funded_user(balance=100)
    async with holding_row_lock(tokendb_clean, held.id) as lock:
        call = started(
            tokendb.charge_many(items=[{"user": held, "amount": 3}, {"user": other, "amount": 3}])
        )
        (pid,) = await blocked_backends(lock, like="%WITH RECURSIVE items%")
        await lock.execute("SELECT pg_terminate_backend($1)", pid)
        results = await asyncio.wait_for(call, 30)
    assert [type(r) for r in results] == [tokendb.DatabaseUnavailable] * 2
    assert all(r.outcome_unknown for r in results) and results[0] is not results[1]
    assert [await tokendb.get_balance(user=u) for u in (held, other)] == [100, 100]


async def test_a_batch_that_waited_for_a_lock_builds_on_what_committed_meanwhile(
    tokendb_clean: str, funded_user
) -> None:
    """While a batch waits for a user's row, a credit commits. The batch decides on
    the balance it finds once it holds the lock, and its rows follow the credit's in
    the chain (created after it, balance_after continuing from it), in one statement."""
    user = await funded_user(balance=100)
    with statements_sent() as sent:
        async with holding_row_lock(tokendb_clean, user.id) as lock:
            call = started(tokendb.charge_many(items=[{"user": user, "amount": 120}] * 2))
            await blocked_backends(lock, like="%WITH RECURSIVE items%")
            await lock.execute(
                _ledger_sql.MOVE, user.id, 100, "topup", new_id(), None, "credit", None, None
            )
            await lock.execute("COMMIT")
            await lock.execute("BEGIN")  # for the rollback on the way out
            results = await asyncio.wait_for(call, 30)
    # One statement did it: not refused at commit (users_balance_follows_ledger) and
    # then redone item by item, which would hide rows out of the chain's order.
    assert sent.count(charge_batch([])[0]) == 1
    assert sent.count(_ledger_sql.MOVE) == 1  # the credit
    assert isinstance(results[0], tokendb.TokenTransaction)
    assert results[0].balance_after == 80
    assert isinstance(results[1], tokendb.InsufficientTokens) and results[1].balance == 80
    assert await tokendb.get_balance(user=user) == 80
    newest = await tokendb.list_transactions(user=user, limit=2)
    assert [(tx.amount, tx.balance_after) for tx in newest] == [(-120, 80), (100, 200)]


async def test_a_batch_takes_references_of_usage_rows_only(tokendb_clean: str, funded_user) -> None:
    """References are scoped by type: a top-up's reference is no repeat for a charge."""
    user = await funded_user(balance=100)
    reference = uuid.uuid4()
    await tokendb.top_up(user=user, amount=7, reference_id=reference)
    results = await tokendb.charge_many(
        items=[{"user": user, "amount": 7, "reference_id": reference}, {"user": user, "amount": 1}]
    )
    assert [getattr(r, "balance_after", r) for r in results] == [100, 99]


async def test_a_batch_writes_only_the_users_it_charges(tokendb_clean: str, funded_user) -> None:
    """One statement; a bystander, and a user all of whose charges were refused, are
    left exactly as they were (row digests unchanged)."""
    charged, refused, bystander = [await funded_user(balance=10) for _ in range(3)]
    digest = "SELECT md5(u::text) AS digest FROM users u WHERE id = ANY($1::uuid[]) ORDER BY id"
    untouched = [refused.id, bystander.id]
    before = await _db.read(digest, untouched)
    with statements_sent() as sent:
        results = await tokendb.charge_many(
            items=[
                {"user": charged, "amount": 4},
                {"user": refused, "amount": 11},
                {"user": charged, "amount": 5},
                {"user": refused, "amount": 12},
            ]
        )
    assert len(sent) == 1, sent
    assert [type(r) for r in results] == [
        tokendb.TokenTransaction,
        tokendb.InsufficientTokens,
        tokendb.TokenTransaction,
        tokendb.InsufficientTokens,
    ]
    assert await _db.read(digest, untouched) == before


async def test_repeats_in_a_batch_are_answered_with_their_own_rows(
    tokendb_clean: str, funded_user
) -> None:
    user, other = await funded_user(balance=100), await funded_user(balance=100)
    first, second = uuid.uuid4(), uuid.uuid4()
    prior = [
        await tokendb.charge(user=user, amount=3, reference_id=first),
        await tokendb.charge(user=user, amount=4, reference_id=second),
        await tokendb.charge(user=other, amount=5, reference_id=first),
    ]
    results = await tokendb.charge_many(
        items=[
            {"user": user, "amount": 4, "reference_id": second},
            {"user": other, "amount": 5, "reference_id": first},
            {"user": user, "amount": 3, "reference_id": first},
            {"user": other, "amount": 1},
        ]
    )
    assert [getattr(r, "id", r) for r in results[:3]] == [prior[1].id, prior[2].id, prior[0].id]
    assert getattr(results[3], "balance_after", results[3]) == 94


async def test_a_list_of_one_charge_is_the_single_statement(
    tokendb_clean: str, funded_user
) -> None:
    """A batch of one costs what a lone charge() costs: the single-movement statement."""
    user = await funded_user(balance=10)
    with statements_sent() as sent:
        [result] = await tokendb.charge_many(items=[{"user": user, "amount": 1}])
    assert sent == [_ledger_sql.MOVE]
    assert isinstance(result, tokendb.TokenTransaction) and result.balance_after == 9


# --- isolation: callers that give up, and users whose rows are locked ----------------


async def no_longer_blocked(conn: asyncpg.Connection) -> None:
    """Wait (up to 2 s) until no statement waits for a lock: a cancelled one was cancelled
    on the server too. Returns anyway after 2 s (then the lock goes and the test says why)."""
    for _ in range(200):
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND state = 'active'"
        )
        if waiting == 0:
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("coalesce", [True, False], ids=["coalesced", "alone"])
async def test_a_lone_caller_that_gives_up_while_its_user_is_locked_is_not_charged(
    tokendb_clean: str, funded_user, coalesce: bool
) -> None:
    """A lone coalesced call runs on its caller's task: giving up (``wait_for``) cancels
    its statement, as it does with coalescing off, and nothing is charged."""
    user = await funded_user(balance=100)
    with db_settings(coalesce_charges=coalesce):
        async with holding_row_lock(tokendb_clean, user.id) as lock:
            call = started(tokendb.charge(user=user, amount=5, description="gave up"))
            await blocked_backends(lock)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(call, 0.05)
            await no_longer_blocked(lock)
        await asyncio.sleep(0.2)  # a statement still alive would commit now
    assert await tokendb.get_balance(user=user) == 100
    rows = await _db.read("SELECT 1 FROM token_transactions WHERE description = 'gave up'")
    assert rows == []


async def test_a_locked_users_lone_call_does_not_hold_up_other_users(
    tokendb_clean: str, funded_user, coalescing_on
) -> None:
    """While one user's row is locked and its lone call waits for it, the other users'
    coalesced charges go on (before that call's lock wait ends)."""
    held = await funded_user(balance=100)
    others = [await funded_user(balance=100) for _ in range(4)]
    async with holding_row_lock(tokendb_clean, held.id) as lock:
        waiting = started(tokendb.charge(user=held, amount=1))
        await blocked_backends(lock)
        rest = [started(tokendb.charge(user=u, amount=1)) for u in others for _ in range(3)]
        done, _ = await asyncio.wait(rest, timeout=30)
        assert not waiting.done(), "the others went on only once the locked call ended"
        assert len(done) == len(rest)
        assert all(isinstance(call.result(), tokendb.TokenTransaction) for call in rest)
    assert (await waiting).balance_after == 99
    assert [await tokendb.get_balance(user=u) for u in others] == [97] * 4


async def test_a_batch_skips_a_locked_user_and_its_call_waits_alone(
    tokendb_clean: str, funded_user, coalescing_on
) -> None:
    """A batch that meets a row locked longer than the lane's patience runs again without
    that user, whose call goes alone (with the normal lock timeout): its neighbours in
    the batch are charged while it waits."""
    first, held, a, b = [await funded_user(balance=100) for _ in range(4)]
    async with holding_row_lock(tokendb_clean, held.id) as lock:
        lone = started(tokendb.charge(user=first, amount=1))
        await asyncio.sleep(0)  # in flight: the next three form a batch
        batch = [started(tokendb.charge(user=u, amount=2)) for u in (held, a, b)]
        await asyncio.wait([lone, *batch[1:]], timeout=30)
        assert not batch[0].done(), "the batch waited for the locked user"
        assert [call.result().balance_after for call in (lone, *batch[1:])] == [99, 98, 98]
        await blocked_backends(lock, like=f"%{_ledger_sql.MOVE.strip()[:20]}%")  # alone now
    assert (await batch[0]).balance_after == 98
    assert [await tokendb.get_balance(user=u) for u in (first, held, a, b)] == [99, 98, 98, 98]


async def test_other_users_latency_barely_moves_while_one_users_row_is_locked(
    tokendb_clean: str, funded_user, coalescing_on
) -> None:
    """The issue's target is p99 with one user's row locked ≤ 2× p99 with nothing locked
    (``python -m bench --only coalesced-locked`` reports it); this test, on a shared
    machine, only asks for 5×. Before, the others waited for the locked call's
    ``lock_timeout`` (10 s here): thousands of times their usual latency."""
    held = await funded_user(balance=1000)
    others = [(await funded_user(balance=10_000)).id for _ in range(24)]
    loop = asyncio.get_running_loop()

    async def round_of_calls() -> float:
        latencies: list[float] = []

        async def caller(index: int) -> None:
            for step in range(12):
                started = loop.time()
                await tokendb.charge(user=others[(index + step) % len(others)], amount=1)
                latencies.append(loop.time() - started)

        await asyncio.gather(*(caller(index) for index in range(16)))
        latencies.sort()
        return latencies[int(0.99 * len(latencies))]

    async def gives_up() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tokendb.charge(user=held, amount=1), 0.3)

    free, locked = [], []
    for _ in range(3):  # interleaved: the machine's load hits both alike
        free.append(await round_of_calls())
        async with holding_row_lock(tokendb_clean, held.id):
            stuck = [started(gives_up()) for _ in range(2)]
            locked.append(await round_of_calls())
            await asyncio.gather(*stuck)
    free_p99, locked_p99 = sorted(free)[1], sorted(locked)[1]
    assert locked_p99 <= 5 * free_p99, (
        f"p99 {locked_p99 * 1000:.1f} ms locked, {free_p99 * 1000:.1f} ms not"
    )
    assert await tokendb.get_balance(user=held) == 1000  # every call for it gave up uncharged


async def test_a_user_found_locked_goes_alone_and_no_later_batch_waits_for_its_row(
    tokendb_clean: str, funded_user, coalescing_on, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a batch has waited out the lane's patience for a locked row, that user's next
    calls skip the lane (alone, each waiting for the row with the normal lock timeout), so
    the next batches do not wait for the row again; a call that goes through ends it."""
    skipping: list[int] = []
    write_when_sent = _db.write_when_sent

    def counted(sql: str, arguments: Any) -> Any:
        if sql is _ledger_sql.BATCH_SKIPPING:
            skipping.append(1)
        return write_when_sent(sql, arguments)

    monkeypatch.setattr(_db, "write_when_sent", counted)
    monkeypatch.setattr(ledger, "_locked_users", {})
    first, held, a, b = [await funded_user(balance=100) for _ in range(4)]
    async with holding_row_lock(tokendb_clean, held.id) as lock:
        waiting = []
        for _ in range(3):
            lone = started(tokendb.charge(user=first, amount=1))
            await asyncio.sleep(0)  # in flight: the next three form a batch
            batch = [started(tokendb.charge(user=u, amount=1)) for u in (held, a, b)]
            await asyncio.wait([lone, *batch[1:]], timeout=30)
            assert all(call.done() for call in (lone, *batch[1:]))
            waiting.append(batch[0])
        assert not any(call.done() for call in waiting)
        assert len(skipping) == 1, "a later batch waited for the locked row again"
        assert set(ledger._locked_users) == {held.id}
        await blocked_backends(lock, like=f"%{_ledger_sql.MOVE.strip()[:20]}%", count=3)
    assert sorted([(await call).balance_after for call in waiting]) == [97, 98, 99]
    assert ledger._locked_users == {}
    assert [await tokendb.get_balance(user=u) for u in (first, held, a, b)] == [97] * 4


async def test_calls_queued_while_a_batch_waits_for_a_locked_row_do_not_wait_for_it_again(
    tokendb_clean: str, funded_user, coalescing_on, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The locked user's next call, queued while the first batch waited for its row, is
    left out of the next batch (sent alone) once that row is known to be locked
    (found by review: that batch waited the lane's patience again)."""
    skipping: list[int] = []
    second_wave: list[asyncio.Task[Any]] = []
    write_when_sent = _db.write_when_sent
    first, held, a, b, c, d = [await funded_user(balance=100) for _ in range(6)]

    def counted(sql: str, arguments: Any) -> Any:
        if sql is _ledger_sql.BATCH_SKIPPING:
            skipping.append(1)
        if sql is _ledger_sql.BATCH_PATIENT and not second_wave:
            # While the first batch waits for the row, the locked user's next call and
            # two others queue: they form the next batch.
            second_wave.extend(started(tokendb.charge(user=u, amount=1)) for u in (held, c, d))
        return write_when_sent(sql, arguments)

    monkeypatch.setattr(_db, "write_when_sent", counted)
    monkeypatch.setattr(ledger, "_locked_users", {})
    async with holding_row_lock(tokendb_clean, held.id):
        lone = started(tokendb.charge(user=first, amount=1))
        await asyncio.sleep(0)  # in flight: the next three form a batch
        batch = [started(tokendb.charge(user=u, amount=1)) for u in (held, a, b)]
        await asyncio.wait([lone, *batch[1:]], timeout=30)
        assert len(second_wave) == 3  # queued while that batch waited
        await asyncio.wait(second_wave[1:], timeout=30)
        assert all(call.done() for call in (lone, *batch[1:], *second_wave[1:]))
        assert not batch[0].done() and not second_wave[0].done()
    await asyncio.gather(*batch, *second_wave)
    assert len(skipping) == 1, f"{len(skipping)} batches waited for the locked row"
    assert await tokendb.get_balance(user=held) == 98


async def test_a_user_marked_locked_is_unmarked_by_its_next_decided_call(
    tokendb_clean: str, funded_user, coalescing_on, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under SKIP LOCKED an unknown user's item has no row either, so it is marked like a
    locked one; its call, sent alone, is decided (NotFound) and ends the mark, as any
    decided call of a marked user does; the locked user's stays until its call goes through."""
    monkeypatch.setattr(ledger, "_locked_users", {})
    first, held, a = [await funded_user(balance=100) for _ in range(3)]
    async with holding_row_lock(tokendb_clean, held.id):
        lone = started(tokendb.charge(user=first, amount=1))
        await asyncio.sleep(0)
        batch = [started(tokendb.charge(user=u, amount=1)) for u in (held, UNKNOWN_USER, a)]
        await asyncio.wait([lone, *batch[1:]], timeout=30)
        # Its item, left undecided, went alone at once (ALONE): NotFound ended the mark.
        with pytest.raises(tokendb.NotFound):
            await batch[1]
        assert set(ledger._locked_users) == {held.id}
        with pytest.raises(tokendb.NotFound):
            await tokendb.charge(user=UNKNOWN_USER, amount=1)
        assert set(ledger._locked_users) == {held.id}
    await batch[0]  # sent alone by the batch's ALONE, and through: the mark ends
    assert ledger._locked_users == {}
    await tokendb.charge(user=held, amount=1)
    assert ledger._locked_users == {}


def test_the_marks_of_locked_users_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past _LOCKED_USERS_KEPT entries, marking drops the expired ones."""
    monkeypatch.setattr(ledger, "_locked_users", {})
    expired = [uuid.uuid4() for _ in range(ledger._LOCKED_USERS_KEPT + 1)]
    ledger._found_locked(set(expired))
    for user_id in expired:
        ledger._locked_users[user_id] = 0.0  # long past
    fresh = uuid.uuid4()
    ledger._found_locked({fresh})
    assert list(ledger._locked_users) == [fresh]
    assert ledger._locked_lately(fresh)
    assert not ledger._locked_lately(uuid.uuid4())
