"""Token holds: reserve tokens before a completion, capture what it used, release the rest.

A gateway does not know what a completion costs until its stream ends. It
:func:`hold` s an estimate first (refused with :class:`InsufficientTokens`
like a charge), streams, then :func:`capture` s what was used (one ``usage``
ledger row) or :func:`release` s the hold on error. A hold nobody resolves
expires at ``expires_at`` by itself: a process that dies between hold and
capture does not keep the tokens.

Held tokens cannot be spent by :func:`tokendb.charge`, by
:func:`tokendb.add_message` without the hold, or by other holds, also
concurrently: every one of those statements decides on ``token_balance -
held_tokens`` under the user's row lock (:mod:`tokendb._holds_sql` says
why that cannot race, and how expiry takes effect without a sweeper).
:func:`get_balance` stays the booked balance (Σ ledger);
:func:`get_available_balance` is what can still be spent or held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

from tokendb import _args, _db, _holds_sql, _keyset
from tokendb._holds_sql import Reservation
from tokendb._translate import translated
from tokendb.errors import CaptureExceedsHold, NotFound, ValidationError
from tokendb.models import ApiKey, HoldStatus, TokenHold, TokenTransaction, User

__all__ = [
    "MAX_HOLD_TTL",
    "HoldDiscrepancy",
    "audit_holds",
    "capture",
    "expire_holds",
    "get_available_balance",
    "hold",
    "list_holds",
    "release",
]

MAX_HOLD_TTL = timedelta(hours=24)
"""The longest a hold may live: a completion's stream, with room; the database refuses longer."""

MAX_DESCRIPTION_LENGTH = 1000
MAX_MODEL_LENGTH = 50


def _ttl(value: Any) -> timedelta:
    """A hold's lifetime: a ``timedelta`` or seconds (an int or float), > 0, ≤ 24 h."""
    if isinstance(value, timedelta):
        ttl = _args.exact_timedelta(value)
    elif isinstance(value, float):
        seconds = float.__float__(value)
        if not math.isfinite(seconds):
            raise ValidationError("ttl", f"must be a finite number of seconds, got {seconds}")
        if seconds <= 0 or seconds > MAX_HOLD_TTL.total_seconds():
            raise ValidationError("ttl", f"must be within (0, {MAX_HOLD_TTL}], got {seconds} s")
        ttl = timedelta(seconds=seconds)
    elif isinstance(value, int) and not isinstance(value, bool):
        seconds_int = _args.exact_int(value, "ttl")
        if seconds_int <= 0 or seconds_int > MAX_HOLD_TTL.total_seconds():
            raise ValidationError("ttl", f"must be within (0, {MAX_HOLD_TTL}], got {seconds_int} s")
        ttl = timedelta(seconds=seconds_int)
    else:
        raise ValidationError(
            "ttl", f"must be a timedelta or seconds (int, float), got {type(value).__name__}"
        )
    if ttl <= timedelta(0) or ttl > MAX_HOLD_TTL:
        raise ValidationError("ttl", f"must be within (0, {MAX_HOLD_TTL}], got {ttl}")
    return ttl


@translated
async def hold(
    *,
    user: User | UUID | str,
    amount: int,
    ttl: timedelta | int | float,
    reference_id: UUID | str | None = None,
    description: str | None = None,
    api_key: ApiKey | UUID | str | None = None,
    model: str | None = None,
) -> TokenHold:
    """Reserve ``amount`` tokens of ``user`` for ``ttl``; return the ``active`` hold.

    ``ttl`` is a ``timedelta`` or seconds (an int or a float), more than 0
    and at most :data:`MAX_HOLD_TTL` (24 hours); ``expires_at`` is the
    database's clock plus ``ttl``, read after the user's row lock. Held
    tokens cannot be spent or held again until the hold is captured,
    released or expires, also by concurrent calls. With ``reference_id``, a
    repeat (also a concurrent one) returns the same hold, whatever its state.

    ``api_key`` (one of ``user``'s keys) and ``model`` say what the tokens
    are held for; :func:`capture` bills its usage row to both. While active,
    the hold counts against the key's ``token_limit``: a hold that would
    pass it is refused, decided under the key's row lock; its capture is
    then never refused by the limit (the hold reserved it).

    Raises:
        InsufficientTokens: ``amount`` is more than the available balance
            (``.balance`` is that balance); nothing written.
        KeyLimitExceeded: ``api_key``'s window (plus its active holds) cannot
            take ``amount`` more; nothing written.
        ReferenceConflict: ``reference_id`` was used for a hold of another amount.
        NotFound: unknown user, or ``api_key`` is not one of ``user``'s keys.
        ValidationError: a malformed argument (``ttl`` out of range, a bool,
            NaN or infinite); nothing written.
        DatabaseUnavailable: the database is unreachable, or the connection was lost
            (``.outcome_unknown`` once the hold was sent: retry with ``reference_id``).
    """
    reservation = Reservation(
        _args.ref_id(user, "user", User),
        _args.positive_amount(amount),
        _ttl(ttl),
        _args.optional_text(description, "description", max_length=MAX_DESCRIPTION_LENGTH),
        _args.optional_uuid(reference_id, "reference_id"),
        _args.optional_ref_id(api_key, "api_key", ApiKey),
        None if model is None else _args.text(model, "model", max_length=MAX_MODEL_LENGTH),
    )
    return await _holds_sql.hold(reservation)


@translated
async def capture(
    *, hold: TokenHold | UUID | str, amount: int, description: str | None = None
) -> TokenTransaction:
    """Charge ``amount`` tokens (1 ≤ amount ≤ the held amount) from an active hold; return
    the ``usage`` row. The rest of the hold is released: a hold is captured once.

    One statement: the hold becomes ``captured`` (``captured_amount``,
    ``captured_transaction_id``), the user's held tokens drop by the hold's
    amount and the balance by ``amount``, and the usage row (``reference_id``
    = the hold's id, ``description`` this one, else the hold's) is written.
    A capture is always affordable: held tokens are part of the balance. A
    repeat with the same amount returns the same row (a retry after an
    unknown outcome). The usage row records the hold's API key and model; a
    key's limit never refuses a capture (the hold counted against it).

    Raises:
        HoldExpired: the hold expired (also when nothing marked it yet).
        HoldNotActive: the hold was released, or captured with another amount
            (``.status``).
        CaptureExceedsHold: ``amount`` is more than the hold's; nothing written.
        NotFound: unknown hold.
        ValidationError: a malformed argument.
        DatabaseUnavailable: the database is unreachable, or the connection was lost
            (``.outcome_unknown`` once the capture was sent: repeat it).
    """
    hold_id = _args.ref_id(hold, "hold", TokenHold)
    requested = _args.positive_amount(amount)
    if isinstance(hold, TokenHold) and requested > hold.amount:  # a hold's amount never changes
        raise CaptureExceedsHold(hold_id, hold.amount, requested)
    text = _args.optional_text(description, "description", max_length=MAX_DESCRIPTION_LENGTH)
    return await _holds_sql.capture(hold_id, requested, text)


@translated
async def release(*, hold: TokenHold | UUID | str) -> TokenHold:
    """Give an active hold's tokens back; return the hold (``released``).

    Idempotent: a hold that is released or expired already is returned as it
    is, and an active one past its expiry becomes ``expired``.

    Raises:
        HoldNotActive: the hold was captured (``.status``).
        NotFound: unknown hold.
        ValidationError: a malformed id.
        DatabaseUnavailable: the database is unreachable, or the connection was lost.
    """
    return await _holds_sql.release(_args.ref_id(hold, "hold", TokenHold))


@translated
async def expire_holds() -> int:
    """Mark every active hold past its ``expires_at`` ``expired``; return how many.

    Optional: an expired hold frees its tokens at ``expires_at`` without it
    (:func:`get_available_balance` does not count it, and the next debit or
    hold of its user marks it). Run it now and then to keep ``list_holds``
    and ``held_tokens`` tidy.

    Raises:
        DatabaseUnavailable: the database is unreachable, or the connection was lost.
    """
    return await _holds_sql.expire()


@translated
async def get_available_balance(*, user: User | UUID | str) -> int:
    """``user``'s balance minus its active, unexpired holds: what it can spend or hold now.

    Raises:
        NotFound: unknown user.
        ValidationError: ``user`` is not a user or a UUID.
        DatabaseUnavailable: the database is unreachable.
    """
    user_id = _args.ref_id(user, "user", User)
    available = await _holds_sql.available_or_none(user_id)
    if available is None:
        raise NotFound("user", user_id)
    return available


@translated
async def list_holds(
    *,
    user: User | UUID | str,
    status: HoldStatus | str | None = None,
    limit: int = 50,
    before: TokenHold | UUID | str | None = None,
) -> list[TokenHold]:
    """``user``'s holds, newest first, ``limit`` (1–1000) per page; only ``status`` ones
    if given (an expired hold nothing marked yet is still ``active``).

    Keyset pagination on ``(created_at, id)``: ``before`` is the last hold of
    the previous page. Like every ``list_*``: an unknown user is
    :class:`NotFound`, a user without holds an empty list.

    Raises:
        NotFound: unknown user, or a ``before`` that is not this user's.
        ValidationError: a bad ``status`` or ``limit``, or a malformed id.
        DatabaseUnavailable: the database is unreachable.
    """
    user_id = _args.ref_id(user, "user", User)
    wanted = None if status is None else _args.enum_member(status, HoldStatus, "status")
    return await _keyset.page(
        TokenHold,
        _holds_sql.PAGES[wanted],
        owner_column="user_id",
        owner_id=user_id,
        limit=_args.page_limit(limit),
        boundary=before,
        field="before",
        entity="hold",
        owner=("users", "user"),
    )


@dataclass(frozen=True)
class HoldDiscrepancy:
    """A user whose holds do not add up.

    ``held_tokens`` is the cached ``users.held_tokens``, ``active_holds`` Σ
    its active holds, ``balance`` its booked balance (held tokens must not
    exceed it); ``broken_captures`` counts captured holds whose usage row is
    missing or bills another amount or user.
    """

    user_id: UUID
    held_tokens: int
    active_holds: int
    balance: int
    broken_captures: int


@translated
async def audit_holds() -> list[HoldDiscrepancy]:
    """Every user whose holds are inconsistent (see :class:`HoldDiscrepancy`); empty when
    they all add up. One read; cheap enough to run after every test.

    Raises:
        DatabaseUnavailable: the database is unreachable.
    """
    rows = await _db.read(_holds_sql.AUDIT)
    return [
        HoldDiscrepancy(
            user_id=row["user_id"],
            held_tokens=int(row["held_tokens"]),
            active_holds=int(row["active_holds"]),
            balance=int(row["balance"]),
            broken_captures=int(row["broken_captures"]),
        )
        for row in rows
    ]
