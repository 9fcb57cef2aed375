"""The ledger's SQL: every statement that writes a ledger row or reads the books.

:mod:`tokendb.ledger` decides *what* to do (validate, coalesce or not);
this module says *how the database does it*: each statement, its
parameters, and the Python that sends it and turns its rows into results.
Every ledger row tokendb writes is written by a statement here — a charge,
a top-up, a bonus, a refund, a batch of charges, a billed chat message, the
signup bonus — so each rule of the books has one home:

==========================================  =======================================
rule                                        where
==========================================  =======================================
balance never below 0, decided with the     :data:`MOVE` (``WHERE token_balance +
user's row lock held                        delta >= 0``), :data:`BATCH` (the walk)
a repeated ``reference_id`` moves nothing   :data:`MOVE` (``prior``), :data:`BATCH`
a ledger row's columns                      :func:`_record` (from the model)
refunds within their charge                 :func:`refund` (lock, then sum)
a key's limit, decided under its row lock   :func:`decide_under_lock` (charges,
                                            holds) with :mod:`tokendb._limits_sql`;
                                            the statements move nothing through a
                                            limited key (``_limits_sql.LIMITED``)
a refusal explained, then decided locked    :func:`refused`, :func:`decide_under_lock`
a hold's capture                            :func:`capturing` (``CAPTURE``,
                                            :data:`ADD_MESSAGE_CAPTURE`)
the books balance                           :data:`AUDIT`, :data:`AUDIT_USER`,
                                            :data:`AUDIT_SINCE_CHECKPOINT`
==========================================  =======================================

What comes next goes here too: a condition on the available balance (holds)
belongs in the ``WHERE`` of :data:`MOVE`, in the walk of :data:`BATCH` and
in :data:`ADD_MESSAGE`'s debit; a new ledger column is a
value in each :func:`_record` call; a rollup written with the movement is one
more CTE of each statement that calls :func:`_record`.

Why one statement cannot race
=============================

``users.token_balance`` is a cache of ``Σ token_transactions.amount`` for the
user, kept exact by writing both in **one SQL statement** (:data:`MOVE`)::

    UPDATE users SET token_balance = token_balance + delta
     WHERE id = user AND token_balance + delta >= 0        -- the row lock is taken here
    → INSERT INTO token_transactions (..., balance_after, created_at = clock_timestamp())

The ``UPDATE`` takes the user's row lock. A concurrent movement for the same
user blocks on that lock and, when it is released, PostgreSQL re-evaluates
the ``WHERE`` against the committed balance (READ COMMITTED's re-check), so
``token_balance + delta >= 0`` is judged on the real balance: no
read-then-write in Python, no overdraft, no lost update. The ledger row is
inserted from the ``UPDATE``'s ``RETURNING`` in the same statement, so a
balance never changes without its row. ``created_at`` is
``clock_timestamp()`` evaluated *after* the lock, so one user's rows in
``(created_at, id)`` order follow their ``balance_after`` chain.

*Idempotency.* A movement with a ``reference_id`` is skipped when a row with
the same ``(user, type, reference_id)`` exists; two concurrent first attempts
both pass that check (same snapshot) but the partial unique index
:data:`IDEMPOTENCY_INDEX` rejects the second statement as a whole, and the
caller gets the first row back. Same reference, different amount:
:class:`ReferenceConflict`.

Why a batch has each call's own outcome
=======================================

:data:`BATCH` charges many movements in one statement (the group commit of
``charge()``, and ``charge_many``). It locks the batch's users, then walks
each user's items in arrival order with a recursive CTE carrying the running
balance: an item is a *repeat* when its ``reference_id`` is in the ledger
already or was moved earlier in the batch, it *moves* when the balance
covers it, and is refused (*short*) otherwise. That is the sequence of
decisions the calls would have made one by one, so every caller gets its own
row, its own :class:`InsufficientTokens` (with the balance it would have
seen), :class:`ReferenceConflict` or :class:`NotFound`. The statement's
snapshot can miss a reference another process committed while the batch
waited for a lock; the idempotency index then refuses the duplicate and the
batch runs again on a new snapshot, where it is a repeat.

*Deadlock-free.* The users are locked by ``ORDER BY id FOR UPDATE``: every
batch (of any process) takes its locks in id order, and every other
statement of tokendb holds at most one user lock, so no wait cycle can form.
(Application transactions that lock several users in another order can still
deadlock; PostgreSQL then aborts one side and the batch is retried.)

*The books.* All rows of a batch share one ``clock_timestamp()`` read after
every lock is held, and their ids are minted in arrival order
(:func:`tokendb.ids.new_id` is monotonic), so one user's rows sort by
``(created_at, id)`` in the order their ``balance_after`` chain was computed.
They are inserted in that order too: the database checks each ledger row
against the user's newest row, which for the second row of a user in a
batch is the first (migration 2, ``token_transactions_chain``).

*Failure isolation.* A constraint or trigger that refuses the statement
refuses it whole, and nothing was written: the batch is re-run one movement
at a time so the poison item fails alone (the coalesced lane's callers each
send theirs alone, :func:`charge_coalesced`). The lane's batch waits for a
locked row only briefly (:data:`BATCH_PATIENT`), then goes on without its
user (:data:`BATCH_SKIPPING`). A timeout or a lost connection
fails the batch's movements only. Connection loss while a batch is in flight
is :class:`DatabaseUnavailable` with ``outcome_unknown=True`` for each of
them: retry with the same ``reference_id``.

*Backstops.* The database refuses what Python already refuses:
``users_token_balance_nonnegative``, the sign of ``amount`` per type, the
idempotency index, refunds within their charge (a trigger), and the ledger
is append-only (a trigger).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, TypeAlias, TypeVar
from uuid import UUID

import asyncpg

from tokendb import _args, _db, _keyset, _limits_sql, _sql
from tokendb._rows import hydrator, to_model
from tokendb._translate import RETRYABLE, TIMED_OUT, translate
from tokendb.errors import (
    InsufficientTokens,
    NotFound,
    ReferenceConflict,
    RefundExceedsCharge,
    TokenDBError,
    ValidationError,
)
from tokendb.ids import new_id
from tokendb.models import ChatMessage, TokenTransaction, TransactionType, User

__all__ = [
    "ADD_MESSAGE",
    "ADD_MESSAGE_CAPTURE",
    "AUDIT",
    "AUDIT_SINCE_CHECKPOINT",
    "AUDIT_USAGE",
    "AUDIT_USAGE_USER",
    "AUDIT_USER",
    "BALANCE",
    "BATCH",
    "BATCH_PATIENT",
    "BATCH_SKIPPING",
    "BY_REFERENCE",
    "CHECKPOINTS",
    "CREATE_USER",
    "IDEMPOTENCY_INDEX",
    "KEY_OWNER",
    "LOCK_CHARGE",
    "LOCK_USER",
    "MARKS",
    "MOVE",
    "MOVE_DECIDED",
    "PAGES",
    "REFUNDED",
    "SWEEP_USER",
    "Movement",
    "Outcome",
    "audit",
    "available_under_lock",
    "balance_or_none",
    "capturing",
    "charge_batch",
    "charge_coalesced",
    "decide_under_lock",
    "move",
    "record",
    "refund",
    "refused",
    "spendable_or_none",
]

IDEMPOTENCY_INDEX = "token_transactions_idempotency_key"

T = TypeVar("T")

Outcome: TypeAlias = TokenTransaction | TokenDBError
"""What one movement of a batch came to: its row, or the error its call raises."""


class Movement(NamedTuple):
    """A validated request to move ``amount`` (> 0) tokens of ``user_id``, for a usage row
    through ``api_key_id`` (one of the user's keys) for ``model``."""

    user_id: UUID
    amount: int
    description: str | None
    reference_id: UUID | None
    api_key_id: UUID | None = None
    model: str | None = None


def _record(source: str, **values: str) -> str:
    """``INSERT INTO token_transactions`` of a ledger row, its columns from the model.

    Every ``NOT NULL`` column needs a value; a nullable one left out gets the
    database's default (:func:`tokendb._sql.insert`).
    """
    return _sql.insert(TokenTransaction, values, source=source)


record = _record
"""For the ledger rows other statements write (a hold's capture: :mod:`tokendb._holds_sql`)."""


def capturing(*, hold: str, tokens: str, transaction: str, holder: str) -> str:
    """The CTEs ``captured`` (the hold, ``RETURNING h.*``) and ``debit`` (its user:
    ``id``, ``token_balance``) of a hold's capture: every statement that captures one.

    The hold ``hold`` of the locked user ``holder`` (a CTE with its ``id``) is
    captured for ``tokens`` (released for 0) only while active and unexpired and
    when it covers them; its user's held tokens drop by the hold's amount, the
    balance by ``tokens``, and the usage row is ``transaction``. Otherwise
    neither CTE writes (the statement's ledger row follows ``debit``).
    """
    return f"""captured AS (
    UPDATE token_holds h
    SET status = CASE WHEN {tokens} > 0 THEN 'captured' ELSE 'released' END,
        captured_amount = nullif({tokens}, 0),
        captured_transaction_id = CASE WHEN {tokens} > 0 THEN {transaction}::uuid END
    FROM {holder}
    WHERE h.id = {hold} AND h.user_id = {holder}.id AND h.status = 'active'
      AND h.expires_at > clock_timestamp() AND h.amount >= {tokens}
    RETURNING h.*
), debit AS (
    UPDATE users u
    SET token_balance = u.token_balance - {tokens}, held_tokens = u.held_tokens - captured.amount,
        updated_at = clock_timestamp()
    FROM captured
    WHERE u.id = captured.user_id
    RETURNING u.id, u.token_balance
)"""


# --- one movement -----------------------------------------------------------------------

_MOVED = _record(
    "moved",
    id="$4",
    user_id="id",
    amount="$2",
    type="$3",
    description="$6",
    reference_id="$5",
    balance_after="token_balance",
    created_at="clock_timestamp()",
    api_key_id="$7",
    model="$8",
)


# $1 user, $2 delta (negative for a debit), $3 type, $4 new row id, $5 reference,
# $6 description, $7 the API key (one of the user's) or NULL, $8 the model or NULL.
def _move(*, decided: bool) -> str:
    return f"""
WITH prior AS (
    SELECT 1 FROM token_transactions
    WHERE $5::uuid IS NOT NULL AND $3 <> 'refund'  -- refunds share their charge's id
      AND user_id = $1 AND type = $3 AND reference_id = $5
), moved AS (
    UPDATE users                                    -- the user's row lock is taken here
    SET token_balance = token_balance + $2, updated_at = clock_timestamp()
    WHERE id = $1 AND token_balance - held_tokens + $2 >= 0 AND NOT EXISTS (SELECT 1 FROM prior)
      AND {_limits_sql.key_allowed("$7", "$1", decided=decided)}
    RETURNING id, token_balance
)
{_MOVED}
RETURNING *
"""


MOVE = _move(decided=False)
"""One movement in one statement: nothing moves through a key with a limit
(:mod:`tokendb._limits_sql` decides those under the key's lock)."""

MOVE_DECIDED = _move(decided=True)
""":data:`MOVE` whose key's limit was decided by the caller under the key's lock (or does
not apply: a refund)."""

BY_REFERENCE = (
    "SELECT * FROM token_transactions WHERE user_id = $1 AND type = $2 AND reference_id = $3"
)
BALANCE = "SELECT token_balance, held_tokens FROM users WHERE id = $1"
KEY_OWNER = "SELECT user_id, token_limit FROM api_keys WHERE id = $1"
LOCK_USER = "SELECT token_balance, held_tokens FROM users WHERE id = $1 FOR UPDATE"

# $1 user, whose row lock the caller holds: its expired holds are marked and
# their tokens freed. Every writer of a user's holds holds that lock, so no
# hold of this user changes meanwhile.
SWEEP_USER = """
WITH swept AS (
    UPDATE token_holds SET status = 'expired'
    WHERE user_id = $1 AND status = 'active' AND expires_at <= clock_timestamp()
    RETURNING amount
)
UPDATE users SET held_tokens = held_tokens - (SELECT coalesce(sum(amount), 0) FROM swept)
WHERE id = $1
RETURNING token_balance, held_tokens
"""


async def available_under_lock(conn: _db.Connection, user_id: UUID) -> int | None:
    """Lock ``user_id``'s row, free its expired holds; what it can spend (None: no such user).

    ``held_tokens`` counts a hold until it is marked, so a debit refused on
    it may have been refused by a hold that has expired: this is the second
    look, under the lock, where expiry takes effect without a sweeper.
    """
    locked = await conn.fetchrow(LOCK_USER, user_id)
    if locked is None:
        return None
    if locked["held_tokens"]:
        locked = await conn.fetchrow(SWEEP_USER, user_id)
        assert locked is not None  # the row is locked: it is still there
    return int(locked["token_balance"]) - int(locked["held_tokens"])


async def move(movement: Movement, kind: TransactionType) -> TokenTransaction:
    """Move a validated ``movement`` in one statement (:data:`MOVE`); return its row.

    When nothing moved, two reads say why (a repeat, an unknown user, a short
    balance). Should the balance read show enough after all (a credit landed
    between the refusal and the read), the call is decided again with the
    user's row locked (:func:`_move_under_lock`), so the balance an
    :class:`InsufficientTokens` reports is the one the refusal was made on.

    Raises :class:`InsufficientTokens`, :class:`ReferenceConflict`,
    :class:`NotFound` and :class:`ValidationError` (a balance past the column).
    """
    user_id, requested, text, reference, key_id, model = movement
    delta = -requested if kind is TransactionType.USAGE else requested
    arguments = (user_id, delta, kind.value, new_id(), reference, text, key_id, model)
    if key_id is not None and _limits_sql.probably_limited(key_id):
        return await _move_under_lock(arguments, requested)
    try:
        rows = await _db.write(MOVE, *arguments)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != IDEMPOTENCY_INDEX or reference is None:
            raise
        rows = []  # a concurrent first attempt with this reference won
    except asyncpg.NumericValueOutOfRangeError as exc:
        raise _args.past_integer_column("amount") from exc
    if rows:
        return to_model(TokenTransaction, rows[0])

    if reference is not None:
        existing = await _db.read(BY_REFERENCE, user_id, kind.value, reference)
        if existing:
            return _as_repeat(to_model(TokenTransaction, existing[0]), delta)
    await refused(user_id, key_id, requested if delta < 0 else 0)
    return await _move_under_lock(arguments, requested)


async def refused(user_id: UUID, key_id: UUID | None, debit: int) -> None:
    """Why a one-statement :data:`MOVE` or :data:`tokendb._holds_sql.HOLD` of ``debit``
    tokens (0: a credit) wrote nothing, when it was no repeat.

    Raises :class:`NotFound` (the user, or a key not the user's) and
    :class:`InsufficientTokens` (short, and no holds that may have expired).
    Returns when the call must be decided again under the locks
    (:func:`decide_under_lock`): the key has a limit, or the balance covers the
    debit after all (a credit landed), or the user has holds, maybe expired.
    """
    found = await spendable_or_none(user_id)
    if found is None:
        raise NotFound("user", user_id)
    if key_id is not None:
        keys = await _db.read(KEY_OWNER, key_id)
        if not keys or keys[0]["user_id"] != user_id:
            raise NotFound("API key", key_id)
        if keys[0]["token_limit"] is not None:
            return  # decided under the key's lock
    available, holds = found
    if available < debit and not holds:
        raise InsufficientTokens(user_id, available, debit)


async def decide_under_lock(
    conn: _db.Connection,
    *,
    user_id: UUID,
    key_id: UUID | None,
    requested: int,
    repeat: Callable[[], Awaitable[T | None]],
    write: Callable[[], Awaitable[T | None]],
) -> T:
    """A debit or a hold of ``requested`` tokens decided with the rows locked, in order:
    the key's row (when through a key), a ``repeat`` of the reference (its row,
    or None), the key's limit (:func:`tokendb._limits_sql.check`), the user's
    row with its expired holds freed (:func:`available_under_lock`), then the
    ``write`` (its row, or None: :class:`InsufficientTokens` on that balance).

    Raises :class:`NotFound`, :class:`KeyLimitExceeded`, :class:`InsufficientTokens`.
    """
    limit = None if key_id is None else await _limits_sql.lock_key(conn, key_id, user_id)
    earlier = await repeat()
    if earlier is not None:
        return earlier
    if limit is not None:
        assert key_id is not None
        await _limits_sql.check(conn, key_id, limit, requested)
    available = await available_under_lock(conn, user_id)
    if available is None:
        raise NotFound("user", user_id)
    written = await write()
    if written is not None:
        return written
    raise InsufficientTokens(user_id, available, requested)


async def _move_under_lock(arguments: tuple[Any, ...], requested: int) -> TokenTransaction:
    """:data:`MOVE_DECIDED` in a transaction that holds the key's row lock (when the
    movement is through a key) and then the user's (and has freed the user's
    expired holds: :func:`available_under_lock`).

    Through a key with a limit, the window is read after the key's lock, in
    a statement of its own, and the movement refused past the limit
    (:func:`tokendb._limits_sql.check`). A repeated reference is a repeat
    before it is a movement: it neither counts nor is refused.
    """
    user_id, delta, kind, _, reference, _, key_id, _ = arguments

    async def body(conn: _db.Connection) -> TokenTransaction:
        async def repeat() -> TokenTransaction | None:
            if reference is None:
                return None
            existing = await conn.fetchrow(BY_REFERENCE, user_id, kind, reference)
            if existing is None:
                return None
            return _as_repeat(to_model(TokenTransaction, existing), delta)

        async def write() -> TokenTransaction | None:
            row = await conn.fetchrow(MOVE_DECIDED, *arguments)
            return None if row is None else to_model(TokenTransaction, row)

        return await decide_under_lock(
            conn, user_id=user_id, key_id=key_id, requested=requested, repeat=repeat, write=write
        )

    with _args.fits_integer_column("amount"):
        return await _db.transaction(body)


def _as_repeat(existing: TokenTransaction, delta: int) -> TokenTransaction:
    """``existing``, the row a repeated reference found, unless its amount differs."""
    if existing.amount != delta:
        assert existing.reference_id is not None
        raise ReferenceConflict(
            existing.reference_id,
            existing_amount=abs(existing.amount),
            requested_amount=abs(delta),
        )
    return existing


async def balance_or_none(user_id: UUID) -> int | None:
    """``user_id``'s booked balance (Σ ledger), or None for an unknown user."""
    rows = await _db.read(BALANCE, user_id)
    return int(rows[0]["token_balance"]) if rows else None


async def spendable_or_none(user_id: UUID) -> tuple[int, bool] | None:
    """``user_id``'s balance minus ``held_tokens``, and whether it has active holds
    (some may have expired unmarked); None for an unknown user."""
    rows = await _db.read(BALANCE, user_id)
    if not rows:
        return None
    held = int(rows[0]["held_tokens"])
    return int(rows[0]["token_balance"]) - held, held > 0


# --- many charges in one statement ------------------------------------------------------

_BATCH_MOVED = _record(
    # In chain order: the database checks each row against the one inserted before it.
    "walk w JOIN items i ON i.seq = w.seq CROSS JOIN stamp WHERE w.outcome = 'moved'"
    " ORDER BY i.seq",
    id="i.id",
    user_id="i.user_id",
    amount="-i.amount",
    type="'usage'",
    description="i.description",
    reference_id="i.reference_id",
    balance_after="w.balance",
    created_at="stamp.at",
    api_key_id="i.api_key_id",
    model="i.model",
)

_LOCKED = (
    "SELECT id, token_balance, held_tokens FROM users WHERE id = ANY($1::uuid[])\n"
    "    ORDER BY id FOR UPDATE"
)

# $1 users, $2 amounts (> 0), $3 new row ids (minted in arrival order),
# $4 reference ids, $5 descriptions, $6 API keys, $7 models; item i is element i of each array.
BATCH = f"""
WITH RECURSIVE items AS MATERIALIZED (
    SELECT i.seq, i.user_id, i.amount, i.id, i.reference_id, i.description, i.api_key_id,
           i.model, i.api_key_id IS NULL OR k.user_id IS NOT DISTINCT FROM i.user_id AS key_ok,
           {_limits_sql.LIMITED} AS limited,  -- decided alone, under the key's lock
           row_number() OVER (PARTITION BY i.user_id ORDER BY i.seq) AS rank
    FROM unnest($1::uuid[], $2::int[], $3::uuid[], $4::uuid[], $5::text[], $6::uuid[],
                $7::text[])
         WITH ORDINALITY
         AS i(user_id, amount, id, reference_id, description, api_key_id, model, seq)
    LEFT JOIN api_keys k ON k.id = i.api_key_id
), locked AS MATERIALIZED (
    {_LOCKED}                          -- the locks, in id order
), stamp AS MATERIALIZED (
    SELECT clock_timestamp() AS at FROM (SELECT count(*) FROM locked) AS held
), prior AS MATERIALIZED (
    SELECT t.* FROM token_transactions t
    WHERE t.type = 'usage' AND t.reference_id IS NOT NULL
      AND (t.user_id, t.reference_id) IN (SELECT user_id, reference_id FROM items)
), walk (user_id, rank, seq, outcome, balance, held, moved_refs) AS (
    SELECT id, 0::bigint, 0::bigint, '', token_balance, held_tokens, ARRAY[]::uuid[] FROM locked
  UNION ALL
    SELECT w.user_id, i.rank, i.seq, step.outcome,
           CASE step.outcome WHEN 'moved' THEN w.balance - i.amount ELSE w.balance END,
           w.held,
           CASE step.outcome WHEN 'moved' THEN w.moved_refs || i.reference_id
                ELSE w.moved_refs END
    FROM walk w
    JOIN items i ON i.user_id = w.user_id AND i.rank = w.rank + 1
    CROSS JOIN LATERAL (
        SELECT CASE
            WHEN NOT i.key_ok THEN 'nokey'
            WHEN i.limited THEN 'limited'
            WHEN i.reference_id = ANY(w.moved_refs) OR EXISTS (
                SELECT 1 FROM prior p
                WHERE p.user_id = i.user_id AND p.reference_id = i.reference_id
            ) THEN 'repeat'
            WHEN w.balance - w.held >= i.amount THEN 'moved'
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
    {_BATCH_MOVED}
    RETURNING *
)
SELECT w.seq, w.outcome, w.balance - w.held AS available, w.held,
       {_sql.select_list(TokenTransaction, "r", "row_")},
       {_sql.select_list(TokenTransaction, "p", "prior_")}
FROM walk w
JOIN items i ON i.seq = w.seq
LEFT JOIN inserted r ON r.id = i.id
LEFT JOIN prior p ON w.outcome = 'repeat'
                 AND p.user_id = i.user_id AND p.reference_id = i.reference_id
WHERE w.rank > 0
"""


def _batch_locking(locked: str) -> str:
    assert BATCH.count(_LOCKED) == 1 and locked != _LOCKED
    return BATCH.replace(_LOCKED, locked)


# The coalesced lane's batches: $8 the lock_timeout of the statement (its own
# transaction), set before the first row lock is asked for (the filter runs
# on each user's row before FOR UPDATE locks it).
_PATIENT = _LOCKED.replace(
    "WHERE id = ANY($1::uuid[])",
    "WHERE id = ANY($1::uuid[]) AND set_config('lock_timeout', $8, true) <> ''",
)
BATCH_PATIENT = _batch_locking(_PATIENT)
""":data:`BATCH` that waits at most ``$8`` for its users' rows (``LockNotAvailable``)."""
BATCH_SKIPPING = _batch_locking(_PATIENT + " SKIP LOCKED")
""":data:`BATCH` that leaves out users whose rows are locked: their items get no row."""

_BATCH_WIDE = (*TIMED_OUT, *RETRYABLE)
"""Failures of a whole batch, whichever item it holds (retryable ones after the seam's retries)."""


async def charge_batch(movements: Sequence[Movement]) -> list[Outcome]:
    """Charge ``movements`` in order, as one statement (:data:`BATCH`); one outcome each.

    Never raises (except :class:`asyncio.CancelledError`): each movement's
    error is its outcome.
    """
    if len(movements) == 1:
        return [await _charge_alone(movements[0])]
    ids = [new_id() for _ in movements]  # in arrival order: the chain's tie-breaker
    columns = (
        [m.user_id for m in movements],
        [m.amount for m in movements],
        ids,
        [m.reference_id for m in movements],
        [m.description for m in movements],
        [m.api_key_id for m in movements],
        [m.model for m in movements],
    )
    for _ in range(3):
        try:
            rows = await _db.write(BATCH, *columns)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == IDEMPOTENCY_INDEX:
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
        outcomes = _outcomes(movements, rows)
        for index, outcome in enumerate(outcomes):
            if outcome is None:
                # Refused while the user had holds, some maybe expired: alone,
                # the call would have had the second look that frees them.
                # Or through a limited key: decided alone, under its lock.
                outcomes[index] = await _charge_alone(movements[index])
        return [outcome for outcome in outcomes if outcome is not None]
    return [await _charge_alone(movement) for movement in movements]


async def charge_coalesced(
    movements: Sequence[Movement],
    *,
    given_up: Callable[[int], bool],
    patience: float,
    found_locked: Callable[[set[UUID]], None] | None = None,
) -> list[Outcome | None]:
    """Charge ``movements`` as one statement without waiting for locks longer than
    ``patience`` seconds; one outcome each, None for a movement not decided here.

    The coalesced lane's batch (:mod:`tokendb._group_commit`): its callers
    are other users' too, so one user's locked row must not hold them up.
    :data:`BATCH_PATIENT` waits up to ``patience`` for the rows; past it, the
    statement runs again as :data:`BATCH_SKIPPING`, without the users whose
    rows are still locked. Their movements are None: the caller sends each
    alone (:func:`move`, with the normal ``lock_timeout``). Movements whose
    caller gave up before the statement was sent (``given_up(i)``, asked
    once a connection is held) are left out, and None too. A statement
    refused as a whole leaves every movement to its caller alone: the item at
    fault then fails on its own. ``found_locked`` is told the users left out
    because their rows stayed locked. Never raises (except
    :class:`asyncio.CancelledError`).
    """
    ids = [new_id() for _ in movements]  # in arrival order: the chain's tie-breaker
    timeout = f"{max(1, round(patience * 1000))}ms"
    sent: list[int] = []

    def arguments() -> tuple[Any, ...] | None:
        sent[:] = [index for index in range(len(movements)) if not given_up(index)]
        if not sent:
            return None
        chosen = [movements[index] for index in sent]
        return (
            [m.user_id for m in chosen],
            [m.amount for m in chosen],
            [ids[index] for index in sent],
            [m.reference_id for m in chosen],
            [m.description for m in chosen],
            [m.api_key_id for m in chosen],
            [m.model for m in chosen],
            timeout,
        )

    outcomes: list[Outcome | None] = [None] * len(movements)
    statement = BATCH_PATIENT
    for _ in range(3):
        failure: BaseException | None = None
        try:
            rows = await _db.write_when_sent(statement, arguments)
        except asyncpg.LockNotAvailableError:
            statement = BATCH_SKIPPING  # a row stayed locked: go on without its user
            continue
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == IDEMPOTENCY_INDEX:
                continue  # a reference used after the snapshot: a new statement sees it
            break
        except _BATCH_WIDE as exc:
            failure = exc
        except asyncpg.PostgresError:
            break  # refused as a whole, nothing written: each alone finds the item at fault
        except Exception as exc:  # every caller gets an outcome
            failure = exc
        decided = (
            _failed(failure, len(sent))
            if failure is not None
            else _outcomes(
                [movements[index] for index in sent],
                rows,
                unlocked=None if statement is BATCH_SKIPPING else NotFound,
            )
        )
        for index, decision in zip(sent, decided, strict=True):
            outcomes[index] = decision
        if failure is None and statement is BATCH_SKIPPING and found_locked is not None:
            answered = {row["seq"] for row in rows}  # an item's seq: its place among those sent
            found_locked(
                {
                    movements[index].user_id
                    for seq, index in enumerate(sent, start=1)
                    if seq not in answered
                }
            )
        break
    return outcomes


async def _charge_alone(movement: Movement) -> Outcome:
    try:
        return await move(movement, TransactionType.USAGE)
    except Exception as exc:  # the error is this movement's outcome
        return translate(exc)


def _failed(exc: BaseException, count: int) -> list[Outcome]:
    """The same failure for ``count`` callers, one exception object each."""
    if not isinstance(exc, TokenDBError):
        return [translate(exc) for _ in range(count)]
    clones: list[Outcome] = []
    for _ in range(count):
        clone = exc.__class__.__new__(exc.__class__)
        clone.__dict__.update(exc.__dict__)
        clone.args = exc.args
        clone.__cause__ = exc.__cause__
        clones.append(clone)
    return clones


def _outcomes(
    movements: Sequence[Movement],
    rows: list[_db.Record],
    *,
    unlocked: type[NotFound] | None = NotFound,
) -> list[Outcome | None]:
    """Each movement's outcome from :data:`BATCH`'s rows; None for one refused while
    its user had holds (its call alone then has the second look that frees
    them) and for one through a key with a limit (decided alone, under the
    key's lock). A movement without a row (its user was not there to lock, or,
    skipping locked rows, was locked) is ``unlocked``: :class:`NotFound`, or
    None (undecided: alone, too)."""
    by_seq = {row["seq"]: row for row in rows}
    charged_row = hydrator(TokenTransaction, "row_")  # the batch's rows all hold its columns
    moved: dict[tuple[UUID, UUID], TokenTransaction] = {}
    outcomes: list[Outcome | None] = []
    for seq, (user_id, amount, _, reference, key_id, _) in enumerate(movements, start=1):
        row = by_seq.get(seq)
        if row is None:
            outcomes.append(None if unlocked is None else unlocked("user", user_id))
        elif row["outcome"] == "nokey":
            assert key_id is not None
            outcomes.append(NotFound("API key", key_id))
        elif row["outcome"] == "limited":
            assert key_id is not None
            _limits_sql.remember(key_id, limited=True)
            outcomes.append(None)  # alone, as if it had come alone
        elif row["outcome"] == "moved":
            charged = charged_row(row)
            if reference is not None:
                moved[user_id, reference] = charged
            outcomes.append(charged)
        elif row["outcome"] == "short":
            if row["held"]:
                outcomes.append(None)
            else:
                outcomes.append(InsufficientTokens(user_id, int(row["available"]), amount))
        else:
            assert reference is not None
            existing = moved.get((user_id, reference)) or to_model(TokenTransaction, row, "prior_")
            try:
                outcomes.append(_as_repeat(existing, -amount))
            except ReferenceConflict as exc:
                outcomes.append(exc)
    return outcomes


# --- refunds ----------------------------------------------------------------------------

# $1 the charge, $2 its owner or NULL. Takes the user's row lock.
LOCK_CHARGE = f"""
SELECT t.user_id, t.amount, t.type, t.api_key_id, t.model, u.token_balance
FROM token_transactions t JOIN users u ON u.id = t.user_id
WHERE t.id = $1 AND {_sql.owned_by("$2", "t.user_id")}
FOR UPDATE OF u
"""

REFUNDED = """
SELECT coalesce(sum(amount), 0) AS refunded FROM token_transactions
WHERE reference_id = $1 AND type = 'refund'
"""


async def refund(
    charge_id: UUID, *, owner: UUID | None, requested: int | None, description: str | None
) -> TokenTransaction:
    """Refund ``requested`` tokens (None: all that is left) of the usage row ``charge_id``.

    Partial refunds add up to at most the charge, also concurrently: they
    serialise on the user's row lock, taken before the refunded sum is read.

    Raises :class:`RefundExceedsCharge`, :class:`NotFound` (unknown charge,
    or not ``owner``'s) and :class:`ValidationError` (not a usage row).
    """

    async def body(conn: _db.Connection) -> TokenTransaction:
        # Statement 1 takes the user's row lock; statement 2 then reads the
        # refunds with a fresh snapshot that includes every refund committed
        # before the lock was granted.
        locked = await conn.fetchrow(LOCK_CHARGE, charge_id, owner)
        if locked is None:
            raise NotFound("transaction", charge_id)
        if locked["type"] != TransactionType.USAGE.value:
            raise ValidationError(
                "transaction", f"only usage rows can be refunded, this is {locked['type']}"
            )
        refunded = await conn.fetchval(REFUNDED, charge_id)
        refundable = -int(locked["amount"]) - int(refunded)
        wanted = refundable if requested is None else requested
        if wanted <= 0 or wanted > refundable:
            raise RefundExceedsCharge(charge_id, refundable, wanted)
        row = await conn.fetchrow(
            MOVE_DECIDED,  # a credit: no key limit to decide
            locked["user_id"],
            wanted,
            TransactionType.REFUND.value,
            new_id(),
            charge_id,
            description if description is not None else f"refund of {charge_id}",
            locked["api_key_id"],  # a refund carries its charge's key and model
            locked["model"],
        )
        assert row is not None  # the lock is ours and credits have no floor
        return to_model(TokenTransaction, row)

    with _args.fits_integer_column("amount"):
        return await _db.transaction(body)


# --- statements of other modules that write ledger rows ---------------------------------

_NEW_USER = _sql.insert(
    User,
    {
        "id": "$1",
        "email": "$2",
        "password_hash": "$3",
        "name": "$4",
        "role": "$5",
        "token_balance": "$6",
        "held_tokens": "0",
        "created_at": "clock_timestamp()",
        "updated_at": "clock_timestamp()",
    },
)
_SIGNUP_BONUS = _record(
    "new_user WHERE token_balance > 0",
    id="$7",
    user_id="id",
    amount="token_balance",
    type="'bonus'",
    description="'signup bonus'",
    balance_after="token_balance",
    created_at="created_at",
)

# users.create_user: $1 id, $2 email, $3 password hash, $4 name, $5 role, $6 signup bonus,
# $7 the bonus row's id. The bonus row is written with the user: balance = Σ ledger from
# the first commit.
CREATE_USER = f"""
WITH new_user AS (
    {_NEW_USER}
    RETURNING *
), bonus AS (
    {_SIGNUP_BONUS}
)
SELECT * FROM new_user
"""


def _message(source: str) -> str:
    """``INSERT INTO chat_messages`` of the message, from ``source``: the session's row
    (``id``, ``tokens_used``) after it counted the message's tokens."""
    return _sql.insert(
        ChatMessage,
        {
            "id": "$1",
            "session_id": "id",
            "role": "$3",
            "content": "$4",
            "tokens": "$5",
            "tokens_used_after": "tokens_used",  # the session's total, this message included
            "created_at": "clock_timestamp()",
        },
        source=source,
    )


_MESSAGE = _message("session")


def _message_usage(source: str) -> str:
    return _record(
        source,
        id="$6",
        user_id="debit.id",
        amount="-$5",
        type="'usage'",
        description="'chat message (' || session.model || ')'",
        reference_id="$1",
        balance_after="debit.token_balance",
        created_at="clock_timestamp()",
        api_key_id="session.api_key_id",
        model="session.model",
    )


_MESSAGE_USAGE = _message_usage("debit, session")

_MESSAGE_BACK = ", ".join(
    _sql.quoted(column) for column in _sql.columns(ChatMessage) if column != "content"
)
"""The stored message's columns but its content, which the caller sent: echoing a
message of megabytes back would cost the caller's event loop as much again."""

# chats.add_message: $1 message id, $2 session, $3 role, $4 content, $5 tokens,
# $6 the usage row's id, $7 the session's owner or NULL, $8 true when the caller
# holds the session's key's lock and decided its limit (else nothing is written
# through a key with a limit: the caller takes the locked path).
# Session row first (tokens_used), then the user row (the debit). If the
# debit would go below zero, users_token_balance_nonnegative aborts the
# whole statement: the session update and the message go with it.
ADD_MESSAGE = f"""
WITH session AS (
    UPDATE chat_sessions SET tokens_used = tokens_used + $5
    WHERE id = $2 AND ended_at IS NULL AND {_sql.owned_by("$7")}
      AND ($8::bool OR $5 = 0 OR NOT EXISTS (
          SELECT 1 FROM api_keys k
          WHERE k.id = chat_sessions.api_key_id AND {_limits_sql.LIMITED}
      ))
    RETURNING id, user_id, api_key_id, model, tokens_used
), debit AS (
    UPDATE users
    SET token_balance = token_balance - $5, updated_at = clock_timestamp()
    WHERE $5 > 0 AND id = (SELECT user_id FROM session)
    RETURNING id, token_balance
), message AS (
    {_MESSAGE}
    RETURNING *
), usage AS (
    {_MESSAGE_USAGE}
    RETURNING id
)
SELECT {_MESSAGE_BACK} FROM message
"""


# --- reading the books ------------------------------------------------------------------

PAGES = _keyset.statements("token_transactions", "user_id", newest_first=True)
"""The first-page and next-page statements of ``list_transactions``."""

# A link of a user's chain, in seq order: each row continues the one before it
# (seq + 1, balance_after + amount, a later (created_at, id)); the first row
# continues nothing (seq 0, balance 0).
_BROKEN = """(
    balance_after <> lag(balance_after, 1, 0) OVER w + amount
    OR seq <> lag(seq, 1, 0) OVER w + 1
    OR (created_at, id) <= (lag(created_at) OVER w, lag(id) OVER w)
) IS TRUE"""

_BOOKS = """
    sum(amount) AS ledger_sum,
    count(*) FILTER (WHERE broken) AS broken_links,
    (array_agg(id ORDER BY seq) FILTER (WHERE broken))[1] AS first_broken"""

_OFF = "u.token_balance <> coalesce(b.ledger_sum, 0) OR coalesce(b.broken_links, 0) > 0"

AUDIT = f"""
WITH chain AS (
    SELECT user_id, id, seq, amount, {_BROKEN} AS broken
    FROM token_transactions
    WINDOW w AS (PARTITION BY user_id ORDER BY seq)   -- the (user_id, seq) index's order
), books AS (
    SELECT user_id, {_BOOKS}
    FROM chain GROUP BY user_id
)
SELECT u.id AS user_id, u.token_balance AS balance,
       coalesce(b.ledger_sum, 0) AS ledger_sum,
       coalesce(b.broken_links, 0) AS broken_links,
       b.first_broken
FROM users u LEFT JOIN books b ON b.user_id = u.id
WHERE {_OFF}
ORDER BY u.id
"""
"""Every user whose balance ≠ Σ amounts or whose chain is broken: one pass over the ledger."""

AUDIT_USER = f"""
WITH chain AS (
    SELECT id, seq, amount, {_BROKEN} AS broken
    FROM token_transactions
    WHERE user_id = $1                                -- the (user_id, seq) index
    WINDOW w AS (ORDER BY seq)
), books AS (
    SELECT {_BOOKS}
    FROM chain
)
SELECT u.id AS user_id, u.token_balance AS balance,
       coalesce(b.ledger_sum, 0) AS ledger_sum,
       coalesce(b.broken_links, 0) AS broken_links,
       b.first_broken
FROM users u CROSS JOIN books b
WHERE u.id = $1 AND ({_OFF})
"""
""":data:`AUDIT` for the user ``$1`` alone: its own statement, so the plan is always the
index's (a ``$1 IS NULL OR user_id = $1`` form gets a generic plan that windows the
whole ledger)."""


async def audit(statement: str, *args: Any) -> list[_db.Record]:
    """Run an audit statement (:data:`AUDIT`, :data:`AUDIT_SINCE_CHECKPOINT`) with JIT off.

    Their plans are estimated costly enough (one probe a user, a window over
    the ledger) that PostgreSQL compiles them: about 2 s of compilation for
    an incremental audit that then runs in 0.2 s at a million rows. ``jit``
    is set for this statement's transaction only, and put back when it runs
    inside the caller's.
    """

    async def body(conn: _db.Connection) -> list[_db.Record]:
        was = await conn.fetchval(
            "SELECT current_setting('jit') FROM set_config('jit', 'off', true)"
        )
        rows = await conn.fetch(statement, *args)
        await conn.execute("SELECT set_config('jit', $1, true)", was)
        return list(rows)

    return await _db.transaction(body)


CHECKPOINTS = "tokendb_audit_checkpoints"
MARKS = "tokendb_audit_marks"

AUDIT_SINCE_CHECKPOINT = "SELECT * FROM tokendb_audit_since_checkpoint($1)"
"""The books since the stored checkpoint ($1 the new checkpoint's id): every user whose rows
since their mark do not continue it, or whose balance is not the mark's plus the new amounts;
a checkpoint and the users' new marks are written in the same statement when there is none.
The statement is the owner's function (migration ``*_audit_marks_owner.py``), the only
writer of :data:`MARKS` and :data:`CHECKPOINTS`: a role that could write a mark could move
it past a broken row."""


def _audit_usage(user: str | None) -> str:
    """:data:`AUDIT_USAGE` over everyone (``user`` None) or over the user ``user`` alone."""
    ledger_rows = "" if user is None else f" AND t.user_id = {user}  -- the (user_id, seq) index"
    rollup_rows = "" if user is None else f" WHERE user_id = {user}  -- usage_daily_group_key"
    return f"""
WITH ledger AS (
    -- A refund counts on its charge's key, model and UTC day (as the rollup books it).
    SELECT t.user_id,
           CASE t.type WHEN 'refund' THEN c.api_key_id ELSE t.api_key_id END AS api_key_id,
           CASE t.type WHEN 'refund' THEN c.model ELSE t.model END AS model,
           (CASE t.type WHEN 'refund' THEN c.created_at ELSE t.created_at END
               AT TIME ZONE 'UTC')::date AS day,
           -t.amount AS tokens, (t.type = 'usage')::int AS requests
    FROM token_transactions t
    LEFT JOIN token_transactions c ON t.type = 'refund' AND c.id = t.reference_id
    WHERE t.type IN ('usage', 'refund'){ledger_rows}
), both_sides AS (
    SELECT user_id, api_key_id, model, day, tokens, requests, 0 AS ledger_tokens,
           0 AS ledger_requests
    FROM usage_daily{rollup_rows}
  UNION ALL
    SELECT user_id, api_key_id, model, day, 0, 0, tokens, requests FROM ledger
)
SELECT user_id, api_key_id, model, day,   -- GROUP BY puts NULLs together
       sum(tokens) AS tokens, sum(requests) AS requests,
       sum(ledger_tokens) AS ledger_tokens, sum(ledger_requests) AS ledger_requests
FROM both_sides
GROUP BY user_id, api_key_id, model, day
HAVING sum(tokens) <> sum(ledger_tokens) OR sum(requests) <> sum(ledger_requests)
ORDER BY user_id, day, api_key_id NULLS FIRST, model NULLS FIRST
"""


AUDIT_USAGE = _audit_usage(None)
"""Every group of ``usage_daily`` that is not what the ledger's usage and refund rows add
up to, with both sides."""

AUDIT_USAGE_USER = _audit_usage("$1")
""":data:`AUDIT_USAGE` for the user ``$1`` alone: its own statement, as :data:`AUDIT_USER`
(a ``$1 IS NULL OR user_id = $1`` form gets a generic plan that reads the whole ledger)."""


# chats.add_message with a hold: the parameters of ADD_MESSAGE, and $8 the hold.
# Locks the session row, then the user row, then the hold: the order of
# ADD_MESSAGE and of every statement on holds. The hold is captured for the
# message's tokens (released for 0 tokens) only while active and unexpired
# and when it covers them; the user's held tokens drop by the hold's amount,
# the balance by the tokens. Without that, nothing is written: the session's
# total, the message and the usage row all follow the debit.
ADD_MESSAGE_CAPTURE = f"""
WITH session AS MATERIALIZED (
    SELECT id, user_id, api_key_id, model FROM chat_sessions
    WHERE id = $2 AND ended_at IS NULL AND {_sql.owned_by("$7")}
      AND NOT EXISTS (  -- a limited key spends only what was held through it (and counted)
          SELECT 1 FROM api_keys k WHERE k.id = chat_sessions.api_key_id AND {_limits_sql.LIMITED}
             AND NOT EXISTS (SELECT 1 FROM token_holds h WHERE h.id = $8 AND h.api_key_id = k.id)
      )
    FOR UPDATE
), holder AS MATERIALIZED (
    SELECT u.id FROM users u JOIN session ON u.id = session.user_id
    FOR UPDATE OF u
), {capturing(hold="$8", tokens="$5", transaction="$6", holder="holder")}, counted AS (
    UPDATE chat_sessions s SET tokens_used = s.tokens_used + $5
    FROM debit
    WHERE s.id = $2
    RETURNING s.id, s.tokens_used
), message AS (
    {_message("counted")}
    RETURNING *
), usage AS (
    {_message_usage("debit, session WHERE $5 > 0")}
    RETURNING id
)
SELECT {_MESSAGE_BACK} FROM message
"""
