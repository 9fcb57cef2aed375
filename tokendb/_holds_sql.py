"""The SQL of token holds: reserve, capture, release, expire, and read what is available.

:mod:`tokendb.holds` validates and decides; this module says how the
database does it, like :mod:`tokendb._ledger_sql` for the ledger (whose
:func:`~tokendb._ledger_sql.record` writes a capture's usage row).

Why a hold cannot overcommit
============================

``users.held_tokens`` caches Σ ``amount`` of the user's active holds, so
what a user can spend is one column minus another of the row every movement
locks. :data:`HOLD` is one statement::

    UPDATE users SET held_tokens = held_tokens + amount
     WHERE id = user AND token_balance - held_tokens >= amount   -- the row lock
    → INSERT INTO token_holds (..., expires_at = clock_timestamp() + ttl)

and a charge's :data:`~tokendb._ledger_sql.MOVE` asks ``token_balance -
held_tokens + delta >= 0``. After a lock wait, READ COMMITTED re-checks the
``WHERE`` on the row's newest version, so both conditions are judged on the
committed balance *and* the committed holds. (A ``SUM`` over ``token_holds``
in that ``WHERE`` would not be: a subquery reads the statement's snapshot,
taken before the wait, and misses a hold committed meanwhile.)

*Expiry without a sweeper.* An expired hold stays in ``held_tokens`` until
something marks it, so the cache over-counts and a decision made on it can
refuse wrongly, never grant wrongly. Every refusal of a user who has holds
gets a second look (:func:`tokendb._ledger_sql.available_under_lock`): the
user's row locked, its expired holds marked ``expired`` and their tokens
freed, the decision made again. So a hold frees its tokens at
``expires_at``; :func:`tokendb.expire_holds` only tidies up.

*Lock order.* Every statement that writes a hold takes its user's row lock
first (:data:`CAPTURE`, :data:`RELEASE` through a ``FOR UPDATE OF`` users
CTE that the hold's ``UPDATE`` joins, so it cannot run before it;
:data:`EXPIRE` in id order, like a batch of charges), then the hold's. No
two of them wait for each other the other way round.

*Backstops* (migration 3): ``held_tokens`` between 0 and ``token_balance``
(CHECKs), ``held_tokens`` = Σ active holds and a captured hold billed by its
usage row at commit (constraint triggers), one move from ``active`` to a
final state, dated by the database (``token_holds_transition``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, NamedTuple
from uuid import UUID

import asyncpg

from tokendb import _db, _keyset, _ledger_sql, _limits_sql, _sql
from tokendb._rows import to_model
from tokendb.errors import (
    CaptureExceedsHold,
    HoldExpired,
    HoldNotActive,
    NotFound,
    ReferenceConflict,
)
from tokendb.ids import new_id
from tokendb.models import HoldStatus, TokenHold, TokenTransaction

__all__ = [
    "AUDIT",
    "AVAILABLE",
    "CAPTURE",
    "EXPIRE",
    "HOLD",
    "HOLD_DECIDED",
    "HOLD_REFERENCE_INDEX",
    "PAGES",
    "RELEASE",
    "Reservation",
    "available_or_none",
    "capture",
    "expire",
    "hold",
    "refused",
    "release",
]

HOLD_REFERENCE_INDEX = "token_holds_reference_key"


class Reservation(NamedTuple):
    """A validated request to hold ``amount`` (> 0) tokens of ``user_id`` for ``ttl``,
    through ``api_key_id`` (one of the user's keys) for ``model``."""

    user_id: UUID
    amount: int
    ttl: timedelta
    description: str | None
    reference_id: UUID | None
    api_key_id: UUID | None = None
    model: str | None = None


# --- reserving --------------------------------------------------------------------------

_NEW_HOLD = _sql.insert(
    TokenHold,
    {
        "id": "$3",
        "user_id": "id",
        "amount": "$2",
        "status": "'active'",
        "reference_id": "$4",
        "description": "$5",
        "expires_at": "clock_timestamp() + $6::interval",  # after the lock
        "created_at": "clock_timestamp()",
        "api_key_id": "$7",
        "model": "$8",
    },
    source="reserved",
)


# $1 user, $2 amount, $3 new hold id, $4 reference, $5 description, $6 ttl,
# $7 the API key (one of the user's) or NULL, $8 the model or NULL.
def _hold(*, decided: bool) -> str:
    return f"""
WITH prior AS (
    SELECT 1 FROM token_holds WHERE $4::uuid IS NOT NULL AND user_id = $1 AND reference_id = $4
), reserved AS (
    UPDATE users                                    -- the user's row lock is taken here
    SET held_tokens = held_tokens + $2
    WHERE id = $1 AND token_balance - held_tokens >= $2 AND NOT EXISTS (SELECT 1 FROM prior)
      AND {_limits_sql.key_allowed("$7", "$1", decided=decided)}
    RETURNING id
)
{_NEW_HOLD}
RETURNING *
"""


HOLD = _hold(decided=False)
"""One hold in one statement: none through a key with a limit (decided under the
key's lock: :mod:`tokendb._limits_sql`)."""

HOLD_DECIDED = _hold(decided=True)
""":data:`HOLD` whose key's limit the caller decided under the key's lock."""

BY_REFERENCE = "SELECT * FROM token_holds WHERE user_id = $1 AND reference_id = $2"


async def hold(reservation: Reservation) -> TokenHold:
    """Reserve a validated ``reservation`` (:data:`HOLD`); return the hold.

    A refusal is explained as :func:`tokendb._ledger_sql.move` explains one:
    a repeat of the reference, an unknown user, a short balance; a user with
    holds (maybe expired) or a balance read that covers the hold after all
    gets the decision again under the row lock.

    Raises :class:`InsufficientTokens`, :class:`ReferenceConflict` and
    :class:`NotFound`.
    """
    user_id, amount, ttl, text, reference, key_id, model = reservation
    arguments = (user_id, amount, new_id(), reference, text, ttl, key_id, model)
    if key_id is None or not _limits_sql.probably_limited(key_id):  # else: the locked path
        rows = await _reserve(_db.write, HOLD, arguments)
        if rows:
            return to_model(TokenHold, rows[0])
        if reference is not None:
            existing = await _db.read(BY_REFERENCE, user_id, reference)
            if existing:
                return _as_repeat(to_model(TokenHold, existing[0]), amount)
        await _ledger_sql.refused(user_id, key_id, amount)

    async def body(conn: _db.Connection) -> TokenHold:
        async def repeat() -> TokenHold | None:
            if reference is None:
                return None
            existing = await conn.fetch(BY_REFERENCE, user_id, reference)
            return _as_repeat(to_model(TokenHold, existing[0]), amount) if existing else None

        async def write() -> TokenHold | None:
            rows = await _reserve(conn.fetch, HOLD_DECIDED, arguments)
            return to_model(TokenHold, rows[0]) if rows else None

        return await _ledger_sql.decide_under_lock(
            conn, user_id=user_id, key_id=key_id, requested=amount, repeat=repeat, write=write
        )

    return await _db.transaction(body)


async def _reserve(fetch: Any, statement: str, arguments: tuple[Any, ...]) -> list[Any]:
    try:
        rows: list[Any] = await fetch(statement, *arguments)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != HOLD_REFERENCE_INDEX:
            raise
        return []  # a concurrent first attempt with this reference won
    return rows


def _as_repeat(existing: TokenHold, amount: int) -> TokenHold:
    if existing.amount != amount:
        assert existing.reference_id is not None
        raise ReferenceConflict(
            existing.reference_id, existing_amount=existing.amount, requested_amount=amount
        )
    return existing


# --- capturing and releasing ------------------------------------------------------------

# The hold's user, locked before the hold is touched: the hold's UPDATE joins
# this CTE, so it cannot run first. $1 the hold.
_LOCK_HOLDER = """
locked AS MATERIALIZED (
    SELECT u.id FROM token_holds h JOIN users u ON u.id = h.user_id
    WHERE h.id = $1
    FOR UPDATE OF u
)"""

_CAPTURED_USAGE = _ledger_sql.record(
    "debit, captured",
    id="$3",
    user_id="debit.id",
    amount="-$2",
    type="'usage'",
    description="coalesce($4, captured.description, 'capture of hold ' || captured.id)",
    reference_id="captured.id",  # the hold: one capture per hold, also in the ledger's index
    balance_after="debit.token_balance",
    created_at="clock_timestamp()",
    api_key_id="captured.api_key_id",  # what the hold was for; its key's limit reserved it
    model="captured.model",
)

# $1 hold, $2 amount (1 ≤ amount ≤ the hold's), $3 the usage row's id, $4 description.
# Captured only while active and unexpired; the held tokens all go back to the
# balance's free part and amount leaves the balance: amount ≤ held ≤ balance,
# so it is always affordable.
CAPTURE = f"""
WITH {_LOCK_HOLDER},
{_ledger_sql.capturing(hold="$1", tokens="$2", transaction="$3", holder="locked")}
{_CAPTURED_USAGE}
RETURNING *
"""

# $1 hold. An active hold past its expiry is marked expired rather than released.
RELEASE = f"""
WITH {_LOCK_HOLDER}, resolved AS (
    UPDATE token_holds h
    SET status = CASE WHEN h.expires_at > clock_timestamp() THEN 'released' ELSE 'expired' END
    FROM locked
    WHERE h.id = $1 AND h.user_id = locked.id AND h.status = 'active'
    RETURNING h.*
), freed AS (
    UPDATE users u SET held_tokens = u.held_tokens - resolved.amount
    FROM resolved
    WHERE u.id = resolved.user_id
)
SELECT * FROM resolved
"""

_STATE = f"""
SELECT h.*, h.expires_at <= clock_timestamp() AS past,
       {_sql.select_list(TokenTransaction, "t", "tx_")}
FROM token_holds h LEFT JOIN token_transactions t ON t.id = h.captured_transaction_id
WHERE h.id = $1
"""


async def capture(hold_id: UUID, amount: int, description: str | None) -> TokenTransaction:
    """Capture ``amount`` tokens of the hold (:data:`CAPTURE`); return the usage row.

    A repeat with the same amount returns the same row. Raises
    :class:`HoldExpired`, :class:`HoldNotActive`, :class:`CaptureExceedsHold`
    and :class:`NotFound`.
    """
    for _ in range(3):
        try:
            rows = await _db.write(CAPTURE, hold_id, amount, new_id(), description)
        except asyncpg.CheckViolationError as exc:
            if exc.constraint_name != "token_holds_transition":
                raise
            rows = []  # it expired between the statement's check and its trigger's
        if rows:
            return to_model(TokenTransaction, rows[0])
        found, state = await refused(hold_id, amount)
        if found.status is HoldStatus.CAPTURED:
            return to_model(TokenTransaction, state, "tx_")
    raise AssertionError("an active hold refused a capture three times")  # pragma: no cover


async def refused(
    hold_id: UUID, amount: int, *, user_id: UUID | None = None, field: str = "amount"
) -> tuple[TokenHold, _db.Record]:
    """Why a capture of ``amount`` from the hold wrote nothing.

    Raises what the caller raises: :class:`NotFound` (no such hold, or not
    ``user_id``'s), :class:`HoldNotActive` (captured with another amount,
    released), :class:`HoldExpired`, :class:`CaptureExceedsHold`. Returns
    the hold and its state row (``tx_``: the captured transaction) when it
    was captured with ``amount`` (a repeat), or is active and covers
    ``amount`` (it changed since: decide again).
    """
    state = await _state(hold_id)
    found = to_model(TokenHold, state)
    if user_id is not None and found.user_id != user_id:
        raise NotFound("hold", hold_id)
    if found.status is HoldStatus.CAPTURED:
        if found.captured_amount == amount:
            return found, state
        raise HoldNotActive(hold_id, found.status.value)
    _require_active(found, past=state["past"])
    if amount > found.amount:
        raise CaptureExceedsHold(hold_id, found.amount, amount, field=field)
    return found, state


async def release(hold_id: UUID) -> TokenHold:
    """Release the hold (:data:`RELEASE`); return it, ``released`` (or ``expired``).

    Releasing a hold that is released or expired already returns it as it
    is. Raises :class:`HoldNotActive` (captured) and :class:`NotFound`.
    """
    rows = await _db.write(RELEASE, hold_id)
    if rows:
        return to_model(TokenHold, rows[0])
    found = to_model(TokenHold, await _state(hold_id))
    if found.status is HoldStatus.CAPTURED:
        raise HoldNotActive(hold_id, found.status.value)
    return found


async def _state(hold_id: UUID) -> _db.Record:
    rows = await _db.read(_STATE, hold_id)
    if not rows:
        raise NotFound("hold", hold_id)
    return rows[0]


def _require_active(found: TokenHold, *, past: bool) -> None:
    """Raise what a resolved (or past its expiry) hold is."""
    if found.status is HoldStatus.EXPIRED or (found.status is HoldStatus.ACTIVE and past):
        raise HoldExpired(found.id, found.expires_at)
    if found.status is not HoldStatus.ACTIVE:
        raise HoldNotActive(found.id, found.status.value)


# --- expiring, reading ------------------------------------------------------------------

# $1 users per statement. Users with expired active holds, locked in id order
# (as a batch of charges locks them), then their expired holds marked and
# their tokens freed. Returns the users and holds it handled.
EXPIRE = """
WITH due AS MATERIALIZED (
    SELECT DISTINCT user_id FROM token_holds
    WHERE status = 'active' AND expires_at <= clock_timestamp()
    LIMIT $1
), locked AS MATERIALIZED (
    SELECT id FROM users WHERE id IN (SELECT user_id FROM due) ORDER BY id FOR UPDATE
), swept AS (
    UPDATE token_holds h SET status = 'expired'
    FROM locked
    WHERE h.user_id = locked.id AND h.status = 'active' AND h.expires_at <= clock_timestamp()
    RETURNING h.user_id, h.amount
), freed AS (
    UPDATE users u SET held_tokens = u.held_tokens - s.total
    FROM (SELECT user_id, sum(amount) AS total FROM swept GROUP BY user_id) AS s
    WHERE u.id = s.user_id
)
SELECT (SELECT count(*) FROM locked) AS users, (SELECT count(*) FROM swept) AS holds
"""

EXPIRE_USERS_PER_STATEMENT = 500


async def expire() -> int:
    """Mark every active hold past its expiry ``expired`` and free its tokens; how many."""
    total = 0
    while True:
        rows = await _db.write(EXPIRE, EXPIRE_USERS_PER_STATEMENT)
        total += int(rows[0]["holds"])
        if int(rows[0]["users"]) < EXPIRE_USERS_PER_STATEMENT:
            return total


# The booked balance minus the active holds that have not expired: a plain
# read (an expired hold counts for nothing, marked or not).
AVAILABLE = """
SELECT u.token_balance - CASE WHEN u.held_tokens = 0 THEN 0 ELSE (
    SELECT coalesce(sum(h.amount), 0) FROM token_holds h
    WHERE h.user_id = u.id AND h.status = 'active' AND h.expires_at > clock_timestamp()
) END AS available
FROM users u WHERE u.id = $1
"""


async def available_or_none(user_id: UUID) -> int | None:
    """``user_id``'s available balance, or None for an unknown user."""
    rows = await _db.read(AVAILABLE, user_id)
    return int(rows[0]["available"]) if rows else None


PAGES = {
    status: _keyset.statements(
        "token_holds",
        "user_id",
        newest_first=True,
        condition=None if status is None else f"status = '{status.value}'",
    )
    for status in (None, *HoldStatus)
}
"""``list_holds``' first-page and next-page statements, per status filter (None: all)."""

AUDIT = """
WITH active AS (
    SELECT user_id, sum(amount) AS held FROM token_holds WHERE status = 'active' GROUP BY user_id
), captures AS (
    SELECT h.user_id, count(*) AS broken
    FROM token_holds h LEFT JOIN token_transactions t ON t.id = h.captured_transaction_id
    WHERE h.status = 'captured'
      AND (t.id IS NULL OR t.user_id <> h.user_id OR t.type <> 'usage'
           OR t.amount <> -h.captured_amount OR t.created_at < h.created_at)
    GROUP BY h.user_id
)
SELECT u.id AS user_id, u.token_balance AS balance, u.held_tokens,
       coalesce(a.held, 0) AS active_holds, coalesce(c.broken, 0) AS broken_captures
FROM users u
LEFT JOIN active a ON a.user_id = u.id
LEFT JOIN captures c ON c.user_id = u.id
WHERE u.held_tokens <> coalesce(a.held, 0) OR u.held_tokens > u.token_balance
   OR coalesce(c.broken, 0) > 0
ORDER BY u.id
"""
"""Every user whose ``held_tokens`` ≠ Σ active holds or exceeds the balance, or who has a
captured hold its usage row does not bill (or bills with a row older than the hold)."""
