"""Group commit for charges: concurrent ``charge()`` calls share one statement.

Design
======

A gateway charges once per request. With one statement per call, a hot
user's charges queue on its row lock one commit at a time, and every call
pays a commit of its own. Here concurrent calls in one process go out
together, group-commit style::

    charge() ─┐                      ┌─ batch in flight: one statement (_BATCH)
    charge() ─┼─► queue (this loop) ─┤
    charge() ─┘                      └─ arrivals meanwhile form the next batch

*No timer.* A call that finds no batch in flight goes out on the loop's next
turn, and a batch of one is the plain single statement
(:data:`tokendb.ledger._MOVE`), so a lone call costs what it always did.
Batches form only from calls that arrive while a batch is in flight. One
batch is in flight per event loop and pool: two or three were measured, and
their smaller batches contending for the same locks were slower.

*Same outcome as one call after another.* :data:`_BATCH` locks the batch's
users, then walks each user's items in arrival order with a recursive CTE
carrying the running balance: an item is a *repeat* when its
``reference_id`` is in the ledger already or was moved earlier in the batch,
it *moves* when the balance covers it, and is refused (*short*) otherwise.
That is the sequence of decisions the calls would have made one by one, so
every caller gets its own row, its own :class:`InsufficientTokens` (with the
balance it would have seen), :class:`ReferenceConflict` or :class:`NotFound`.
The statement's snapshot can miss a reference another process committed
while the batch waited for a lock; the idempotency index then refuses the
duplicate and the batch runs again on a new snapshot, where it is a repeat.

*Deadlock-free.* The users are locked by ``ORDER BY id FOR UPDATE``: every
batch (of any process) takes its locks in id order, and every other
statement of tokendb holds at most one user lock, so no wait cycle can form.
(Application transactions that lock several users in another order can still
deadlock; PostgreSQL then aborts one side and a batch is retried.)

*Durable.* A caller resumes only after the statement carrying its charge has
committed; nothing waits in memory across a crash. Connection loss while a
batch is in flight is :class:`DatabaseUnavailable` with
``outcome_unknown=True`` for each of its callers: retry with the same
``reference_id``.

*The books.* All rows of a batch share one ``clock_timestamp()`` read after
every lock is held, and their ids are minted in arrival order
(:func:`tokendb.ids.new_id` is monotonic), so one user's rows sort by
``(created_at, id)`` in the order their ``balance_after`` chain was computed.

*Failure isolation.* A constraint or trigger that refuses the statement
refuses it whole, and nothing was written: the batch is re-run one call at a
time so the poison item fails alone. A timeout or a lost connection fails the
batch's callers only; the next batch starts afresh.

*Cancellation.* A call cancelled while queued is dropped before its batch is
built: it is not charged. Once its batch is sent, the statement is not
cancelled with it (other callers ride on it): the charge commits or fails as
if the caller had stayed, and the caller only stops waiting, so for it the
outcome is unknown, as for any write cancelled after it was sent. A retry
with the same ``reference_id`` returns the original row.

*Scope.* Only calls outside a transaction are coalesced: inside the
caller's own, ``charge()`` runs its single statement on the caller's connection.
``tokendb.init(coalesce_charges=False)`` turns it off. :func:`charge_many`
sends a list of charges as batches of its own, in list order.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias
from uuid import UUID

import asyncpg
from tortoise.backends.base.client import TransactionalDBClient

from tokendb import _db, ledger
from tokendb.errors import (
    DatabaseUnavailable,
    InsufficientTokens,
    NotFound,
    ReferenceConflict,
    TokenDBError,
    ValidationError,
)
from tokendb.ids import new_id
from tokendb.models import TokenTransaction, TransactionType, User

__all__ = ["MAX_BATCH", "ChargeItem", "charge_many", "submit"]

MAX_BATCH = 256
"""Charges per statement. Beyond a few hundred a batch only holds its locks longer."""

Outcome: TypeAlias = TokenTransaction | TokenDBError

# $1 users, $2 amounts (> 0), $3 new row ids (minted in arrival order),
# $4 reference ids, $5 descriptions; item i is element i of each array.
_BATCH = """
WITH RECURSIVE items AS MATERIALIZED (
    SELECT i.seq, i.user_id, i.amount, i.id, i.reference_id, i.description,
           row_number() OVER (PARTITION BY i.user_id ORDER BY i.seq) AS rank
    FROM unnest($1::uuid[], $2::int[], $3::uuid[], $4::uuid[], $5::text[])
         WITH ORDINALITY AS i(user_id, amount, id, reference_id, description, seq)
), locked AS MATERIALIZED (
    SELECT id, token_balance FROM users WHERE id = ANY($1::uuid[])
    ORDER BY id FOR UPDATE                          -- the locks, in id order
), stamp AS MATERIALIZED (
    SELECT clock_timestamp() AS at FROM (SELECT count(*) FROM locked) AS held
), prior AS MATERIALIZED (
    SELECT t.user_id, t.reference_id, t.id, t.amount, t.description,
           t.balance_after, t.created_at
    FROM token_transactions t
    WHERE t.type = 'usage' AND t.reference_id IS NOT NULL
      AND (t.user_id, t.reference_id) IN (SELECT user_id, reference_id FROM items)
), walk (user_id, rank, seq, outcome, balance, moved_refs) AS (
    SELECT id, 0::bigint, 0::bigint, '', token_balance, ARRAY[]::uuid[] FROM locked
  UNION ALL
    SELECT w.user_id, i.rank, i.seq, step.outcome,
           CASE step.outcome WHEN 'moved' THEN w.balance - i.amount ELSE w.balance END,
           CASE step.outcome WHEN 'moved' THEN w.moved_refs || i.reference_id
                ELSE w.moved_refs END
    FROM walk w
    JOIN items i ON i.user_id = w.user_id AND i.rank = w.rank + 1
    CROSS JOIN LATERAL (
        SELECT CASE
            WHEN i.reference_id = ANY(w.moved_refs) OR EXISTS (
                SELECT 1 FROM prior p
                WHERE p.user_id = i.user_id AND p.reference_id = i.reference_id
            ) THEN 'repeat'
            WHEN w.balance >= i.amount THEN 'moved'
            ELSE 'short'
        END AS outcome
    ) AS step
), debited AS (
    UPDATE users u SET token_balance = last.balance, updated_at = stamp.at
    FROM (
        SELECT DISTINCT ON (user_id) user_id, balance FROM walk ORDER BY user_id, rank DESC
    ) AS last, stamp
    WHERE u.id = last.user_id
      AND EXISTS (SELECT 1 FROM walk m WHERE m.user_id = last.user_id AND m.outcome = 'moved')
), inserted AS (
    INSERT INTO token_transactions
        (id, user_id, amount, type, description, reference_id, balance_after, created_at)
    SELECT i.id, i.user_id, -i.amount, 'usage', i.description, i.reference_id, w.balance, stamp.at
    FROM walk w JOIN items i ON i.seq = w.seq CROSS JOIN stamp
    WHERE w.outcome = 'moved'
)
SELECT w.seq, w.outcome, w.balance, stamp.at,
       p.id AS prior_id, p.amount AS prior_amount, p.description AS prior_description,
       p.balance_after AS prior_balance_after, p.created_at AS prior_created_at
FROM walk w CROSS JOIN stamp
JOIN items i ON i.seq = w.seq
LEFT JOIN prior p ON w.outcome = 'repeat'
                 AND p.user_id = i.user_id AND p.reference_id = i.reference_id
WHERE w.rank > 0
"""

_BATCH_WIDE = (
    asyncpg.exceptions.QueryCanceledError,  # statement_timeout
    asyncpg.exceptions.LockNotAvailableError,  # lock_timeout
    *_db._RETRYABLE,  # still conflicting after the seam's retries
)


async def _execute(movements: Sequence[ledger._Movement]) -> list[Outcome]:
    """Charge ``movements`` in order, as one statement; one outcome per movement. Never raises
    (except :class:`asyncio.CancelledError`)."""
    if len(movements) == 1:
        return [await _one(movements[0])]
    ids = [new_id() for _ in movements]  # in arrival order: the chain's tie-breaker
    columns = (
        [m.user_id for m in movements],
        [m.amount for m in movements],
        ids,
        [m.reference_id for m in movements],
        [m.description for m in movements],
    )
    for _ in range(3):
        try:
            rows = await _db.write(_BATCH, *columns)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == ledger._IDEMPOTENCY_INDEX:
                # Another process used one of the references after this
                # statement's snapshot was taken: a new statement sees it.
                continue
            break
        except _BATCH_WIDE as exc:
            return _failed(exc, len(movements))
        except asyncpg.PostgresError:
            break  # refused as a whole, nothing written: find the item at fault below
        except Exception as exc:  # every caller gets an outcome
            return _failed(exc, len(movements))
        return _outcomes(movements, ids, rows)
    return [await _one(movement) for movement in movements]


async def _one(movement: ledger._Movement) -> Outcome:
    try:
        return await ledger._apply(movement, TransactionType.USAGE)
    except Exception as exc:  # the error is this caller's outcome
        return _db.translate(exc)


def _failed(exc: BaseException, count: int) -> list[Outcome]:
    """The same failure for ``count`` callers, one exception object each."""
    if not isinstance(exc, TokenDBError):
        return [_db.translate(exc) for _ in range(count)]
    clones: list[Outcome] = []
    for _ in range(count):
        clone = exc.__class__.__new__(exc.__class__)
        clone.__dict__.update(exc.__dict__)
        clone.args = exc.args
        clone.__cause__ = exc.__cause__
        clones.append(clone)
    return clones


def _outcomes(
    movements: Sequence[ledger._Movement], ids: list[UUID], rows: list[_db.Record]
) -> list[Outcome]:
    by_seq = {row["seq"]: row for row in rows}
    moved: dict[tuple[UUID, UUID], TokenTransaction] = {}
    outcomes: list[Outcome] = []
    for seq, (movement, row_id) in enumerate(zip(movements, ids, strict=True), start=1):
        user_id, amount, description, reference = movement
        row = by_seq.get(seq)
        if row is None:  # its user was not there to lock
            outcomes.append(NotFound("user", user_id))
        elif row["outcome"] == "moved":
            charged = _usage_row(
                row_id, user_id, amount, description, reference, row["balance"], row["at"]
            )
            if reference is not None:
                moved[user_id, reference] = charged
            outcomes.append(charged)
        elif row["outcome"] == "short":
            outcomes.append(InsufficientTokens(user_id, int(row["balance"]), amount))
        else:
            assert reference is not None
            existing = moved.get((user_id, reference))
            if existing is None:
                existing = _usage_row(
                    row["prior_id"],
                    user_id,
                    -row["prior_amount"],
                    row["prior_description"],
                    reference,
                    row["prior_balance_after"],
                    row["prior_created_at"],
                )
            try:
                outcomes.append(ledger._as_repeat(existing, -amount))
            except ReferenceConflict as exc:
                outcomes.append(exc)
    return outcomes


def _usage_row(
    row_id: UUID,
    user_id: UUID,
    amount: int,
    description: str | None,
    reference: UUID | None,
    balance_after: int,
    created_at: Any,
) -> TokenTransaction:
    return _db.to_model(
        TokenTransaction,
        {
            "id": row_id,
            "user_id": user_id,
            "amount": -amount,
            "type": TransactionType.USAGE.value,
            "description": description,
            "reference_id": reference,
            "balance_after": balance_after,
            "created_at": created_at,
        },
    )


_Waiter: TypeAlias = "asyncio.Future[TokenTransaction]"


class _Lane:
    """The charges of one event loop waiting for one connection pool, and their flusher."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: deque[tuple[ledger._Movement, _Waiter]] = deque()
        self.flushing = False
        self._tasks: set[asyncio.Task[None]] = set()  # referenced while they run

    def submit(self, movement: ledger._Movement) -> _Waiter:
        waiter: _Waiter = self.loop.create_future()
        self.queue.append((movement, waiter))
        if not self.flushing:
            self.flushing = True
            task = self.loop.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return waiter

    async def _flush(self) -> None:
        try:
            while batch := self._take():
                await self._send(batch)
        except BaseException:
            self._fail_queued()
            raise
        finally:
            # Set in the same step that found the queue empty: a call queued
            # after this point starts a new flusher.
            self.flushing = False

    def _take(self) -> list[tuple[ledger._Movement, _Waiter]]:
        batch: list[tuple[ledger._Movement, _Waiter]] = []
        while self.queue and len(batch) < MAX_BATCH:
            entry = self.queue.popleft()
            if not entry[1].done():  # a cancelled caller is not charged
                batch.append(entry)
        return batch

    async def _send(self, batch: list[tuple[ledger._Movement, _Waiter]]) -> None:
        try:
            outcomes = await _execute([movement for movement, _ in batch])
        except BaseException:
            for _, waiter in batch:
                if not waiter.done():
                    waiter.set_exception(
                        DatabaseUnavailable(
                            "the charge coalescer was stopped while this charge was in "
                            "flight; the outcome is unknown: retry with the same reference_id",
                            outcome_unknown=True,
                        )
                    )
            raise
        for (_, waiter), outcome in zip(batch, outcomes, strict=True):
            if waiter.done():
                continue  # cancelled in flight: the charge stands, nobody waits for it
            if isinstance(outcome, TokenDBError):
                waiter.set_exception(outcome)
            else:
                waiter.set_result(outcome)

    def _fail_queued(self) -> None:
        while self.queue:
            _, waiter = self.queue.popleft()
            if not waiter.done():
                waiter.set_exception(
                    DatabaseUnavailable("the charge coalescer was stopped; nothing was written")
                )


_lanes: weakref.WeakKeyDictionary[Any, _Lane] = weakref.WeakKeyDictionary()


async def submit(movement: ledger._Movement) -> TokenTransaction:
    """Charge a validated ``movement`` in the next batch; return its row once that batch committed.

    Inside the caller's own transaction, the single statement on its
    connection instead: a batch would commit the charge outside it. Raises
    what :func:`tokendb.charge` raises.
    """
    client = _db._client()
    if isinstance(client, TransactionalDBClient):
        return await ledger._apply(movement, TransactionType.USAGE)
    loop = asyncio.get_running_loop()
    lane = _lanes.get(client)
    if lane is None or lane.loop is not loop:
        lane = _lanes[client] = _Lane(loop)
    return await lane.submit(movement)


@dataclass(frozen=True, slots=True)
class ChargeItem:
    """One charge for :func:`charge_many`: the keyword arguments of :func:`tokendb.charge`."""

    user: User | UUID | str
    amount: int
    description: str | None = None
    reference_id: UUID | str | None = None


_ITEM_KEYS = frozenset(("user", "amount", "description", "reference_id"))


def _movement(item: Any) -> ledger._Movement:
    if isinstance(item, ChargeItem):
        return ledger._validated(item.user, item.amount, item.description, item.reference_id)
    if not isinstance(item, Mapping):
        raise ValidationError(
            "items", f"expected a ChargeItem or a mapping, got {type(item).__name__}"
        )
    unknown = set(item) - _ITEM_KEYS
    if unknown:
        raise ValidationError("items", f"unknown keys {sorted(map(str, unknown))}")
    if "user" not in item or "amount" not in item:
        raise ValidationError("items", "each item needs a user and an amount")
    return ledger._validated(
        item["user"], item["amount"], item.get("description"), item.get("reference_id")
    )


@_db.translated
async def charge_many(
    *, items: Sequence[ChargeItem | Mapping[str, Any]]
) -> list[TokenTransaction | TokenDBError]:
    """Charge every item, in list order; return one result per item, in the same order.

    Each item is what :func:`tokendb.charge` takes (a :class:`ChargeItem` or a
    mapping with ``user``, ``amount`` and optionally ``description`` and
    ``reference_id``), and its result is what that call would have returned,
    or the :class:`TokenDBError` it would have raised (:class:`InsufficientTokens`,
    :class:`ReferenceConflict`, :class:`NotFound`, :class:`ValidationError`,
    :class:`DatabaseUnavailable` …): the items are applied as if charged one
    after another, repeats of a ``reference_id`` within the list included.

    One statement per :data:`MAX_BATCH` items, each committed on its own
    (inside the caller's transaction: part of it). Nothing is raised for an
    item; an item whose batch was lost with the connection carries
    ``DatabaseUnavailable(outcome_unknown=True)``. Raises
    :class:`ValidationError` only when ``items`` is not a list (or tuple).
    """
    if not isinstance(items, (list, tuple)):
        raise ValidationError("items", "must be a list of charges")
    results: list[Outcome] = []
    valid: list[tuple[int, ledger._Movement]] = []
    for index, item in enumerate(items):
        try:
            valid.append((index, _movement(item)))
        except TokenDBError as exc:
            results.append(exc)
        else:
            results.append(_PENDING)
    for start in range(0, len(valid), MAX_BATCH):
        chunk = valid[start : start + MAX_BATCH]
        outcomes = await _execute([movement for _, movement in chunk])
        for (index, _), outcome in zip(chunk, outcomes, strict=True):
            results[index] = outcome
    return results


_PENDING: Outcome = TokenDBError("not charged yet")  # a placeholder that never leaves charge_many
