"""The token ledger: every change of a balance is an append-only row.

Design
======

``users.token_balance`` is a cache of ``Σ token_transactions.amount`` for the
user, kept exact by writing both in **one SQL statement** (:data:`_MOVE`)::

    UPDATE users SET token_balance = token_balance + delta
     WHERE id = user AND token_balance + delta >= 0        -- the row lock is taken here
    → INSERT INTO token_transactions (..., balance_after, created_at = clock_timestamp())

*Why it cannot race.* The ``UPDATE`` takes the user's row lock. A concurrent
movement for the same user blocks on that lock and, when it is released,
PostgreSQL re-evaluates the ``WHERE`` against the committed balance
(READ COMMITTED's re-check), so ``token_balance + delta >= 0`` is judged on
the real balance: no read-then-write in Python, no overdraft, no lost update.
The ledger row is inserted from the ``UPDATE``'s ``RETURNING`` in the same
statement, so a balance never changes without its row. ``created_at`` is
``clock_timestamp()`` evaluated *after* the lock, so one user's rows in
``(created_at, id)`` order follow their ``balance_after`` chain.

*Idempotency.* A movement with a ``reference_id`` is skipped when a row with
the same ``(user, type, reference_id)`` exists; two concurrent first attempts
both pass that check (same snapshot) but the partial unique index
``token_transactions_idempotency_key`` rejects the second statement as a
whole, and the caller gets the first row back. Same reference, different
amount: :class:`ReferenceConflict`.

*Backstops.* The database refuses what Python already refuses:
``users_token_balance_nonnegative``, the sign of ``amount`` per type, the
idempotency index, refunds within their charge (a trigger), and the ledger
is append-only (a trigger). :func:`audit_ledger` checks the books.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple
from uuid import UUID

import asyncpg

from tokendb import _args, _db, _keyset
from tokendb.errors import (
    InsufficientTokens,
    NotFound,
    ReferenceConflict,
    RefundExceedsCharge,
    ValidationError,
)
from tokendb.ids import new_id
from tokendb.models import TokenTransaction, TransactionType, User

__all__ = [
    "LedgerDiscrepancy",
    "audit_ledger",
    "charge",
    "get_balance",
    "grant_bonus",
    "list_transactions",
    "refund",
    "top_up",
]

MAX_DESCRIPTION_LENGTH = 1000
_IDEMPOTENCY_INDEX = "token_transactions_idempotency_key"

_MOVE = """
WITH prior AS (
    SELECT 1 FROM token_transactions
    WHERE $5::uuid IS NOT NULL AND $3 <> 'refund'  -- refunds share their charge's id
      AND user_id = $1 AND type = $3 AND reference_id = $5
), moved AS (
    UPDATE users
    SET token_balance = token_balance + $2, updated_at = clock_timestamp()
    WHERE id = $1 AND token_balance + $2 >= 0 AND NOT EXISTS (SELECT 1 FROM prior)
    RETURNING id, token_balance
)
INSERT INTO token_transactions
    (id, user_id, amount, type, description, reference_id, balance_after, created_at)
SELECT $4, id, $2, $3, $6, $5, token_balance, clock_timestamp() FROM moved
RETURNING *
"""


def _description(value: Any) -> str | None:
    return _args.optional_text(value, "description", max_length=MAX_DESCRIPTION_LENGTH)


class _Movement(NamedTuple):
    """A validated request to move ``amount`` (> 0) tokens of ``user_id``."""

    user_id: UUID
    amount: int
    description: str | None
    reference_id: UUID | None


def _validated(user: Any, amount: Any, description: Any, reference_id: Any) -> _Movement:
    return _Movement(
        _args.ref_id(user, "user", User),
        _args.positive_amount(amount),
        _description(description),
        _args.optional_uuid(reference_id, "reference_id"),
    )


async def _apply(movement: _Movement, kind: TransactionType) -> TokenTransaction:
    """Move a validated ``movement`` in one statement (:data:`_MOVE`).

    When nothing moved, two reads say why (a repeat, an unknown user, a short
    balance). Should the balance read show enough after all (a credit landed
    between the refusal and the read), the call is decided again with the
    user's row locked (:func:`_apply_under_lock`), so the balance an
    :class:`InsufficientTokens` reports is the one the refusal was made on.
    """
    user_id, requested, text, reference = movement
    delta = -requested if kind is TransactionType.USAGE else requested
    arguments = (user_id, delta, kind.value, new_id(), reference, text)
    with _args.fits_integer_column("amount"):
        try:
            rows = await _db.write(_MOVE, *arguments)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != _IDEMPOTENCY_INDEX or reference is None:
                raise
            rows = []  # a concurrent first attempt with this reference won
    if rows:
        return _db.to_model(TokenTransaction, rows[0])

    if reference is not None:
        existing = await _db.read(_BY_REFERENCE, user_id, kind.value, reference)
        if existing:
            return _as_repeat(_db.to_model(TokenTransaction, existing[0]), delta)
    balance = await _balance_or_none(user_id)
    if balance is None:
        raise NotFound("user", user_id)
    if delta < 0 and balance + delta < 0:
        raise InsufficientTokens(user_id, balance, requested)
    return await _apply_under_lock(arguments, requested)


async def _apply_under_lock(arguments: tuple[Any, ...], requested: int) -> TokenTransaction:
    """:data:`_MOVE` again, in a transaction that holds the user's row lock first."""
    user_id, delta, kind, _, reference, _ = arguments

    async def body(conn: _db.Connection) -> TokenTransaction:
        balance = await conn.fetchval(
            "SELECT token_balance FROM users WHERE id = $1 FOR UPDATE", user_id
        )
        if balance is None:
            raise NotFound("user", user_id)
        row = await conn.fetchrow(_MOVE, *arguments)
        if row is not None:
            return _db.to_model(TokenTransaction, row)
        if reference is not None:
            existing = await conn.fetchrow(_BY_REFERENCE, user_id, kind, reference)
            if existing is not None:
                return _as_repeat(_db.to_model(TokenTransaction, existing), delta)
        raise InsufficientTokens(user_id, int(balance), requested)

    with _args.fits_integer_column("amount"):
        return await _db.transaction(body)


_BY_REFERENCE = (
    "SELECT * FROM token_transactions WHERE user_id = $1 AND type = $2 AND reference_id = $3"
)


def _as_repeat(existing: TokenTransaction, delta: int) -> TokenTransaction:
    if existing.amount != delta:
        assert existing.reference_id is not None
        raise ReferenceConflict(
            existing.reference_id,
            existing_amount=abs(existing.amount),
            requested_amount=abs(delta),
        )
    return existing


async def _balance_or_none(user_id: UUID) -> int | None:
    rows = await _db.read("SELECT token_balance FROM users WHERE id = $1", user_id)
    return int(rows[0]["token_balance"]) if rows else None


@_db.translated
async def charge(
    *,
    user: User | UUID | str,
    amount: int,
    description: str | None = None,
    reference_id: UUID | str | None = None,
) -> TokenTransaction:
    """Debit ``amount`` tokens from ``user``; return the ``usage`` row (negative amount).

    Race-free: the balance check and the debit are one conditional UPDATE.
    With ``reference_id``, a repeat returns the original row and moves
    nothing, however many run concurrently.

    Concurrent calls in one process are coalesced into one statement per
    flush (group commit, :mod:`tokendb.coalescing`) with the same outcome
    each call would have had alone; a call returns only after the statement
    carrying its charge has committed. Inside the caller's own transaction,
    or with ``tokendb.init(coalesce_charges=False)``, it is the single
    statement :data:`_MOVE` on the call's connection.

    Raises :class:`InsufficientTokens` (``.balance``, ``.requested``; nothing
    written), :class:`ReferenceConflict` (same reference, other amount),
    :class:`NotFound` and :class:`ValidationError` (``amount`` must be a
    positive ``int`` that fits the integer column).
    """
    movement = _validated(user, amount, description, reference_id)
    if _db.settings().coalesce_charges:
        from tokendb import coalescing  # a layer on top of this module

        return await coalescing.submit(movement)  # or _apply, in the caller's transaction
    return await _apply(movement, TransactionType.USAGE)


@_db.translated
async def top_up(
    *,
    user: User | UUID | str,
    amount: int,
    description: str | None = None,
    reference_id: UUID | str | None = None,
) -> TokenTransaction:
    """Credit ``amount`` purchased tokens to ``user``; return the ``topup`` row.

    Pass the payment's id as ``reference_id`` so a retried webhook credits
    once. Raises :class:`ValidationError` (also when the balance would
    overflow), :class:`ReferenceConflict` and :class:`NotFound`.
    """
    movement = _validated(user, amount, description, reference_id)
    return await _apply(movement, TransactionType.TOPUP)


@_db.translated
async def grant_bonus(
    *,
    user: User | UUID | str,
    amount: int,
    description: str | None = None,
    reference_id: UUID | str | None = None,
) -> TokenTransaction:
    """Credit ``amount`` free tokens to ``user``; return the ``bonus`` row.

    Raises as :func:`top_up`.
    """
    movement = _validated(user, amount, description, reference_id)
    return await _apply(movement, TransactionType.BONUS)


_LOCK_CHARGE = """
SELECT t.user_id, t.amount, t.type, u.token_balance
FROM token_transactions t JOIN users u ON u.id = t.user_id
WHERE t.id = $1 AND ($2::uuid IS NULL OR t.user_id = $2)
FOR UPDATE OF u
"""

_REFUNDED = """
SELECT coalesce(sum(amount), 0) AS refunded FROM token_transactions
WHERE reference_id = $1 AND type = 'refund'
"""


@_db.translated
async def refund(
    *,
    transaction: TokenTransaction | UUID | str,
    amount: int | None = None,
    description: str | None = None,
    user: User | UUID | str | None = None,
) -> TokenTransaction:
    """Give back tokens of a ``usage`` row; return the ``refund`` row.

    ``amount=None`` refunds whatever is still refundable; partial refunds add
    up to at most the charge, also when they run concurrently (they
    serialise on the user's row lock, taken before the refunded sum is
    read). The refund's ``reference_id`` is the usage row's id. With
    ``user``, the charge must belong to that user.

    A refund has no idempotency key of its own: ``amount=None`` is naturally
    safe to retry (the second call finds nothing left and raises).

    Raises :class:`RefundExceedsCharge` (``.refundable``, ``.requested``),
    :class:`NotFound` (unknown charge, or another user's) and
    :class:`ValidationError` (not a ``usage`` row, bad amount).
    """
    charge_id = _args.ref_id(transaction, "transaction", TokenTransaction)
    owner = _args.optional_ref_id(user, "user", User)
    requested = None if amount is None else _args.positive_amount(amount)
    text = _description(description)

    async def body(conn: _db.Connection) -> TokenTransaction:
        # Statement 1 takes the user's row lock; statement 2 then reads the
        # refunds with a fresh snapshot that includes every refund committed
        # before the lock was granted.
        locked = await conn.fetchrow(_LOCK_CHARGE, charge_id, owner)
        if locked is None:
            raise NotFound("transaction", charge_id)
        if locked["type"] != TransactionType.USAGE.value:
            raise ValidationError(
                "transaction", f"only usage rows can be refunded, this is {locked['type']}"
            )
        refunded = await conn.fetchval(_REFUNDED, charge_id)
        refundable = -int(locked["amount"]) - int(refunded)
        wanted = refundable if requested is None else requested
        if wanted <= 0 or wanted > refundable:
            raise RefundExceedsCharge(charge_id, refundable, wanted)
        row = await conn.fetchrow(
            _MOVE,
            locked["user_id"],
            wanted,
            TransactionType.REFUND.value,
            new_id(),
            charge_id,
            text if text is not None else f"refund of {charge_id}",
        )
        assert row is not None  # the lock is ours and credits have no floor
        return _db.to_model(TokenTransaction, row)

    with _args.fits_integer_column("amount"):
        return await _db.transaction(body)


@_db.translated
async def get_balance(*, user: User | UUID | str) -> int:
    """``user``'s current token balance. Raises :class:`NotFound`."""
    user_id = _args.ref_id(user, "user", User)
    balance = await _balance_or_none(user_id)
    if balance is None:
        raise NotFound("user", user_id)
    return balance


_PAGES = _keyset.statements("token_transactions", "user_id", newest_first=True)
_PAGE_FIRST, _PAGE_BEFORE = _PAGES  # the statements the benchmark and EXPLAIN test use


@_db.translated
async def list_transactions(
    *,
    user: User | UUID | str,
    limit: int = 50,
    before: TokenTransaction | UUID | str | None = None,
) -> list[TokenTransaction]:
    """``user``'s ledger rows, newest first, ``limit`` (1–1000) per page.

    Keyset pagination on ``(created_at, id)``, never OFFSET, so page 1,000
    costs what page 1 costs: pass the last row of the previous page as
    ``before``. Raises :class:`NotFound` (unknown user, or a ``before`` row
    that is not this user's).
    """
    user_id = _args.ref_id(user, "user", User)
    rows = await _keyset.page(
        TokenTransaction,
        _PAGES,
        owner_column="user_id",
        owner_id=user_id,
        limit=_args.page_limit(limit),
        boundary=before,
        field="before",
        entity="transaction",
    )
    # Every user has rows (the signup bonus): an empty first page asks whether it exists.
    if not rows and before is None and await _balance_or_none(user_id) is None:
        raise NotFound("user", user_id)
    return rows


@dataclass(frozen=True)
class LedgerDiscrepancy:
    """A user whose books do not balance.

    ``balance`` is ``users.token_balance``; ``ledger_sum`` the sum of their
    rows; ``broken_links`` counts rows whose ``balance_after`` is not the
    previous row's plus the amount (in ``(created_at, id)`` order), the first
    of them being ``first_broken_transaction``.
    """

    user_id: UUID
    balance: int
    ledger_sum: int
    broken_links: int
    first_broken_transaction: UUID | None


_AUDIT = """
WITH chain AS (
    SELECT user_id, id, amount, balance_after, created_at,
           lag(balance_after, 1, 0) OVER (
               PARTITION BY user_id ORDER BY created_at, id
           ) AS previous_after
    FROM token_transactions
    WHERE $1::uuid IS NULL OR user_id = $1
), books AS (
    SELECT user_id,
           sum(amount) AS ledger_sum,
           count(*) FILTER (WHERE previous_after + amount <> balance_after) AS broken_links,
           (array_agg(id ORDER BY created_at, id)
               FILTER (WHERE previous_after + amount <> balance_after))[1] AS first_broken
    FROM chain GROUP BY user_id
)
SELECT u.id AS user_id, u.token_balance AS balance,
       coalesce(b.ledger_sum, 0) AS ledger_sum,
       coalesce(b.broken_links, 0) AS broken_links,
       b.first_broken
FROM users u LEFT JOIN books b ON b.user_id = u.id
WHERE ($1::uuid IS NULL OR u.id = $1)
  AND (u.token_balance <> coalesce(b.ledger_sum, 0) OR coalesce(b.broken_links, 0) > 0)
ORDER BY u.id
"""


@_db.translated
async def audit_ledger(*, user: User | UUID | str | None = None) -> list[LedgerDiscrepancy]:
    """Check the books: every user (or just ``user``) whose balance ≠ Σ amounts
    or whose ``balance_after`` chain is broken. Empty when the books balance.

    One read over the ledger (a sort per user); cheap enough to run after
    every test module and from the CLI.
    """
    user_id = None if user is None else _args.ref_id(user, "user", User)
    rows = await _db.read(_AUDIT, user_id)
    return [
        LedgerDiscrepancy(
            user_id=row["user_id"],
            balance=int(row["balance"]),
            ledger_sum=int(row["ledger_sum"]),
            broken_links=int(row["broken_links"]),
            first_broken_transaction=row["first_broken"],
        )
        for row in rows
    ]
