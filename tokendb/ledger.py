"""The token ledger: every change of a balance is an append-only row.

This module is the ledger's public face: it validates, decides how a
movement is sent, and returns rows. The statements themselves, and why they
cannot race, are in :mod:`tokendb._ledger_sql`. Where the locks are taken:

* ``top_up``, ``grant_bonus`` and a ``charge`` that is not coalesced send
  :data:`~tokendb._ledger_sql.MOVE`, one statement whose ``UPDATE users``
  takes the user's row lock and decides ``balance + delta >= 0`` under it;
* a coalesced ``charge`` and ``charge_many`` send
  :data:`~tokendb._ledger_sql.BATCH`, which locks all of its users in id
  order before it walks each user's items;
* ``refund`` locks the charged user's row, then reads what was refunded.

Whether ``charge()`` is coalesced is decided in one place,
:func:`_coalescing_lane`: concurrent calls of one process with the same
settings share statements (group commit, :mod:`tokendb._group_commit`)
unless the caller is inside its own transaction or
``tokendb.init(coalesce_charges=False)`` turned it off.

*Backstops.* The database refuses what Python already refuses:
``users_token_balance_nonnegative``, the sign of ``amount`` per type, the
idempotency index, refunds within their charge (a trigger), and the ledger
is append-only (a trigger). :func:`audit_ledger` checks the books.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from tokendb import _args, _db, _keyset, _ledger_sql, _limits_sql, _settings
from tokendb._group_commit import ALONE, Alone, GroupCommit
from tokendb._ledger_sql import Movement, Outcome
from tokendb._translate import translated
from tokendb.errors import DatabaseTimeout, NotFound, TokenDBError, ValidationError
from tokendb.ids import new_id
from tokendb.models import ApiKey, TokenTransaction, TransactionType, User

__all__ = [
    "MAX_BATCH",
    "ChargeItem",
    "LedgerDiscrepancy",
    "audit_ledger",
    "charge",
    "charge_many",
    "get_balance",
    "grant_bonus",
    "list_transactions",
    "refund",
    "top_up",
]

MAX_DESCRIPTION_LENGTH = 1000
MAX_MODEL_LENGTH = 50
MAX_BATCH = 256
"""Charges per statement. Beyond a few hundred a batch only holds its locks longer."""


def _validated(
    user: Any,
    amount: Any,
    description: Any,
    reference_id: Any,
    api_key: Any = None,
    model: Any = None,
) -> Movement:
    return Movement(
        _args.ref_id(user, "user", User),
        _args.positive_amount(amount),
        _args.optional_text(description, "description", max_length=MAX_DESCRIPTION_LENGTH),
        _args.optional_uuid(reference_id, "reference_id"),
        _args.optional_ref_id(api_key, "api_key", ApiKey),
        None if model is None else _args.text(model, "model", max_length=MAX_MODEL_LENGTH),
    )


PATIENCE = 0.02
"""Seconds a coalesced call may hold up other users' calls: how long a lone charge
holds the lane, and a batch waits for a locked row, before the others go on
(a few times a batch's normal latency; on a machine so loaded that statements
take longer, :data:`tokendb._group_commit.PATIENCE_FACTOR` times their usual time)."""


LOCKED_ALONE = 5.0
"""Seconds for which the charges of a user whose row a coalesced batch found locked
(past the lane's patience) skip the lane and go alone, each its own statement with the
normal ``lock_timeout``, unless one of them goes through sooner: later batches then do not
wait for that row again (each such wait holds a whole batch up for the lane's patience)."""

_locked_users: dict[UUID, float] = {}
"""Users whose rows a batch found locked, and until when (``time.monotonic()``) their
charges go alone; for every event loop of the process (a row lock is not one loop's)."""
_LOCKED_USERS_KEPT = 1024
"""Past this many entries, the expired ones are dropped when another is added."""


def _found_locked(user_ids: set[UUID]) -> None:
    now = time.monotonic()
    if len(_locked_users) > _LOCKED_USERS_KEPT:
        for user_id in [user for user, until in list(_locked_users.items()) if until <= now]:
            _locked_users.pop(user_id, None)
    for user_id in user_ids:
        _locked_users[user_id] = now + LOCKED_ALONE


def _locked_lately(user_id: UUID) -> bool:
    until = _locked_users.get(user_id)
    if until is None:
        return False
    if until > time.monotonic():
        return True
    _locked_users.pop(user_id, None)
    return False


def _charge_alone(movement: Movement) -> Coroutine[Any, Any, TokenTransaction]:
    """One charge as its own statement: the lane's ``run_one``, and a marked user's call.

    While users are marked (rarely), a decided outcome ends its user's mark; otherwise
    it is :func:`tokendb._ledger_sql.move` itself, without a coroutine around it (every
    lone charge comes here).
    """
    if _locked_users:
        return _charge_alone_unmarking(movement)
    return _ledger_sql.move(movement, TransactionType.USAGE)


async def _charge_alone_unmarking(movement: Movement) -> TokenTransaction:
    try:
        charged = await _ledger_sql.move(movement, TransactionType.USAGE)
    except DatabaseTimeout:
        raise  # not decided: the row may still be locked
    except TokenDBError:
        if _locked_users:
            _locked_users.pop(movement.user_id, None)
        raise
    if _locked_users:
        _locked_users.pop(movement.user_id, None)
    return charged


async def _coalesced_batch(
    movements: Sequence[Movement], given_up: Callable[[int], bool], patience: float
) -> list[Outcome | Alone]:
    def left_out(index: int) -> bool:
        # A caller who gave up, or a user found locked since this batch's calls queued:
        # that caller sends its charge alone (ALONE), the batch does not wait for the row.
        return given_up(index) or (bool(_locked_users) and _locked_lately(movements[index].user_id))

    outcomes = await _ledger_sql.charge_coalesced(
        movements, given_up=left_out, patience=patience, found_locked=_found_locked
    )
    return [ALONE if outcome is None else outcome for outcome in outcomes]


_CHARGES: GroupCommit[Movement, TokenTransaction] = GroupCommit(
    run_one=_charge_alone,
    run_batch=_coalesced_batch,
    max_batch=MAX_BATCH,
    patience=PATIENCE,
)
"""The group commit of ``charge()``: a lone call is :data:`~tokendb._ledger_sql.MOVE`
on its caller's task, concurrent ones share :data:`~tokendb._ledger_sql.BATCH_PATIENT`
(a user whose row stays locked: its call alone)."""


def _coalescing_lane() -> tuple[object, _settings.Settings] | None:
    """Whether ``charge()`` is coalesced: the lane its call may share and the
    settings of the calls it may share a statement with, or None.

    None (a statement of its own) when coalescing is off, or inside the
    caller's transaction: a shared statement would commit outside it.
    """
    settings = _settings.current()
    if not settings.coalesce_charges:
        return None
    client = _db.pooled_client()
    return None if client is None else (client, settings)


@translated
async def charge(
    *,
    user: User | UUID | str,
    amount: int,
    description: str | None = None,
    reference_id: UUID | str | None = None,
    api_key: ApiKey | UUID | str | None = None,
    model: str | None = None,
) -> TokenTransaction:
    """Debit ``amount`` tokens from ``user``; return the ``usage`` row (negative amount).

    Race-free: the balance check and the debit are one conditional UPDATE.
    With ``reference_id``, a repeat returns the original row and moves
    nothing, however many run concurrently.

    ``api_key`` (one of ``user``'s keys, revoked or not) and ``model``
    (1–50 characters) say what the tokens paid for: they are stored on the
    row and counted in :func:`usage_report`. Through a key with a
    ``token_limit`` (:func:`set_api_key_limit`), the charge is decided in a
    transaction that locks the key's row first, then reads the key's window,
    so concurrent charges cannot pass the limit together; such a charge is
    never coalesced (it runs as it would alone).

    Concurrent calls in one process are coalesced into one statement per
    flush (group commit) with the same outcome each call would have had
    alone; a call returns only after the statement carrying its charge has
    committed. Inside the caller's own transaction, or with
    ``tokendb.init(coalesce_charges=False)``, it is a single statement on the
    call's connection.

    Raises:
        InsufficientTokens: the balance does not cover ``amount`` (``.balance``,
            ``.requested``); nothing written.
        KeyLimitExceeded: ``api_key``'s window cannot take ``amount`` more
            (``.limit``, ``.used``, ``.requested``, ``.period``); nothing written.
        ReferenceConflict: ``reference_id`` was used with another amount.
        NotFound: unknown user, or ``api_key`` is not one of ``user``'s keys.
        ValidationError: ``amount`` is not a positive ``int`` that fits the
            integer column, or another argument is malformed.
        DatabaseUnavailable: the database is unreachable, or the connection
            was lost (``.outcome_unknown`` once the charge was sent).
    """
    movement = _validated(user, amount, description, reference_id, api_key, model)
    key_id = movement.api_key_id
    lane = (
        None if key_id is not None and _limits_sql.probably_limited(key_id) else _coalescing_lane()
    )
    if lane is None:
        return await _ledger_sql.move(movement, TransactionType.USAGE)
    if _locked_users and _locked_lately(movement.user_id):
        # A batch found this user's row locked lately: alone, it waits for the row
        # without holding up a batch (and the lane) for the lane's patience again.
        return await _charge_alone(movement)
    client, settings = lane
    return await _CHARGES.call(movement, lane=client, group=settings)


@translated
async def top_up(
    *,
    user: User | UUID | str,
    amount: int,
    description: str | None = None,
    reference_id: UUID | str | None = None,
) -> TokenTransaction:
    """Credit ``amount`` purchased tokens to ``user``; return the ``topup`` row.

    Pass the payment's id as ``reference_id`` so a retried webhook credits once.

    Raises:
        ValidationError: a malformed argument, or a balance that would overflow.
        ReferenceConflict: ``reference_id`` was used with another amount.
        NotFound: unknown user.
        DatabaseUnavailable: the database is unreachable or the connection was lost.
    """
    movement = _validated(user, amount, description, reference_id)
    return await _ledger_sql.move(movement, TransactionType.TOPUP)


@translated
async def grant_bonus(
    *,
    user: User | UUID | str,
    amount: int,
    description: str | None = None,
    reference_id: UUID | str | None = None,
) -> TokenTransaction:
    """Credit ``amount`` free tokens to ``user``; return the ``bonus`` row.

    Raises:
        ValidationError: a malformed argument, or a balance that would overflow.
        ReferenceConflict: ``reference_id`` was used with another amount.
        NotFound: unknown user.
        DatabaseUnavailable: the database is unreachable or the connection was lost.
    """
    movement = _validated(user, amount, description, reference_id)
    return await _ledger_sql.move(movement, TransactionType.BONUS)


@dataclass(frozen=True, slots=True)
class ChargeItem:
    """One charge for :func:`charge_many`: the keyword arguments of :func:`charge`."""

    user: User | UUID | str
    amount: int
    description: str | None = None
    reference_id: UUID | str | None = None
    api_key: ApiKey | UUID | str | None = None
    model: str | None = None


_ITEM_KEYS = frozenset(("user", "amount", "description", "reference_id", "api_key", "model"))


def _movement(item: Any) -> Movement:
    if isinstance(item, ChargeItem):
        return _validated(
            item.user, item.amount, item.description, item.reference_id, item.api_key, item.model
        )
    if not isinstance(item, Mapping):
        raise ValidationError(
            "items", f"expected a ChargeItem or a mapping, got {type(item).__name__}"
        )
    unknown = set(item) - _ITEM_KEYS
    if unknown:
        raise ValidationError("items", f"unknown keys {sorted(map(str, unknown))}")
    if "user" not in item or "amount" not in item:
        raise ValidationError("items", "each item needs a user and an amount")
    return _validated(
        item["user"],
        item["amount"],
        item.get("description"),
        item.get("reference_id"),
        item.get("api_key"),
        item.get("model"),
    )


@translated
async def charge_many(
    *, items: Sequence[ChargeItem | Mapping[str, Any]]
) -> list[TokenTransaction | TokenDBError]:
    """Charge every item, in list order; return one result per item, in the same order.

    Each item is what :func:`charge` takes (a :class:`ChargeItem` or a
    mapping with ``user``, ``amount`` and optionally ``description``,
    ``reference_id``, ``api_key`` and ``model``), and its result is what that
    call would have returned, or the :class:`TokenDBError` it would have
    raised (:class:`InsufficientTokens`, :class:`KeyLimitExceeded`,
    :class:`ReferenceConflict`, :class:`NotFound`, :class:`ValidationError`,
    :class:`DatabaseUnavailable` …): the items are applied as if charged one
    after another, repeats of a ``reference_id`` within the list included.
    (An item through a key with a limit is decided alone, under the key's
    lock, after the other items of its statement.)

    One statement per :data:`MAX_BATCH` items, each committed on its own
    (inside the caller's transaction: part of it). Nothing is raised for an
    item; an item whose batch was lost with the connection carries
    ``DatabaseUnavailable(outcome_unknown=True)``.

    Raises:
        ValidationError: ``items`` is not a list (or tuple).
    """
    if not isinstance(items, (list, tuple)):
        raise ValidationError("items", "must be a list of charges")
    results: list[Outcome] = []
    valid: list[tuple[int, Movement]] = []
    for index, item in enumerate(items):
        try:
            valid.append((index, _movement(item)))
        except TokenDBError as exc:
            results.append(exc)
        else:
            results.append(_PENDING)
    for start in range(0, len(valid), MAX_BATCH):
        chunk = valid[start : start + MAX_BATCH]
        outcomes = await _ledger_sql.charge_batch([movement for _, movement in chunk])
        for (index, _), outcome in zip(chunk, outcomes, strict=True):
            results[index] = outcome
    return results


_PENDING: Outcome = TokenDBError("not charged yet")  # a placeholder that never leaves charge_many


@translated
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

    Raises:
        RefundExceedsCharge: more than is left of the charge (``.refundable``,
            ``.requested``).
        NotFound: unknown charge, or another user's.
        ValidationError: not a ``usage`` row, or a bad amount.
        DatabaseUnavailable: the database is unreachable or the connection was lost.
    """
    charge_id = _args.ref_id(transaction, "transaction", TokenTransaction)
    owner = _args.optional_ref_id(user, "user", User)
    requested = None if amount is None else _args.positive_amount(amount)
    text = _args.optional_text(description, "description", max_length=MAX_DESCRIPTION_LENGTH)
    return await _ledger_sql.refund(charge_id, owner=owner, requested=requested, description=text)


@translated
async def get_balance(*, user: User | UUID | str) -> int:
    """``user``'s current token balance.

    Raises:
        NotFound: unknown user.
        ValidationError: ``user`` is not a user or a UUID.
        DatabaseUnavailable: the database is unreachable.
    """
    user_id = _args.ref_id(user, "user", User)
    balance = await _ledger_sql.balance_or_none(user_id)
    if balance is None:
        raise NotFound("user", user_id)
    return balance


@translated
async def list_transactions(
    *,
    user: User | UUID | str,
    limit: int = 50,
    before: TokenTransaction | UUID | str | None = None,
) -> list[TokenTransaction]:
    """``user``'s ledger rows, newest first, ``limit`` (1–1000) per page.

    Keyset pagination on ``(created_at, id)``, never OFFSET, so page 1,000
    costs what page 1 costs: pass the last row of the previous page as
    ``before``. Like every ``list_*``: an unknown user is :class:`NotFound`,
    a user without rows an empty list.

    Raises:
        NotFound: unknown user, or a ``before`` row that is not this user's.
        ValidationError: a malformed argument.
        DatabaseUnavailable: the database is unreachable.
    """
    user_id = _args.ref_id(user, "user", User)
    return await _keyset.page(
        TokenTransaction,
        _ledger_sql.PAGES,
        owner_column="user_id",
        owner_id=user_id,
        limit=_args.page_limit(limit),
        boundary=before,
        field="before",
        entity="transaction",
        owner=("users", "user"),
    )


@dataclass(frozen=True)
class LedgerDiscrepancy:
    """A user whose books do not balance.

    ``balance`` is ``users.token_balance``; ``ledger_sum`` the sum of their
    rows; ``broken_links`` counts the rows that do not continue the row
    before them in the user's chain (``seq`` order): a ``balance_after``
    that is not the previous row's plus the amount, a ``seq`` that is not the
    previous one's + 1 (a row missing), or a ``(created_at, id)`` not after
    the previous row's. The first of them is ``first_broken_transaction``.
    """

    user_id: UUID
    balance: int
    ledger_sum: int
    broken_links: int
    first_broken_transaction: UUID | None


@translated
async def audit_ledger(
    *, user: User | UUID | str | None = None, since_checkpoint: bool = False
) -> list[LedgerDiscrepancy]:
    """Check the books: every user (or just ``user``) whose balance ≠ Σ amounts
    or whose ``balance_after`` chain is broken. Empty when the books balance.

    The whole ledger is one read, in each user's chain order (the
    ``(user_id, seq)`` index): about 1–3 s a million rows (``bench/README.md``),
    so at some ten million rows it outlasts the default ``statement_timeout``
    (30 s): run it after ``init(statement_timeout=None)`` (``tokendb audit``
    does), or audit since the checkpoint.
    One user's audit reads that user's rows alone (about a millisecond for a
    user with 100 rows in a ledger of a million): cheap enough after every
    test and from the CLI.

    ``since_checkpoint=True`` is the incremental audit, for ledgers too large
    to read whole: per user, it reads the rows from the newest row the last
    clean incremental audit covered (the user's *mark*) on. The marked row
    must still be there, unchanged, each new row must continue the one
    before it (the first continues the mark), and the balance must be the
    mark's ``balance_after`` plus the new amounts (``ledger_sum`` reports
    that sum). When it finds nothing, the same statement stores a
    checkpoint and moves every user's mark to their newest row; when it
    finds something, nothing is stored, so the next audit reads those rows
    again. Without a checkpoint it reads every row. Its cost is one index
    probe per user plus the new rows. Marks are positions in each user's
    chain (``seq``), not times, so a row whose transaction commits after a
    checkpoint, dated before it, is still read by the next audit (the
    reasoning is in the migration ``*_audit_checkpoints.py``). It does not read rows older than the
    marks again: a change to one of those (only the schema owner can make
    it) is the full audit's to find.

    Raises:
        ValidationError: ``user`` is not a user or a UUID, or both ``user``
            and ``since_checkpoint`` are given (a user's own audit is cheap:
            run it whole).
        DatabaseUnavailable: the database is unreachable.
    """
    if user is None and since_checkpoint:
        rows = await _ledger_sql.audit(_ledger_sql.AUDIT_SINCE_CHECKPOINT, new_id())
    elif user is None:
        rows = await _ledger_sql.audit(_ledger_sql.AUDIT)
    elif since_checkpoint:
        raise ValidationError("since_checkpoint", "audits every user: leave out user")
    else:
        rows = await _db.read(_ledger_sql.AUDIT_USER, _args.ref_id(user, "user", User))
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
